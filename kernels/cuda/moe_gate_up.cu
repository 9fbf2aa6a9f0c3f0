// Kernel body: decode-step gate + up + SwiGLU clamp + route weight, one
// (token, slot) pair per grid row.
//   inputs    x float32 [n_tok, D]; ids int32 [n_tok * K]; weights float32 [n_tok * K];
//             gate uint8 [E, F, gate_row_bytes]; up uint8 [E, F, up_row_bytes]; limit float32 [1]
//   outputs   mid float32 [n_tok * K, F]
//   template  QTG, QTU (gate/up types), F, D, K, E, NR (rows per warp)
//   launch    grid = (threads_per_block * ceil(F / rows_per_block), n_tok * K, 1),
//             rows_per_block = (threads_per_block / WARP) * NR (moe_decode_geometry).
// Block (bx, pair): the expert id is read here from ids[pair] (no host
// sync); warp v owns rows (bx * warps + v) * NR + r of both gate and up,
// dots them with the token's x, and lane 0 writes
// mid = silu(min(g, limit)) * clip(u, -limit, limit) * weights[pair].
// An id outside [0, E) yields mid = 0.
constexpr int RBG = mg_row_bytes<QTG>(D);
constexpr int RBU = mg_row_bytes<QTU>(D);
__shared__ uint64_t grid_s[256];
__shared__ uint8_t signs_s[128];
if (QTG == MG_IQ2_XXS || QTU == MG_IQ2_XXS) mg_stage_tables(grid_s, signs_s);
const MgTables tb{grid_s, signs_s};

const int lane = threadIdx.x % MG_WARP;
const int row0 = (blockIdx.x * (blockDim.x / MG_WARP) + threadIdx.x / MG_WARP) * NR;
const int pair = blockIdx.y;
const int e = ids[pair];
const bool valid = e >= 0 && e < E;
if (row0 >= F) return;  // a whole warp past the end; no barrier follows
float ag[1][NR], au[1][NR];
#pragma unroll
for (int r = 0; r < NR; ++r) ag[0][r] = au[0][r] = 0.0f;
if (valid) {
  const float* xt = x + size_t(pair / K) * D;
  mg_warp_dot<QTG, NR, 1>(gate + size_t(e) * F * RBG, RBG, row0, F, xt, D, 1, D / 32, lane, tb, ag);
  mg_warp_dot<QTU, NR, 1>(up + size_t(e) * F * RBU, RBU, row0, F, xt, D, 1, D / 32, lane, tb, au);
}
const float lim = limit[0], rw = weights[pair];
#pragma unroll
for (int r = 0; r < NR; ++r) {
  const float g = mg_warp_sum(ag[0][r]), u = mg_warp_sum(au[0][r]);
  if (lane == 0 && row0 + r < F) mid[size_t(pair) * F + row0 + r] = valid ? mg_swiglu(g, u, lim, rw) : 0.0f;
}

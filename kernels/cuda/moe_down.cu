// Kernel body: decode-step down projection summed over a token's K experts.
//   inputs    mid float32 [n_tok * K, F]; ids int32 [n_tok * K]; down uint8 [E, D, row_bytes]
//   outputs   y float32 [n_tok, D]
//   template  QT, D, F, K, E, NR (rows per warp)
//   launch    grid = (threads_per_block * ceil(D / rows_per_block), n_tok, 1)
//             (moe_decode_geometry with D rows and n_tok grid rows).
// Warp v of block (bx, t) owns output rows (bx * warps + v) * NR + r and
// loops over the K slots inside: each slot's expert rows are dotted with
// that slot's mid row into the same accumulators, so y is written once,
// with no atomics. (The route weight is already in mid.)
constexpr int RB = mg_row_bytes<QT>(F);
__shared__ uint64_t grid_s[256];
__shared__ uint8_t signs_s[128];
if (QT == MG_IQ2_XXS) mg_stage_tables(grid_s, signs_s);
const MgTables tb{grid_s, signs_s};

const int lane = threadIdx.x % MG_WARP;
const int row0 = (blockIdx.x * (blockDim.x / MG_WARP) + threadIdx.x / MG_WARP) * NR;
const int t = blockIdx.y;
if (row0 >= D) return;  // a whole warp past the end; no barrier follows
float acc[1][NR];
#pragma unroll
for (int r = 0; r < NR; ++r) acc[0][r] = 0.0f;
for (int k = 0; k < K; ++k) {
  const int pair = t * K + k, e = ids[pair];
  if (e < 0 || e >= E) continue;  // uniform over the block
  mg_warp_dot<QT, NR, 1>(down + size_t(e) * D * RB, RB, row0, D, mid + size_t(pair) * F, F, 1, F / 32,
                         lane, tb, acc);
}
#pragma unroll
for (int r = 0; r < NR; ++r) {
  const float v = mg_warp_sum(acc[0][r]);
  if (lane == 0 && row0 + r < D) y[size_t(t) * D + row0 + r] = v;
}

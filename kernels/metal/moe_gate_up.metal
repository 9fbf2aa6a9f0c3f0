// Kernel body: decode-step gate + up + SwiGLU clamp + route weight, one
// (token, slot) pair per grid row.
//   inputs    x float32 [n_tok, D]; ids int32 [n_tok, K]; weights float32 [n_tok, K];
//             gate uint8 [E, F, gate_row_bytes]; up uint8 [E, F, up_row_bytes]; limit float32 0-d
//   outputs   mid float32 [n_tok, K, F]
//   template  QTG, QTU (gate / up types), F, D (a multiple of 32), K, E, NR (rows per simdgroup)
//   launch    threadgroup = SG simdgroups of 32;
//             grid = (32 * SG * ceil(F / (SG * NR)), n_tok * K, 1) (decode_geometry).
// Threadgroup (bx, pair): the expert is read here from ids[pair] (no host
// sync). Simdgroup v owns rows (bx * SG + v) * NR + r of both gate and up.
// Each lane walks chunks c = lane, lane + 32, ...: it loads the token's 32
// activations of chunk c once and dots them with the chunk of all 2 * NR
// rows. simd_sum reduces, and lane 0 writes
// mid = silu(min(g, limit)) * clip(u, -limit, limit) * weights[pair].
// An id outside [0, E) yields mid = 0.
constexpr int RBG = mg_row_bytes(QTG, D);
constexpr int RBU = mg_row_bytes(QTU, D);
constexpr bool TABLES = mg_uses_tables(QTG, QTU);
threadgroup uint grid_tg[mg_grid_words(TABLES)];
threadgroup uint8_t signs_tg[mg_sign_bytes(TABLES)];
if (TABLES) mg_stage_tables(grid_tg, signs_tg, thread_index_in_threadgroup, threads_per_threadgroup.x);

const uint lane = thread_index_in_simdgroup;
const int row0 = (int(threadgroup_position_in_grid.x) * int(simdgroups_per_threadgroup)
                  + int(simdgroup_index_in_threadgroup)) * NR;
const int pair = int(threadgroup_position_in_grid.y);  // = token * K + slot
if (row0 >= F) return;  // a whole simdgroup past the end; no barrier follows
const int e = ids[pair];
const bool valid = e >= 0 && e < E;
float ag[NR] = {}, au[NR] = {};
if (valid) {  // uniform over the threadgroup
  const device float* xt = x + ulong(pair / K) * D;
  const device uint8_t* gr[NR];
  const device uint8_t* ur[NR];
  for (int r = 0; r < NR; ++r) {
    const ulong row = ulong(e) * F + min(row0 + r, F - 1);  // rows past F: recomputed, not written
    gr[r] = gate + row * RBG;
    ur[r] = up + row * RBU;
  }
  for (int c = int(lane); c < D / 32; c += MG_SIMD) {
    float4 xv[8];  // activations 32c .. 32c+31, shared by the 2 * NR rows
    const device float4* xp = (const device float4*)(xt + 32 * c);
    for (int i = 0; i < 8; ++i) xv[i] = xp[i];
    MgChunk<QTG> cg[NR];
    MgChunk<QTU> cu[NR];
    for (int r = 0; r < NR; ++r) {
      cg[r].load(gr[r], c);
      cu[r].load(ur[r], c);
    }
    for (int s = 0; s < 4; ++s) {  // values 8s .. 8s+7 of the chunk
      for (int r = 0; r < NR; ++r) {
        const MgF8 vg = cg[r].get8(s, grid_tg, signs_tg);
        const MgF8 vu = cu[r].get8(s, grid_tg, signs_tg);
        ag[r] += dot(vg.lo, xv[2 * s]) + dot(vg.hi, xv[2 * s + 1]);
        au[r] += dot(vu.lo, xv[2 * s]) + dot(vu.hi, xv[2 * s + 1]);
      }
    }
  }
}
const float lim = limit, rw = weights[pair];
for (int r = 0; r < NR; ++r) {
  const float g = simd_sum(ag[r]), u = simd_sum(au[r]);
  if (lane == 0 && row0 + r < F) mid[ulong(pair) * F + row0 + r] = valid ? mg_swiglu(g, u, lim, rw) : 0.0f;
}

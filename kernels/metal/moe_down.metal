// Kernel body: decode-step down projection summed over each token's K experts.
//   inputs    mid float32 [n_tok, K, F]; ids int32 [n_tok, K]; down uint8 [E, D, row_bytes]
//   outputs   y float32 [n_tok, D]
//   template  QT, D, F (a multiple of 32), K, E, NR (rows per simdgroup)
//   launch    threadgroup = SG simdgroups of 32;
//             grid = (32 * SG * ceil(D / (SG * NR)), n_tok, 1) (decode_geometry).
// Simdgroup v of threadgroup (bx, t) owns output rows (bx * SG + v) * NR + r
// and loops over the token's K slots inside the kernel: each slot's expert
// rows are dotted with that slot's mid row into the same accumulators, so y
// is written once, with no atomics and no separate reduction. The route
// weight is already in mid. Slots with an id outside [0, E) add nothing.
constexpr int RB = mg_row_bytes(QT, F);
constexpr bool TABLES = mg_uses_tables(QT);
threadgroup uint grid_tg[mg_grid_words(TABLES)];
threadgroup uint8_t signs_tg[mg_sign_bytes(TABLES)];
if (TABLES) mg_stage_tables(grid_tg, signs_tg, thread_index_in_threadgroup, threads_per_threadgroup.x);

const uint lane = thread_index_in_simdgroup;
const int row0 = (int(threadgroup_position_in_grid.x) * int(simdgroups_per_threadgroup)
                  + int(simdgroup_index_in_threadgroup)) * NR;
const int t = int(threadgroup_position_in_grid.y);
if (row0 >= D) return;  // a whole simdgroup past the end; no barrier follows
float acc[1][NR] = {};
for (int k = 0; k < K; ++k) {
  const int pair = t * K + k, e = ids[pair];
  if (e < 0 || e >= E) continue;  // uniform over the threadgroup
  mg_simd_dot<QT, NR, 1>(down + ulong(e) * D * RB, RB, row0, D, mid + ulong(pair) * F, F, 1, F / 32, lane,
                         grid_tg, signs_tg, acc);
}
for (int r = 0; r < NR; ++r) {
  const float v = simd_sum(acc[0][r]);
  if (lane == 0 && row0 + r < D) y[ulong(t) * D + row0 + r] = v;
}

// Kernel body: y = x @ W.T for a few tokens, a simdgroup per NR rows; by row
// groups when G > 1 (V4's grouped attention output): group g, rows
// g * ROWS / G .. (g + 1) * ROWS / G - 1, multiplies x's g-th COLS values.
//   inputs    w uint8 [ROWS, row_bytes]; x float32 [n_tok, G * COLS]; n_tok int32 0-d
//   outputs   y float32 [n_tok, ROWS]
//   template  QT, ROWS, COLS (a multiple of 32), NR (rows per simdgroup),
//             NT (a power of two >= n_tok: the accumulators kept per lane),
//             G (row groups; when G > 1, NR divides ROWS / G: a simdgroup never spans two)
//   launch    threadgroup = SG simdgroups of 32; grid = (32 * SG * ceil(ROWS / (SG * NR)), 1, 1)
//             (decode_geometry in kernels/metal.py).
// Simdgroup v of threadgroup b owns rows (b * SG + v) * NR + r, r < NR. Its
// lanes split each row's chunks; a chunk is decoded once and dotted with all
// n_tok activation rows; simd_sum adds the lanes up and lane 0 writes.
constexpr int ROW_BYTES = mg_row_bytes(QT, COLS);
constexpr bool TABLES = mg_uses_tables(QT);
threadgroup uint grid_tg[mg_grid_words(TABLES)];
threadgroup uint8_t signs_tg[mg_sign_bytes(TABLES)];
if (TABLES) mg_stage_tables(grid_tg, signs_tg, thread_index_in_threadgroup, threads_per_threadgroup.x);

const uint lane = thread_index_in_simdgroup;
const int row0 = (int(threadgroup_position_in_grid.x) * int(simdgroups_per_threadgroup)
                  + int(simdgroup_index_in_threadgroup)) * NR;
if (row0 >= ROWS) return;  // a whole simdgroup past the end; no barrier follows
const int tokens = int(n_tok);
const int group = row0 / (ROWS / G);  // G = 1: 0 (row0 < ROWS)
float acc[NT][NR] = {};
mg_simd_dot<QT, NR, NT>(w, ROW_BYTES, row0, ROWS, x + group * COLS, G * COLS, tokens, COLS / 32, lane, grid_tg,
                        signs_tg, acc);
for (int t = 0; t < NT; ++t) {
  if (t < tokens) {  // uniform over the simdgroup
    for (int r = 0; r < NR; ++r) {
      const float v = simd_sum(acc[t][r]);
      if (lane == 0 && row0 + r < ROWS) y[ulong(t) * ROWS + row0 + r] = v;
    }
  }
}

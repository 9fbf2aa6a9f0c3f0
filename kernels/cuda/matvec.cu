// Kernel body: y = x @ W.T for a few tokens (warp per NR rows); by row groups
// when G > 1 (V4's grouped attention output): group g, rows g * ROWS / G ..
// (g + 1) * ROWS / G - 1, multiplies x's g-th COLS values.
//   inputs    w uint8 [ROWS, row_bytes]; x float32 [n_tok, G * COLS]; params int32 [1] = {n_tok}
//   outputs   y float32 [n_tok, ROWS]
//   template  QT, ROWS, COLS, NR (rows per warp), NT (most tokens, n_tok <= NT),
//             G (row groups; when G > 1, NR divides ROWS / G: a warp never spans two)
//   launch    grid.x = threads_per_block * ceil(ROWS / rows_per_block) with
//             rows_per_block = (threads_per_block / WARP) * NR (matvec_geometry).
// Warp v of block b owns rows (b * warps_per_block + v) * NR + r, r < NR. Its
// lanes split the row's chunks; each chunk is decoded once and dotted with
// all n_tok activation rows; lane 0 writes the warp-reduced sums.
constexpr int ROW_BYTES = mg_row_bytes<QT>(COLS);
__shared__ uint64_t grid_s[256];
__shared__ uint8_t signs_s[128];
if (QT == MG_IQ2_XXS) mg_stage_tables(grid_s, signs_s);
const MgTables tb{grid_s, signs_s};

const int lane = threadIdx.x % MG_WARP;
const int row0 = (blockIdx.x * (blockDim.x / MG_WARP) + threadIdx.x / MG_WARP) * NR;
const int n_tok = params[0];
float acc[NT][NR];
#pragma unroll
for (int t = 0; t < NT; ++t)
#pragma unroll
  for (int r = 0; r < NR; ++r) acc[t][r] = 0.0f;
if (row0 < ROWS)  // uniform per warp
  mg_warp_dot<QT, NR, NT>(w, ROW_BYTES, row0, ROWS, x + (row0 / (ROWS / G)) * COLS, G * COLS, n_tok, COLS / 32,
                          lane, tb, acc);
#pragma unroll
for (int t = 0; t < NT; ++t) {
  if (t < n_tok) {
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const float v = mg_warp_sum(acc[t][r]);
      if (lane == 0 && row0 + r < ROWS) y[size_t(t) * ROWS + row0 + r] = v;
    }
  }
}

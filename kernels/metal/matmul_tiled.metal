// Kernel body: y = x @ W.T for many tokens, a 64-row x BN-token tile per threadgroup.
//   inputs    w uint8 [ROWS, row_bytes]; x float32 [n_tok, COLS]; n_tok int32 0-d
//   outputs   y float32 [n_tok, ROWS]
//   template  QT, ROWS, COLS (a multiple of 32), BN (tokens per tile: 16, 32, 48 or 64)
//   launch    threadgroup 256; grid = (256 * ceil(ROWS / 64), ceil(n_tok / BN), 1)
//             (tiled_geometry). Threadgroup (bx, by): rows 64 bx .., tokens BN by ..
// Per 32-column step the threadgroup decodes its 64 rows' chunk once into
// threadgroup memory (ws), stages its BN token rows beside it (xs), and each
// thread accumulates 4 rows x BN/16 tokens (common.metal).
constexpr int ROW_BYTES = mg_row_bytes(QT, COLS);
constexpr bool TABLES = mg_uses_tables(QT);
threadgroup uint grid_tg[mg_grid_words(TABLES)];
threadgroup uint8_t signs_tg[mg_sign_bytes(TABLES)];
threadgroup float ws[32 * MG_TILE_LD];
threadgroup float xs[32 * MG_TILE_LD];
threadgroup int xrow[BN];
const uint tid = thread_index_in_threadgroup;
if (TABLES) mg_stage_tables(grid_tg, signs_tg, tid, MG_TILE_THREADS);

const int tokens = int(n_tok);
const int row0 = int(threadgroup_position_in_grid.x) * MG_TILE_ROWS;
const int t0 = int(threadgroup_position_in_grid.y) * BN;
for (int j = int(tid); j < BN; j += MG_TILE_THREADS) xrow[j] = t0 + j < tokens ? t0 + j : -1;
float acc[4][BN / 16] = {};
for (int c = 0; c < COLS / 32; ++c) {
  threadgroup_barrier(mem_flags::mem_threadgroup);  // xrow is ready; the last step's tiles are consumed
  mg_tile_decode<QT>(w, ROW_BYTES, row0, ROWS, c, ws, tid, grid_tg, signs_tg);
  mg_tile_stage_x<BN>(x, COLS, xrow, c, xs, tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  mg_tile_fma<BN>(ws, xs, tid, acc);
}
const int ty = int(tid >> 4), tx = int(tid & 15u);
for (int i = 0; i < 4; ++i) {
  for (int j = 0; j < BN / 16; ++j) {
    const int row = row0 + ty + 16 * i, t = t0 + tx + 16 * j;
    if (row < ROWS && t < tokens) y[ulong(t) * ROWS + row] = acc[i][j];
  }
}

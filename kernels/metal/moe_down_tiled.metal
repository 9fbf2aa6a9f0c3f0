// Kernel body: prefill down projection for the pairs grouped by expert; each
// pair's product goes to its own output row (the slots are summed afterwards).
//   inputs    mid float32 [P, F]; order, tile_end, group_end int32 (as in
//             moe_gate_up_tiled); down uint8 [E, D, row_bytes]
//   outputs   y_pair float32 [P, D] (row = pair = token * K + slot)
//   template  QT, D, F (a multiple of 32), K, E, BN
//   launch    threadgroup 256; grid = (256 * max_tiles, ceil(D / 64), 1) (moe_tiled_geometry).
// Every pair sits in exactly one tile, so every output element is written
// exactly once (zeros for ids outside [0, E)): no atomics, and the sum over
// a token's K slots (an MLX sum in kernels/metal.py) is deterministic.
constexpr int RB = mg_row_bytes(QT, F);
constexpr bool TABLES = mg_uses_tables(QT);
threadgroup uint grid_tg[mg_grid_words(TABLES)];
threadgroup uint8_t signs_tg[mg_sign_bytes(TABLES)];
threadgroup float ws[32 * MG_TILE_LD];
threadgroup float xs[32 * MG_TILE_LD];
threadgroup int xrow[BN];  // pair (= row of mid) of each tile column (-1: none)
const uint tid = thread_index_in_threadgroup;
if (TABLES) mg_stage_tables(grid_tg, signs_tg, tid, MG_TILE_THREADS);

int g, p0, p1;
if (!mg_group_tile(tile_end, group_end, E + 1, int(threadgroup_position_in_grid.x), BN, g, p0, p1)) return;
const bool valid = g < E;  // the same for the whole threadgroup
const int row0 = int(threadgroup_position_in_grid.y) * MG_TILE_ROWS;
for (int j = int(tid); j < BN; j += MG_TILE_THREADS) xrow[j] = p0 + j < p1 ? int(order[p0 + j]) : -1;
threadgroup_barrier(mem_flags::mem_threadgroup);  // xrow is ready
float acc[4][BN / 16] = {};
if (valid) {
  const device uint8_t* wd = down + ulong(g) * D * RB;
  for (int c = 0; c < F / 32; ++c) {
    if (c > 0) threadgroup_barrier(mem_flags::mem_threadgroup);  // the last step's tiles are consumed
    mg_tile_decode<QT>(wd, RB, row0, D, c, ws, tid, grid_tg, signs_tg);
    mg_tile_stage_x<BN>(mid, F, xrow, c, xs, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mg_tile_fma<BN>(ws, xs, tid, acc);
  }
}
const int ty = int(tid >> 4), tx = int(tid & 15u);
for (int i = 0; i < 4; ++i) {
  for (int j = 0; j < BN / 16; ++j) {
    const int row = row0 + ty + 16 * i, pair = xrow[tx + 16 * j];
    if (row < D && pair >= 0) y_pair[ulong(pair) * D + row] = acc[i][j];
  }
}

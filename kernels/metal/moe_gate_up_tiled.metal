// Kernel body: prefill gate + up + SwiGLU for the (token, slot) pairs grouped
// by expert; a tile of <= BN pairs of one expert per threadgroup column.
//   inputs    x float32 [n_tok, D]; order int32 [P] (pair index token * K + slot
//             at each sorted position, sorted by expert); tile_end, group_end
//             int32 [E + 1] (the grouping, see mg_group_tile); weights float32 [P];
//             gate uint8 [E, F, gate_row_bytes]; up uint8 [E, F, up_row_bytes];
//             limit float32 0-d
//   outputs   mid float32 [P, F] (row = pair)
//   template  QTG, QTU, F, D (a multiple of 32), K, E, BN (pairs per tile: 16, 32, 48 or 64)
//   launch    threadgroup 256; grid = (256 * max_tiles, ceil(F / 64), 1)
//             (moe_tiled_geometry). Threadgroup (b, by) finds tile b (past
//             the last tile: exits at once) and computes rows 64 by .. of
//             gate and up for the tile's pairs: each weight chunk is decoded
//             once for all of them.
// Pairs whose id is outside [0, E) form the last group and get mid = 0.
constexpr int RBG = mg_row_bytes(QTG, D);
constexpr int RBU = mg_row_bytes(QTU, D);
constexpr bool TABLES = mg_uses_tables(QTG, QTU);
threadgroup uint grid_tg[mg_grid_words(TABLES)];
threadgroup uint8_t signs_tg[mg_sign_bytes(TABLES)];
threadgroup float wg_s[32 * MG_TILE_LD];
threadgroup float wu_s[32 * MG_TILE_LD];
threadgroup float xs[32 * MG_TILE_LD];
threadgroup int xrow[BN];  // token of each tile column (-1: none)
threadgroup int prow[BN];  // pair of each tile column (-1: none)
const uint tid = thread_index_in_threadgroup;
if (TABLES) mg_stage_tables(grid_tg, signs_tg, tid, MG_TILE_THREADS);

int g, p0, p1;
if (!mg_group_tile(tile_end, group_end, E + 1, int(threadgroup_position_in_grid.x), BN, g, p0, p1)) return;
const bool valid = g < E;  // the same for the whole threadgroup
const int row0 = int(threadgroup_position_in_grid.y) * MG_TILE_ROWS;
for (int j = int(tid); j < BN; j += MG_TILE_THREADS) {
  const int pair = p0 + j < p1 ? int(order[p0 + j]) : -1;
  prow[j] = pair;
  xrow[j] = pair >= 0 && valid ? pair / K : -1;
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // prow / xrow are ready
float ag[4][BN / 16] = {}, au[4][BN / 16] = {};
if (valid) {
  const device uint8_t* wg = gate + ulong(g) * F * RBG;
  const device uint8_t* wu = up + ulong(g) * F * RBU;
  for (int c = 0; c < D / 32; ++c) {
    if (c > 0) threadgroup_barrier(mem_flags::mem_threadgroup);  // the last step's tiles are consumed
    mg_tile_decode<QTG>(wg, RBG, row0, F, c, wg_s, tid, grid_tg, signs_tg);
    mg_tile_decode<QTU>(wu, RBU, row0, F, c, wu_s, tid, grid_tg, signs_tg);
    mg_tile_stage_x<BN>(x, D, xrow, c, xs, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mg_tile_fma<BN>(wg_s, xs, tid, ag);
    mg_tile_fma<BN>(wu_s, xs, tid, au);
  }
}
const float lim = limit;
const int ty = int(tid >> 4), tx = int(tid & 15u);
for (int i = 0; i < 4; ++i) {
  for (int j = 0; j < BN / 16; ++j) {
    const int row = row0 + ty + 16 * i, pair = prow[tx + 16 * j];
    if (row < F && pair >= 0) {
      mid[ulong(pair) * F + row] = valid ? mg_swiglu(ag[i][j], au[i][j], lim, weights[pair]) : 0.0f;
    }
  }
}

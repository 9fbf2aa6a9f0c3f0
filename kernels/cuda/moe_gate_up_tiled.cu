// Kernel body: prefill gate + up + SwiGLU for (token, slot) pairs grouped by
// expert, one tile of <= BN pairs of one expert per block column.
//   inputs    x float32 [n_tok, D]; order int32 [P] (pairs sorted by expert);
//             sorted_ids int32 [P]; tile_id int32 [P] (tile of each sorted
//             position, non-decreasing); weights float32 [P];
//             gate uint8 [E, F, gate_row_bytes]; up uint8 [E, F, up_row_bytes];
//             limit float32 [1]; params int32 [1] = {P}
//   outputs   mid float32 [P, F] (row = pair = token * K + slot)
//   template  QTG, QTU, F, D, K, E, BN (pairs per tile, multiple of 16, <= 64)
//   launch    threadgroup 256; grid = (256 * max_tiles, ceil(F / 64), 1)
//             (moe_tiled_geometry). Block (b, by) finds tile b's first sorted
//             position by binary search (past the last tile: exits) and
//             computes rows 64 by.. of gate and up for the tile's pairs: each
//             weight chunk is decoded once for all of them.
constexpr int RBG = mg_row_bytes<QTG>(D);
constexpr int RBU = mg_row_bytes<QTU>(D);
__shared__ uint64_t grid_s[256];
__shared__ uint8_t signs_s[128];
__shared__ float wg_s[32 * MG_TILE_LD];
__shared__ float wu_s[32 * MG_TILE_LD];
__shared__ float xs[32 * MG_TILE_LD];
__shared__ int xrow[BN], prow[BN];
if (QTG == MG_IQ2_XXS || QTU == MG_IQ2_XXS) mg_stage_tables(grid_s, signs_s);
const MgTables tb{grid_s, signs_s};

const int n_pairs = params[0];
const int b = blockIdx.x, row0 = blockIdx.y * MG_TILE_ROWS;
const int p0 = mg_tile_first(tile_id, n_pairs, b);
if (p0 >= n_pairs || tile_id[p0] != b) return;  // uniform over the block
const int e_raw = sorted_ids[p0];
const bool valid = e_raw >= 0 && e_raw < E;
const int e = valid ? e_raw : 0;  // an invalid expert: zero activations, mid = 0
for (int j = threadIdx.x; j < BN; j += MG_TILE_THREADS) {
  const int p = p0 + j;
  const int pair = p < n_pairs && tile_id[p] == b ? order[p] : -1;
  prow[j] = pair;
  xrow[j] = pair >= 0 && valid ? pair / K : -1;
}
const uint8_t* wg = gate + size_t(e) * F * RBG;
const uint8_t* wu = up + size_t(e) * F * RBU;
float ag[4][BN / 16] = {}, au[4][BN / 16] = {};
for (int c = 0; c < D / 32; ++c) {
  __syncthreads();
  mg_tile_decode<QTG>(wg, RBG, row0, F, c, wg_s, tb);
  mg_tile_decode<QTU>(wu, RBU, row0, F, c, wu_s, tb);
  mg_tile_stage_x<BN>(x, D, xrow, c, xs);
  __syncthreads();
  mg_tile_fma<BN>(wg_s, xs, ag);
  mg_tile_fma<BN>(wu_s, xs, au);
}
const float lim = limit[0];
const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
for (int i = 0; i < 4; ++i)
#pragma unroll
  for (int j = 0; j < BN / 16; ++j) {
    const int row = row0 + ty + 16 * i, pair = prow[tx + 16 * j];
    if (row < F && pair >= 0) mid[size_t(pair) * F + row] = mg_swiglu(ag[i][j], au[i][j], lim, weights[pair]);
  }

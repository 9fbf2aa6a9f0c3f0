// Kernel body: prefill down projection for pairs grouped by expert; each
// pair's result is added into its token's output row.
//   inputs    mid float32 [P, F]; order, sorted_ids, tile_id int32 [P] (as in
//             moe_gate_up_tiled); down uint8 [E, D, row_bytes]; params int32 [1] = {P}
//   outputs   y float32 [n_tok, D], zero-filled by the launch (init_value=0)
//   template  QT, D, F, K, E, BN
//   launch    threadgroup 256; grid = (256 * max_tiles, ceil(D / 64), 1).
// A token's K pairs usually sit in different tiles (different experts), so
// the per-token sum is an atomicAdd; its order varies from run to run at
// the last bit of f32.
constexpr int RB = mg_row_bytes<QT>(F);
__shared__ uint64_t grid_s[256];
__shared__ uint8_t signs_s[128];
__shared__ float ws[32 * MG_TILE_LD];
__shared__ float xs[32 * MG_TILE_LD];
__shared__ int xrow[BN];
if (QT == MG_IQ2_XXS) mg_stage_tables(grid_s, signs_s);
const MgTables tb{grid_s, signs_s};

const int n_pairs = params[0];
const int b = blockIdx.x, row0 = blockIdx.y * MG_TILE_ROWS;
const int p0 = mg_tile_first(tile_id, n_pairs, b);
if (p0 >= n_pairs || tile_id[p0] != b) return;  // uniform over the block
const int e = sorted_ids[p0];
if (e < 0 || e >= E) return;  // an invalid expert adds nothing
for (int j = threadIdx.x; j < BN; j += MG_TILE_THREADS) {
  const int p = p0 + j;
  xrow[j] = p < n_pairs && tile_id[p] == b ? order[p] : -1;  // the pair is mid's row
}
const uint8_t* wd = down + size_t(e) * D * RB;
float acc[4][BN / 16] = {};
for (int c = 0; c < F / 32; ++c) {
  __syncthreads();
  mg_tile_decode<QT>(wd, RB, row0, D, c, ws, tb);
  mg_tile_stage_x<BN>(mid, F, xrow, c, xs);
  __syncthreads();
  mg_tile_fma<BN>(ws, xs, acc);
}
const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
for (int i = 0; i < 4; ++i)
#pragma unroll
  for (int j = 0; j < BN / 16; ++j) {
    const int row = row0 + ty + 16 * i, pair = xrow[tx + 16 * j];
    if (row < D && pair >= 0) atomicAdd(y + size_t(pair / K) * D + row, acc[i][j]);
  }

// Kernel body: y = x @ W.T for many tokens, 64 rows x BN tokens per block.
//   inputs    w uint8 [ROWS, row_bytes]; x float32 [n_tok, COLS]; params int32 [1] = {n_tok}
//   outputs   y float32 [n_tok, ROWS]
//   template  QT, ROWS, COLS, BN (tokens per tile, a multiple of 16)
//   launch    threadgroup 256; grid = (256 * ceil(ROWS / 64), ceil(n_tok / BN), 1)
//             (tiled_geometry). Block (bx, by): rows 64 bx.., tokens BN by..
// Per 32-column step the block decodes its 64 rows' chunk once into shared
// memory, stages BN token rows beside it, and each thread accumulates 4 rows
// x BN/16 tokens (see common.cuh).
constexpr int ROW_BYTES = mg_row_bytes<QT>(COLS);
__shared__ uint64_t grid_s[256];
__shared__ uint8_t signs_s[128];
__shared__ float ws[32 * MG_TILE_LD];
__shared__ float xs[32 * MG_TILE_LD];
__shared__ int xrow[BN];
if (QT == MG_IQ2_XXS) mg_stage_tables(grid_s, signs_s);
const MgTables tb{grid_s, signs_s};

const int n_tok = params[0];
const int row0 = blockIdx.x * MG_TILE_ROWS, t0 = blockIdx.y * BN;
for (int j = threadIdx.x; j < BN; j += MG_TILE_THREADS) xrow[j] = t0 + j < n_tok ? t0 + j : -1;
float acc[4][BN / 16] = {};
for (int c = 0; c < COLS / 32; ++c) {
  __syncthreads();  // xrow is ready; the previous step's tiles are consumed
  mg_tile_decode<QT>(w, ROW_BYTES, row0, ROWS, c, ws, tb);
  mg_tile_stage_x<BN>(x, COLS, xrow, c, xs);
  __syncthreads();
  mg_tile_fma<BN>(ws, xs, acc);
}
const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
for (int i = 0; i < 4; ++i)
#pragma unroll
  for (int j = 0; j < BN / 16; ++j) {
    const int row = row0 + ty + 16 * i, t = t0 + tx + 16 * j;
    if (row < ROWS && t < n_tok) y[size_t(t) * ROWS + row] = acc[i][j];
  }

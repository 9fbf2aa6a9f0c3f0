// Kernel body: dequantize whole rows of selected experts to f32.
//   inputs    w uint8 [E, ROWS, row_bytes]; sel int32 [n_sel] expert ids; params int32 [1] = {n_sel}
//   outputs   out float32 [n_sel, ROWS, COLS]
//   template  QT (GGML type id), ROWS, COLS (multiple of 32)
//   launch    1-D, one thread per 32-value chunk: grid.x = n_sel * ROWS * COLS / 32
//             rounded up to the block (dequantize_geometry in kernels/cuda.py).
// Thread g decodes chunk g % (COLS/32) of output row g / (COLS/32) and
// writes its 32 floats; bit-exact with kernels/reference.py.
constexpr int CHUNKS = COLS / 32;
constexpr int ROW_BYTES = mg_row_bytes<QT>(COLS);
__shared__ uint64_t grid_s[256];
__shared__ uint8_t signs_s[128];
if (QT == MG_IQ2_XXS) mg_stage_tables(grid_s, signs_s);
const MgTables tb{grid_s, signs_s};

const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
const long long total = (long long)params[0] * ROWS * CHUNKS;
if (g >= total) return;
const int c = int(g % CHUNKS);
const long long out_row = g / CHUNKS;  // = selected * ROWS + row
const int row = int(out_row % ROWS);
const long long e = sel[out_row / ROWS];
MgChunk<QT> ch;
ch.load(w + (size_t(e) * ROWS + row) * ROW_BYTES, c);
float4* o = reinterpret_cast<float4*>(out + size_t(out_row) * COLS + 32 * c);
#pragma unroll
for (int s = 0; s < 4; ++s) {
  float v[8];
  ch.get8(s, v, tb);
  o[2 * s] = make_float4(v[0], v[1], v[2], v[3]);
  o[2 * s + 1] = make_float4(v[4], v[5], v[6], v[7]);
}

// Kernel body: dequantize whole rows of selected experts (or rows) to f32.
//   inputs    w uint8 [E, ROWS, row_bytes]; sel int32 [n_sel] (experts to expand);
//             n_sel int32 0-d
//   outputs   out float32 [n_sel, ROWS, COLS]
//   template  QT (GGML type id), ROWS, COLS (a multiple of 32)
//   launch    1-D, one thread per 32-value chunk: grid.x = n_sel * ROWS * COLS / 32
//             rounded up to the threadgroup (dequantize_geometry in kernels/metal.py).
// Thread g decodes chunk g % (COLS/32) of output row g / (COLS/32) and writes
// its 32 floats; bit-exact with kernels/reference.py.
constexpr int CHUNKS = COLS / 32;
constexpr int ROW_BYTES = mg_row_bytes(QT, COLS);
constexpr bool TABLES = mg_uses_tables(QT);
threadgroup uint grid_tg[mg_grid_words(TABLES)];
threadgroup uint8_t signs_tg[mg_sign_bytes(TABLES)];
if (TABLES) mg_stage_tables(grid_tg, signs_tg, thread_index_in_threadgroup, threads_per_threadgroup.x);

const ulong g = thread_position_in_grid.x;
if (g >= ulong(n_sel) * ROWS * CHUNKS) return;  // the last threadgroup's spare threads
const int c = int(g % CHUNKS);
const ulong out_row = g / CHUNKS;  // = selected index * ROWS + row
const int row = int(out_row % ROWS);
const int e = sel[out_row / ROWS];
MgChunk<QT> ch;
ch.load(w + (ulong(e) * ROWS + row) * ROW_BYTES, c);
device float4* o = (device float4*)(out + out_row * COLS + 32 * c);
for (int s = 0; s < 4; ++s) {
  const MgF8 v = ch.get8(s, grid_tg, signs_tg);
  o[2 * s] = v.lo;
  o[2 * s + 1] = v.hi;
}

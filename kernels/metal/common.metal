// common.metal: the inner loops the product kernels share (after blocks.metal).
//
// mg_simd_dot   one simdgroup, NR weight rows, up to NT activation rows: the 32
//               lanes split the row's 32-value chunks (lane, lane + 32, ...);
//               each chunk is decoded once and dotted with every activation
//               row. Sums stay per lane; the caller reduces them with
//               simd_sum. For few tokens (matvec, MoE decode).
// mg_tile_*     a 256-thread threadgroup computes a 64-row x BN-column tile
//               of W @ X^T in steps of one 32-value chunk: the chunk of the 64
//               rows is decoded once into threadgroup memory (each thread one
//               8-value piece), BN activation rows are staged beside it, and
//               each thread accumulates 4 rows x BN/16 columns. For many
//               tokens (dense matmul, grouped MoE prefill).
// Activations, decoded weights and sums are f32 throughout.
//
// Pointers to arrays of fewer than 8 elements arrive in the constant address
// space (MLX's rule), so index arrays (ids, sel, order, ...) are read in the
// kernel bodies or through templates (mg_group_tile), never passed as
// `device` pointers. Weights, x and mid always have 32 or more elements.

#define MG_SIMD 32          // lanes per simdgroup (every Apple GPU)
#define MG_TILE_THREADS 256 // threads of a tile kernel's threadgroup
#define MG_TILE_ROWS 64     // weight rows per tile
#define MG_TILE_LD 65       // row pitch of the threadgroup tiles (padded: fewer bank conflicts)

// acc[t][r] += this lane's share of dot(W[row0 + r], x[t]) for t < n_tok.
// Rows past `rows` are read as row rows-1 (the caller drops them), so every
// lane runs the same loop and the later simd_sum sees all 32 lanes.
template <int QT, int NR, int NT>
inline void mg_simd_dot(const device uint8_t* w, int row_bytes, int row0, int rows,
                        const device float* x, int x_stride, int n_tok, int n_chunks, uint lane,
                        const threadgroup uint* grid, const threadgroup uint8_t* signs,
                        thread float (&acc)[NT][NR]) {
  const device uint8_t* rp[NR];
  for (int r = 0; r < NR; ++r) rp[r] = w + ulong(min(row0 + r, rows - 1)) * ulong(row_bytes);
  for (int c = int(lane); c < n_chunks; c += MG_SIMD) {
    MgChunk<QT> ch[NR];
    for (int r = 0; r < NR; ++r) ch[r].load(rp[r], c);
    for (int s = 0; s < 4; ++s) {
      MgF8 v[NR];
      for (int r = 0; r < NR; ++r) v[r] = ch[r].get8(s, grid, signs);
      for (int t = 0; t < NT; ++t) {
        if (t < n_tok) {
          // values 32c + 8s .. 32c + 8s + 7 of activation row t
          const device float4* xp = (const device float4*)(x + ulong(t) * ulong(x_stride) + 32 * c + 8 * s);
          const float4 a = xp[0], b = xp[1];
          for (int r = 0; r < NR; ++r) acc[t][r] += dot(v[r].lo, a) + dot(v[r].hi, b);
        }
      }
    }
  }
}

// ---- tiles (threadgroup of MG_TILE_THREADS threads; tid = thread_index_in_threadgroup) ----

// Decode chunk c of weight rows row0 .. row0+63 into ws[k * MG_TILE_LD + m]
// (k = value in the chunk, m = row in the tile). Thread tid decodes row
// m = tid / 4, values 8s .. 8s+7 with s = tid % 4. Rows past `rows` are zeros.
template <int QT>
inline void mg_tile_decode(const device uint8_t* w, int row_bytes, int row0, int rows, int c,
                           threadgroup float* ws, uint tid,
                           const threadgroup uint* grid, const threadgroup uint8_t* signs) {
  const int m = int(tid >> 2), s = int(tid & 3u);
  MgF8 v = mg_f8(float4(0.0f), float4(0.0f));
  if (row0 + m < rows) {
    MgChunk<QT> ch;
    ch.load(w + ulong(row0 + m) * ulong(row_bytes), c);
    v = ch.get8(s, grid, signs);
  }
  for (int i = 0; i < 4; ++i) {
    ws[(8 * s + i) * MG_TILE_LD + m] = v.lo[i];
    ws[(8 * s + 4 + i) * MG_TILE_LD + m] = v.hi[i];
  }
}

// Stage values 32c .. 32c+31 of the BN activation rows xrow[j] (-1: none,
// zeros) into xs[k * MG_TILE_LD + j]. Work item i = (row j = i / 8, values
// 4q .. 4q+3 with q = i % 8), spread over the threads.
template <int BN>
inline void mg_tile_stage_x(const device float* x, int x_stride, const threadgroup int* xrow, int c,
                            threadgroup float* xs, uint tid) {
  static_assert(BN % 16 == 0 && BN <= MG_TILE_ROWS, "BN: a multiple of 16, at most 64");
  for (int i = int(tid); i < BN * 8; i += MG_TILE_THREADS) {
    const int j = i >> 3, q = i & 7;
    float4 v = float4(0.0f);
    if (xrow[j] >= 0) v = *((const device float4*)(x + ulong(xrow[j]) * ulong(x_stride) + 32 * c + 4 * q));
    for (int e = 0; e < 4; ++e) xs[(4 * q + e) * MG_TILE_LD + j] = v[e];
  }
}

// acc[i][j] += sum over k < 32 of ws[k][ty + 16i] * xs[k][tx + 16j], with
// ty = tid / 16 and tx = tid % 16: thread (ty, tx) owns tile rows ty + 16i
// (i < 4) and tile columns tx + 16j (j < BN/16).
template <int BN>
inline void mg_tile_fma(const threadgroup float* ws, const threadgroup float* xs, uint tid,
                        thread float (&acc)[4][BN / 16]) {
  const int ty = int(tid >> 4), tx = int(tid & 15u);
  for (int k = 0; k < 32; ++k) {
    float a[4], b[BN / 16];
    for (int i = 0; i < 4; ++i) a[i] = ws[k * MG_TILE_LD + ty + 16 * i];
    for (int j = 0; j < BN / 16; ++j) b[j] = xs[k * MG_TILE_LD + tx + 16 * j];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < BN / 16; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
  }
}

// ---- MoE ----

// The routed-expert activation: silu(min(g, limit)) * clip(u, -limit, limit) * weight.
inline float mg_swiglu(float g, float u, float limit, float weight) {
  g = min(g, limit);
  u = clamp(u, -limit, limit);
  return g / (1.0f + precise::exp(-g)) * u * weight;
}

// The expert grouping of the prefill kernels (moe_groups in kernels/metal.py):
// pairs sorted by expert, group g = expert g (g = n_groups - 1 collects
// invalid ids), group_end[g] = pairs in groups 0..g, tile_end[g] = tiles in
// groups 0..g with a group of n pairs cut into ceil(n / bn) tiles.
// Finds tile b's group and sorted positions [p0, p1); false when b is past
// the last tile. P is whatever pointer type MLX gives the index arrays.
template <typename P>
inline bool mg_group_tile(P tile_end, P group_end, int n_groups, int b, int bn,
                          thread int& g, thread int& p0, thread int& p1) {
  if (b >= int(tile_end[n_groups - 1])) return false;
  int lo = 0, hi = n_groups - 1;  // the first group whose tiles reach past b
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (int(tile_end[mid]) > b) hi = mid; else lo = mid + 1;
  }
  g = lo;
  const int first_tile = g > 0 ? int(tile_end[g - 1]) : 0;   // tiles before group g
  const int first_pair = g > 0 ? int(group_end[g - 1]) : 0;  // pairs before group g
  p0 = first_pair + (b - first_tile) * bn;
  p1 = min(p0 + bn, int(group_end[g]));
  return true;
}

// common.cuh: the two inner loops every product kernel is built from.
//
// mg_warp_dot  - one warp, NR weight rows, up to NT activation rows: the
//                lanes split the row's 32-value chunks (lane, lane + MG_WARP,
//                ...), each chunk is decoded once and dotted with every
//                activation row; partial sums stay per lane (reduce with
//                mg_warp_sum afterwards). Used for few tokens (matvec).
// mg_tile_*    - a 256-thread block computes a 64-row x BN-column tile of
//                W @ X^T in steps of one 32-value chunk: the chunk of 64 rows
//                is decoded once into shared memory (each thread one 8-value
//                piece), BN activation rows are staged beside it, and each
//                thread accumulates 4 rows x BN/16 columns. Used for many
//                tokens (dense matmul, grouped MoE prefill).
// Activations and accumulators are f32 throughout.

// mg_warp_dot: acc[t][r] += lane's share of dot(W[row0 + r], x[t]).
// Rows past `rows` are read as row rows-1 (the caller drops them), so all
// lanes stay busy and in step for the later shuffles.
template <int QT, int NR, int NT>
__device__ __forceinline__ void mg_warp_dot(
    const uint8_t* w, int row_bytes, int row0, int rows,
    const float* x, int x_stride, int n_tok, int n_chunks, int lane,
    const MgTables& tb, float (&acc)[NT][NR]) {
  const uint8_t* rp[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const int row = row0 + r < rows ? row0 + r : rows - 1;
    rp[r] = w + size_t(row) * row_bytes;
  }
  for (int c = lane; c < n_chunks; c += MG_WARP) {
    MgChunk<QT> ch[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) ch[r].load(rp[r], c);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      float v[NR][8];
#pragma unroll
      for (int r = 0; r < NR; ++r) ch[r].get8(s, v[r], tb);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t < n_tok) {
          const float4* xp = reinterpret_cast<const float4*>(x + size_t(t) * x_stride + 32 * c + 8 * s);
          const float4 a = xp[0], b = xp[1];
#pragma unroll
          for (int r = 0; r < NR; ++r) {
            float sum = acc[t][r];
            sum = fmaf(v[r][0], a.x, sum); sum = fmaf(v[r][1], a.y, sum);
            sum = fmaf(v[r][2], a.z, sum); sum = fmaf(v[r][3], a.w, sum);
            sum = fmaf(v[r][4], b.x, sum); sum = fmaf(v[r][5], b.y, sum);
            sum = fmaf(v[r][6], b.z, sum); sum = fmaf(v[r][7], b.w, sum);
            acc[t][r] = sum;
          }
        }
      }
    }
  }
}

// ---- tiles (blockDim.x == MG_TILE_THREADS) ----
#define MG_TILE_THREADS 256
#define MG_TILE_ROWS 64
#define MG_TILE_LD 65  // padded row of the shared tiles: conflict-free stores

// Decode chunk c of rows row0..row0+63 into ws[k * MG_TILE_LD + m]
// (k = value in chunk, m = row in tile); rows past `rows` become zeros.
template <int QT>
__device__ __forceinline__ void mg_tile_decode(
    const uint8_t* w, int row_bytes, int row0, int rows, int c, float* ws, const MgTables& tb) {
  const int m = threadIdx.x >> 2, s = threadIdx.x & 3;
  float v[8];
  if (row0 + m < rows) {
    MgChunk<QT> ch;
    ch.load(w + size_t(row0 + m) * row_bytes, c);
    ch.get8(s, v, tb);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.0f;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) ws[(8 * s + i) * MG_TILE_LD + m] = v[i];
}

// Stage chunk c of the BN activation rows xrow[j] (-1: none, zeros) into
// xs[k * MG_TILE_LD + j].
template <int BN>
__device__ __forceinline__ void mg_tile_stage_x(
    const float* x, int x_stride, const int* xrow, int c, float* xs) {
  static_assert(BN % 16 == 0 && BN <= MG_TILE_ROWS, "BN: a multiple of 16, at most 64");
  for (int i = threadIdx.x; i < BN * 8; i += MG_TILE_THREADS) {
    const int j = i >> 3, q = i & 7;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (xrow[j] >= 0) v = *reinterpret_cast<const float4*>(x + size_t(xrow[j]) * x_stride + 32 * c + 4 * q);
    xs[(4 * q + 0) * MG_TILE_LD + j] = v.x;
    xs[(4 * q + 1) * MG_TILE_LD + j] = v.y;
    xs[(4 * q + 2) * MG_TILE_LD + j] = v.z;
    xs[(4 * q + 3) * MG_TILE_LD + j] = v.w;
  }
}

// acc[i][j] += sum_k ws[k][ty + 16 i] * xs[k][tx + 16 j] with ty = tid / 16,
// tx = tid % 16: thread (ty, tx) owns rows ty + 16i (i < 4) and columns
// tx + 16j (j < BN / 16). Strided ownership keeps shared reads conflict-free.
template <int BN>
__device__ __forceinline__ void mg_tile_fma(const float* ws, const float* xs, float (&acc)[4][BN / 16]) {
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll 8
  for (int k = 0; k < 32; ++k) {
    float a[4], b[BN / 16];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = ws[k * MG_TILE_LD + ty + 16 * i];
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) b[j] = xs[k * MG_TILE_LD + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < BN / 16; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// ---- MoE helpers ----

// The routed-expert activation: silu(min(g, limit)) * clip(u, +-limit) * weight.
__device__ __forceinline__ float mg_swiglu(float g, float u, float limit, float weight) {
  g = fminf(g, limit);
  u = fminf(fmaxf(u, -limit), limit);
  return g / (1.0f + expf(-g)) * u * weight;
}

// First sorted position p with tile_id[p] >= b (tile_id is non-decreasing).
__device__ __forceinline__ int mg_tile_first(const int32_t* tile_id, int n, int b) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (tile_id[mid] < b) lo = mid + 1; else hi = mid;
  }
  return lo;
}

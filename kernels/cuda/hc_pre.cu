// Kernel body: the hyper-connection input step (docs/spec/v4-model.md §3.3),
// one token per block, in one launch: kernels/hyper.py's hc_pre.
//   inputs    x float32 [T, HC, D]; fn uint8 [MIX, row_bytes] (MIX = (2 + HC) * HC rows of
//             HC * D values of type QT); scale float32 [3]; base float32 [MIX];
//             eps float32 [2] = {rms_eps, hc_eps}; norm float32 [D] (the sublayer's RMS norm
//             weight when NORM, else a stand-in)
//   outputs   x_in float32 [T, D]; post float32 [T, HC]; comb float32 [T, HC, HC]
//   template  QT, HC, D (HC * D a multiple of 32), ITERS (Sinkhorn passes), NORM (0/1)
//   launch    block = 256 threads; grid = (256, T, 1) (hc_pre_geometry in kernels/gpu.py).
// 1. Every thread adds up squares of the token's streams; warp v dots fn rows
//    v * NR .. v * NR + NR - 1 with the raw streams (mg_warp_dot, lanes over
//    32-value chunks); both land in shared memory. The RMS factor is applied to
//    the NR sums afterwards: fn @ (x * r) = r * (fn @ x).
// 2. Thread 0 does the small math of the token, in ops.sinkhorn's order:
//    sigmoid pre (+ eps) and 2 * sigmoid post, the HC x HC comb softmaxed per
//    row (+ eps), then columns, then ITERS - 1 row / column passes (C is not
//    symmetric, so the order matters). HC * HC values fit in its registers.
// 3. Every thread writes x_in[d] = sum_i pre[i] * x[i][d] for its d.
// 4. NORM: the sublayer's RMS norm of x_in (Backend.hc_pre_norm), its squares summed as
//    in step 1, then each thread scales the values it wrote: one launch instead of two.
constexpr int N = HC * D;
constexpr int MIX = (2 + HC) * HC;
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / MG_WARP;
constexpr int NR = (MIX + WARPS - 1) / WARPS;
constexpr int ROW_BYTES = mg_row_bytes<QT>(N);
__shared__ uint64_t grid_s[256];
__shared__ uint8_t signs_s[128];
__shared__ float squares_s[WARPS];
__shared__ float mix_s[WARPS * NR];
__shared__ float pre_s[HC];
if (QT == MG_IQ2_XXS) mg_stage_tables(grid_s, signs_s);
const MgTables tb{grid_s, signs_s};

const int tid = threadIdx.x, lane = tid % MG_WARP, warp = tid / MG_WARP;
const int t = blockIdx.y;
const float* xt = x + size_t(t) * N;

float sq = 0.0f;
for (int k = tid; k < N; k += THREADS) sq = fmaf(xt[k], xt[k], sq);
sq = mg_warp_sum(sq);
if (lane == 0) squares_s[warp] = sq;

// Rows past MIX are read as row MIX - 1 and dropped (mg_warp_dot's rule).
float acc[1][NR];
#pragma unroll
for (int r = 0; r < NR; ++r) acc[0][r] = 0.0f;
mg_warp_dot<QT, NR, 1>(fn, ROW_BYTES, warp * NR, MIX, xt, N, 1, N / 32, lane, tb, acc);
#pragma unroll
for (int r = 0; r < NR; ++r) {
  const float v = mg_warp_sum(acc[0][r]);
  if (lane == 0) mix_s[warp * NR + r] = v;
}
__syncthreads();

if (tid == 0) {
  float total = 0.0f;
  for (int v = 0; v < WARPS; ++v) total += squares_s[v];
  const float rms = 1.0f / sqrtf(total / float(N) + eps[0]), hc_eps = eps[1];
  for (int i = 0; i < HC; ++i) {
    pre_s[i] = 1.0f / (1.0f + expf(-(mix_s[i] * rms * scale[0] + base[i]))) + hc_eps;
    post[size_t(t) * HC + i] = 2.0f / (1.0f + expf(-(mix_s[HC + i] * rms * scale[1] + base[HC + i])));
  }
  float c[HC][HC];
  for (int a = 0; a < HC; ++a) {
    float top = -inf;
    for (int b = 0; b < HC; ++b) {
      c[a][b] = mix_s[2 * HC + a * HC + b] * rms * scale[2] + base[2 * HC + a * HC + b];
      top = fmaxf(top, c[a][b]);
    }
    float sum = 0.0f;
    for (int b = 0; b < HC; ++b) {
      c[a][b] = expf(c[a][b] - top);
      sum += c[a][b];
    }
    for (int b = 0; b < HC; ++b) c[a][b] = c[a][b] / sum + hc_eps;
  }
  for (int it = 0; it < ITERS; ++it) {
    if (it > 0) {  // rows, from the second pass on
      for (int a = 0; a < HC; ++a) {
        float sum = 0.0f;
        for (int b = 0; b < HC; ++b) sum += c[a][b];
        for (int b = 0; b < HC; ++b) c[a][b] /= sum + hc_eps;
      }
    }
    for (int b = 0; b < HC; ++b) {  // columns
      float sum = 0.0f;
      for (int a = 0; a < HC; ++a) sum += c[a][b];
      for (int a = 0; a < HC; ++a) c[a][b] /= sum + hc_eps;
    }
  }
  for (int a = 0; a < HC; ++a)
    for (int b = 0; b < HC; ++b) comb[(size_t(t) * HC + a) * HC + b] = c[a][b];
}
__syncthreads();

float nsq = 0.0f;
for (int d = tid; d < D; d += THREADS) {
  float v = 0.0f;
  for (int i = 0; i < HC; ++i) v = fmaf(pre_s[i], xt[i * D + d], v);
  x_in[size_t(t) * D + d] = v;
  nsq = fmaf(v, v, nsq);
}
if (NORM) {  // squares_s is free: thread 0 read it before the last barrier
  nsq = mg_warp_sum(nsq);
  if (lane == 0) squares_s[warp] = nsq;
  __syncthreads();
  float total = 0.0f;
  for (int v = 0; v < WARPS; ++v) total += squares_s[v];
  const float r = 1.0f / sqrtf(total / float(D) + eps[0]);
  for (int d = tid; d < D; d += THREADS) x_in[size_t(t) * D + d] = norm[d] * (x_in[size_t(t) * D + d] * r);
}

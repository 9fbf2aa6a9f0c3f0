// Kernel body: the hyper-connection input step (docs/spec/v4-model.md section 3.3),
// one token per threadgroup, in one launch: kernels/hyper.py's hc_pre.
//   inputs    x float32 [T, HC, D]; fn uint8 [MIX, row_bytes] (MIX = (2 + HC) * HC rows of
//             HC * D values of type QT); scale float32 [3]; base float32 [MIX];
//             eps float32 [2] = {rms_eps, hc_eps}; norm float32 [D] (the sublayer's RMS norm
//             weight when NORM, else a stand-in)
//   outputs   x_in float32 [T, D]; post float32 [T, HC]; comb float32 [T, HC, HC]
//   template  QT, HC, D (HC * D a multiple of 32), ITERS (Sinkhorn passes), NORM (0/1)
//   launch    threadgroup = 256 threads (8 simdgroups); grid = (256, T, 1)
//             (hc_pre_geometry in kernels/gpu.py).
// 1. Every thread adds up squares of the token's streams; simdgroup v dots fn
//    rows v * NR .. v * NR + NR - 1 with the raw streams (mg_simd_dot, lanes over
//    32-value chunks); both land in threadgroup memory. The RMS factor is applied
//    to the NR sums afterwards: fn @ (x * r) = r * (fn @ x).
// 2. Thread 0 does the small math of the token, in ops.sinkhorn's order:
//    sigmoid pre (+ eps) and 2 * sigmoid post, the HC x HC comb softmaxed per
//    row (+ eps), then columns, then ITERS - 1 row / column passes (C is not
//    symmetric, so the order matters). HC * HC values fit in its registers.
// 3. Every thread writes x_in[d] = sum_i pre[i] * x[i][d] for its d.
// 4. NORM: the sublayer's RMS norm of x_in (Backend.hc_pre_norm), its squares summed as
//    in step 1, then each thread scales the values it wrote: one launch instead of two.
constexpr int N = HC * D;
constexpr int MIX = (2 + HC) * HC;
constexpr int SG = 8;  // simdgroups of the 256-thread threadgroup
constexpr int NR = (MIX + SG - 1) / SG;
constexpr int ROW_BYTES = mg_row_bytes(QT, N);
constexpr bool TABLES = mg_uses_tables(QT);
threadgroup uint grid_tg[mg_grid_words(TABLES)];
threadgroup uint8_t signs_tg[mg_sign_bytes(TABLES)];
threadgroup float squares_tg[SG];
threadgroup float mix_tg[SG * NR];
threadgroup float pre_tg[HC];
const uint tid = thread_index_in_threadgroup;
if (TABLES) mg_stage_tables(grid_tg, signs_tg, tid, threads_per_threadgroup.x);

const uint lane = thread_index_in_simdgroup, sg = simdgroup_index_in_threadgroup;
const uint t = threadgroup_position_in_grid.y;
const device float* xt = x + ulong(t) * N;

float sq = 0.0f;
for (uint k = tid; k < uint(N); k += 32 * SG) sq += xt[k] * xt[k];
sq = simd_sum(sq);
if (lane == 0) squares_tg[sg] = sq;

// Rows past MIX are read as row MIX - 1 and dropped (mg_simd_dot's rule).
float acc[1][NR] = {};
mg_simd_dot<QT, NR, 1>(fn, ROW_BYTES, int(sg) * NR, MIX, xt, N, 1, N / 32, lane, grid_tg, signs_tg, acc);
for (int r = 0; r < NR; ++r) {
  const float v = simd_sum(acc[0][r]);
  if (lane == 0) mix_tg[int(sg) * NR + r] = v;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

if (tid == 0) {
  float total = 0.0f;
  for (int v = 0; v < SG; ++v) total += squares_tg[v];
  const float rms = 1.0f / precise::sqrt(total / float(N) + eps[0]), hc_eps = eps[1];
  for (int i = 0; i < HC; ++i) {
    pre_tg[i] = 1.0f / (1.0f + precise::exp(-(mix_tg[i] * rms * scale[0] + base[i]))) + hc_eps;
    post[ulong(t) * HC + i] = 2.0f / (1.0f + precise::exp(-(mix_tg[HC + i] * rms * scale[1] + base[HC + i])));
  }
  float c[HC][HC];
  for (int a = 0; a < HC; ++a) {
    float top = -INFINITY;
    for (int b = 0; b < HC; ++b) {
      c[a][b] = mix_tg[2 * HC + a * HC + b] * rms * scale[2] + base[2 * HC + a * HC + b];
      top = max(top, c[a][b]);
    }
    float sum = 0.0f;
    for (int b = 0; b < HC; ++b) {
      c[a][b] = precise::exp(c[a][b] - top);
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
    for (int b = 0; b < HC; ++b) comb[(ulong(t) * HC + a) * HC + b] = c[a][b];
}
threadgroup_barrier(mem_flags::mem_threadgroup);

float nsq = 0.0f;
for (uint d = tid; d < uint(D); d += 32 * SG) {
  float v = 0.0f;
  for (int i = 0; i < HC; ++i) v += pre_tg[i] * xt[i * D + d];
  x_in[ulong(t) * D + d] = v;
  nsq += v * v;
}
if (NORM) {  // squares_tg is free: thread 0 read it before the last barrier
  nsq = simd_sum(nsq);
  if (lane == 0) squares_tg[sg] = nsq;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  for (int v = 0; v < SG; ++v) total += squares_tg[v];
  const float r = 1.0f / precise::sqrt(total / float(D) + eps[0]);
  for (uint d = tid; d < uint(D); d += 32 * SG) x_in[ulong(t) * D + d] = norm[d] * (x_in[ulong(t) * D + d] * r);
}

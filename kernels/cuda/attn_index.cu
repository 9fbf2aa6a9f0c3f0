// Kernel body: the lightning indexer's scores of one decode token (kernels/attention_decode.py
// index_scores), score[n] = sum_h (relu(q_h . k_n) * IXD^-0.5) * (w_h * IXH^-0.5), for the
// visible rows n < min((p + 1) / 4, CAP); rows past them get 0 (never read).
//   inputs    p int32 [1]; q float32 [IXH * IXD] (attn_state's iq_out); w [IXH]; rows [CAP, IXD]
//   outputs   score [CAP]
//   template  IXH, IXD, CAP, DSC, HSC (float32 bits of IXD^-0.5, IXH^-0.5)
//   launch    block = 64 threads, a thread per row; grid = (64 * ceil(CAP / 64), 1, 1).
constexpr int THREADS = 64;
const int n = blockIdx.x * THREADS + threadIdx.x;
if (n >= CAP) return;
const int n_vis = (p[0] + 1) / 4 < CAP ? (p[0] + 1) / 4 : CAP;
if (n >= n_vis) {
  score[n] = 0.0f;
  return;
}
const float dsc = __uint_as_float(unsigned(DSC)), hsc = __uint_as_float(unsigned(HSC));
const float* k = rows + size_t(n) * IXD;
float s = 0.0f;
for (int h = 0; h < IXH; ++h) {
  const float* qh = q + h * IXD;
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // 8 partial sums, as the CPU kernel
  for (int i = 0; i < IXD; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += qh[i + l] * k[i + l];
  const float d = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  s += fmaxf(d, 0.0f) * dsc * (w[h] * hsc);
}
score[n] = s;

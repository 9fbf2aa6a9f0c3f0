// Kernel body: one token's attention with per-head sinks over its live keys (kernels/
// attention_decode.py after the state updates; base.attend): q's per-head RMS and RoPE,
// the ring slots s <= p, the visible compressed rows (ratio 4 with SEL: the top TOPK by
// indexer score, ties to the lowest index, as top_k_mask), softmax with the sink, V's
// rotation undone.
//   inputs    p int32 [1]; q float32 [H * HD]; sinks [H]; inv_freq [HALF]; raw [W, HD] (updated);
//             rows [CAP, HD] (updated; ratio 0: a stand-in); score [CAP] (SEL: attn_index's)
//   outputs   o [1, H, HD]; att [H, NK] (scratch: each key's score, then its weight)
//   template  HD, W, R, CAP, TOPK, SEL (0/1), HALF, EPS, ASC (float32 bits of HD^-0.5), NK
//   launch    block = 256 threads per head; grid = (256 * H, 1, 1).
// Each block selects the top-k rows itself (the same choice in every block) so the heads
// need no second launch: a binary search over the scores' order keys finds the k-th
// largest (32 counting passes), then rows above it and the lowest-index ties are kept.
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / MG_WARP;
__shared__ float q_s[HD];
__shared__ float freq_s[HALF];
__shared__ float red_s[THREADS / 32];
__shared__ float cnt_s[THREADS];
__shared__ int keep_s[SEL ? TOPK : 1];
const int tid = threadIdx.x, lane = tid % MG_WARP, warp = tid / MG_WARP, h = blockIdx.x, pos = p[0];
const float eps = __uint_as_float(unsigned(EPS));
for (int i = tid; i < HALF; i += THREADS) freq_s[i] = inv_freq[i];
float sq = 0.0f;
for (int i = tid; i < HD; i += THREADS) {
  const float v = q[h * HD + i];
  q_s[i] = v;
  sq += v * v;
}
const float r = 1.0f / sqrtf(mg_block_sum(sq, red_s) * (1.0f / float(HD)) + eps);
for (int i = tid; i < HD; i += THREADS) q_s[i] *= r;
__syncthreads();
for (int i = tid; i < HALF; i += THREADS) {
  const float theta = float(pos) * freq_s[i], c = cosf(theta), s = sinf(theta);
  const int k = HD - 2 * HALF + 2 * i;
  const float x0 = q_s[k], x1 = q_s[k + 1];
  q_s[k] = x0 * c - x1 * s;
  q_s[k + 1] = x0 * s + x1 * c;
}
__syncthreads();

const int n_ring = pos + 1 < W ? pos + 1 : W;
constexpr int RD = R == 0 ? 1 : R;  // no division by zero in the ratio-0 instance
const int n_vis = R == 0 ? 0 : (pos + 1) / RD < CAP ? (pos + 1) / RD : CAP;
const bool pick = SEL && n_vis > TOPK;  // uniform over the block
if (pick) {
  const int chunk = (n_vis + THREADS - 1) / THREADS;
  const int lo = tid * chunk < n_vis ? tid * chunk : n_vis, hi = lo + chunk < n_vis ? lo + chunk : n_vis;
  uint32_t kth = 0;  // the largest key with at least TOPK keys >= it: the k-th largest
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = kth | (1u << bit);
    float c = 0.0f;
    for (int n = lo; n < hi; ++n) c += mg_order_key(score[n]) >= cand ? 1.0f : 0.0f;
    if (mg_block_sum(c, red_s) >= float(TOPK)) kth = cand;
  }
  float above = 0.0f, ties = 0.0f;
  for (int n = lo; n < hi; ++n) {
    const uint32_t key = mg_order_key(score[n]);
    above += key > kth ? 1.0f : 0.0f;
    ties += key == kth ? 1.0f : 0.0f;
  }
  const int need = TOPK - int(mg_block_sum(above, red_s));
  cnt_s[tid] = ties;
  __syncthreads();
  int tie0 = 0;  // ties in the chunks before this thread's
  for (int t = 0; t < tid; ++t) tie0 += int(cnt_s[t]);
  __syncthreads();
  int kept = 0, tie = tie0;
  for (int n = lo; n < hi; ++n) {
    const uint32_t key = mg_order_key(score[n]);
    kept += key > kth || (key == kth && tie++ < need);
  }
  cnt_s[tid] = float(kept);
  __syncthreads();
  int at = 0;  // this chunk's first place in the kept list (kept in row order)
  for (int t = 0; t < tid; ++t) at += int(cnt_s[t]);
  tie = tie0;
  for (int n = lo; n < hi; ++n) {
    const uint32_t key = mg_order_key(score[n]);
    if (key > kth || (key == kth && tie++ < need)) keep_s[at++] = n;
  }
  __syncthreads();
}
const int n_keys = n_ring + (pick ? TOPK : n_vis);
#define MG_KEY(j) ((j) < n_ring ? raw + size_t(j) * HD : rows + size_t(pick ? keep_s[(j) - n_ring] : (j) - n_ring) * HD)

// Scores: a warp per key, lanes over the dims.
float* att_h = att + size_t(h) * NK;
for (int j = warp; j < n_keys; j += WARPS) {
  const float* k = MG_KEY(j);
  float d = 0.0f;
  for (int i = lane; i < HD; i += MG_WARP) d += q_s[i] * k[i];
  d = mg_warp_sum(d);
  if (lane == 0) att_h[j] = d * __uint_as_float(unsigned(ASC));
}
__syncthreads();
const float sink = sinks[h];
float top = sink;
for (int j = tid; j < n_keys; j += THREADS) top = fmaxf(top, att_h[j]);
top = mg_block_max(top, red_s);
float sum = 0.0f;
for (int j = tid; j < n_keys; j += THREADS) {
  const float e = expf(att_h[j] - top);
  att_h[j] = e;
  sum += e;
}
const float denom = mg_block_sum(sum, red_s) + expf(sink - top);  // the sink takes mass, adds no value

// Output: a thread per pair of dims (RoPE pairs stay in one thread), then V's rotation undone.
for (int i = tid; i < HD / 2; i += THREADS) {
  float o0 = 0.0f, o1 = 0.0f;
  for (int j = 0; j < n_keys; ++j) {
    const float* k = MG_KEY(j);
    o0 += att_h[j] * k[2 * i];
    o1 += att_h[j] * k[2 * i + 1];
  }
  o0 /= denom;
  o1 /= denom;
  const int f = i - (HD / 2 - HALF);
  if (f >= 0) {
    const float theta = float(pos) * freq_s[f], c = cosf(theta), s = -sinf(theta);
    const float x0 = o0, x1 = o1;
    o0 = x0 * c - x1 * s;
    o1 = x0 * s + x1 * c;
  }
  o[h * HD + 2 * i] = o0;
  o[h * HD + 2 * i + 1] = o1;
}
#undef MG_KEY

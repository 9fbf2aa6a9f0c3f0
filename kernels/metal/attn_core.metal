// Kernel body: one token's attention with per-head sinks over its live keys (kernels/
// attention_decode.py after the state updates; base.attend): q's per-head RMS and RoPE,
// the ring slots s <= p, the visible compressed rows (ratio 4 with SEL: the top TOPK by
// indexer score, ties to the lowest index, as top_k_mask), softmax with the sink, V's
// rotation undone.
//   inputs    p int32 [1]; q float32 [H * HD]; sinks [H]; inv_freq [HALF]; raw [W, HD] (updated);
//             rows [CAP, HD] (updated; ratio 0: a stand-in); score [CAP] (SEL: attn_index's)
//   outputs   o [1, H, HD]; att [H, NK] (scratch: each key's score, then its weight)
//   template  HD, W, R, CAP, TOPK, SEL (0/1), HALF, EPS, ASC (float32 bits of HD^-0.5), NK
//   launch    threadgroup = 256 threads per head; grid = (256 * H, 1, 1).
// Each threadgroup selects the top-k rows itself (the same choice in every threadgroup) so the heads
// need no second launch: a binary search over the scores' order keys finds the k-th
// largest (32 counting passes), then rows above it and the lowest-index ties are kept.
constexpr int THREADS = 256;
constexpr int SG = THREADS / 32;  // simdgroups
threadgroup float q_s[HD];
threadgroup float freq_s[HALF];
threadgroup float red_s[SG];
threadgroup float cnt_s[THREADS];
threadgroup int keep_s[SEL ? TOPK : 1];
const int tid = int(thread_index_in_threadgroup), lane = tid % 32, sg = tid / 32;
const int h = int(threadgroup_position_in_grid.x), pos = p[0];
const float eps = as_type<float>(uint(EPS));
for (int i = tid; i < HALF; i += THREADS) freq_s[i] = inv_freq[i];
float sq = 0.0f;
for (int i = tid; i < HD; i += THREADS) {
  const float v = q[h * HD + i];
  q_s[i] = v;
  sq += v * v;
}
const float r = 1.0f / precise::sqrt(mg_block_sum(sq, red_s, tid, THREADS) * (1.0f / float(HD)) + eps);
for (int i = tid; i < HD; i += THREADS) q_s[i] *= r;
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int i = tid; i < HALF; i += THREADS) {
  const float theta = float(pos) * freq_s[i], c = precise::cos(theta), s = precise::sin(theta);
  const int k = HD - 2 * HALF + 2 * i;
  const float x0 = q_s[k], x1 = q_s[k + 1];
  q_s[k] = x0 * c - x1 * s;
  q_s[k + 1] = x0 * s + x1 * c;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

const int n_ring = pos + 1 < W ? pos + 1 : W;
constexpr int RD = R == 0 ? 1 : R;  // no division by zero in the ratio-0 instance
const int n_vis = R == 0 ? 0 : (pos + 1) / RD < CAP ? (pos + 1) / RD : CAP;
const bool pick = SEL && n_vis > TOPK;  // uniform over the threadgroup
if (pick) {
  const int chunk = (n_vis + THREADS - 1) / THREADS;
  const int lo = tid * chunk < n_vis ? tid * chunk : n_vis, hi = lo + chunk < n_vis ? lo + chunk : n_vis;
  uint kth = 0;  // the largest key with at least TOPK keys >= it: the k-th largest
  for (int bit = 31; bit >= 0; --bit) {
    const uint cand = kth | (1u << bit);
    float c = 0.0f;
    for (int n = lo; n < hi; ++n) c += mg_order_key(score[n]) >= cand ? 1.0f : 0.0f;
    if (mg_block_sum(c, red_s, tid, THREADS) >= float(TOPK)) kth = cand;
  }
  float above = 0.0f, ties = 0.0f;
  for (int n = lo; n < hi; ++n) {
    const uint key = mg_order_key(score[n]);
    above += key > kth ? 1.0f : 0.0f;
    ties += key == kth ? 1.0f : 0.0f;
  }
  const int need = TOPK - int(mg_block_sum(above, red_s, tid, THREADS));
  cnt_s[tid] = ties;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  int tie0 = 0;  // ties in the chunks before this thread's
  for (int t = 0; t < tid; ++t) tie0 += int(cnt_s[t]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  int kept = 0, tie = tie0;
  for (int n = lo; n < hi; ++n) {
    const uint key = mg_order_key(score[n]);
    kept += key > kth || (key == kth && tie++ < need);
  }
  cnt_s[tid] = float(kept);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  int at = 0;  // this chunk's first place in the kept list (kept in row order)
  for (int t = 0; t < tid; ++t) at += int(cnt_s[t]);
  tie = tie0;
  for (int n = lo; n < hi; ++n) {
    const uint key = mg_order_key(score[n]);
    if (key > kth || (key == kth && tie++ < need)) keep_s[at++] = n;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
const int n_keys = n_ring + (pick ? TOPK : n_vis);
#define MG_KEY(j) ((j) < n_ring ? raw + ulong(j) * HD : rows + ulong(pick ? keep_s[(j) - n_ring] : (j) - n_ring) * HD)

// Scores: a simdgroup per key, lanes over the dims.
device float* att_h = att + ulong(h) * NK;
for (int j = sg; j < n_keys; j += SG) {
  const device float* k = MG_KEY(j);
  float d = 0.0f;
  for (int i = lane; i < HD; i += 32) d += q_s[i] * k[i];
  d = simd_sum(d);
  if (lane == 0) att_h[j] = d * as_type<float>(uint(ASC));
}
threadgroup_barrier(mem_flags::mem_device);
const float sink = sinks[h];
float top = sink;
for (int j = tid; j < n_keys; j += THREADS) top = max(top, att_h[j]);
top = mg_block_max(top, red_s, tid, THREADS);
float sum = 0.0f;
for (int j = tid; j < n_keys; j += THREADS) {
  const float e = precise::exp(att_h[j] - top);
  att_h[j] = e;
  sum += e;
}
threadgroup_barrier(mem_flags::mem_device);  // the weights, before other threads read them
const float denom = mg_block_sum(sum, red_s, tid, THREADS) + precise::exp(sink - top);  // the sink takes mass, adds no value

// Output: a thread per pair of dims (RoPE pairs stay in one thread), then V's rotation undone.
for (int i = tid; i < HD / 2; i += THREADS) {
  float o0 = 0.0f, o1 = 0.0f;
  for (int j = 0; j < n_keys; ++j) {
    const device float* k = MG_KEY(j);
    o0 += att_h[j] * k[2 * i];
    o1 += att_h[j] * k[2 * i + 1];
  }
  o0 /= denom;
  o1 /= denom;
  const int f = i - (HD / 2 - HALF);
  if (f >= 0) {
    const float theta = float(pos) * freq_s[f], c = precise::cos(theta), s = -precise::sin(theta);
    const float x0 = o0, x1 = o1;
    o0 = x0 * c - x1 * s;
    o1 = x0 * s + x1 * c;
  }
  o[h * HD + 2 * i] = o0;
  o[h * HD + 2 * i + 1] = o1;
}
#undef MG_KEY

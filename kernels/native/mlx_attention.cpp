// mlx_attention.cpp: one token's decode attention after its dense projections
// (kernels/attention_decode.py, the MLX-ops oracle; docs/spec/v4-model.md
// sections 3.4-3.7 and 5.1) as one MLX primitive with a CPU kernel, for all
// three layer kinds: sliding window (ratio 0), plain compressed windows
// (ratio 128) and overlapping windows with the lightning indexer (ratio 4).
//
// Per token at position p: q heads RMS-normalized and rotated; the kv row
// normalized, rotated, rounded (Rounding.kv_row) and written at ring slot
// p % window; each compressor's frontier gets the token's kv and gate + ape
// rows and, when its window closes at p, the window is pooled by a
// per-dimension softmax, normalized, rotated at the window's first position,
// rounded and written at row p / ratio (the oracle also writes the open
// window's partial pool there every token, a row no token sees yet: 128
// softmaxes per dimension on ratio-128 layers, skipped here); the
// indexer scores the visible compressed rows and keeps the top k (ties to the
// lowest index) when the buffer holds more than k; attention with per-head
// sinks over the live keys; V's rotation undone. The state outputs reuse their
// inputs' buffers when those can be donated (as MLX's slice updates do), else
// start from a copy: the compressed buffers can be megabytes per layer.
//
// PoolWindows is Backend.pool_windows, a prefill chunk's closed compressor
// windows pooled in one pass with the MLX ops' bits (their exp is MLX's own
// polynomial, run here 8 lanes at a time), where the MLX ops' strided softmax
// took 2-5 ms a call (~180 ms of small's 2.4 s 512-token prefill).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
// MLX's own CPU exp (its polynomial), compiled here with each step rounded as in the wheel,
// so pool_windows gives the MLX ops' bits: libm's expf differs in the last bit on most inputs.
#if defined(__clang__)
#pragma clang fp contract(off)
#include "mlx/backend/cpu/simd/math.h"
#pragma clang fp contract(fast)
#else
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#include "mlx/backend/cpu/simd/math.h"
#pragma GCC pop_options
#endif
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "mlx_common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace mlx_ext;

namespace {

struct AttnConst {
  int n_head, head_dim, window, ratio, half;  // half: rope_dim / 2
  int ix_heads, ix_dim, top_k;                // ratio 4
  float eps;
  bool official, select;
  int nope;
  bool operator==(const AttnConst&) const = default;
};

// A float32 input (a strided view) as a row-major copy the kernel may change.
std::vector<float> load(const View& a) {
  std::vector<float> v(a.size());
  gather(a, v.data());
  return v;
}

// exp(x) for x <= 0, skipping libm's slow underflow path where the result is 0 anyway
// (EMPTY frontier scores and masked-out keys land far below -104).
float exp_neg(float x) { return x < -110.0f ? 0.0f : std::exp(x); }

float max(float a, float b) { return a < b ? b : a; }  // inlined, unlike std::fmax (no NaNs here)

// o += e * x, in blocks of 8 the compiler vectorizes (o and x never overlap).
void axpy(float* __restrict o, const float* __restrict x, float e, int n) {
  int k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) o[k + l] += e * x[k + l];
  for (; k < n; ++k) o[k] += e * x[k];
}

// x * rsqrt(mean(x^2) + eps), times w when given: rowops.rms / rmsnorm, with MLX's bits.
void rms_norm(float* x, int n, const float* w, float eps) {
  const float r = inverse_rms(x, n, eps);
  for (int i = 0; i < n; ++i) x[i] = w ? w[i] * (x[i] * r) : x[i] * r;
}

struct Angles {
  std::vector<float> cos, sin;
};

Angles angles(int64_t pos, const std::vector<float>& inv_freq) {
  Angles a{std::vector<float>(inv_freq.size()), std::vector<float>(inv_freq.size())};
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const float theta = float(pos) * inv_freq[i];
    a.cos[i] = std::cos(theta);
    a.sin[i] = std::sin(theta);
  }
  return a;
}

// Rotate the trailing 2 * half dims of x[n] in interleaved pairs; sign -1 undoes it.
void rope(float* x, int n, const Angles& a, float sign = 1.0f) {
  const int half = int(a.cos.size());
  float* r = x + n - 2 * half;
  for (int i = 0; i < half; ++i) {
    const float x0 = r[2 * i], x1 = r[2 * i + 1], c = a.cos[i], s = sign * a.sin[i];
    r[2 * i] = x0 * c - x1 * s;
    r[2 * i + 1] = x0 * s + x1 * c;
  }
}

// -- the official precision's round trips (kernels/precision.py) ----------------------------

uint32_t bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

float from_bits(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

float pow2_ceil(float y) { return from_bits((bits(y) + 0x007FFFFFu) & 0x7F800000u); }

// Nearest E4M3FN value, ties to even, subnormals (step 2^-9) included, 448 at most.
float round_e4m3(float t) {
  const float a = std::fabs(t);
  if (a == 0.0f || !std::isfinite(a)) return t;
  const int e = std::max(int((bits(a) >> 23) & 0xFF) - 127, -6);
  const float step = std::ldexp(1.0f, e - 3);
  return std::copysign(std::min(std::nearbyint(a / step) * step, 448.0f), t);
}

float round_e2m1(float t) {
  const uint32_t exponent = bits(t) & 0x7F800000u;
  const float step = from_bits(std::max(exponent, 127u << 23) - (1u << 23));
  return std::nearbyint(t / step) * step;
}

template <typename Round>
void blockwise(float* x, int n, int block, float limit, float floor, Round round) {
  for (int b = 0; b < n; b += block) {
    float amax = 0.0f;
    for (int i = b; i < b + block; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    const float scale = pow2_ceil(std::fmax(amax, floor) / limit);
    for (int i = b; i < b + block; ++i) x[i] = round(x[i] / scale) * scale;
  }
}

float f16(float v) { return float(mx::float16_t(v)); }

void kv_row(float* x, int n, const AttnConst& k) {
  if (!k.official) return;
  blockwise(x, k.nope, 64, 448.0f, 1e-4f, round_e4m3);
  for (int i = 0; i < n; ++i) x[i] = f16(x[i]);
}

// Walsh-Hadamard in MLX's CPU order (strides 1, 2, 4, ..., then the scale), then FP4 blocks of 32.
void indexer_round_trip(float* x, int n) {
  for (int h = 1; h < n; h <<= 1)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const float scale = float(1.0 / std::sqrt(double(n)));
  for (int i = 0; i < n; ++i) x[i] *= scale;
  blockwise(x, n, 32, 6.0f, 6.0f * std::ldexp(1.0f, -126), round_e2m1);
}

// -- compressor and attention --------------------------------------------------------------

#if defined(__AVX2__) && defined(__FMA__)
// mx::simd::exp's steps on 8 lanes (log2(e) times x, 2^floor(. + 1/2) times its degree-6
// polynomial in the rest, each fma fused as there; NaN passes, past +-88 inf or 0): its bits, 8
// at a time, where the scalar template runs one at a time.
MLX_EXT_ROUNDED_STEPS __m256 mlx_exp8(__m256 x_init) {
  const __m256 x = _mm256_mul_ps(x_init, _mm256_set1_ps(1.442695f));
  const __m256 ipart = _mm256_floor_ps(_mm256_add_ps(x, _mm256_set1_ps(0.5f)));
  const __m256 fpart = _mm256_sub_ps(x, ipart);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  for (const float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f,
                        2.402264791363012e-1f, 6.931472028550421e-1f, 1.000000000000000f})
    p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(c));
  const __m256i epart = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(ipart), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(_mm256_castsi256_ps(epart), p);
  r = _mm256_blendv_ps(r, x_init, _mm256_cmp_ps(x_init, x_init, _CMP_UNORD_Q));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x_init, _mm256_set1_ps(88.0f), _CMP_GT_OQ));
  return _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(x_init, _mm256_set1_ps(-88.0f), _CMP_LT_OQ));
}
#endif

// e[j] = MLX's exp(s[j] - top[j]), each also added to sum[j].
MLX_EXT_ROUNDED_STEPS void exp_minus_add(const float* s, const float* top, float* e, float* sum, int d) {
  int j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; j + 8 <= d; j += 8) {
    const __m256 v = mlx_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(top + j)));
    _mm256_storeu_ps(e + j, v);
    _mm256_storeu_ps(sum + j, _mm256_add_ps(_mm256_loadu_ps(sum + j), v));
  }
#endif
  for (; j < d; ++j) sum[j] += (e[j] = mx::simd::exp(mx::simd::Simd<float, 1>(s[j] - top[j])).value);
}

// Slots a window pools, which are also a compressor's frontier rows (kv_state.frontier_rows):
// ratio 4's two overlapping lanes of 4, else ratio.
constexpr int window_slots(int ratio) { return ratio == 4 ? 8 : ratio; }

// Windows [c0, c1) of attention_decode.pool_windows on slots kv, sc [slots, width]: window c is
// slots cR .. cR + R - 1, or for ratio 4 lane A (columns [0, d)) of slots 4c .. 4c + 3 then lane B
// ([d, 2d)) of 4c + 4 .. 4c + 7. Per dimension, MLX's steps in its order: the slots' max, the exp
// of each score minus it, their sum, each exp over the sum, and kv times that summed over the slots.
MLX_EXT_ROUNDED_STEPS void pool_windows_rows(const float* kv, const float* sc, int width, int R, int d, int64_t c0,
                                              int64_t c1, float* out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int n = window_slots(R);
  std::vector<float> top(d), sum(d), e(size_t(n) * d);
  for (int64_t c = c0; c < c1; ++c) {
    auto slot = [&](const float* a, int r) {
      return R == 4 ? a + (4 * c + r) * width + (r >= 4 ? d : 0) : a + (c * R + r) * width;
    };
    std::fill(top.begin(), top.end(), -INFINITY);
    for (int r = 0; r < n; ++r) {
      const float* s = slot(sc, r);
      for (int j = 0; j < d; ++j) top[j] = max(top[j], s[j]);
    }
    std::fill(sum.begin(), sum.end(), 0.0f);
    for (int r = 0; r < n; ++r) {
      const float* s = slot(sc, r);
      float* er = e.data() + size_t(r) * d;
      exp_minus_add(s, top.data(), er, sum.data(), d);
    }
    float* o = out + c * d;
    std::fill(o, o + d, 0.0f);
    for (int r = 0; r < n; ++r) {
      const float *k = slot(kv, r), *er = e.data() + size_t(r) * d;
      for (int j = 0; j < d; ++j) o[j] += k[j] * (er[j] / sum[j]);
    }
  }
}

// One compressor (attention_decode.pool_one) on its state buffers, in place.
struct Pool {
  View kv, gate, ape, norm;
  float *rows, *f_kv, *f_sc;
  int ratio, dim;
};

// A window closing past the rows' capacity is pooled but not stored: p is a graph value, known only
// here, and the rows past the capacity are seen by no token (n_vis stops at it).
void pool_one(const Pool& c, int64_t p, int cap, const std::vector<float>& inv_freq, const AttnConst& k,
              bool index_key) {
  const int R = c.ratio, d = c.dim, lanes = R == 4 ? 2 : 1, width = lanes * d;
  const std::vector<float> kv = load(c.kv), gate = load(c.gate);
  const float* ape = c.ape.as<float>() + (p % R) * c.ape.strides[0];  // [R, width]: only this token's row
  const int slot = int(p % R) + (R == 4 ? 4 : 0);
  for (int j = 0; j < width; ++j) {
    c.f_kv[slot * width + j] = kv[j];
    c.f_sc[slot * width + j] = gate[j] + ape[j * c.ape.strides[1]];
  }
  // Row p / R is seen by no token until its window closes at p: only then is it pooled (the MLX
  // reference and the GPU kernels pool the open window every token, into that unseen row).
  if ((p + 1) % R) return;
  const std::vector<float> norm = load(c.norm);
  // The frontier holds the window as prefill's slots hold window 0 (ratio 4: lane A of rows
  // 0-3, lane B of rows 4-7), so it pools the same way, with the same bits.
  std::vector<float> row(d);
  pool_windows_rows(c.f_kv, c.f_sc, width, R, d, 0, 1, row.data());
  if (R == 4) {  // the closed window becomes lane A of the next one
    std::memcpy(c.f_kv, c.f_kv + 4 * width, sizeof(float) * 4 * width);
    std::memcpy(c.f_sc, c.f_sc + 4 * width, sizeof(float) * 4 * width);
  }
  rms_norm(row.data(), d, norm.data(), k.eps);
  rope(row.data(), d, angles(p / R * R, inv_freq));
  if (index_key) {
    if (k.official) {
      indexer_round_trip(row.data(), d);
      for (float& v : row) v = f16(v);
    }
  } else {
    kv_row(row.data(), d, k);
  }
  if (p / R < cap) std::memcpy(c.rows + (p / R) * d, row.data(), sizeof(float) * d);
}

// Rows of ``index`` [n_vis rows visible] the indexer keeps: the top k by score, ties to the lowest index.
std::vector<int> select_rows(const View& iq_in, const View& iw_in, const float* index, int n_vis, const Angles& a,
                             const AttnConst& k) {
  const int IH = k.ix_heads, ID = k.ix_dim;
  std::vector<float> q = load(iq_in), w = load(iw_in);
  for (int h = 0; h < IH; ++h) {
    rope(q.data() + h * ID, ID, a);
    if (k.official) indexer_round_trip(q.data() + h * ID, ID);
  }
  const float dscale = float(std::pow(double(ID), -0.5)), hscale = float(std::pow(double(IH), -0.5));
  for (float& v : w) v *= hscale;
  std::vector<float> score(n_vis, 0.0f);
  for (int n = 0; n < n_vis; ++n) {
    float s = 0.0f;
    for (int h = 0; h < IH; ++h)
      s += std::fmax(dot(q.data() + h * ID, index + int64_t(n) * ID, ID), 0.0f) * dscale * w[h];
    score[n] = s;
  }
  std::vector<int> keep;
  if (n_vis <= k.top_k) {
    for (int n = 0; n < n_vis; ++n) keep.push_back(n);
    return keep;
  }
  std::vector<float> sorted = score;
  std::nth_element(sorted.begin(), sorted.begin() + (k.top_k - 1), sorted.end(), std::greater<float>());
  const float kth = sorted[k.top_k - 1];
  int need = k.top_k;
  for (float s : score) need -= s > kth;
  for (int n = 0; n < n_vis; ++n)
    if (score[n] > kth || (score[n] == kth && need-- > 0)) keep.push_back(n);
  return keep;
}

struct Task {
  AttnConst k;
  const int32_t* p;
  View q, kv, kv_norm, sinks, inv_freq;
  Pool comp, index;  // ratio > 0, ratio 4
  View iq, iw;       // k.select
  float *out, *raw;
  int cap;
};

void run(const Task& t) {
  const AttnConst& k = t.k;
  const int H = k.n_head, hd = k.head_dim, W = k.window, R = k.ratio;
  const int64_t p = *t.p;
  if (p < 0) {  // no position to write: the state stays as it was, the output says so
    std::fill(t.out, t.out + size_t(H) * hd, NAN);
    return;
  }
  const std::vector<float> inv_freq = load(t.inv_freq), kv_norm = load(t.kv_norm), sinks = load(t.sinks);
  const Angles a = angles(p, inv_freq);
  std::vector<float> q = load(t.q), kv = load(t.kv);
  for (int h = 0; h < H; ++h) {
    rms_norm(q.data() + h * hd, hd, nullptr, k.eps);
    rope(q.data() + h * hd, hd, a);
  }
  rms_norm(kv.data(), hd, kv_norm.data(), k.eps);
  rope(kv.data(), hd, a);
  kv_row(kv.data(), hd, k);
  std::memcpy(t.raw + (p % W) * hd, kv.data(), sizeof(float) * hd);

  std::vector<const float*> keys;  // the live keys: ring slots s <= p, then visible (kept) rows
  for (int s = 0; s < W && s <= p; ++s) keys.push_back(t.raw + int64_t(s) * hd);
  if (R) {
    pool_one(t.comp, p, t.cap, inv_freq, k, false);
    const int n_vis = int(std::min<int64_t>((p + 1) / R, t.cap));
    if (R == 4) pool_one(t.index, p, t.cap, inv_freq, k, true);
    if (k.select) {
      for (int n : select_rows(t.iq, t.iw, t.index.rows, n_vis, a, k)) keys.push_back(t.comp.rows + int64_t(n) * hd);
    } else {
      for (int n = 0; n < n_vis; ++n) keys.push_back(t.comp.rows + int64_t(n) * hd);
    }
  }

  // Keys in the outer loops, heads inside: each key row is read twice per thread, while q, the
  // scores and the outputs of its heads stay in cache (64 heads x 512 at Flash widths). Heads
  // are split over threads (each head's steps are the same whatever the split).
  const float scale = float(std::pow(double(hd), -0.5));  // as Python's hd ** -0.5
  const size_t N = keys.size();
  std::vector<float> s(size_t(H) * N), denom(H);
  split_rows(H, int64_t(N) * hd * 2, [&](int64_t h0, int64_t h1) {
    for (size_t j = 0; j < N; ++j)
      for (int64_t h = h0; h < h1; ++h) s[h * N + j] = dot(q.data() + h * hd, keys[j], hd) * scale;
    for (int64_t h = h0; h < h1; ++h) {
      float* sh = s.data() + h * N;
      float top = sinks[h];
      for (size_t j = 0; j < N; ++j) top = max(top, sh[j]);
      float sum = 0.0f;
      for (size_t j = 0; j < N; ++j) sum += (sh[j] = exp_neg(sh[j] - top));
      denom[h] = sum + exp_neg(sinks[h] - top);  // the sink takes mass, adds no value
    }
    std::fill(t.out + h0 * hd, t.out + h1 * hd, 0.0f);
    for (size_t j = 0; j < N; ++j)
      for (int64_t h = h0; h < h1; ++h) axpy(t.out + h * hd, keys[j], s[h * N + j], hd);
    for (int64_t h = h0; h < h1; ++h) {
      float* o = t.out + h * hd;
      for (int i = 0; i < hd; ++i) o[i] /= denom[h];
      rope(o, hd, a, -1.0f);
    }
  });
}

// The state output starts as its input: the same buffer when MLX lets us donate it.
struct StateCopy {
  View src;
  float* dst;
};

float* adopt(const mx::array& in, mx::array& out, std::vector<StateCopy>& copies) {
  if (in.is_donatable() && in.flags().row_contiguous && in.data_size() == in.size()) {
    out.copy_shared_buffer(in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    copies.push_back({view(in), out.data<float>()});
  }
  return out.data<float>();
}

class AttentionDecode : public mx::Primitive {
 public:
  AttentionDecode(mx::Stream s, AttnConst k) : mx::Primitive(s), k_(k) {}

  // Inputs: p, q, kv, kv_norm, sinks, inv_freq, raw; ratio > 0: kv, gate, ape, norm, rows, f_kv,
  // f_sc; ratio 4: the indexer's seven the same; select: indexer q, indexer weights.
  // Outputs: o, raw, then each compressor's rows, f_kv, f_sc.
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    std::vector<StateCopy> copies;  // the states' buffers first: begin_eval leaves them as set
    Task t{k_, in[0].data<int32_t>(), view(in[1]), view(in[2]), view(in[3]), view(in[4]), view(in[5])};
    t.raw = adopt(in[6], out[1], copies);
    auto pool = [&](int i, int o, int ratio, int dim) {
      return Pool{view(in[i]), view(in[i + 1]), view(in[i + 2]), view(in[i + 3]),
                  adopt(in[i + 4], out[o], copies), adopt(in[i + 5], out[o + 1], copies),
                  adopt(in[i + 6], out[o + 2], copies), ratio, dim};
    };
    if (k_.ratio) {
      t.comp = pool(7, 2, k_.ratio, k_.head_dim);
      t.cap = in[11].shape(0);
    }
    if (k_.ratio == 4) t.index = pool(14, 5, 4, k_.ix_dim);
    if (k_.select) t.iq = view(in[21]), t.iw = view(in[22]);
    auto& enc = begin_eval(stream(), in, out);
    t.out = out[0].data<float>();
    enc.dispatch([t = std::move(t), copies = std::move(copies)]() {
      for (const auto& c : copies) gather(c.src, c.dst);
      run(t);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MagnetarAttentionDecode has a CPU kernel only");
  }

  const char* name() const override { return "MagnetarAttentionDecode"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return k_ == static_cast<const AttentionDecode&>(other).k_;
  }

 private:
  AttnConst k_;
};

void need(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("attention_decode: ") + what);
}

void need_f32(const mx::array& a, size_t size, const char* what) {
  need(a.dtype() == mx::float32 && a.size() == size, what);
}

void need_state(const mx::array& a, int rows, int width, const char* what) {
  need(a.dtype() == mx::float32 && a.ndim() == 2 && (rows < 0 || a.shape(0) == rows) && a.shape(1) == width, what);
}

nb::list attention_decode(const std::vector<mx::array>& in, int n_head, int head_dim, int window, int ratio,
                          float eps, bool official, int nope, int ix_heads, int ix_dim, int top_k) {
  const bool select = ratio == 4 && in.size() == 23;
  const size_t want = ratio == 0 ? 7 : ratio == 4 ? (select ? 23 : 21) : 14;
  need(in.size() == want, "7 inputs, 14 with a compressor, 21 with the indexer, 23 when it selects");
  need(in[0].dtype() == mx::int32 && in[0].size() == 1, "p must be one int32");
  need_f32(in[1], size_t(n_head) * head_dim, "q must be float32 [n_head * head_dim]");
  need_f32(in[2], head_dim, "kv must be float32 [head_dim]");
  need_f32(in[3], head_dim, "kv_norm must be float32 [head_dim]");
  need_f32(in[4], n_head, "sinks must be float32 [n_head]");
  const int half = int(in[5].size());
  need(in[5].dtype() == mx::float32 && 2 * half <= head_dim && (ratio != 4 || 2 * half <= ix_dim),
       "inv_freq must be float32 [rope_dim / 2]");
  need_state(in[6], window, head_dim, "raw must be float32 [window, head_dim]");
  need(nope % 64 == 0 && nope <= head_dim, "nope must be a multiple of 64 within head_dim");
  auto check_pool = [&](int i, int R, int dim) {
    const int width = (R == 4 ? 2 : 1) * dim, rows = window_slots(R);
    need_f32(in[i], width, "compressor kv must be float32 [lanes * dim]");
    need_f32(in[i + 1], width, "compressor gate must be float32 [lanes * dim]");
    need_f32(in[i + 2], size_t(R) * width, "compressor ape must be float32 [ratio, lanes * dim]");
    need_f32(in[i + 3], dim, "compressor norm must be float32 [dim]");
    need_state(in[i + 4], -1, dim, "compressed rows must be float32 [cap, dim]");
    need_state(in[i + 5], rows, width, "compressor frontier must be float32 [rows, lanes * dim]");
    need_state(in[i + 6], rows, width, "compressor frontier scores must be float32 [rows, lanes * dim]");
  };
  std::vector<mx::Shape> shapes{{1, n_head, head_dim}, in[6].shape()};
  if (ratio) {
    check_pool(7, ratio, head_dim);
    for (int i = 11; i < 14; ++i) shapes.push_back(in[i].shape());
  }
  if (ratio == 4) {
    need((ix_dim & (ix_dim - 1)) == 0 && ix_dim % 32 == 0, "the indexer dim must be a power of two >= 32");
    check_pool(14, 4, ix_dim);
    need(in[18].shape(0) == in[11].shape(0), "indexer rows and compressed rows must have one capacity");
    for (int i = 18; i < 21; ++i) shapes.push_back(in[i].shape());
  }
  if (select) {
    need(top_k > 0 && top_k < in[11].shape(0), "top_k must be below the capacity when selecting");
    need_f32(in[21], size_t(ix_heads) * ix_dim, "indexer q must be float32 [heads * dim]");
    need_f32(in[22], ix_heads, "indexer weights must be float32 [heads]");
  }
  const AttnConst k{n_head, head_dim, window, ratio, half, ix_heads, ix_dim, top_k, eps, official, select, nope};
  const std::vector<mx::Dtype> types(shapes.size(), mx::float32);
  auto outs = mx::array::make_arrays(std::move(shapes), types,
                                     std::make_shared<AttentionDecode>(mx::default_stream(mx::Device::cpu), k), in);
  nb::list result;
  for (auto& o : outs) result.append(o);
  return result;
}

class PoolWindows : public mx::Primitive {
 public:
  PoolWindows(mx::Stream s, int ratio, int dim) : mx::Primitive(s), ratio_(ratio), dim_(dim) {}

  // in: kv, sc [slots, width]; out: [n, dim]
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& enc = begin_eval(stream(), in, out);
    const View kv = view(in[0]), sc = view(in[1]);
    const int R = ratio_, d = dim_, width = in[0].shape(1);
    const int64_t n = out[0].shape(0);
    float* dst = out[0].data<float>();
    enc.dispatch([=]() {
      std::vector<float> kc, scc;
      const float *k = dense<float>(kv, kc), *s = dense<float>(sc, scc);
      split_rows(n, int64_t(window_slots(R)) * d * 4, [&](int64_t c0, int64_t c1) {
        pool_windows_rows(k, s, width, R, d, c0, c1, dst);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MagnetarPoolWindows has a CPU kernel only");
  }

  const char* name() const override { return "MagnetarPoolWindows"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const PoolWindows&>(other);
    return ratio_ == o.ratio_ && dim_ == o.dim_;
  }

 private:
  int ratio_, dim_;
};

mx::array pool_windows(const mx::array& kv, const mx::array& sc, int n, int ratio, int dim) {
  const int width = (ratio == 4 ? 2 : 1) * dim;
  if (ratio < 1 || dim < 1 || n < 0)
    throw std::invalid_argument("pool_windows: ratio and dim must be positive, n not negative");
  if (kv.ndim() != 2 || kv.dtype() != mx::float32 || kv.shape(1) != width || sc.shape() != kv.shape() ||
      sc.dtype() != mx::float32)
    throw std::invalid_argument("pool_windows: kv and sc must be float32 [slots, lanes * dim], one shape");
  if (kv.shape(0) < int64_t(n) * ratio + (ratio == 4 ? 4 : 0))
    throw std::invalid_argument("pool_windows: fewer slots than n windows need");
  return mx::array({n, dim}, mx::float32, std::make_shared<PoolWindows>(mx::default_stream(mx::Device::cpu), ratio, dim),
                   {kv, sc});
}

}  // namespace

void register_attention(nb::module_& m) {
  m.def("attention_decode", &attention_decode,
        "inputs (see mlx_attention.cpp), n_head, head_dim, window, ratio, eps, official, nope, indexer heads, "
        "indexer dim, top_k -> [o, raw, (rows, f_kv, f_sc) per compressor]");
  m.def("pool_windows", &pool_windows, "kv [slots, lanes * dim], sc (the same), n, ratio, dim -> [n, dim]: "
        "n windows pooled by a per-dimension softmax (attention_decode.pool_windows, its bits)");
}

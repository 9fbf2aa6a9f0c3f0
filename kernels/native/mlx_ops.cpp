// mlx_ops.cpp: hot blocks of the decode step as MLX primitives with a CPU
// kernel, so each is one node of MLX's graph (kernels/mlx_ext.py builds this
// at first use, with nanobind, against the MLX wheel's headers and libmlx).
//
// HcPre is kernels/hyper.py's hc_pre (docs/spec/v4-model.md section 3.3): RMS
// norm of the token's hc streams, the product with the (2 + hc) * hc mix rows
// of fn (f32, f16 or bf16 as stored), sigmoid pre / post, the hc x hc comb
// softmaxed per row and Sinkhorn-normalized in ops.sinkhorn's order (columns,
// then iters - 1 row / column passes), and x_in = sum_i pre[i] * X[i]; given
// the sublayer's norm weight it also applies that RMS norm to x_in (RmsNorm's bits).
// HcPost is hyper.hc_post: X'[j] = post[j] * y + sum_i comb[i][j] * X[i].
// RmsNorm is rowops.rmsnorm over rows, the same bits: the square, mean, rsqrt
// and the two multiplies that MLX runs as three nodes (a product, a sum, a fused rest).
// Route is Backend.route: the router's scores, its top-k (or the hash layers'
// given ids) and the chosen weights, seven MLX nodes as one.
// NormRope is Backend.norm_rope, a prefill chunk's per-head RMS norm and RoPE (or
// RoPE undone): rowops' rms, rmsnorm and rope with their bits, in one pass over the
// rows instead of MLX's slices, stack and concatenate (~100 ms per layer at Flash
// widths for a 256-token chunk's queries, 64 heads of 512).
// Called inside mx.compile like any op: the primitive only records its
// inputs; eval_cpu allocates the outputs and queues the work on the CPU
// stream's encoder, as MLX's own CPU primitives do (the inputs' buffers are
// held by the graph until the task has run).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "mlx_common.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace mlx_ext;

namespace {

struct HcConst {
  float rms_eps, hc_eps;
  int iters;
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// The same sums for F16 rows (fn as stored), widened 8 at a time by F16C: MLX's
// float16_t converts value by value in integer code here, 11x slower at Flash widths.
// Four chains of FMAs, so the adds' latency does not bound the row (hc_pre makes 24 a token).
float f16c_dot(const mx::float16_t* w, const float* x, int n) {
  auto wide = [&](int k) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))); };
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int k = 0;
  for (; k + 32 <= n; k += 32) {
    s0 = _mm256_fmadd_ps(wide(k), _mm256_loadu_ps(x + k), s0);
    s1 = _mm256_fmadd_ps(wide(k + 8), _mm256_loadu_ps(x + k + 8), s1);
    s2 = _mm256_fmadd_ps(wide(k + 16), _mm256_loadu_ps(x + k + 16), s2);
    s3 = _mm256_fmadd_ps(wide(k + 24), _mm256_loadu_ps(x + k + 24), s3);
  }
  for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(wide(k), _mm256_loadu_ps(x + k), s0);
  float acc[8];
  _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; k < n; ++k) acc[0] += float(w[k]) * x[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
#endif

// fn's row . x: F16 rows through F16C where the CPU has it (dot, mlx_common.h, otherwise).
template <typename W>
float row_dot(const W* w, const float* x, int n) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if constexpr (std::is_same_v<W, mx::float16_t>) return f16c_dot(w, x, n);
#endif
  return dot(w, x, n);
}

// The small per-token math after the mix product m[(2 + hc) * hc] (already
// RMS-scaled): pre, post and the Sinkhorn-normalized comb.
void hc_mix(const float* m, const float* scale, const float* base, int hc, const HcConst& k, float* pre,
            float* post, float* comb) {
  auto sigmoid = [](float v) { return 1.0f / (1.0f + std::exp(-v)); };
  for (int i = 0; i < hc; ++i) {
    pre[i] = sigmoid(m[i] * scale[0] + base[i]) + k.hc_eps;
    post[i] = 2.0f * sigmoid(m[hc + i] * scale[1] + base[hc + i]);
  }
  float* c = comb;
  for (int a = 0; a < hc; ++a) {
    float* row = c + a * hc;
    float top = -INFINITY;
    for (int b = 0; b < hc; ++b) {
      row[b] = m[2 * hc + a * hc + b] * scale[2] + base[2 * hc + a * hc + b];
      top = std::fmax(top, row[b]);
    }
    float sum = 0.0f;
    for (int b = 0; b < hc; ++b) sum += (row[b] = std::exp(row[b] - top));
    for (int b = 0; b < hc; ++b) row[b] = row[b] / sum + k.hc_eps;
  }
  for (int it = 0; it < k.iters; ++it) {
    if (it > 0) {  // rows, from the second pass on
      for (int a = 0; a < hc; ++a) {
        float sum = 0.0f;
        for (int b = 0; b < hc; ++b) sum += c[a * hc + b];
        for (int b = 0; b < hc; ++b) c[a * hc + b] /= sum + k.hc_eps;
      }
    }
    for (int b = 0; b < hc; ++b) {  // columns
      float sum = 0.0f;
      for (int a = 0; a < hc; ++a) sum += c[a * hc + b];
      for (int a = 0; a < hc; ++a) c[a * hc + b] /= sum + k.hc_eps;
    }
  }
}

// norm_v.data, when set: x_in leaves RMS-normalized and times that weight (rowops.rmsnorm's bits).
// Tokens [t0, t1).
template <typename W>
void hc_pre_tokens(View X, View fn, View scale_v, View base_v, View norm_v, int64_t t0, int64_t t1, int hc, int D,
                   HcConst k, float* x_in, float* post, float* comb) {
  const int n = hc * D, mix = (2 + hc) * hc;
  std::vector<float> xs(n), m(mix), pre(hc), scale(3), base(mix);
  for (int i = 0; i < 3; ++i) scale[i] = scale_v.as<float>()[i * scale_v.strides[0]];
  for (int j = 0; j < mix; ++j) base[j] = base_v.as<float>()[j * base_v.strides[0]];
  std::vector<W> wrow(fn.strides[1] == 1 ? 0 : n);
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = X.as<float>() + t * X.strides[0];
    double squares = 0.0;  // ds4 sums the squares in double
    for (int i = 0; i < hc; ++i)
      for (int d = 0; d < D; ++d) {
        const float v = xt[i * X.strides[1] + d * X.strides[2]];
        xs[i * D + d] = v;
        squares += double(v) * v;
      }
    const float r = 1.0f / std::sqrt(float(squares / n) + k.rms_eps);
    for (int j = 0; j < mix; ++j) {
      const W* row = fn.as<W>() + j * fn.strides[0];
      if (fn.strides[1] != 1) {
        for (int c = 0; c < n; ++c) wrow[c] = row[c * fn.strides[1]];
        row = wrow.data();
      }
      m[j] = r * row_dot(row, xs.data(), n);  // fn @ (x * r) = r * (fn @ x)
    }
    hc_mix(m.data(), scale.data(), base.data(), hc, k, pre.data(), post + t * hc, comb + t * hc * hc);
    // Stream by stream, so the loops over d vectorize; per d the sum runs in i order as before.
    float* xt_in = x_in + int64_t(t) * D;
    for (int d = 0; d < D; ++d) xt_in[d] = pre[0] * xs[d];
    for (int i = 1; i < hc; ++i)
      for (int d = 0; d < D; ++d) xt_in[d] += pre[i] * xs[i * D + d];
    if (norm_v.data) {
      const float r = inverse_rms(xt_in, D, k.rms_eps);
      for (int d = 0; d < D; ++d) xt_in[d] = norm_v.as<float>()[d * norm_v.strides[0]] * (xt_in[d] * r);
    }
  }
}

class HcPre : public mx::Primitive {
 public:
  HcPre(mx::Stream s, HcConst k) : mx::Primitive(s), k_(k) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& enc = begin_eval(stream(), in, out);
    const mx::array &X = in[0], &fn = in[1];
    const int T = X.shape(0), hc = X.shape(1), D = X.shape(2);
    const View x = view(X), w = view(fn), scale = view(in[2]), base = view(in[3]);
    const View norm = in.size() > 4 ? view(in[4]) : View{};
    float *x_in = out[0].data<float>(), *post = out[1].data<float>(), *comb = out[2].data<float>();
    const HcConst k = k_;
    const mx::Dtype type = fn.dtype();
    enc.dispatch([=]() {
      split_rows(T, int64_t((2 + hc) * hc) * hc * D, [&](int64_t t0, int64_t t1) {
        if (type == mx::float32)
          hc_pre_tokens<float>(x, w, scale, base, norm, t0, t1, hc, D, k, x_in, post, comb);
        else if (type == mx::float16)
          hc_pre_tokens<mx::float16_t>(x, w, scale, base, norm, t0, t1, hc, D, k, x_in, post, comb);
        else
          hc_pre_tokens<mx::bfloat16_t>(x, w, scale, base, norm, t0, t1, hc, D, k, x_in, post, comb);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MagnetarHcPre has a CPU kernel only");
  }

  const char* name() const override { return "MagnetarHcPre"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const HcPre&>(other);
    return k_.rms_eps == o.k_.rms_eps && k_.hc_eps == o.k_.hc_eps && k_.iters == o.k_.iters;
  }

 private:
  HcConst k_;
};

// Tokens [t0, t1).
void hc_post_tokens(View y, View X, View post, View comb, int64_t t0, int64_t t1, int hc, int D, float* out) {
  auto at = [](View v, int64_t a, int64_t b, int64_t c = 0) {
    return v.as<float>()[a * v.strides[0] + b * v.strides[1] + c * v.strides[2]];
  };
  // unit stride along D (the usual case): loops that vectorize
  const bool rows = y.strides[1] == 1 && X.strides[2] == 1;
  for (int64_t t = t0; t < t1; ++t)
    for (int j = 0; j < hc; ++j) {
      float* o = out + (t * hc + j) * D;
      const float p = at(post, t, j);
      if (rows) {
        const float* yt = y.as<float>() + t * y.strides[0];
        for (int d = 0; d < D; ++d) o[d] = p * yt[d];
      } else {
        for (int d = 0; d < D; ++d) o[d] = p * at(y, t, d);
      }
      for (int i = 0; i < hc; ++i) {
        const float c = at(comb, t, i, j);
        if (rows) {
          const float* xi = X.as<float>() + t * X.strides[0] + i * X.strides[1];
          for (int d = 0; d < D; ++d) o[d] += c * xi[d];
        } else {
          for (int d = 0; d < D; ++d) o[d] += c * at(X, t, i, d);
        }
      }
    }
}

class HcPost : public mx::Primitive {
 public:
  explicit HcPost(mx::Stream s) : mx::Primitive(s) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& enc = begin_eval(stream(), in, out);
    mx::array& o = out[0];
    const int T = o.shape(0), hc = o.shape(1), D = o.shape(2);
    const View y = view(in[0]), X = view(in[1]), post = view(in[2]), comb = view(in[3]);
    float* dst = o.data<float>();
    enc.dispatch([=]() {
      split_rows(T, int64_t(hc) * (hc + 1) * D,
                 [&](int64_t t0, int64_t t1) { hc_post_tokens(y, X, post, comb, t0, t1, hc, D, dst); });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MagnetarHcPost has a CPU kernel only");
  }

  const char* name() const override { return "MagnetarHcPost"; }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

// y[t] = w * (x[t] * inverse_rms(x[t])) for rows [t0, t1) of x (a strided view)
void rms_norm_rows(View x, const float* weight, int64_t t0, int64_t t1, int D, float eps, float* y) {
  std::vector<float> row(x.strides[1] == 1 ? 0 : D);
  for (int64_t t = t0; t < t1; ++t) {
    float* yt = y + t * D;
    const float* xt = x.as<float>() + t * x.strides[0];
    if (x.strides[1] != 1) {  // a transposed or broadcast input: gathered first
      for (int d = 0; d < D; ++d) row[d] = xt[d * x.strides[1]];
      xt = row.data();
    }
    const float r = inverse_rms(xt, D, eps);
    for (int d = 0; d < D; ++d) yt[d] = weight[d] * (xt[d] * r);
  }
}

class RmsNorm : public mx::Primitive {
 public:
  RmsNorm(mx::Stream s, float eps) : mx::Primitive(s), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& enc = begin_eval(stream(), in, out);
    mx::array& o = out[0];
    const View x = view(in[0]), w = view(in[1]);
    const int T = o.shape(0), D = o.shape(1);
    const float eps = eps_;
    float* dst = o.data<float>();
    enc.dispatch([=]() {
      std::vector<float> copy;
      const float* weight = dense(w, copy);
      split_rows(T, D, [&](int64_t t0, int64_t t1) { rms_norm_rows(x, weight, t0, t1, D, eps, dst); });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MagnetarRmsNorm has a CPU kernel only");
  }

  const char* name() const override { return "MagnetarRmsNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }

 private:
  float eps_;
};

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  if (x.ndim() != 2 || x.dtype() != mx::float32)
    throw std::invalid_argument("rms_norm: x must be float32 [T, D]");
  if (w.ndim() != 1 || w.shape(0) != x.shape(1) || w.dtype() != mx::float32)
    throw std::invalid_argument("rms_norm: w must be float32 [D]");
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(mx::default_stream(mx::Device::cpu), eps),
                   {x, w});
}

// -- NormRope ------------------------------------------------------------------------------

struct NormRopeConst {
  bool norm;    // RMS-normalize each row first (times weight when given)
  float eps;
  float sign;   // +1 rotates, -1 undoes the rotation
};

// Rows [r0, r1) of x [rows, n]; row r belongs to token r / heads (its cos, sin [half]).
// rope's products and sums are rounded one by one (x0 * c - x1 * s is not one fused rounding).
MLX_EXT_ROUNDED_STEPS void norm_rope_rows(const float* x, const float* weight, const float* cos, const float* sin,
                                           int heads, int n, int half, NormRopeConst c, int64_t r0, int64_t r1,
                                           float* y) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    if (c.norm) {
      const float inv = inverse_rms(xr, n, c.eps);
      for (int i = 0; i < n; ++i) yr[i] = weight ? weight[i] * (xr[i] * inv) : xr[i] * inv;
    } else if (yr != xr) {
      std::memcpy(yr, xr, sizeof(float) * size_t(n));
    }
    const float* ct = cos + (r / heads) * half;
    const float* st = sin + (r / heads) * half;
    float* pair = yr + n - 2 * half;
    for (int i = 0; i < half; ++i) {
      const float x0 = pair[2 * i], x1 = pair[2 * i + 1], co = ct[i], si = c.sign * st[i];
      pair[2 * i] = x0 * co - x1 * si;
      pair[2 * i + 1] = x0 * si + x1 * co;
    }
  }
}

class NormRope : public mx::Primitive {
 public:
  NormRope(mx::Stream s, NormRopeConst c) : mx::Primitive(s), c_(c) {}

  // in: x [T, heads, n] or [T, n], cos [T, half], sin [T, half], weight [n] (when norm and given)
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const mx::array& xin = in[0];
    // A chunk's rows are worked in place when nothing else holds them: a fresh output of this
    // size (33 MB at Flash widths) costs more in first-touch page faults than the work itself.
    if (xin.is_donatable() && xin.flags().row_contiguous && xin.data_size() == xin.size())
      out[0].copy_shared_buffer(xin);
    auto& enc = begin_eval(stream(), in, out);
    const View x = view(in[0]), cs = view(in[1]), sn = view(in[2]);
    const View w = in.size() > 3 ? view(in[3]) : View{};
    const int T = in[0].shape(0), n = in[0].shape(-1), heads = in[0].ndim() == 3 ? in[0].shape(1) : 1;
    const int half = in[1].shape(1);
    const NormRopeConst c = c_;
    float* dst = out[0].data<float>();
    enc.dispatch([=]() {
      std::vector<float> xc, cc, sc, wc;
      const float *xp = dense<float>(x, xc), *cp = dense<float>(cs, cc), *sp = dense<float>(sn, sc);
      const float* wp = w.data ? dense<float>(w, wc) : nullptr;
      split_rows(int64_t(T) * heads, n, [&](int64_t r0, int64_t r1) {
        norm_rope_rows(xp, wp, cp, sp, heads, n, half, c, r0, r1, dst);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MagnetarNormRope has a CPU kernel only");
  }

  const char* name() const override { return "MagnetarNormRope"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const NormRope&>(other);
    return c_.norm == o.c_.norm && c_.eps == o.c_.eps && c_.sign == o.c_.sign;
  }

 private:
  NormRopeConst c_;
};

// eps given: RMS norm first (times weight when given); then RoPE of the trailing 2 * half
// values of each row with token t's cos and sin, sign -1 undoing it.
mx::array norm_rope(const mx::array& x, const mx::array& cos, const mx::array& sin, std::optional<float> eps,
                    std::optional<mx::array> weight, float sign) {
  if ((x.ndim() != 2 && x.ndim() != 3) || x.dtype() != mx::float32)
    throw std::invalid_argument("norm_rope: x must be float32 [T, heads, n] or [T, n]");
  const int T = x.shape(0), n = x.shape(-1);
  if (cos.ndim() != 2 || cos.shape(0) != T || cos.shape() != sin.shape() || cos.dtype() != mx::float32 ||
      sin.dtype() != mx::float32 || 2 * cos.shape(1) > n)
    throw std::invalid_argument("norm_rope: cos and sin must be float32 [T, half], 2 * half <= n");
  if (weight && (!eps || weight->ndim() != 1 || weight->shape(0) != n || weight->dtype() != mx::float32))
    throw std::invalid_argument("norm_rope: the norm weight must be float32 [n], with eps");
  if (sign != 1.0f && sign != -1.0f) throw std::invalid_argument("norm_rope: sign must be 1 or -1");
  std::vector<mx::array> inputs{x, cos, sin};
  if (weight) inputs.push_back(*weight);
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<NormRope>(mx::default_stream(mx::Device::cpu),
                                              NormRopeConst{eps.has_value(), eps.value_or(0.0f), sign}),
                   inputs);
}

struct RouteConst {
  int k;
  bool norm;
  float scale, floor;
};

// Per token: scores s = sqrt(softplus(l)) (rowops.softplus: l past 20 is its own softplus);
// the k largest s + bias, larger first and the lower id first among equals, or the ids
// given; w = the chosen s, over their sum (not below floor) if norm, times scale.
void route_tokens(View logits, View bias, View chosen, int T, int E, RouteConst c, int32_t* ids, float* w) {
  std::vector<float> s(E), key(bias.data ? E : 0);
  std::vector<int> order(bias.data ? E : 0);
  for (int t = 0; t < T; ++t, ids += c.k, w += c.k) {
    const float* l = logits.as<float>() + t * logits.strides[0];
    for (int e = 0; e < E; ++e) {
      const float v = l[e * logits.strides[1]];
      s[e] = std::sqrt(v > 20.0f ? v : std::log1p(std::exp(std::min(v, 20.0f))));
    }
    if (bias.data) {
      for (int e = 0; e < E; ++e) key[e] = s[e] + bias.as<float>()[e * bias.strides[0]];
      for (int e = 0; e < E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + c.k, order.end(),
                        [&](int a, int b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
      for (int j = 0; j < c.k; ++j) ids[j] = order[j];
    } else {
      for (int j = 0; j < c.k; ++j) ids[j] = chosen.as<int32_t>()[t * chosen.strides[0] + j * chosen.strides[1]];
    }
    float sum = 0.0f;
    for (int j = 0; j < c.k; ++j) sum += (w[j] = s[ids[j]]);
    const float div = c.norm ? std::max(sum, c.floor) : 1.0f;
    for (int j = 0; j < c.k; ++j) w[j] = w[j] / div * c.scale;
  }
}

class Route : public mx::Primitive {
 public:
  Route(mx::Stream s, RouteConst c, bool hash) : mx::Primitive(s), c_(c), hash_(hash) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& enc = begin_eval(stream(), in, out);
    const View logits = view(in[0]), none{};
    const View bias = hash_ ? none : view(in[1]), chosen = hash_ ? view(in[1]) : none;
    const int T = in[0].shape(0), E = in[0].shape(1);
    const RouteConst c = c_;
    int32_t* ids = out[0].data<int32_t>();
    float* w = out[1].data<float>();
    enc.dispatch([=]() { route_tokens(logits, bias, chosen, T, E, c, ids, w); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MagnetarRoute has a CPU kernel only");
  }

  const char* name() const override { return "MagnetarRoute"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Route&>(other);
    return c_.k == o.c_.k && c_.norm == o.c_.norm && c_.scale == o.c_.scale && c_.floor == o.c_.floor &&
           hash_ == o.hash_;
  }

 private:
  RouteConst c_;
  bool hash_;
};

// With bias (float32 [E]) the ids are chosen here; with chosen (int32 [T, k]) they are given.
nb::tuple route(const mx::array& logits, int k, std::optional<mx::array> bias, std::optional<mx::array> chosen,
                bool norm, float scale, float floor) {
  if (logits.ndim() != 2 || logits.dtype() != mx::float32)
    throw std::invalid_argument("route: logits must be float32 [T, n_expert]");
  const int T = logits.shape(0), E = logits.shape(1);
  if (k < 1 || k > E) throw std::invalid_argument("route: k must be in [1, n_expert]");
  if (bias.has_value() == chosen.has_value()) throw std::invalid_argument("route: give a bias or the chosen ids");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != E || bias->dtype() != mx::float32))
    throw std::invalid_argument("route: bias must be float32 [n_expert]");
  if (chosen && (chosen->shape() != mx::Shape{T, k} || chosen->dtype() != mx::int32))
    throw std::invalid_argument("route: chosen ids must be int32 [T, k]");
  auto outs = mx::array::make_arrays({{T, k}, {T, k}}, {mx::int32, mx::float32},
                                     std::make_shared<Route>(mx::default_stream(mx::Device::cpu),
                                                             RouteConst{k, norm, scale, floor}, chosen.has_value()),
                                     {logits, bias ? *bias : *chosen});
  return nb::make_tuple(outs[0], outs[1]);
}

mx::array hc_post(const mx::array& y, const mx::array& X, const mx::array& post, const mx::array& comb) {
  if (X.ndim() != 3 || y.ndim() != 2 || post.ndim() != 2 || comb.ndim() != 3)
    throw std::invalid_argument("hc_post: y [T, D], X [T, hc, D], post [T, hc], comb [T, hc, hc]");
  const int T = X.shape(0), hc = X.shape(1), D = X.shape(2);
  if (y.shape() != mx::Shape{T, D} || post.shape() != mx::Shape{T, hc} || comb.shape() != mx::Shape{T, hc, hc})
    throw std::invalid_argument("hc_post: y [T, D], X [T, hc, D], post [T, hc], comb [T, hc, hc] disagree");
  for (const mx::array* a : {&y, &X, &post, &comb})
    if (a->dtype() != mx::float32) throw std::invalid_argument("hc_post: float32 inputs only");
  return mx::array({T, hc, D}, mx::float32, std::make_shared<HcPost>(mx::default_stream(mx::Device::cpu)),
                   {y, X, post, comb});
}

nb::tuple hc_pre(const mx::array& X, const mx::array& fn, const mx::array& scale, const mx::array& base,
                 float rms_eps, float hc_eps, int iters, std::optional<mx::array> norm) {
  if (X.ndim() != 3 || X.dtype() != mx::float32)
    throw std::invalid_argument("hc_pre: X must be float32 [T, hc, D]");
  const int T = X.shape(0), hc = X.shape(1), D = X.shape(2), mix = (2 + hc) * hc;
  if (fn.ndim() != 2 || fn.shape(0) != mix || fn.shape(1) != hc * D ||
      (fn.dtype() != mx::float32 && fn.dtype() != mx::float16 && fn.dtype() != mx::bfloat16))
    throw std::invalid_argument("hc_pre: fn must be float32/float16/bfloat16 [(2 + hc) * hc, hc * D]");
  if (scale.ndim() != 1 || scale.size() != 3 || base.ndim() != 1 || base.size() != size_t(mix) ||
      scale.dtype() != mx::float32 || base.dtype() != mx::float32)
    throw std::invalid_argument("hc_pre: scale must be float32 [3], base float32 [(2 + hc) * hc]");
  if (norm && (norm->ndim() != 1 || norm->shape(0) != D || norm->dtype() != mx::float32))
    throw std::invalid_argument("hc_pre: the norm weight must be float32 [D]");
  std::vector<mx::array> inputs{X, fn, scale, base};
  if (norm) inputs.push_back(*norm);
  auto outs = mx::array::make_arrays({{T, D}, {T, hc}, {T, hc, hc}}, {mx::float32, mx::float32, mx::float32},
                                     std::make_shared<HcPre>(mx::default_stream(mx::Device::cpu),
                                                             HcConst{rms_eps, hc_eps, iters}),
                                     inputs);
  return nb::make_tuple(outs[0], outs[1], outs[2]);
}

}  // namespace

void register_q8(nb::module_& m);  // mlx_q8.cpp
void register_attention(nb::module_& m);  // mlx_attention.cpp
void register_moe(nb::module_& m);  // mlx_moe.cpp

NB_MODULE(_magnetar_mlx_ops, m) {
  register_q8(m);
  register_attention(m);
  register_moe(m);
  m.def("hc_pre", &hc_pre, "X [T, hc, D], fn, scale [3], base, rms_eps, hc_eps, iters, norm [D] | None -> "
        "(x_in, post, comb), x_in RMS-normalized times norm when given", nb::arg("X"), nb::arg("fn"),
        nb::arg("scale"), nb::arg("base"), nb::arg("rms_eps"), nb::arg("hc_eps"), nb::arg("iters"),
        nb::arg("norm").none() = nb::none());
  m.def("route", &route, "logits [T, E], k, bias [E] | None, chosen [T, k] | None, norm, scale, floor -> (ids, w)",
        nb::arg("logits"), nb::arg("k"), nb::arg("bias").none(), nb::arg("chosen").none(), nb::arg("norm"),
        nb::arg("scale"), nb::arg("floor"));
  m.def("rms_norm", &rms_norm, "x [T, D], w [D], eps -> w * x / sqrt(mean(x^2) + eps) per row");
  m.def("norm_rope", &norm_rope, "x [T, heads, n] | [T, n], cos [T, half], sin [T, half], eps | None, "
        "weight [n] | None, sign -> RMS-normed (when eps) then rotated (sign 1) or unrotated (-1) rows",
        nb::arg("x"), nb::arg("cos"), nb::arg("sin"), nb::arg("eps").none() = nb::none(),
        nb::arg("weight").none() = nb::none(), nb::arg("sign") = 1.0f);
  m.def("hc_post", &hc_post, "y [T, D], X [T, hc, D], post [T, hc], comb [T, hc, hc] -> X' [T, hc, D]");
}

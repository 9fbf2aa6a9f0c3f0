// mlx_q8.cpp: y = x @ W.T for a Q8_0 or F16 matrix W as stored in the GGUF, as
// one MLX primitive with a CPU kernel (registered into mlx_ops.cpp's module).
//
// With groups = G, x is [T, G * cols] and W's rows split into G equal groups,
// group g multiplying x's g-th slice of cols (V4's grouped attention output).
//
// A Q8_0 row is blocks of 34 bytes: an f16 scale d, then 32 int8 codes q, and
// w = d * q. The kernel keeps x in float32 (no activation quantization, unlike
// llama.cpp's q8 dot), sums x * q over each block in f32 and adds d times that
// block sum to the row's total, so it reads each weight byte once and never
// widens the matrix. That makes a decode-sized product (a few rows of x)
// memory-bound: on the CPU backend MLX's own paths either dequantize the whole
// matrix per token or run mx.quantized_matmul at ~1 GB/s (issue 16).
//
// With activations "q8_0" (opt-in: llama.cpp's CPU arithmetic) x is rounded first, per
// 32 values, to Q8_0 codes and an f32 scale (d = max|x| / 127, codes to nearest, ties
// to even), and a block's 32 code pairs are multiplied and summed in integers (AVX2:
// vpmaddubsw), exact, then scaled by both d. Fewer instructions per weight byte than
// widening the codes to f32 (~10-20% more GB/s on two cores, bench kernels), for
// ~0.4% relative rounding of each product. Prefill-sized products do not take it.
//
// An F16 row is widened 8 values at a time in registers (F16C) and multiplied
// into f32 sums: half the bytes of the f32 copy MLX would multiply, and no
// widening pass per token (the compressors, indexer and router are F16).
//
// Large matrices are split by output rows over a few threads (the MLX CPU
// stream is one thread, and the experts' C kernels do not run meanwhile).

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
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

constexpr int kBlock = 32;
constexpr int kBlockBytes = 34;
constexpr int64_t kWeightsPerThread = 1 << 21;  // below this a second thread costs more than it saves
constexpr int64_t kChunkWeights = 1 << 17;  // rows handed to a thread at a time (~140 KB of blocks)

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400));
    bits = sign | ((112 - e) << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

constexpr int kTokens = 4;  // tokens that share one pass over a weight row

// x as the row dots read it: f32 values, or (Q8_0 activations) their codes and scales,
// ``stride`` values from one token to the next. A dot starts at value ``at`` of token 0.
struct Operand {
  const float* x = nullptr;
  const int8_t* q = nullptr;  // codes laid out as x
  const float* d = nullptr;  // one scale per 32 codes
  size_t stride = 0;
};

// A block of 32 values as Q8_0 activations: codes q and the returned scale d, q * d ~ x.
// A block holding inf or NaN gets d = NaN (its products come out NaN, as from f32).
float quantize_block(const float* x, int8_t* q) {
  float amax = 0.0f, poison = 0.0f;
  for (int i = 0; i < kBlock; ++i) {
    poison += x[i] * 0.0f;  // 0 unless some value is inf or NaN
    amax = std::max(amax, std::fabs(x[i]));
  }
  if (poison != 0.0f || amax == 0.0f) {
    std::memset(q, 0, kBlock);
    return poison != 0.0f ? NAN : 0.0f;
  }
  const float inverse = 127.0f / amax;
  for (int i = 0; i < kBlock; ++i) q[i] = int8_t(std::nearbyint(x[i] * inverse));
  return amax / 127.0f;
}

// n values (a multiple of 32) of x as Q8_0 activations into q, scales into d.
void quantize_q8_0(const float* x, size_t n, int8_t* q, float* d) {
  for (size_t b = 0; b < n / kBlock; ++b) d[b] = quantize_block(x + b * kBlock, q + b * kBlock);
}

#if defined(__AVX2__) && defined(__FMA__)
float scale(const uint8_t* block) {
  uint16_t h;
  std::memcpy(&h, block, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return f16_to_f32(h);
#endif
}

float horizontal_sum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// A large product streams its matrix from memory once, and the hardware prefetchers alone
// left its loads waiting: one token against a 570 MB Q8_0 matrix (the output head's size)
// read 11 GB/s with f32 activations, 13 with Q8_0 ones; asking for the bytes 2 KiB ahead
// of each step, 14 and 17.5 (2-core Sapphire Rapids VM). Past a row's end is the next row;
// past the matrix's end a prefetch does nothing.
constexpr int kPrefetchBytes = 2048;

void prefetch_ahead(const uint8_t* row) { _mm_prefetch(reinterpret_cast<const char*>(row) + kPrefetchBytes, _MM_HINT_T0); }

__m256 widen8(const uint8_t* codes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes))));
}

// sum over one block of x * q, 8-wide (d not applied)
__m256 block_sum(const __m256 q[4], const float* x) {
  __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
  s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x + 8), s);
  s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x + 16), s);
  return _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x + 24), s);
}

// One Q8_0 row against N tokens (x rows ``x_stride`` apart): each block's 32
// codes are widened once; per token, 32 products go into one 8-wide sum,
// scaled by d into that token's total. N is a template parameter so the
// totals stay in registers. Two blocks per step, each into its own totals:
// two chains of dependent FMAs through the row instead of one.
template <int N>
void row_dots_n(const uint8_t* row, const Operand& op, size_t at, int cols, float* y, int y_stride) {
  const float* x = op.x + at;
  const size_t x_stride = op.stride;
  __m256 even[N], odd[N];
  for (int t = 0; t < N; ++t) even[t] = odd[t] = _mm256_setzero_ps();
  int c = 0;
  for (; c + 2 * kBlock <= cols; c += 2 * kBlock, row += 2 * kBlockBytes) {
    prefetch_ahead(row);
    const __m256 d0 = _mm256_set1_ps(scale(row)), d1 = _mm256_set1_ps(scale(row + kBlockBytes));
    const __m256 q0[4] = {widen8(row + 2), widen8(row + 10), widen8(row + 18), widen8(row + 26)};
    const uint8_t* next = row + kBlockBytes;
    const __m256 q1[4] = {widen8(next + 2), widen8(next + 10), widen8(next + 18), widen8(next + 26)};
    for (int t = 0; t < N; ++t) {
      const float* xt = x + t * x_stride + c;
      even[t] = _mm256_fmadd_ps(d0, block_sum(q0, xt), even[t]);
      odd[t] = _mm256_fmadd_ps(d1, block_sum(q1, xt + kBlock), odd[t]);
    }
  }
  if (c < cols) {  // an odd number of blocks
    const __m256 d0 = _mm256_set1_ps(scale(row));
    const __m256 q0[4] = {widen8(row + 2), widen8(row + 10), widen8(row + 18), widen8(row + 26)};
    for (int t = 0; t < N; ++t) even[t] = _mm256_fmadd_ps(d0, block_sum(q0, x + t * x_stride + c), even[t]);
  }
  for (int t = 0; t < N; ++t) y[size_t(t) * y_stride] = horizontal_sum(_mm256_add_ps(even[t], odd[t]));
}

void row_dots(const uint8_t* row, const Operand& op, size_t at, int cols, int n, float* y, int y_stride) {
  switch (n) {
    case 1: return row_dots_n<1>(row, op, at, cols, y, y_stride);
    case 2: return row_dots_n<2>(row, op, at, cols, y, y_stride);
    case 3: return row_dots_n<3>(row, op, at, cols, y, y_stride);
    default: return row_dots_n<4>(row, op, at, cols, y, y_stride);
  }
}

// 32 code pairs of one block multiplied and summed in pairs: 8 exact int32 sums. vpmaddubsw
// takes an unsigned first operand, so w's signs move onto the activations (|w| <= 128 and
// |code| <= 127: a pair's sum fits its 16 bits).
// VNNI's vpdpbusd does both widening steps in one instruction, to the same integers.
__m256i block_codes_dot(__m256i w, const int8_t* q) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
#else
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

// row_dots_n with Q8_0 activations: per token and block, the integer sum times d_w * d_x
// into that token's totals; two blocks per step, as row_dots_n.
template <int N>
void q8_0_act_row_dots_n(const uint8_t* row, const Operand& op, size_t at, int cols, float* y, int y_stride) {
  const int8_t* q = op.q + at;
  const float* d = op.d + at / kBlock;
  const size_t q_stride = op.stride, d_stride = op.stride / kBlock;
  __m256 even[N], odd[N];
  for (int t = 0; t < N; ++t) even[t] = odd[t] = _mm256_setzero_ps();
  int c = 0;
  for (; c + 2 * kBlock <= cols; c += 2 * kBlock, row += 2 * kBlockBytes) {
    prefetch_ahead(row);
    const float d0 = scale(row), d1 = scale(row + kBlockBytes);
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + kBlockBytes + 2));
    for (int t = 0; t < N; ++t) {
      const int8_t* qt = q + t * q_stride + c;
      const float* dt = d + t * d_stride + c / kBlock;
      even[t] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * dt[0]), _mm256_cvtepi32_ps(block_codes_dot(w0, qt)), even[t]);
      odd[t] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * dt[1]), _mm256_cvtepi32_ps(block_codes_dot(w1, qt + kBlock)),
                               odd[t]);
    }
  }
  if (c < cols) {  // an odd number of blocks
    const float d0 = scale(row);
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2));
    for (int t = 0; t < N; ++t)
      even[t] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * d[t * d_stride + c / kBlock]),
                                _mm256_cvtepi32_ps(block_codes_dot(w0, q + t * q_stride + c)), even[t]);
  }
  for (int t = 0; t < N; ++t) y[size_t(t) * y_stride] = horizontal_sum(_mm256_add_ps(even[t], odd[t]));
}

void q8_0_act_row_dots(const uint8_t* row, const Operand& op, size_t at, int cols, int n, float* y, int y_stride) {
  switch (n) {
    case 1: return q8_0_act_row_dots_n<1>(row, op, at, cols, y, y_stride);
    case 2: return q8_0_act_row_dots_n<2>(row, op, at, cols, y, y_stride);
    case 3: return q8_0_act_row_dots_n<3>(row, op, at, cols, y, y_stride);
    default: return q8_0_act_row_dots_n<4>(row, op, at, cols, y, y_stride);
  }
}
#else
void row_dots(const uint8_t* row, const Operand& op, size_t at, int cols, int n, float* y, int y_stride) {
  const float* x = op.x + at;
  const size_t x_stride = op.stride;
  float total[kTokens] = {};
  for (int c = 0; c < cols; c += kBlock, row += kBlockBytes) {
    uint16_t h;
    std::memcpy(&h, row, 2);
    const float d = f16_to_f32(h);
    const int8_t* q = reinterpret_cast<const int8_t*>(row + 2);
    for (int t = 0; t < n; ++t) {
      const float* xt = x + t * x_stride + c;
      float acc[8] = {};
      for (int k = 0; k < kBlock; k += 8)
        for (int l = 0; l < 8; ++l) acc[l] += float(q[k + l]) * xt[k + l];
      total[t] += d * (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
    }
  }
  for (int t = 0; t < n; ++t) y[size_t(t) * y_stride] = total[t];
}

void q8_0_act_row_dots(const uint8_t* row, const Operand& op, size_t at, int cols, int n, float* y, int y_stride) {
  float total[kTokens] = {};
  for (int c = 0; c < cols; c += kBlock, row += kBlockBytes) {
    uint16_t h;
    std::memcpy(&h, row, 2);
    const float d = f16_to_f32(h);
    const int8_t* w = reinterpret_cast<const int8_t*>(row + 2);
    for (int t = 0; t < n; ++t) {
      const size_t from = at + t * op.stride + c;
      int32_t sum = 0;
      for (int k = 0; k < kBlock; ++k) sum += int32_t(w[k]) * op.q[from + k];
      total[t] += d * op.d[from / kBlock] * float(sum);
    }
  }
  for (int t = 0; t < n; ++t) y[size_t(t) * y_stride] = total[t];
}
#endif

// The same for an F16 row: values widened 8 at a time as they are read.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
__m256 widen_f16(const uint8_t* row, int c) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * size_t(c))));
}

// One F16 row against N tokens: each 8 weights are widened once and feed N
// sums. Per token U independent chains of FMAs (4 for one or two tokens, to
// cover an FMA's latency; 2 for more), so the N * U sums, U weight vectors and
// an x vector fit AVX2's 16 registers.
template <int N>
void f16_row_dots_n(const uint8_t* row, const Operand& op, size_t at, int cols, float* y, int y_stride) {
  const float* x = op.x + at;
  const size_t x_stride = op.stride;
  constexpr int U = N <= 2 ? 4 : 2;
  __m256 acc[N][U];
  for (int t = 0; t < N; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_ps();
  int c = 0;
  for (; c + 8 * U <= cols; c += 8 * U) {
    __m256 w[U];
    for (int u = 0; u < U; ++u) w[u] = widen_f16(row, c + 8 * u);
    for (int t = 0; t < N; ++t)
      for (int u = 0; u < U; ++u)
        acc[t][u] = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(x + t * x_stride + c + 8 * u), acc[t][u]);
  }
  for (; c + 8 <= cols; c += 8) {
    const __m256 w = widen_f16(row, c);
    for (int t = 0; t < N; ++t) acc[t][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * x_stride + c), acc[t][0]);
  }
  float tail[N] = {};
  for (; c < cols; ++c) {  // the last cols % 8
    uint16_t h;
    std::memcpy(&h, row + 2 * size_t(c), 2);
    const float w = _cvtsh_ss(h);
    for (int t = 0; t < N; ++t) tail[t] += w * x[t * x_stride + c];
  }
  for (int t = 0; t < N; ++t) {
    __m256 sum = acc[t][0];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[t][u]);
    y[size_t(t) * y_stride] = horizontal_sum(sum) + tail[t];
  }
}

void f16_row_dots(const uint8_t* row, const Operand& op, size_t at, int cols, int n, float* y, int y_stride) {
  switch (n) {
    case 1: return f16_row_dots_n<1>(row, op, at, cols, y, y_stride);
    case 2: return f16_row_dots_n<2>(row, op, at, cols, y, y_stride);
    case 3: return f16_row_dots_n<3>(row, op, at, cols, y, y_stride);
    default: return f16_row_dots_n<4>(row, op, at, cols, y, y_stride);
  }
}
#else  // MLX's float16_t: the CPU's own conversion where it has one (ARM's __fp16)
void f16_row_dots(const uint8_t* row, const Operand& op, size_t at, int cols, int n, float* y, int y_stride) {
  const float* x = op.x + at;
  const size_t x_stride = op.stride;
  thread_local std::vector<float> w;  // the row widened once for its n tokens
  w.resize(cols);
  for (int c = 0; c < cols; ++c) {
    mx::float16_t h;
    std::memcpy(&h, row + 2 * size_t(c), 2);
    w[c] = float(h);
  }
  for (int t = 0; t < n; ++t) {
    const float* xt = x + t * x_stride;
    float acc[8] = {};
    for (int c = 0; c < cols; ++c) acc[c % 8] += w[c] * xt[c];
    y[size_t(t) * y_stride] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
}
#endif

// One weight row (as stored) against n <= kTokens tokens: row_dots, q8_0_act_row_dots or f16_row_dots.
using RowDots = void (*)(const uint8_t*, const Operand&, size_t, int, int, float*, int);

enum class Codes { kQ8_0, kF16 };

// The row dots of a matrix's codes; q8_0: x's Q8_0 codes into a Q8_0 matrix (an F16 one keeps f32).
RowDots row_dots_for(Codes codes, bool q8_0) {
  return codes == Codes::kF16 ? f16_row_dots : q8_0 ? q8_0_act_row_dots : row_dots;
}

struct Shape {
  int T, rows, cols, groups;  // x [T, groups * cols], W [rows, cols]; rows / groups per group
};

// Output rows [r0, r1) for every token; rows of w are ``w_stride`` bytes apart.
// Row r belongs to group r / (rows / groups), which reads its own cols of x.
void dot_rows(RowDots dots, const uint8_t* w, size_t w_stride, const Operand& x, float* y, Shape s, int r0, int r1) {
  const int per_group = s.rows / s.groups;
  for (int r = r0; r < r1; ++r)
    for (int t = 0; t < s.T; t += kTokens)
      dots(w + r * w_stride, x, t * x.stride + size_t(r / per_group) * s.cols, s.cols, std::min(kTokens, s.T - t),
           y + size_t(t) * s.rows + r, s.rows);
}

void codes_matmul(RowDots dots, const uint8_t* w, size_t w_stride, const Operand& x, float* y, Shape s) {
  const int64_t weights = int64_t(s.rows) * s.cols;
  // read once: glibc answers by reading /sys, ~7 us a call, and small's decode step makes ~500 of these calls
  static const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  const int n = int(std::min<int64_t>({hw, 4, std::max<int64_t>(1, weights / kWeightsPerThread)}));
  if (n == 1) {
    dot_rows(dots, w, w_stride, x, y, s, 0, s.rows);
    return;
  }
  // Rows are handed out in chunks as threads ask, so a core that another process
  // holds does not leave the others waiting on a fixed share.
  const int chunk = std::max(1, int(kChunkWeights / std::max(1, s.cols)));
  std::atomic<int> next{0};
  auto work = [&]() {
    for (int r0 = next.fetch_add(chunk); r0 < s.rows; r0 = next.fetch_add(chunk))
      dot_rows(dots, w, w_stride, x, y, s, r0, std::min(s.rows, r0 + chunk));
  };
  Helpers::get().run(n, work);
}

// A matrix as the row dots read it (Q8_0 or F16 rows as stored, each contiguous).
struct StoredRows {
  const uint8_t* data;
  size_t stride;  // bytes from one row to the next
  RowDots dots;
  int rows;
  bool q8_0_x;  // it reads x as Q8_0 codes

  void times(const Operand& x, float* y, Shape s) const { codes_matmul(dots, data, stride, x, y, s); }
};

StoredRows stored_rows(const mx::array& w, Codes codes, bool q8_0, const char* what) {
  if (w.strides(1) != 1) throw std::runtime_error(std::string(what) + ": the weight rows must be contiguous");
  const bool q8_0_x = q8_0 && codes == Codes::kQ8_0;
  return {w.data<uint8_t>(), w.strides(0) * w.itemsize(), row_dots_for(codes, q8_0_x), w.shape(0), q8_0_x};
}

// x [T, width] for products that each read it as f32 or as Q8_0 codes: quantized once, when
// some product asks for codes.
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> d;
  Operand f32, q8_0;

  Activations(const float* x, int T, size_t width, bool any_q8_0) : f32{x, nullptr, nullptr, width}, q8_0(f32) {
    if (!any_q8_0) return;
    q.resize(size_t(T) * width);
    d.resize(q.size() / kBlock);
    quantize_q8_0(x, q.size(), q.data(), d.data());
    q8_0.q = q.data(), q8_0.d = d.data();
  }
  const Operand& of(const StoredRows& w) const { return w.q8_0_x ? q8_0 : f32; }
};

class CodesMatmul : public mx::Primitive {
 public:
  CodesMatmul(mx::Stream stream, Codes codes, int groups, bool q8_0)
      : mx::Primitive(stream), codes_(codes), groups_(groups), q8_0_(q8_0) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& encoder = begin_eval(stream(), in, out);
    const mx::array& x = in[0];
    const StoredRows w = stored_rows(in[1], codes_, q8_0_, name());
    const int T = x.shape(0);
    const Shape shape{T, w.rows, int(x.size() / T) / groups_, groups_};
    encoder.dispatch([x = view(x), w, yp = out[0].data<float>(), shape]() {
      std::vector<float> packed;
      const Activations xs(dense(x, packed), shape.T, size_t(shape.groups) * shape.cols, w.q8_0_x);
      w.times(xs.of(w), yp, shape);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " has no GPU kernel (the GPU backends have their own)");
  }

  const char* name() const override { return codes_ == Codes::kF16 ? "MagnetarF16Matmul" : "MagnetarQ8Matmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CodesMatmul&>(other);
    return codes_ == o.codes_ && groups_ == o.groups_ && q8_0_ == o.q8_0_;
  }

 private:
  Codes codes_;
  int groups_;
  bool q8_0_;  // Q8_0 activations into a Q8_0 matrix
};

// Several matrices (Q8_0 or F16 rows as stored) against one x: the decode attention's
// projections of its input, one node instead of one each; each output is CodesMatmul's.
class CodesMatmuls : public mx::Primitive {
 public:
  CodesMatmuls(mx::Stream stream, std::vector<Codes> codes, bool q8_0)
      : mx::Primitive(stream), codes_(std::move(codes)), q8_0_(q8_0) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& encoder = begin_eval(stream(), in, out);
    std::vector<std::pair<StoredRows, float*>> products;  // each matrix and its output
    bool any_q8_0 = false;
    for (size_t i = 0; i < out.size(); ++i) {
      products.emplace_back(stored_rows(in[1 + i], codes_[i], q8_0_, name()), out[i].data<float>());
      any_q8_0 = any_q8_0 || products.back().first.q8_0_x;
    }
    const mx::array& x = in[0];
    const int T = x.shape(0), cols = int(x.size() / T);
    encoder.dispatch([x = view(x), products, T, cols, any_q8_0]() {
      std::vector<float> packed;
      const Activations xs(dense(x, packed), T, size_t(cols), any_q8_0);
      for (const auto& [w, y] : products) w.times(xs.of(w), y, Shape{T, w.rows, cols, 1});
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MagnetarCodesMatmuls has no GPU kernel (the GPU backends have their own)");
  }

  const char* name() const override { return "MagnetarCodesMatmuls"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CodesMatmuls&>(other);
    return codes_ == o.codes_ && q8_0_ == o.q8_0_;
  }

 private:
  std::vector<Codes> codes_;
  bool q8_0_;
};

// A shared expert, y = down(silu(min(gate x, limit)) * clip(up x, -limit, limit)) (ops.swiglu),
// with each matrix read as stored (Q8_0 or F16 rows): the three products and the gating of
// MLX's five nodes as one. The mids live in the task, not in MLX's graph.
class SwigluFfn : public mx::Primitive {
 public:
  SwigluFfn(mx::Stream stream, std::array<Codes, 3> codes, float limit, bool q8_0)
      : mx::Primitive(stream), codes_(codes), limit_(limit), q8_0_(q8_0) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& encoder = begin_eval(stream(), in, out);
    std::array<StoredRows, 3> w;
    for (int i = 0; i < 3; ++i) w[i] = stored_rows(in[1 + i], codes_[i], q8_0_, name());
    const mx::array& x = in[0];
    const int T = x.shape(0), D = x.shape(1), F = in[1].shape(0);
    const View plus = in.size() > 4 ? view(in[4]) : View{};
    encoder.dispatch([x = view(x), yp = out[0].data<float>(), w, T, D, F, plus, limit = limit_]() {
      std::vector<float> packed;
      const Activations xs(dense(x, packed), T, size_t(D), w[0].q8_0_x || w[1].q8_0_x);
      std::vector<float> gate(size_t(T) * F), up(size_t(T) * F);
      w[0].times(xs.of(w[0]), gate.data(), Shape{T, F, D, 1});
      w[1].times(xs.of(w[1]), up.data(), Shape{T, F, D, 1});
      for (size_t i = 0; i < gate.size(); ++i) {
        const float g = std::min(gate[i], limit);
        gate[i] = g * (1.0f / (1.0f + std::exp(-g))) * std::min(std::max(up[i], -limit), limit);
      }
      const Activations mids(gate.data(), T, size_t(F), w[2].q8_0_x);
      w[2].times(mids.of(w[2]), yp, Shape{T, D, F, 1});
      if (const float* p = plus.as<float>())
        for (int t = 0; t < T; ++t)
          for (int d = 0; d < D; ++d)
            yp[size_t(t) * D + d] = p[t * plus.strides[0] + d * plus.strides[1]] + yp[size_t(t) * D + d];
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("MagnetarSwigluFfn has no GPU kernel (the GPU backends have their own)");
  }

  const char* name() const override { return "MagnetarSwigluFfn"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const SwigluFfn&>(other);
    return codes_ == o.codes_ && limit_ == o.limit_ && q8_0_ == o.q8_0_;
  }

 private:
  std::array<Codes, 3> codes_;
  float limit_;
  bool q8_0_;
};

// x [T, ...]: each token's trailing elements, flattened, are the groups' cols side by side.
int check_x(const mx::array& x, int groups, const char* what) {
  const int64_t width = x.ndim() >= 2 && x.shape(0) > 0 ? int64_t(x.size()) / x.shape(0) : 0;
  if (x.ndim() < 2 || x.dtype() != mx::float32 || groups < 1 || width == 0 || width % groups)
    throw std::invalid_argument(std::string(what) + ": x must be float32 [T, ...] of groups * cols per token");
  return int(width / groups);
}

// The activations a Q8_0 product takes: "f32" (false) or "q8_0" (true).
bool q8_0_activations(const std::string& activations, const char* op) {
  if (activations != "f32" && activations != "q8_0")
    throw std::invalid_argument(std::string(op) + ": activations must be 'f32' or 'q8_0', got '" + activations + "'");
  return activations == "q8_0";
}

mx::array codes_product(const mx::array& x, const mx::array& w, Codes codes, int groups, bool q8_0 = false) {
  return mx::array({x.shape(0), w.shape(0)}, mx::float32,
                   std::make_shared<CodesMatmul>(mx::default_stream(mx::Device::cpu), codes, groups, q8_0), {x, w});
}

mx::array q8_matmul_op(const mx::array& x, const mx::array& w, int groups, const std::string& activations) {
  const bool q8_0 = q8_0_activations(activations, "q8_matmul");
  const int cols = check_x(x, groups, "q8_matmul");
  if (cols % kBlock || w.ndim() != 2 || w.dtype() != mx::uint8 || w.shape(1) != cols / kBlock * kBlockBytes ||
      w.shape(0) % groups)
    throw std::invalid_argument("q8_matmul: w must be uint8 Q8_0 rows [groups * rows, cols / 32 * 34]");
  return codes_product(x, w, Codes::kQ8_0, groups, q8_0);
}

// w as float16 values or as their bytes (runtime/weights.py hands matrices over as uint8 rows).
mx::array f16_matmul_op(const mx::array& x, const mx::array& w, int groups) {
  const int cols = check_x(x, groups, "f16_matmul");
  const bool half = w.dtype() == mx::float16;
  if (w.ndim() != 2 || !(half || w.dtype() == mx::uint8) || w.shape(1) != (half ? cols : 2 * cols) ||
      w.shape(0) % groups)
    throw std::invalid_argument("f16_matmul: w must be float16 [groups * rows, cols] or its bytes (uint8, 2 * cols)");
  return codes_product(x, w, Codes::kF16, groups);
}

// A matrix as stored: Q8_0 blocks (uint8 [rows, cols / 32 * 34]) or F16 (float16 [rows, cols] or
// its bytes); -> its codes and its cols, or an error naming the matrix.
std::pair<Codes, int> stored_matrix(const mx::array& w, const std::string& type, const char* what,
                                    const char* op = "swiglu_ffn") {
  if (w.ndim() != 2) throw std::invalid_argument(std::string(op) + ": " + what + " must be 2-D");
  if (type == "q8_0" && w.dtype() == mx::uint8 && w.shape(1) % kBlockBytes == 0)
    return {Codes::kQ8_0, w.shape(1) / kBlockBytes * kBlock};
  if (type == "f16" && (w.dtype() == mx::float16 || (w.dtype() == mx::uint8 && w.shape(1) % 2 == 0)))
    return {Codes::kF16, w.dtype() == mx::float16 ? w.shape(1) : w.shape(1) / 2};
  throw std::invalid_argument(std::string(op) + ": " + what + " must be Q8_0 blocks (uint8) or F16, as named");
}

std::vector<mx::array> codes_matmuls_op(const mx::array& x, const std::vector<mx::array>& ws,
                                        const std::vector<std::string>& types, const std::string& activations) {
  const bool q8_0 = q8_0_activations(activations, "codes_matmuls");
  if (x.ndim() != 2 || x.dtype() != mx::float32) throw std::invalid_argument("codes_matmuls: x must be float32 [T, cols]");
  if (ws.empty() || ws.size() != types.size())
    throw std::invalid_argument("codes_matmuls: give one type per matrix, at least one matrix");
  std::vector<Codes> codes;
  std::vector<mx::Shape> shapes;
  for (size_t i = 0; i < ws.size(); ++i) {
    const auto [c, cols] = stored_matrix(ws[i], types[i], "each matrix", "codes_matmuls");
    if (cols != x.shape(1)) throw std::invalid_argument("codes_matmuls: every matrix must have x's cols");
    codes.push_back(c);
    shapes.push_back({x.shape(0), ws[i].shape(0)});
  }
  std::vector<mx::array> inputs{x};
  inputs.insert(inputs.end(), ws.begin(), ws.end());
  return mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(ws.size(), mx::float32),
                                std::make_shared<CodesMatmuls>(mx::default_stream(mx::Device::cpu), codes, q8_0), inputs);
}

mx::array swiglu_ffn_op(const mx::array& x, const mx::array& gate, const std::string& gate_type, const mx::array& up,
                        const std::string& up_type, const mx::array& down, const std::string& down_type,
                        float limit, std::optional<mx::array> plus, const std::string& activations) {
  const bool q8_0 = q8_0_activations(activations, "swiglu_ffn");
  if (x.ndim() != 2 || x.dtype() != mx::float32) throw std::invalid_argument("swiglu_ffn: x must be float32 [T, D]");
  const auto [g_codes, g_cols] = stored_matrix(gate, gate_type, "gate");
  const auto [u_codes, u_cols] = stored_matrix(up, up_type, "up");
  const auto [d_codes, d_cols] = stored_matrix(down, down_type, "down");
  const int D = x.shape(1), F = gate.shape(0);
  if (g_cols != D || u_cols != D || up.shape(0) != F || d_cols != F || down.shape(0) != D)
    throw std::invalid_argument("swiglu_ffn: gate and up must be [F, D] and down [D, F] for x [T, D]");
  if (plus && (plus->shape() != x.shape() || plus->dtype() != mx::float32))
    throw std::invalid_argument("swiglu_ffn: plus must be float32 [T, D] like x");
  std::vector<mx::array> inputs{x, gate, up, down};
  if (plus) inputs.push_back(*plus);
  return mx::array({x.shape(0), D}, mx::float32,
                   std::make_shared<SwigluFfn>(mx::default_stream(mx::Device::cpu),
                                               std::array<Codes, 3>{g_codes, u_codes, d_codes}, limit, q8_0),
                   inputs);
}

}  // namespace

void register_q8(nb::module_& m) {
  m.def("q8_matmul", &q8_matmul_op, nb::arg("x"), nb::arg("w"), nb::arg("groups") = 1,
        nb::arg("activations") = "f32",
        "x [T, groups * cols] float32, w [groups * R, cols / 32 * 34] uint8 Q8_0 -> [T, groups * R]: "
        "group g's R rows of W times x's g-th cols; activations 'f32' or 'q8_0' (x rounded to Q8_0 first)");
  m.def("f16_matmul", &f16_matmul_op, nb::arg("x"), nb::arg("w"), nb::arg("groups") = 1,
        "x [T, groups * cols] float32, w [groups * R, cols] float16 (or uint8 [groups * R, 2 * cols], its bytes) "
        "-> [T, groups * R]: group g's R rows of W times x's g-th cols");
  m.def("codes_matmuls", &codes_matmuls_op, "x [T, cols] float32, [W_i] as stored, [type_i] ('q8_0' or 'f16'), "
        "activations ('f32' or 'q8_0', for the Q8_0 matrices) -> [x @ W_i.T]: several products of one x as one node",
        nb::arg("x"), nb::arg("ws"), nb::arg("types"), nb::arg("activations") = "f32");
  m.def("swiglu_ffn", &swiglu_ffn_op, "x [T, D] float32, gate, gate_type, up, up_type, down, down_type ('q8_0' or "
        "'f16', each as stored), limit, plus [T, D] | None -> plus + down(silu(min(gate x, limit)) * "
        "clip(up x, -limit, limit)) [T, D]", nb::arg("x"), nb::arg("gate"), nb::arg("gate_type"), nb::arg("up"),
        nb::arg("up_type"), nb::arg("down"), nb::arg("down_type"), nb::arg("limit"), nb::arg("plus").none() = nb::none(),
        nb::arg("activations") = "f32");
}

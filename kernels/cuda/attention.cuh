// attention.cuh: what the decode attention kernels (attn_state, attn_index, attn_core)
// share: block-wide reductions and the row steps of kernels/attention_decode.py, written
// to round exactly as the MLX ops do (kernels/precision.py, kernels/rowops.py). The row
// steps run serially in one thread over a row in shared or global memory, in the order the
// CPU kernel (kernels/native/mlx_attention.cpp) uses, so the FP8 / FP4 / f16 rounding
// decisions come out the same.

// Sum (max) of v over the whole block; every thread gets the same value (each adds the
// warps' partials in the same order). `red` holds a float per warp; every thread must call.
__device__ __forceinline__ float mg_block_sum(float v, float* red) {
  v = mg_warp_sum(v);
  const int lane = threadIdx.x % MG_WARP, warp = threadIdx.x / MG_WARP, warps = blockDim.x / MG_WARP;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int i = 0; i < warps; ++i) s += red[i];
  __syncthreads();
  return s;
}

__device__ __forceinline__ float mg_block_max(float v, float* red) {
  v = mg_warp_max(v);
  const int lane = threadIdx.x % MG_WARP, warp = threadIdx.x / MG_WARP, warps = blockDim.x / MG_WARP;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = red[0];
  for (int i = 1; i < warps; ++i) m = fmaxf(m, red[i]);
  __syncthreads();
  return m;
}

// A float's order as an unsigned key (larger float, larger key); -0 counts as +0.
__device__ __forceinline__ uint32_t mg_order_key(float v) {
  const uint32_t b = __float_as_uint(v + 0.0f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// x * rsqrt(mean(x^2) + eps) * w (rowops.rmsnorm), serially.
template <typename P>
__device__ void mg_rms_norm(P x, int n, const float* w, float eps) {
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += x[i] * x[i];
  const float r = 1.0f / sqrtf(sum * (1.0f / float(n)) + eps);
  for (int i = 0; i < n; ++i) x[i] = w[i] * (x[i] * r);
}

// Rotate the trailing 2 * half dims of x[n] in interleaved pairs at position pos (rowops.rope);
// sign -1 undoes it.
template <typename P>
__device__ void mg_rope(P x, int n, int half, const float* freq, float pos, float sign) {
  for (int i = 0; i < half; ++i) {
    const float theta = pos * freq[i], c = cosf(theta), s = sign * sinf(theta);
    const int k = n - 2 * half + 2 * i;
    const float x0 = x[k], x1 = x[k + 1];
    x[k] = x0 * c - x1 * s;
    x[k + 1] = x0 * s + x1 * c;
  }
}

__device__ __forceinline__ float mg_pow2_ceil(float y) {
  return __uint_as_float((__float_as_uint(y) + 0x007FFFFFu) & 0x7F800000u);
}

// Nearest E4M3FN value, ties to even, subnormals (step 2^-9) included, 448 at most.
__device__ __forceinline__ float mg_round_e4m3(float t) {
  const float a = fabsf(t);
  if (a == 0.0f || !(a <= 3.402823466e38f)) return t;
  int e = int((__float_as_uint(a) >> 23) & 0xFFu) - 127;
  e = e < -6 ? -6 : e;
  const float step = __uint_as_float(uint32_t(e - 3 + 127) << 23);
  return copysignf(fminf(rintf(a / step) * step, 448.0f), t);
}

// E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6}: t / step rounded half to even within t's binade.
__device__ __forceinline__ float mg_round_e2m1(float t) {
  const uint32_t exponent = __float_as_uint(t) & 0x7F800000u;
  const float step = __uint_as_float((exponent > (127u << 23) ? exponent : (127u << 23)) - (1u << 23));
  return rintf(t / step) * step;
}

// Nearest float16, ties to even, widened back (precision.f16_round), from the bits.
__device__ __forceinline__ float mg_f16_round(float x) {
  const uint32_t b = __float_as_uint(x), sign = b & 0x80000000u, a = b & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return x;
  if (a >= 0x477FF000u) return __uint_as_float(sign | 0x7F800000u);  // 65520 and up: inf
  if (a < 0x38800000u) {  // below 2^-14: f16 subnormals, steps of 2^-24 (exact scalings)
    const float m = rintf(fabsf(x) * 16777216.0f) * (1.0f / 16777216.0f);
    return __uint_as_float(sign | __float_as_uint(m));
  }
  const uint32_t r = (a + 0x0FFFu + ((a >> 13) & 1u)) & ~0x1FFFu;  // 10 mantissa bits, ties to even
  return __uint_as_float(sign | r);
}

// Per block of `block` values: a power-of-two scale that fits the block's max magnitude in
// `limit`, then round (precision._blockwise). fp8: E4M3, else E2M1.
template <typename P>
__device__ void mg_blockwise(P x, int n, int block, float limit, float floor, bool fp8) {
  for (int b = 0; b < n; b += block) {
    float amax = 0.0f;
    for (int i = b; i < b + block; ++i) amax = fmaxf(amax, fabsf(x[i]));
    const float scale = mg_pow2_ceil(fmaxf(amax, floor) / limit);
    for (int i = b; i < b + block; ++i) {
      const float t = x[i] / scale;
      x[i] = (fp8 ? mg_round_e4m3(t) : mg_round_e2m1(t)) * scale;
    }
  }
}

// Rounding.kv_row: FP8 blocks of 64 on the first `nope` dims, then f16 storage.
template <typename P>
__device__ void mg_kv_row(P x, int n, int nope) {
  mg_blockwise(x, nope, 64, 448.0f, 1e-4f, true);
  for (int i = 0; i < n; ++i) x[i] = mg_f16_round(x[i]);
}

// precision.indexer_round_trip: Walsh-Hadamard in MLX's CPU order (strides 1, 2, 4, ...,
// then the scale), then FP4 blocks of 32. `scale` is float32(1 / sqrt(n)).
template <typename P>
__device__ void mg_indexer_round_trip(P x, int n, float scale) {
  for (int h = 1; h < n; h <<= 1)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  for (int i = 0; i < n; ++i) x[i] *= scale;
  mg_blockwise(x, n, 32, 6.0f, 6.0f * 1.17549435e-38f, false);
}

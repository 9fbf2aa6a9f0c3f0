// Kernel body: the hyper-connection output step (docs/spec/v4-model.md §3.3),
// kernels/hyper.py's hc_post: X'[t][j][d] = post[t][j] * y[t][d] + sum_i comb[t][i][j] * X[t][i][d].
//   inputs    y float32 [T, D]; x float32 [T, HC, D]; post float32 [T, HC]; comb float32 [T, HC, HC]
//   outputs   x_out float32 [T, HC, D]
//   template  HC, D
//   launch    block = 256 threads; grid = (256 * ceil(D / 256), T, 1) (hc_post_geometry in kernels/gpu.py).
// Thread (d, t) reads the token's HC stream values at d once and writes all HC
// outputs there; comb is read transposed (C is not symmetric).
const int d = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
if (d >= D) return;
float xs[HC];
#pragma unroll
for (int i = 0; i < HC; ++i) xs[i] = x[(size_t(t) * HC + i) * D + d];
const float yd = y[size_t(t) * D + d];
#pragma unroll
for (int j = 0; j < HC; ++j) {
  float v = post[t * HC + j] * yd;
#pragma unroll
  for (int i = 0; i < HC; ++i) v = fmaf(comb[(t * HC + i) * HC + j], xs[i], v);
  x_out[(size_t(t) * HC + j) * D + d] = v;
}

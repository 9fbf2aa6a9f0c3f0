// Kernel body: the hyper-connection output step (docs/spec/v4-model.md section 3.3),
// kernels/hyper.py's hc_post: X'[t][j][d] = post[t][j] * y[t][d] + sum_i comb[t][i][j] * X[t][i][d].
//   inputs    y float32 [T, D]; x float32 [T, HC, D]; post float32 [T, HC]; comb float32 [T, HC, HC]
//   outputs   x_out float32 [T, HC, D]
//   template  HC, D
//   launch    threadgroup = 256 threads; grid = (256 * ceil(D / 256), T, 1)
//             (hc_post_geometry in kernels/gpu.py).
// Thread (d, t) reads the token's HC stream values at d once and writes all HC
// outputs there; comb is read transposed (C is not symmetric).
const uint d = thread_position_in_grid.x, t = thread_position_in_grid.y;
if (d >= uint(D)) return;
float xs[HC];
for (int i = 0; i < HC; ++i) xs[i] = x[(ulong(t) * HC + i) * D + d];
const float yd = y[ulong(t) * D + d];
for (int j = 0; j < HC; ++j) {
  float v = post[t * HC + j] * yd;
  for (int i = 0; i < HC; ++i) v += comb[(t * HC + i) * HC + j] * xs[i];
  x_out[(ulong(t) * HC + j) * D + d] = v;
}

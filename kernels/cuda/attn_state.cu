// Kernel body: the state side of one token's decode attention (kernels/attention_decode.py,
// docs/spec/v4-model.md sections 3.4-3.7), one launch per layer: block 0 the raw ring,
// block 1 the compressor, block 2 the indexer's compressor (ratio 4), block 3 the indexer's
// query (ratio 4 when it selects top-k).
//   inputs    p int32 [1]; kv, kv_norm float32 [HD]; inv_freq [HALF]; raw [W, HD];
//             the compressor's kv, gate [L * HD] (L = 2 lanes at ratio 4, else 1), ape [R, L * HD],
//             norm [HD], f_kv, f_sc [FR, L * HD] (FR = 8 at ratio 4, else R); the indexer
//             compressor's seven the same at IXD; the indexer's q [IXH * IXD]; c_rows [CAP, HD],
//             i_rows [CAP, IXD], the compressed buffers (read: one row). Parts the layer lacks get
//             stand-ins (never read).
//   outputs   raw_out [W, HD]; c_row [1, HD] (row p / R of the compressed buffer; the caller
//             slice-updates it in, so the megabytes of rows are not copied): the pooled window
//             when it closes at p, else the row as it was (no token reads row p / R before
//             its window closes, so only then is it pooled, as on the CPU); c_fkv, c_fsc;
//             i_row [1, IXD]; i_fkv, i_fsc; iq_out [IXH * IXD] (rotated, FP4-rounded query).
//             Outputs of absent parts are [1] and left unwritten.
//   template  HD, W, R, IXH, IXD, HALF, OFFICIAL (0/1), NOPE, EPS (float32 bits), WHT (float32
//             bits of 1 / sqrt(IXD)), CAP (rows of the compressed buffers; 1 without them)
//   launch    block = 256 threads; grid = (256 * blocks, 1, 1) (attention_state_geometry, gpu.py).
// The ring and frontiers are small and copied whole with the token's slot replaced; a pooled
// row is made by a thread per dimension, then finished (norm, RoPE, rounding) by thread 0 in
// the CPU kernel's order, so the rounding decisions are the same.
constexpr int THREADS = 256;
constexpr int MAXD = HD > IXD ? HD : IXD;
__shared__ float row_s[MAXD];
__shared__ float freq_s[HALF];
const int tid = threadIdx.x, role = blockIdx.x, pos = p[0];
const float eps = __uint_as_float(unsigned(EPS));
for (int i = tid; i < HALF; i += THREADS) freq_s[i] = inv_freq[i];

if (role == 0) {  // the token's kv row into ring slot p % W
  for (int i = tid; i < HD; i += THREADS) row_s[i] = kv[i];
  __syncthreads();
  if (tid == 0) {
    mg_rms_norm(row_s, HD, kv_norm, eps);
    mg_rope(row_s, HD, HALF, freq_s, float(pos), 1.0f);
    if (OFFICIAL) mg_kv_row(row_s, HD, NOPE);
  }
  __syncthreads();
  const int slot = pos % W;
  for (int i = tid; i < W * HD; i += THREADS) raw_out[i] = i / HD == slot ? row_s[i % HD] : raw[i];
} else if (role <= 2) {  // a compressor: frontier update, pooling, row p / ratio
  const bool ix = role == 2;
  const int RR = ix ? 4 : R, D = ix ? IXD : HD, L = RR == 4 ? 2 : 1, WD = L * D, FR = RR == 4 ? 8 : RR;
  const float* ckv = ix ? i_kv : c_kv;
  const float* gate = ix ? i_gate : c_gate;
  const float* ape = (ix ? i_ape : c_ape) + (pos % RR) * WD;
  const float* norm = ix ? i_norm : c_norm;
  const float* fkv = ix ? i_fkv : c_fkv;
  const float* fsc = ix ? i_fsc : c_fsc;
  float* fkv_out = ix ? i_fkv_out : c_fkv_out;
  float* fsc_out = ix ? i_fsc_out : c_fsc_out;
  float* row_out = ix ? i_row : c_row;
  const float* rows = ix ? i_rows : c_rows;
  const int slot = pos % RR + (RR == 4 ? 4 : 0);
  const bool closes = RR == 4 && (pos + 1) % 4 == 0;  // the closed window becomes lane A of the next
  for (int i = tid; i < FR * WD; i += THREADS) {
    const int r = i / WD, j = i % WD, src = closes && r < 4 ? r + 4 : r;
    fkv_out[i] = src == slot ? ckv[j] : fkv[src * WD + j];
    fsc_out[i] = src == slot ? gate[j] + ape[j] : fsc[src * WD + j];
  }
  if ((pos + 1) % RR) {  // the window stays open: its row goes back as it was (at the row the
    // slice update writes, which MLX clamps into the buffer)
    const int at = pos / RR < CAP ? pos / RR : CAP - 1;
    for (int j = tid; j < D; j += THREADS) row_out[j] = rows[at * D + j];
    return;
  }
  // Per-dimension softmax over the window's slots (ratio 4: lane A of rows 0-3, lane B of 4-7).
  const int n = RR == 4 ? 8 : RR;
  for (int j = tid; j < D; j += THREADS) {
    float top = -inf;
    for (int r = 0; r < n; ++r) {
      const int col = RR == 4 && r >= 4 ? D + j : j;
      top = fmaxf(top, r == slot ? gate[col] + ape[col] : fsc[r * WD + col]);
    }
    float sum = 0.0f;
    for (int r = 0; r < n; ++r) {
      const int col = RR == 4 && r >= 4 ? D + j : j;
      sum += expf((r == slot ? gate[col] + ape[col] : fsc[r * WD + col]) - top);
    }
    float v = 0.0f;
    for (int r = 0; r < n; ++r) {
      const int col = RR == 4 && r >= 4 ? D + j : j;
      const float e = expf((r == slot ? gate[col] + ape[col] : fsc[r * WD + col]) - top);
      v += (r == slot ? ckv[col] : fkv[r * WD + col]) * (e / sum);
    }
    row_s[j] = v;
  }
  __syncthreads();
  if (tid == 0) {
    mg_rms_norm(row_s, D, norm, eps);
    mg_rope(row_s, D, HALF, freq_s, float(pos / RR * RR), 1.0f);
    if (OFFICIAL && ix) {
      mg_indexer_round_trip(row_s, D, __uint_as_float(unsigned(WHT)));
      for (int i = 0; i < D; ++i) row_s[i] = mg_f16_round(row_s[i]);
    } else if (OFFICIAL) {
      mg_kv_row(row_s, D, NOPE);
    }
  }
  __syncthreads();
  for (int j = tid; j < D; j += THREADS) row_out[j] = row_s[j];
} else {  // the indexer's query: a thread per head rotates and rounds it in place
  for (int i = tid; i < IXH * IXD; i += THREADS) iq_out[i] = iq[i];
  __syncthreads();
  for (int h = tid; h < IXH; h += THREADS) {
    float* x = iq_out + h * IXD;
    mg_rope(x, IXD, HALF, freq_s, float(pos), 1.0f);
    if (OFFICIAL) mg_indexer_round_trip(x, IXD, __uint_as_float(unsigned(WHT)));
  }
}

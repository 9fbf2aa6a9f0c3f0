/* experts.c: CPU kernels on raw GGUF weight blocks for magnetar.
 *
 * Built and loaded at first use by kernels/native.py (plain C11, no Python
 * API). Activations and sums are float32: each weight chunk (one 256-value
 * K/IQ block, or up to 256 values of Q8_0/F16/F32) is decoded into a small
 * f32 buffer, bit-exact with kernels/reference.py, and then dotted with every
 * activation row that needs it, so a weight row is read once per call.
 * With AVX2 and FMA the q2 expert types (IQ2_XXS, Q2_K) are dotted from their
 * codes instead, scales factored out (q2_tiles.c): the decode-time step
 * is bound by instructions per weight byte, not by memory.
 * Block layouts: docs/spec/quant-kernels.md section 1.
 *
 * Exported (all return 0, or a negative code on bad input / no memory):
 *   mg_init        IQ2_XXS tables from Python (grid [256][8], signs [128])
 *   mg_dequantize  raw rows -> f32
 *   mg_matmul      y[T, rows] = x[T, cols] @ W.T
 *   mg_moe         the routed-expert step of kernels/backend.py; with a slot
 *                  map the weights come from a bank of resident experts
 *                  (expert e reads bank row slot_of[e]; -1 leaves its pairs
 *                  out) and the sums add onto `out`, so a selection split over
 *                  rounds in ascending expert order adds in the same order as
 *                  one call over the whole stack: bit-identical results.
 *                  With MG_ACT_Q8K its IQ2_XXS / Q2_K / Q4_K products take
 *                  8-bit activations (q8k.c).
 *   mg_quantize_q8k  f32 rows -> Q8_K blocks, as that mode quantizes them
 *   mg_q8k_matmul  y[T, rows] = (those blocks) . W rows: that mode's products alone
 */
#include <stddef.h>
#include <stdlib.h>
#include <math.h>

#include "blocks.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHUNK 256  /* values decoded at a time */
#define LANES 16   /* partial sums per (row, activation) pair: independent chains the compiler can vectorize */
#define TOK_BLOCK 64 /* matmul: tokens per pass, so their activations stay in cache */
#define PAR_MIN 32768 /* weight values below which a call stays on one thread */
/* mg_moe: multiply-adds below which it stays on one thread. Waking a second thread costs
 * little on an idle core but up to a scheduler slice on a busy one, against ~0.2 ms of
 * work here (small's decode step: 6 experts of 256 x 256, 1.2 M): a 2-core VM ran small
 * q2 decode at 80-108 ms/token median with two threads, 40-49 with one (issue 16). */
#define MOE_PAR_WORK (1 << 22)
#define QCHUNK 8     /* mg_moe pass 2: row tiles per thread's turn */


/* ---------------------------------------------------------------- decoding */

/* IQ2_XXS tables, built once by mg_init from the ones Python passes in: the
 * 256 grid patterns (8 magnitudes each) and, for each 7-bit sign index, 8
 * byte masks (0xff = negate). 3 KiB in all, so lookups stay in L1. */
static uint8_t iq2_grid[256][8], iq2_neg[128][8];
static int iq2_ready;

int mg_init(const uint8_t *grid, const uint8_t *signs)
{
    for (int g = 0; g < 256; g++)
        for (int i = 0; i < 8; i++) {
            if (grid[8 * g + i] > 127) return E_INIT;  /* must fit a signed byte */
            iq2_grid[g][i] = grid[8 * g + i];
        }
    for (int s = 0; s < 128; s++)
        for (int i = 0; i < 8; i++) iq2_neg[s][i] = ((signs[s] >> i) & 1) ? 0xff : 0;
    q2_tiles_init((const uint8_t (*)[8])iq2_grid, (const uint8_t (*)[8])iq2_neg);
    q8k_init((const uint8_t (*)[8])iq2_grid, (const uint8_t (*)[8])iq2_neg);
    iq2_ready = 1;
    return 0;
}

/* F16 rows, n <= CHUNK values. Branch-free selects on whole arrays, so the
 * compiler vectorizes it (the scalar f16() above does not). */
static void dec_f16(const uint8_t *restrict src, int n, float *restrict out)
{
    uint16_t h16[CHUNK];
    union { float f[CHUNK]; uint32_t u[CHUNK]; } sub, res;  /* union: C11 type punning */
    memcpy(h16, src, 2 * (size_t)n);
    for (int i = 0; i < n; i++) sub.f[i] = (float)(int32_t)(h16[i] & 0x3ffu) * 5.9604644775390625e-08f;
    for (int i = 0; i < n; i++) {
        const uint32_t h = h16[i], em = h & 0x7fffu;
        const uint32_t normal = (em << 13) + ((127u - 15u) << 23), special = (em << 13) | 0x7f800000u;
        uint32_t r = em >= 0x7c00u ? special : normal;
        r = em < 0x0400u ? sub.u[i] : r;
        res.u[i] = r | ((h & 0x8000u) << 16);
    }
    memcpy(out, res.f, 4 * (size_t)n);
}

static inline void dec_q8_0(const uint8_t *restrict b, float *restrict out)
{
    const float d = f16(ld16(b));
    const int8_t *restrict q = (const int8_t *)(b + 2);
    for (int i = 0; i < 32; i++) out[i] = d * (float)q[i];
}

/* Q2_K: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of
 * 2-bit codes, then d and dmin. Byte 32h + l holds positions 128h + 32s + l
 * at shift 2s. Codes are unpacked first with 32-byte loops (constant shifts),
 * then scaled per 16-value sub-block: shapes gcc vectorizes well. Every
 * product is exact in f32, so only the subtraction rounds, as in the reference. */
static inline void dec_q2_k(const uint8_t *restrict b, float *restrict out)
{
    const float d = f16(ld16(b + 80)), dmin = f16(ld16(b + 82));
    uint8_t q[256];
    for (int h = 0; h < 2; h++) {
        const uint8_t *restrict src = b + 16 + 32 * h;
        uint8_t *restrict dst = q + 128 * h;
        for (int l = 0; l < 32; l++) {
            dst[l] = src[l] & 3;
            dst[32 + l] = (src[l] >> 2) & 3;
            dst[64 + l] = (src[l] >> 4) & 3;
            dst[96 + l] = src[l] >> 6;
        }
    }
    for (int i = 0; i < 256; i++) out[i] = (float)q[i];
    for (int j = 0; j < 16; j++) {
        const float dl = d * (float)(b[j] & 15), ml = dmin * (float)(b[j] >> 4);
#if defined(__GNUC__)
        /* an explicit 16-lane vector: as a loop, gcc vectorizes across j and shuffles lanes */
        typedef float f32x16 __attribute__((vector_size(64)));
        f32x16 v;
        memcpy(&v, out + 16 * j, sizeof v);
        v = v * dl - ml;
        memcpy(out + 16 * j, &v, sizeof v);
#else
        for (int l = 0; l < 16; l++) out[16 * j + l] = dl * out[16 * j + l] - ml;
#endif
    }
}

/* Q4_K: d, dmin, 12 bytes of packed 6-bit scales/mins, then 4 chunks of 32
 * bytes: low nibbles are sub-block 2c, high nibbles 2c + 1. */
static inline void dec_q4_k(const uint8_t *restrict b, float *restrict out)
{
    const float d = f16(ld16(b)), dmin = f16(ld16(b + 2));
    const uint8_t *restrict qs = b + 16;
    uint8_t sc[8], mn[8];
    q4_k_scales(b + 4, sc, mn);
    for (int c = 0; c < 4; c++) {
        const float dl0 = d * (float)sc[2 * c], ml0 = dmin * (float)mn[2 * c];
        const float dl1 = d * (float)sc[2 * c + 1], ml1 = dmin * (float)mn[2 * c + 1];
        const uint8_t *restrict q = qs + 32 * c;
        float *restrict o = out + 64 * c;
        for (int l = 0; l < 32; l++) o[l] = dl0 * (float)(q[l] & 15) - ml0;
        for (int l = 0; l < 32; l++) o[32 + l] = dl1 * (float)(q[l] >> 4) - ml1;
    }
}

/* IQ2_XXS: d, then 8 groups of two u32 words: four grid indices; four 7-bit
 * sign indices and a 4-bit scale. A group's four patterns and sign masks are
 * gathered into 32 bytes first, because a 32-lane loop vectorizes and four
 * 8-lane ones do not; (v ^ m) - m negates the masked bytes. */
static inline void dec_iq2_xxs(const uint8_t *restrict b, float *restrict out)
{
    const float d = f16(ld16(b));
    for (int g = 0; g < 8; g++) {
        const uint32_t a = ld32(b + 2 + 8 * g), s = ld32(b + 6 + 8 * g);
        const float db = d * (0.5f + (float)(s >> 28)) * 0.25f;
        uint8_t v[32], m[32];
        for (int k = 0; k < 4; k++) {
            memcpy(v + 8 * k, iq2_grid[(a >> (8 * k)) & 255], 8);
            memcpy(m + 8 * k, iq2_neg[(s >> (7 * k)) & 127], 8);
        }
        for (int i = 0; i < 32; i++) out[32 * g + i] = db * (float)(int8_t)((v[i] ^ m[i]) - m[i]);
    }
}

/* (values per block, bytes per block) of a supported type; 0 if unsupported. */
static int block_shape(int type, int *bytes)
{
    switch (type) {
    case T_F32: *bytes = 4; return 1;
    case T_F16: *bytes = 2; return 1;
    case T_Q8_0: *bytes = 34; return 32;
    case T_Q2_K: *bytes = 84; return 256;
    case T_Q4_K: *bytes = 144; return 256;
    case T_IQ2_XXS: *bytes = 66; return 256;
    default: return 0;
    }
}

/* Decode values [c0, c0 + n) of a row (c0 and n whole blocks, n <= CHUNK). */
static void decode_chunk(const uint8_t *row, int type, int64_t c0, int n, float *restrict out)
{
    switch (type) {
    case T_F32: memcpy(out, row + 4 * c0, 4 * (size_t)n); break;
    case T_F16: dec_f16(row + 2 * c0, n, out); break;
    case T_Q8_0:
        for (int i = 0; i < n; i += 32) dec_q8_0(row + (c0 + i) / 32 * 34, out + i);
        break;
    case T_Q2_K: dec_q2_k(row + c0 / 256 * 84, out); break;
    case T_Q4_K: dec_q4_k(row + c0 / 256 * 144, out); break;
    case T_IQ2_XXS: dec_iq2_xxs(row + c0 / 256 * 66, out); break;
    }
}

/* -------------------------------------------------------------- dot products */

/* acc[r * LANES + l] += sum over i = l (mod LANES) of w[r][i] * x[i], r < RT.
 * RT weight rows share each activation load; fixed-length inner loops over
 * named accumulators let gcc -O3 keep them in vector registers without
 * -ffast-math (the summation order is fixed by the lanes). */
static void dot_rows(const float (*restrict w)[CHUNK], int n, const float *restrict x, float *restrict acc)
{
    float a0[LANES], a1[LANES], a2[LANES], a3[LANES];
    memcpy(a0, acc, sizeof a0);
    memcpy(a1, acc + LANES, sizeof a1);
    memcpy(a2, acc + 2 * LANES, sizeof a2);
    memcpy(a3, acc + 3 * LANES, sizeof a3);
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            const float xl = x[i + l];
            a0[l] += w[0][i + l] * xl;
            a1[l] += w[1][i + l] * xl;
            a2[l] += w[2][i + l] * xl;
            a3[l] += w[3][i + l] * xl;
        }
    for (; i < n; i++) {  /* F16/F32 rows of odd length only */
        a0[0] += w[0][i] * x[i];
        a1[0] += w[1][i] * x[i];
        a2[0] += w[2][i] * x[i];
        a3[0] += w[3][i] * x[i];
    }
    memcpy(acc, a0, sizeof a0);
    memcpy(acc + LANES, a1, sizeof a1);
    memcpy(acc + 2 * LANES, a2, sizeof a2);
    memcpy(acc + 3 * LANES, a3, sizeof a3);
}


/* y[t * RT + r] = rows[r] . xs[t] for nr <= RT weight rows of one type and nx
 * activation rows (acc: nx * RT * LANES floats of scratch, lay: q2_floats(cols, nx)).
 * Each chunk of the rows is decoded once and then used by every activation row. */
static void tile_dots(const uint8_t *const *rows, int nr, int type, int64_t cols, const float *const *xs, int nx,
                      float *restrict acc, float *restrict lay, float *restrict y)
{
    if (q2_tile_dots(rows, nr, type, cols, xs, nx, lay, y)) return;
    _Alignas(64) float buf[RT][CHUNK];
    int bb, per = block_shape(type, &bb);
    const int step = per == 1 ? CHUNK : CHUNK / per * per;  /* whole blocks */
    if (nr < RT) memset(buf, 0, sizeof buf);  /* missing rows stay zero; their sums are dropped */
    memset(acc, 0, sizeof(float) * RT * LANES * (size_t)nx);
    for (int64_t c0 = 0; c0 < cols; c0 += step) {
        const int n = (int)(cols - c0 < step ? cols - c0 : step);
        for (int r = 0; r < nr; r++) decode_chunk(rows[r], type, c0, n, buf[r]);
        for (int t = 0; t < nx; t++) dot_rows((const float (*)[CHUNK])buf, n, xs[t] + c0, acc + (size_t)t * RT * LANES);
    }
    for (int t = 0; t < nx * RT; t++) {
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += acc[(size_t)t * LANES + l];
        y[t] = sum;
    }
}


static int n_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- exports */

int mg_dequantize(const uint8_t *raw, int type, int64_t n_rows, int64_t row_bytes, float *out)
{
    int bb, per = block_shape(type, &bb);
    if (!per || row_bytes % bb) return E_TYPE;
    if (type == T_IQ2_XXS && !iq2_ready) return E_INIT;
    const int64_t cols = row_bytes / bb * per;
    const int64_t step = per == 1 ? CHUNK : per;
#pragma omp parallel for schedule(static) if (n_rows * cols >= 8 * PAR_MIN)
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t c0 = 0; c0 < cols; c0 += step)
            decode_chunk(raw + r * row_bytes, type, c0, (int)(cols - c0 < step ? cols - c0 : step),
                         out + r * cols + c0);
    return 0;
}

int mg_matmul(const float *x, int64_t T, int64_t cols, const uint8_t *w, int type, int64_t rows,
              int64_t row_bytes, float *y)
{
    int bb, per = block_shape(type, &bb);
    if (!per || row_bytes % bb || row_bytes / bb * per != cols) return E_TYPE;
    if (type == T_IQ2_XXS && !iq2_ready) return E_INIT;
    if (T <= 0 || rows <= 0) return 0;
    const int tb = T < TOK_BLOCK ? (int)T : TOK_BLOCK;
    const size_t per_thread = (size_t)(RT * LANES + RT) * (size_t)tb + q2_floats(cols, tb);
    const int64_t nq = (rows + RT - 1) / RT;
    const float **xs = malloc(sizeof(*xs) * (size_t)T);
    float *scratch = malloc(sizeof(float) * per_thread * (size_t)n_threads());
    if (!xs || !scratch) { free(xs); free(scratch); return E_NOMEM; }
    for (int64_t t = 0; t < T; t++) xs[t] = x + t * cols;
    /* Token blocks outermost: with T <= TOK_BLOCK each weight row is read once;
     * beyond, re-decoding it per block is cheap next to TOK_BLOCK dot products. */
    for (int64_t t0 = 0; t0 < T; t0 += tb) {
        const int nx = (int)(T - t0 < tb ? T - t0 : tb);
        /* dynamic: a thread sharing its core with another process must not set the pace */
#pragma omp parallel for schedule(dynamic, 4) if (rows * cols * (int64_t)nx >= PAR_MIN)
        for (int64_t q = 0; q < nq; q++) {
            const int nr = (int)(rows - q * RT < RT ? rows - q * RT : RT);
            const uint8_t *rp[RT];
            for (int r = 0; r < nr; r++) rp[r] = w + (q * RT + r) * row_bytes;
            float *acc = scratch + (size_t)thread_id() * per_thread, *yt = acc + (size_t)RT * LANES * tb;
            tile_dots(rp, nr, type, cols, xs + t0, nx, acc, yt + RT * tb, yt);
            for (int t = 0; t < nx; t++)
                for (int r = 0; r < nr; r++) y[(t0 + t) * rows + q * RT + r] = yt[t * RT + r];
        }
    }
    free(xs);
    free(scratch);
    return 0;
}

int mg_quantize_q8k(const float *x, int64_t n, q8k_block *out)
{
    if (n < 0 || n % 256) return E_SHAPE;
    q8k_quantize(x, n, out);
    return 0;
}

int mg_q8k_matmul(const q8k_block *x, int64_t T, const uint8_t *w, int type, int64_t rows, int64_t row_bytes,
                  float *y)
{
    int bb;
    if (!q8k_supported(type) || !block_shape(type, &bb) || row_bytes % bb) return E_TYPE;
    if (type == T_IQ2_XXS && !iq2_ready) return E_INIT;
    if (T > INT32_MAX) return E_SHAPE;
    if (T <= 0 || rows <= 0) return 0;
    const int64_t nb = row_bytes / bb;
    const q8k_block **xs = malloc(sizeof(*xs) * (size_t)T);
    float *col = malloc(sizeof(float) * (size_t)T);
    uint8_t *ready = malloc((size_t)Q8K_PREP_BYTES * (size_t)nb);
    if (!xs || !col || !ready) { free(xs); free(col); free(ready); return E_NOMEM; }
    for (int64_t t = 0; t < T; t++) xs[t] = x + t * nb;
    for (int64_t r = 0; r < rows; r++) {  /* as mg_moe's passes: a row made ready for all T tokens */
        q8k_row row;
        q8k_prepare(&row, type, w + r * row_bytes, nb, (int)T, ready);
        q8k_dots(&row, xs, (int)T, col);
        for (int64_t t = 0; t < T; t++) y[t * rows + r] = col[t];
    }
    free(xs); free(col); free(ready);
    return 0;
}

/* silu(min(g, L)) * clip(u, -L, L) * weight; comparisons written so NaN passes through. */
static inline float swiglu(float g, float u, float weight, float limit)
{
    g = g > limit ? limit : g;
    u = u > limit ? limit : (u < -limit ? -limit : u);
    return g / (1.0f + expf(-g)) * u * weight;
}

/* out[T, D] = sum over slots k of down[e] @ (swiglu(gate[e] @ x_t, up[e] @ x_t) * w[t, k]),
 * e = ids[t, k]. gate/up: [E, F, *_rb] with D columns; down: [E, D, d_rb] with F columns.
 *
 * The (token, slot) pairs are counting-sorted by expert, so every used expert
 * forms a group and each of its weight rows is decoded once for all of its
 * tokens. With one token (decode) every group has one pair and this is the
 * plain per-pair walk. Pass 1, parallel over (group, row): gate and up rows
 * together, the epilogue writes mid[pair, row]. Pass 2, parallel over output
 * rows d: each thread adds every group's contribution to out[:, d] itself,
 * so no atomics are needed; a repeated id is simply two pairs.
 * act MG_ACT_Q8K: each pass whose weights are IQ2_XXS, Q2_K or Q4_K quantizes its
 * activations (x, then every pair's mid row) to Q8_K and dots in integers (q8k.c);
 * MG_ACT_F32 keeps them f32. */
enum { MG_ACT_F32 = 0, MG_ACT_Q8K = 1 };
#define Q8K_PAIRS 16  /* pairs handed to q8k_dots at a time */

int mg_moe(const float *x, int64_t T, int64_t D, const int32_t *ids, const float *wts, int64_t K,
           int64_t E, int64_t F, const uint8_t *gate, int gt, int64_t g_rb, const uint8_t *up, int ut,
           int64_t u_rb, const uint8_t *down, int dt, int64_t d_rb, float limit, float *out,
           const int32_t *slot_of, int64_t S, int act)
{
    int bb, per;
    if (!(per = block_shape(gt, &bb)) || g_rb % bb || g_rb / bb * per != D) return E_TYPE;
    if (!(per = block_shape(ut, &bb)) || u_rb % bb || u_rb / bb * per != D) return E_TYPE;
    if (!(per = block_shape(dt, &bb)) || d_rb % bb || d_rb / bb * per != F) return E_TYPE;
    if ((gt == T_IQ2_XXS || ut == T_IQ2_XXS || dt == T_IQ2_XXS) && !iq2_ready) return E_INIT;
    if (act != MG_ACT_F32 && act != MG_ACT_Q8K) return E_TYPE;
    const int q8_in = act == MG_ACT_Q8K && q8k_supported(gt) && q8k_supported(ut);
    const int q8_mid = act == MG_ACT_Q8K && q8k_supported(dt);
    const int64_t nbd = D / 256, nbf = F / 256;  /* Q8_K blocks per x row, per mid row */
    if (!slot_of) memset(out, 0, sizeof(float) * (size_t)(T * D));
    const int64_t P = T * K;
    if (P == 0) return 0;
    for (int64_t p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= E) return E_ID;
    if (slot_of)
        for (int64_t e = 0; e < E; e++)
            if (slot_of[e] < -1 || slot_of[e] >= S) return E_ID;

    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (size_t)P);      /* pairs sorted by expert */
    int64_t *gexp = malloc(sizeof(int64_t) * (size_t)P), *gbeg = malloc(sizeof(int64_t) * (size_t)P),
            *gend = malloc(sizeof(int64_t) * (size_t)P);  /* group g: pairs order[gbeg[g]..gend[g]) */
    const float **xs = malloc(sizeof(*xs) * (size_t)P), **ms = malloc(sizeof(*ms) * (size_t)P);
    float *mid = malloc(sizeof(float) * (size_t)(P * F));
    int rc = E_NOMEM, nth = n_threads();
    const int64_t widest = D > F ? D : F;
    float *scratch = malloc(sizeof(float) * ((RT * LANES + 2 * RT) * (size_t)P + q2_floats(widest, P)) * (size_t)nth);
    q8k_block *xq = q8_in ? malloc(sizeof(q8k_block) * (size_t)(T * nbd)) : NULL;
    q8k_block *mq = q8_mid ? malloc(sizeof(q8k_block) * (size_t)(P * nbf)) : NULL;
    /* rows made ready for several tokens: gate and up, or down */
    const size_t prep_per_thread = (size_t)Q8K_PREP_BYTES * (size_t)(2 * nbd > nbf ? 2 * nbd : nbf);
    uint8_t *prep = q8_in || q8_mid ? malloc(prep_per_thread * (size_t)nth) : NULL;
    if (!start || !order || !gexp || !gbeg || !gend || !xs || !ms || !mid || !scratch || (q8_in && !xq) ||
        (q8_mid && !mq) || ((q8_in || q8_mid) && !prep))
        goto done;

    /* counting sort, stable: within an expert pairs stay in (token, slot) order */
    for (int64_t p = 0; p < P; p++) start[ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    int64_t G = 0, maxn = 0;
    for (int64_t e = 0; e < E; e++)
        if (start[e + 1] > start[e] && (!slot_of || slot_of[e] >= 0)) {
            gexp[G] = slot_of ? slot_of[e] : e;  /* the bank row its weights are in */
            gbeg[G] = start[e];
            gend[G++] = start[e + 1];
            if (start[e + 1] - start[e] > maxn) maxn = start[e + 1] - start[e];
        }
    for (int64_t p = 0; p < P; p++) order[start[ids[p]]++] = p;
    for (int64_t i = 0; i < P; i++) {
        xs[i] = x + order[i] / K * D;
        ms[i] = mid + order[i] * F;
    }
    const size_t per_thread = (size_t)(RT * LANES + 2 * RT) * (size_t)maxn + q2_floats(widest, maxn);
    const int64_t nqf = (F + RT - 1) / RT, nqd = (D + RT - 1) / RT;
    const int par = P * F * D * 3 >= MOE_PAR_WORK;
    if (q8_in)
#pragma omp parallel for schedule(static) if (par && T > 1)
        for (int64_t t = 0; t < T; t++) q8k_quantize(x + t * D, D, xq + t * nbd);

    /* pass 1: RT gate rows, then the same up rows, of each group's expert; then the epilogue.
     * A thread's turn is 16 tiles, 64 rows of each (~67 KB at Flash widths in IQ2_XXS): long
     * runs through the weight pages (turns of 4 tiles made a decode step ~2% slower). */
#pragma omp parallel for schedule(dynamic, 16) if (par)
    for (int64_t it = 0; it < G * nqf; it++) {
        const int64_t g = it / nqf, r0 = it % nqf * RT, e = gexp[g], b = gbeg[g];
        const int n = (int)(gend[g] - b), nr = (int)(F - r0 < RT ? F - r0 : RT);
        if (q8_in) {  /* rows made ready only for many tokens (q8k_prepare decides) */
            uint8_t *ready = prep + (size_t)thread_id() * prep_per_thread;
            for (int r = 0; r < nr; r++) {
                const uint8_t *gr = gate + (e * F + r0 + r) * g_rb, *ur = up + (e * F + r0 + r) * u_rb;
                q8k_row gq, uq;
                q8k_prepare(&gq, gt, gr, nbd, n, ready);
                q8k_prepare(&uq, ut, ur, nbd, n, ready + Q8K_PREP_BYTES * nbd);
                for (int i0 = 0; i0 < n; i0 += Q8K_PAIRS) {
                    const int m = n - i0 < Q8K_PAIRS ? n - i0 : Q8K_PAIRS;
                    const q8k_block *xb[Q8K_PAIRS];
                    float gv[Q8K_PAIRS], uv[Q8K_PAIRS];
                    for (int i = 0; i < m; i++) xb[i] = xq + order[b + i0 + i] / K * nbd;
                    q8k_dots(&gq, xb, m, gv);
                    q8k_dots(&uq, xb, m, uv);
                    for (int i = 0; i < m; i++) {
                        const int64_t p = order[b + i0 + i];
                        mid[p * F + r0 + r] = swiglu(gv[i], uv[i], wts[p], limit);
                    }
                }
            }
            continue;
        }
        float *acc = scratch + (size_t)thread_id() * per_thread, *yg = acc + (size_t)RT * LANES * n, *yu = yg + RT * n;
        float *lay = acc + (size_t)(RT * LANES + 2 * RT) * maxn;
        const uint8_t *gr[RT], *ur[RT];
        for (int r = 0; r < nr; r++) {
            gr[r] = gate + (e * F + r0 + r) * g_rb;
            ur[r] = up + (e * F + r0 + r) * u_rb;
        }
        tile_dots(gr, nr, gt, D, xs + b, n, acc, lay, yg);
        tile_dots(ur, nr, ut, D, xs + b, n, acc, lay, yu);
        for (int i = 0; i < n; i++) {
            const int64_t p = order[b + i];
            for (int r = 0; r < nr; r++) mid[p * F + r0 + r] = swiglu(yg[i * RT + r], yu[i * RT + r], wts[p], limit);
        }
    }

    if (q8_mid)  /* the mid rows of the pairs that ran (a streamed round leaves some out) */
#pragma omp parallel for schedule(static) if (par && P > 1)
        for (int64_t i = 0; i < P; i++)
            if (slot_of == NULL || slot_of[ids[order[i]]] >= 0) q8k_quantize(mid + order[i] * F, F, mq + order[i] * nbf);

    /* pass 2: down; output rows r0.. belong to one thread for all groups. A thread takes
     * QCHUNK row tiles and walks the groups outside them, so a group's mid rows are read
     * into cache once per chunk, not once per tile (each output still adds its groups in
     * ascending order). */
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int64_t q0 = 0; q0 < nqd; q0 += QCHUNK) {
        float *acc = scratch + (size_t)thread_id() * per_thread, *y = acc + (size_t)RT * LANES * maxn;
        float *lay = acc + (size_t)(RT * LANES + 2 * RT) * maxn;
        for (int64_t g = 0; g < G; g++) {
            const int64_t e = gexp[g], b = gbeg[g];
            const int n = (int)(gend[g] - b);
            for (int64_t q = q0; q < nqd && q < q0 + QCHUNK; q++) {
                const int64_t r0 = q * RT;
                const int nr = (int)(D - r0 < RT ? D - r0 : RT);
                if (q8_mid) {
                    for (int r = 0; r < nr; r++) {
                        q8k_row dq;
                        q8k_prepare(&dq, dt, down + (e * D + r0 + r) * d_rb, nbf, n,
                                    prep + (size_t)thread_id() * prep_per_thread);
                        for (int i0 = 0; i0 < n; i0 += Q8K_PAIRS) {
                            const int m = n - i0 < Q8K_PAIRS ? n - i0 : Q8K_PAIRS;
                            const q8k_block *mb[Q8K_PAIRS];
                            float dv[Q8K_PAIRS];
                            for (int i = 0; i < m; i++) mb[i] = mq + order[b + i0 + i] * nbf;
                            q8k_dots(&dq, mb, m, dv);
                            for (int i = 0; i < m; i++) out[order[b + i0 + i] / K * D + r0 + r] += dv[i];
                        }
                    }
                    continue;
                }
                const uint8_t *dr[RT];
                for (int r = 0; r < nr; r++) dr[r] = down + (e * D + r0 + r) * d_rb;
                tile_dots(dr, nr, dt, F, ms + b, n, acc, lay, y);
                for (int i = 0; i < n; i++) {
                    float *o = out + order[b + i] / K * D + r0;
                    for (int r = 0; r < nr; r++) o[r] += y[i * RT + r];
                }
            }
        }
    }
    rc = 0;
done:
    free(start); free(order); free(gexp); free(gbeg); free(gend); free(xs); free(ms); free(mid); free(scratch);
    free(xq); free(mq); free(prep);
    return rc;
}

/* q8k.c: the routed experts' products with 8-bit activations (mg_moe's
 * MG_ACT_Q8K mode), the arithmetic of ds4's and llama.cpp's CPU paths
 * (spec quant-kernels.md §2.1): an activation row is quantized to Q8_K once,
 * 256 values at a time (int8 codes, one f32 scale), and every IQ2_XXS, Q2_K
 * or Q4_K weight row is dotted with it in integers, a block's scales applied
 * to its integer sums. On AVX2 one instruction multiplies 32 code pairs
 * (vpmaddubsw) where the f32 path decodes and multiplies 8 values. IQ2_XXS
 * still costs eight table loads and their packing per 32 values (as in
 * llama.cpp's AVX2 kernel): one token's step stays bound by instructions, and
 * many tokens share a row's lookups (tiles of Q8K_TILE, rows made ready).
 *
 * The integer sums are exact and a (row, token) pair's value depends only on
 * its own bytes, so decode and prefill, one thread or many, give the same
 * bits. What changes against f32 activations is the activations' rounding:
 * each code is within half a step of 1/127 of its block's largest value,
 * ~1e-2 relative per output.
 */
#include "blocks.h"

#include <math.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* IQ2_XXS: each grid pattern's 8 magnitudes as one word, and each 7-bit sign
 * index's 8 multipliers (+1 or -1 bytes) as one word. */
static uint64_t grid8[256], sign8[128];

void q8k_init(const uint8_t (*grid)[8], const uint8_t (*neg)[8])
{
    for (int g = 0; g < 256; g++) memcpy(&grid8[g], grid[g], 8);
    for (int s = 0; s < 128; s++) {
        uint8_t m[8];
        for (int i = 0; i < 8; i++) m[i] = neg[s][i] ? 0xff : 0x01;
        memcpy(&sign8[s], m, 8);
    }
}

int q8k_supported(int type) { return type == T_IQ2_XXS || type == T_Q2_K || type == T_Q4_K; }

/* GGML's Q8_K rounding: the value of largest magnitude becomes -127 exactly and
 * the rest round to nearest, ties to even (the default rounding mode), so the
 * codes stay in [-127, 127]. A block holding inf or NaN gets d = NaN: its
 * products come out NaN as they would from f32 activations. */
void q8k_quantize(const float *x, int64_t n, q8k_block *y)
{
    for (int64_t b = 0; b < n / 256; b++, x += 256, y++) {
        float amax = 0.0f, max = 0.0f, poison = 0.0f;
        for (int i = 0; i < 256; i++) {
            poison += x[i] * 0.0f;  /* 0 unless some value is inf or NaN */
            if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }
        }
        memset(y->qs, 0, sizeof y->qs);
        memset(y->bsums, 0, sizeof y->bsums);
        if (poison != 0.0f || amax == 0.0f) {
            y->d = poison != 0.0f ? NAN : 0.0f;
            continue;
        }
        const float iscale = -127.0f / max;
        for (int i = 0; i < 256; i++) {
            const int q = (int)nearbyintf(iscale * x[i]);
            y->qs[i] = (int8_t)(q > 127 ? 127 : q);
            y->bsums[i / 16] += y->qs[i];
        }
        y->d = 1.0f / iscale;
    }
}

#if defined(__AVX2__)
/* A weight row against up to Q8K_TILE tokens at a time: each weight vector (and its codes'
 * extraction, its scales) is loaded once for all of them. Per token and block the integer
 * sum is exact; the float steps are the same for every token count (one token is a tile
 * of one), so a token's output has the same bits alone, in a batch, or in streamed rounds. */
#define Q8K_TILE 8
/* IQ2_XXS rows are made ready (q8k_prepare) only for more tokens than this: gathering a
 * block's patterns costs about as much as two tiles' lookups of them. */
#define Q8K_PREPARE_MIN (2 * Q8K_TILE)
#define AI static inline __attribute__((always_inline))  /* m becomes a constant: the sums stay in registers */

/* VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later; AVX-VNNI on Alder Lake) fuses a product's
 * widening and its add into the accumulator: vpdpbusd is vpmaddubsw, vpmaddwd by ones and
 * vpaddd, vpdpwssd is vpmaddwd and vpaddd. No pair here saturates vpmaddubsw's int16 (at most
 * 2 * 45 * 127), so each int32 lane sums the same integers either way and the bits are the
 * AVX2 path's. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define Q8K_VNNI 1
#define DOT_U8_S8(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#define DOT_S16(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define Q8K_VNNI 1
#define DOT_U8_S8(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#define DOT_S16(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#else
#define Q8K_VNNI 0
#define DOT_S16(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif

/* A token's sums are kept as ggml's AVX2 kernels keep them (ggml_vec_dot_*_q8_K): 8 float
 * lanes, lane i gathering the integer sums of bytes 4i .. 4i + 3 of every 32 values (the
 * pairing of vpmaddubsw then vpmaddwd), each block's added as one fused multiply-add by
 * (weight scale * activation scale), its mins' term first; Q4_K's mins go to 4 lanes of their
 * own. The lanes are summed once, at the row's end: a horizontal sum per block cost 7% of an
 * IQ2_XXS row and 20% of a Q2_K one. One token's products are then llama.cpp's, bit for bit,
 * and a tile's steps are per token, so a token's bits do not depend on its tile. */
AI void add_block(__m256 *lane, const __m256i *acc, const __m256i *mins, const q8k_block *const *ys, int m,
                  int64_t ib, float w_scale, float w_min)
{
    for (int t = 0; t < m; t++) {
        const float dy = ys[t][ib].d;
        if (mins) lane[t] = _mm256_fmadd_ps(_mm256_set1_ps(-w_min * dy), _mm256_cvtepi32_ps(mins[t]), lane[t]);
        lane[t] = _mm256_fmadd_ps(_mm256_set1_ps(w_scale * dy), _mm256_cvtepi32_ps(acc[t]), lane[t]);
    }
}

/* ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), ggml's hsum_float_8 */
AI float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* (l0 + l2) + (l1 + l3) */
AI float hsum4(__m128 s)
{
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* vpshufb controls: 16-bit lanes of sub-block scale 2k in the low half, 2k + 1 in the high one */
static inline __m256i pair_scales(__m256i scales, int k)
{
    const __m256i ctrl = _mm256_setr_epi8(2 * k, -1, 2 * k, -1, 2 * k, -1, 2 * k, -1, 2 * k, -1, 2 * k, -1, 2 * k, -1,
                                          2 * k, -1, 2 * k + 1, -1, 2 * k + 1, -1, 2 * k + 1, -1, 2 * k + 1, -1,
                                          2 * k + 1, -1, 2 * k + 1, -1, 2 * k + 1, -1, 2 * k + 1, -1);
    return _mm256_shuffle_epi8(scales, ctrl);
}

/* An IQ2_XXS row for many tokens: its grid patterns and signs gathered once, so each further
 * tile loads two vectors per 32 values instead of eight table entries and their packing (the
 * K-quants' codes are a shift and a mask away already: they are always read as stored). With
 * few tokens the tiles look the patterns up themselves (mag NULL). */
void q8k_prepare(q8k_row *r, int type, const uint8_t *row, int64_t nb, int tokens, uint8_t *scratch)
{
    *r = (q8k_row){type, row, nb, NULL, NULL};
    if (type != T_IQ2_XXS || tokens <= Q8K_PREPARE_MIN) return;
    uint64_t *mag = (uint64_t *)scratch, *sgn = mag + 32 * nb;  /* 8 values per word */
    for (int64_t i = 0; i < 8 * nb; i++) {  /* group i: 4 patterns, their signs and scale in two words */
        const uint32_t a = ld32(row + 66 * (i / 8) + 2 + 8 * (i % 8)), s = ld32(row + 66 * (i / 8) + 6 + 8 * (i % 8));
        for (int k = 0; k < 4; k++) {
            mag[4 * i + k] = grid8[(a >> (8 * k)) & 255];
            sgn[4 * i + k] = sign8[(s >> (7 * k)) & 127];
        }
    }
    r->mag = scratch;
    r->sgn = (const int8_t *)sgn;
}

/* Group g (32 values) of block ib: 4 grid patterns and their signs. The magnitudes are
 * unsigned (vpmaddubsw's first operand), so the signs go onto the activations. */
AI void iq2_group(const q8k_row *r, const uint8_t *block, int64_t ib, int g, __m256i *w, __m256i *sg)
{
    if (r->mag) {
        *w = _mm256_loadu_si256((const __m256i *)(r->mag + 256 * ib + 32 * g));
        *sg = _mm256_loadu_si256((const __m256i *)(r->sgn + 256 * ib + 32 * g));
        return;
    }
    const uint32_t a = ld32(block + 2 + 8 * g), s = ld32(block + 6 + 8 * g);
    *w = _mm256_set_epi64x((int64_t)grid8[a >> 24], (int64_t)grid8[(a >> 16) & 255],
                           (int64_t)grid8[(a >> 8) & 255], (int64_t)grid8[a & 255]);
    *sg = _mm256_set_epi64x((int64_t)sign8[(s >> 21) & 127], (int64_t)sign8[(s >> 14) & 127],
                            (int64_t)sign8[(s >> 7) & 127], (int64_t)sign8[s & 127]);
}

AI void tile_iq2_xxs(const q8k_row *r, const q8k_block *const *ys, int m, float *out)
{
    __m256 lane[Q8K_TILE];
    for (int t = 0; t < Q8K_TILE; t++) lane[t] = _mm256_setzero_ps();
    const uint8_t *row = r->row;
    for (int64_t ib = 0; ib < r->nb; ib++, row += 66) {
        __m256i acc[Q8K_TILE];
        for (int t = 0; t < Q8K_TILE; t++) acc[t] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i w, sg;
            iq2_group(r, row, ib, g, &w, &sg);
            /* pairs: 2 * 43 * 127 fits int16; the group scale 2 * ls + 1 goes on in the widening */
            const __m256i ls = _mm256_set1_epi16((int16_t)(2 * (ld32(row + 6 + 8 * g) >> 28) + 1));
            for (int t = 0; t < m; t++) {
                const __m256i q = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(ys[t][ib].qs + 32 * g)), sg);
                acc[t] = DOT_S16(acc[t], _mm256_maddubs_epi16(w, q), ls);
            }
        }
        add_block(lane, acc, NULL, ys, m, ib, f16(ld16(row)), 0.0f);
    }
    for (int t = 0; t < m; t++) out[t] = 0.125f * hsum8(lane[t]);
}

/* Byte l of half h holds, at shift 2s, value 128h + 32s + l: sub-block 8h + 2s for l < 16,
 * the next for l >= 16, which is how vpmaddubsw's 16-bit lanes split too. */
AI void tile_q2_k(const q8k_row *r, const q8k_block *const *ys, int m, float *out)
{
    const __m256i three = _mm256_set1_epi8(3);
    const __m128i nib = _mm_set1_epi8(15);
    __m256 lane[Q8K_TILE];
    for (int t = 0; t < Q8K_TILE; t++) lane[t] = _mm256_setzero_ps();
    const uint8_t *row = r->row;
    for (int64_t ib = 0; ib < r->nb; ib++, row += 84) {
        const __m128i packed = _mm_loadu_si128((const __m128i *)row);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm_and_si128(packed, nib));
        __m256i acc[Q8K_TILE], msum[Q8K_TILE];
        for (int t = 0; t < Q8K_TILE; t++) acc[t] = msum[t] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i codes = _mm256_loadu_si256((const __m256i *)(row + 16 + 32 * h));
            for (int s = 0; s < 4; s++) {
                const __m256i c = _mm256_and_si256(_mm256_srli_epi16(codes, 2 * s), three);
                const __m256i sc = pair_scales(scales, 4 * h + s);
#if Q8K_VNNI
                /* code * scale fits a byte (3 * 15), and one 16-bit multiply makes both bytes of a
                 * lane (no carry crosses): each token's sum is then one vpdpbusd */
                const __m256i cs = _mm256_mullo_epi16(c, sc);
                for (int t = 0; t < m; t++)
                    acc[t] = DOT_U8_S8(acc[t], cs, _mm256_loadu_si256((const __m256i *)(ys[t][ib].qs + 128 * h + 32 * s)));
#else
                for (int t = 0; t < m; t++) {
                    const __m256i y = _mm256_loadu_si256((const __m256i *)(ys[t][ib].qs + 128 * h + 32 * s));
                    acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(c, y), sc));
                }
#endif
            }
        }
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), nib));
        for (int t = 0; t < m; t++)
            msum[t] = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)ys[t][ib].bsums));
        add_block(lane, acc, msum, ys, m, ib, f16(ld16(row + 80)), f16(ld16(row + 82)));
    }
    for (int t = 0; t < m; t++) out[t] = hsum8(lane[t]);
}

/* 32 bytes c hold sub-block 2c in their low nibbles and 2c + 1 in their high ones. */
AI void tile_q4_k(const q8k_row *r, const q8k_block *const *ys, int m, float *out)
{
    const __m256i nib = _mm256_set1_epi8(15);
    __m256 lane[Q8K_TILE];
    __m128 mlane[Q8K_TILE];
    for (int t = 0; t < Q8K_TILE; t++) lane[t] = _mm256_setzero_ps(), mlane[t] = _mm_setzero_ps();
    const uint8_t *row = r->row;
    for (int64_t ib = 0; ib < r->nb; ib++, row += 144) {
        uint8_t sc[8], mn[8];
        q4_k_scales(row + 4, sc, mn);
        __m256i acc[Q8K_TILE];
        for (int t = 0; t < Q8K_TILE; t++) acc[t] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i codes = _mm256_loadu_si256((const __m256i *)(row + 16 + 32 * c));
            const __m256i lo = _mm256_and_si256(codes, nib), hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), nib);
            const __m256i slo = _mm256_set1_epi16(sc[2 * c]), shi = _mm256_set1_epi16(sc[2 * c + 1]);
            for (int t = 0; t < m; t++) {
                const int8_t *y = ys[t][ib].qs + 64 * c;
                acc[t] = DOT_S16(acc[t], _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)y)), slo);
                acc[t] = DOT_S16(acc[t], _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(y + 32))), shi);
            }
        }
        /* min j covers 32 values, two of the 16-value sums: in 4 lanes, lane k takes mins 2k and
         * 2k + 1. Built in registers from the packed bytes (q4_k_scales' layout): stores read back
         * as one vector would fail to forward, every block. */
        const uint32_t lo6 = ld32(row + 8), hi4 = ld32(row + 12);
        const uint64_t mn8 = (lo6 & 0x3f3f3f3fu) |
                             (uint64_t)(((hi4 >> 4) & 0x0f0f0f0fu) | (((lo6 >> 6) & 0x03030303u) << 4)) << 32;
        const __m128i mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn8));
        const float w_min = f16(ld16(row + 2));
        for (int t = 0; t < m; t++) {
            const __m256i bsums = _mm256_loadu_si256((const __m256i *)ys[t][ib].bsums);
            const __m128i pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256(bsums, 1));
            mlane[t] = _mm_fmadd_ps(_mm_set1_ps(-w_min * ys[t][ib].d), _mm_cvtepi32_ps(_mm_madd_epi16(mins, pairs)),
                                    mlane[t]);
        }
        add_block(lane, acc, NULL, ys, m, ib, f16(ld16(row)), 0.0f);
    }
    for (int t = 0; t < m; t++) out[t] = hsum8(lane[t]) + hsum4(mlane[t]);
}

#define TILE_BY_COUNT(tile) do { \
        switch (m) { \
        case 8: tile(r, ys, 8, out); break; \
        case 7: tile(r, ys, 7, out); break; \
        case 6: tile(r, ys, 6, out); break; \
        case 5: tile(r, ys, 5, out); break; \
        case 4: tile(r, ys, 4, out); break; \
        case 3: tile(r, ys, 3, out); break; \
        case 2: tile(r, ys, 2, out); break; \
        default: tile(r, ys, 1, out); \
        } \
    } while (0)

void q8k_dots(const q8k_row *r, const q8k_block *const *ys, int n, float *out)
{
    for (int t0 = 0; t0 < n; t0 += Q8K_TILE, ys += Q8K_TILE, out += Q8K_TILE) {
        const int m = n - t0 < Q8K_TILE ? n - t0 : Q8K_TILE;
        if (r->type == T_IQ2_XXS) TILE_BY_COUNT(tile_iq2_xxs);
        else if (r->type == T_Q2_K) TILE_BY_COUNT(tile_q2_k);
        else TILE_BY_COUNT(tile_q4_k);
    }
}
#undef TILE_BY_COUNT
#undef AI
#undef Q8K_VNNI
#undef DOT_S16
#undef DOT_U8_S8

#else /* portable: the AVX2 path's integer lanes and float steps, one value at a time (same bits) */

/* A value at position p of its block is in lane (p % 32) / 4. */
#define LANE(p) (((p) & 31) >> 2)

/* lane[l] += d * isum[l], fused, as _mm256_fmadd_ps */
static void add_lanes(float *lane, const int32_t *isum, float d)
{
    for (int l = 0; l < 8; l++) lane[l] = fmaf(d, (float)isum[l], lane[l]);
}

static float sum8(const float *l) { return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])); }

static float dot_iq2_xxs(const uint8_t *row, const q8k_block *y, int64_t nb)
{
    float lane[8] = {0};
    for (int64_t ib = 0; ib < nb; ib++, row += 66, y++) {
        int32_t isum[8] = {0};
        for (int g = 0; g < 8; g++) {
            const uint32_t a = ld32(row + 2 + 8 * g), s = ld32(row + 6 + 8 * g);
            const int32_t ls = (int32_t)(2 * (s >> 28) + 1);
            for (int k = 0; k < 4; k++) {
                uint8_t w[8], m[8];
                memcpy(w, &grid8[(a >> (8 * k)) & 255], 8);
                memcpy(m, &sign8[(s >> (7 * k)) & 127], 8);
                for (int i = 0; i < 8; i++) isum[LANE(8 * k + i)] += ls * w[i] * (int8_t)m[i] * y->qs[32 * g + 8 * k + i];
            }
        }
        add_lanes(lane, isum, f16(ld16(row)) * y->d);
    }
    return 0.125f * sum8(lane);
}

static float dot_q2_k(const uint8_t *row, const q8k_block *y, int64_t nb)
{
    float lane[8] = {0};
    for (int64_t ib = 0; ib < nb; ib++, row += 84, y++) {
        int32_t isum[8] = {0}, msum[8];
        for (int l = 0; l < 8; l++) msum[l] = (row[2 * l] >> 4) * y->bsums[2 * l] + (row[2 * l + 1] >> 4) * y->bsums[2 * l + 1];
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++)
                    isum[LANE(l)] += (row[8 * h + 2 * s + l / 16] & 15) * ((row[16 + 32 * h + l] >> (2 * s)) & 3) *
                                     y->qs[128 * h + 32 * s + l];
        add_lanes(lane, msum, -f16(ld16(row + 82)) * y->d);
        add_lanes(lane, isum, f16(ld16(row + 80)) * y->d);
    }
    return sum8(lane);
}

static float dot_q4_k(const uint8_t *row, const q8k_block *y, int64_t nb)
{
    float lane[8] = {0}, mlane[4] = {0};
    for (int64_t ib = 0; ib < nb; ib++, row += 144, y++) {
        uint8_t sc[8], mn[8];
        q4_k_scales(row + 4, sc, mn);
        int32_t isum[8] = {0};
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                isum[LANE(l)] += sc[2 * c] * (row[16 + 32 * c + l] & 15) * y->qs[64 * c + l] +
                                 sc[2 * c + 1] * (row[16 + 32 * c + l] >> 4) * y->qs[64 * c + 32 + l];
        const float dmin = -f16(ld16(row + 2)) * y->d;
        for (int k = 0; k < 4; k++) {  /* min j covers bsums 2j and 2j + 1; lane k takes mins 2k, 2k + 1 */
            const int32_t prod = mn[2 * k] * (y->bsums[4 * k] + y->bsums[4 * k + 1]) +
                                 mn[2 * k + 1] * (y->bsums[4 * k + 2] + y->bsums[4 * k + 3]);
            mlane[k] = fmaf(dmin, (float)prod, mlane[k]);
        }
        add_lanes(lane, isum, f16(ld16(row)) * y->d);
    }
    return sum8(lane) + ((mlane[0] + mlane[2]) + (mlane[1] + mlane[3]));
}
#undef LANE

void q8k_prepare(q8k_row *r, int type, const uint8_t *row, int64_t nb, int tokens, uint8_t *scratch)
{
    (void)tokens, (void)scratch;
    *r = (q8k_row){type, row, nb, NULL, NULL};
}

/* row . (the nb Q8_K blocks at y): nb weight blocks of a q8k_supported type */
static float q8k_dot(int type, const uint8_t *row, const q8k_block *y, int64_t nb)
{
    switch (type) {
    case T_IQ2_XXS: return dot_iq2_xxs(row, y, nb);
    case T_Q2_K: return dot_q2_k(row, y, nb);
    default: return dot_q4_k(row, y, nb);
    }
}

void q8k_dots(const q8k_row *r, const q8k_block *const *ys, int n, float *out)
{
    for (int t = 0; t < n; t++) out[t] = q8k_dot(r->type, r->row, ys[t], r->nb);
}
#endif

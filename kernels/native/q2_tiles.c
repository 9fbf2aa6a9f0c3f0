/* q2_tiles.c: IQ2_XXS and Q2_K rows (the q2 experts) dotted with f32 activations
 * from their codes, the scales applied once per sub-block (AVX2 + FMA builds), for
 * experts.c's tile_dots.
 *
 * Decoding every value to f32 and then multiplying it (tile_dots) costs more
 * instructions than the memory bus leaves time for. Here a block is laid out
 * as its codes, small integers exact in f32, with the signs applied (qblock),
 * and the scales are applied once per sub-block:
 *   IQ2_XXS, 32-value group g: acc += db_g * (q . x), in 8 lanes;
 *   Q2_K, 16-value sub-block j: acc += dl_j * (q . x), macc += ml_j * (x_lo + x_hi),
 * and the row's value is the lanes' sum (minus the mins' sum). This is not
 * the reference's rounding (it rounds each weight first), only the same up to
 * f32 rounding of the sums; but one (row, token) pair's arithmetic never
 * depends on the other tokens in the call, so decode and prefill give the
 * same bits, as do streamed rounds and one call. */
#include "blocks.h"

#include <stddef.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define LAY_BLOCKS 4 /* rows are laid out this many blocks at a time: RT rows' worth (18 KiB) stays in L1 */

/* The IQ2_XXS tables as f32 magnitudes and sign-bit masks: a grid pattern with
 * its signs is one load and one xor (negation is exact). */
static _Alignas(32) float iq2_gridf[256][8];
static _Alignas(32) uint32_t iq2_signf[128][8];

void q2_tiles_init(const uint8_t (*grid)[8], const uint8_t (*neg)[8])
{
    for (int g = 0; g < 256; g++)
        for (int i = 0; i < 8; i++) iq2_gridf[g][i] = (float)grid[g][i];
    for (int s = 0; s < 128; s++)
        for (int i = 0; i < 8; i++) iq2_signf[s][i] = neg[s][i] ? 0x80000000u : 0;
}

typedef struct { _Alignas(32) float q[256]; float sc[16], mn[16]; } qblock;

/* db_g = d * (0.5 + s_g >> 28) * 0.25 for the 8 groups at once, rounded as the reference does */
static inline void iq2_xxs_scales(const uint8_t *restrict b, float *restrict db)
{
    const __m256 lo = _mm256_loadu_ps((const float *)(b + 2)), hi = _mm256_loadu_ps((const float *)(b + 34));
    /* the odd words (each group's sign-and-scale word) of groups 0-3 and 4-7, in group order */
    const __m256i w = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(lo, hi, 0xdd)), 0xd8);
    const __m256 ls = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 28));
    const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(f16(ld16(b))), _mm256_add_ps(_mm256_set1_ps(0.5f), ls)),
                                   _mm256_set1_ps(0.25f));
    _mm256_storeu_ps(db, v);
}

static inline void lay_iq2_xxs(const uint8_t *restrict b, qblock *restrict o)
{
    iq2_xxs_scales(b, o->sc);
    for (int g = 0; g < 8; g++) {
        const uint32_t a = ld32(b + 2 + 8 * g), s = ld32(b + 6 + 8 * g);
        for (int k = 0; k < 4; k++) {
            const __m256 sign = _mm256_load_ps((const float *)iq2_signf[(s >> (7 * k)) & 127]);
            _mm256_store_ps(o->q + 32 * g + 8 * k, _mm256_xor_ps(_mm256_load_ps(iq2_gridf[(a >> (8 * k)) & 255]), sign));
        }
    }
}

/* dl_j = d * sc_j and ml_j = dmin * m_j for the 16 sub-blocks (one rounding each, as in the reference) */
static inline void q2_k_scales(const uint8_t *restrict b, float *restrict sc, float *restrict mn)
{
    const __m128i v = _mm_loadu_si128((const __m128i *)b), nib = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
    const __m256 d = _mm256_set1_ps(f16(ld16(b + 80))), dmin = _mm256_set1_ps(f16(ld16(b + 82)));
    _mm256_storeu_ps(sc, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo))));
    _mm256_storeu_ps(sc + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)))));
    _mm256_storeu_ps(mn, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi))));
    _mm256_storeu_ps(mn + 8, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))));
}

static inline void lay_q2_k(const uint8_t *restrict b, qblock *restrict o)
{
    q2_k_scales(b, o->sc, o->mn);
    const __m256i three = _mm256_set1_epi32(3);
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l += 8) {  /* 8 code bytes hold 4 runs of 8 values, at shifts 0, 2, 4, 6 */
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 16 + 32 * h + l)));
            float *q = o->q + 128 * h + l;
            _mm256_store_ps(q, _mm256_cvtepi32_ps(_mm256_and_si256(v, three)));
            _mm256_store_ps(q + 32, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 2), three)));
            _mm256_store_ps(q + 64, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4), three)));
            _mm256_store_ps(q + 96, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 6)));
        }
}

/* One token's 256 values into acc[0..1] (IQ2_XXS: groups alternate) or acc[0..7]
 * (Q2_K: sums, then mins), the codes decoded into registers. */
static inline void fused_iq2_xxs(const uint8_t *restrict b, const float *restrict x, __m256 *restrict acc)
{
    float db[8];
    iq2_xxs_scales(b, db);
#pragma GCC unroll 8
    for (int g = 0; g < 8; g++) {  /* unrolled: acc[g & 1] stays in a register */
        const uint32_t a = ld32(b + 2 + 8 * g), s = ld32(b + 6 + 8 * g);
        const float *xg = x + 32 * g;
        /* byte offsets into the 32-byte table rows, shifted and masked in one step each */
#define IQ2_SH(v, bit) ((bit) >= 5 ? (v) >> ((bit) - 5) : (v) << (5 - (bit)))
#define IQ2_Q(k) _mm256_xor_ps(_mm256_load_ps((const float *)((const char *)iq2_gridf + (IQ2_SH(a, 8 * (k)) & (255u << 5)))), \
                               _mm256_load_ps((const float *)((const char *)iq2_signf + (IQ2_SH(s, 7 * (k)) & (127u << 5)))))
        __m256 sum = _mm256_mul_ps(IQ2_Q(0), _mm256_loadu_ps(xg));
        sum = _mm256_fmadd_ps(IQ2_Q(1), _mm256_loadu_ps(xg + 8), sum);
        sum = _mm256_fmadd_ps(IQ2_Q(2), _mm256_loadu_ps(xg + 16), sum);
        sum = _mm256_fmadd_ps(IQ2_Q(3), _mm256_loadu_ps(xg + 24), sum);
#undef IQ2_Q
#undef IQ2_SH
        acc[g & 1] = _mm256_fmadd_ps(_mm256_set1_ps(db[g]), sum, acc[g & 1]);
    }
}

static inline void fused_q2_k(const uint8_t *restrict b, const float *restrict x, __m256 *restrict acc)
{
    float sc[16], mn[16];
    q2_k_scales(b, sc, mn);
    const __m256i three = _mm256_set1_epi32(3);
    for (int h = 0; h < 2; h++)
        for (int half = 0; half < 2; half++) {  /* sub-blocks j = 8h + 2s + half, s = 0..3: codes at shift 2s */
            const uint8_t *qs = b + 16 + 32 * h + 16 * half;
            const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
            const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
#define Q2_SUB(s, q0, q1) do { \
                const int j = 8 * h + 2 * (s) + half; \
                const __m256 x0 = _mm256_loadu_ps(x + 16 * j), x1 = _mm256_loadu_ps(x + 16 * j + 8); \
                __m256 sum = _mm256_mul_ps(_mm256_cvtepi32_ps(q0), x0); \
                sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), x1, sum); \
                acc[s] = _mm256_fmadd_ps(_mm256_set1_ps(sc[j]), sum, acc[s]); \
                acc[4 + (s)] = _mm256_fmadd_ps(_mm256_set1_ps(mn[j]), _mm256_add_ps(x0, x1), acc[4 + (s)]); \
            } while (0)
            Q2_SUB(0, _mm256_and_si256(v0, three), _mm256_and_si256(v1, three));
            Q2_SUB(1, _mm256_and_si256(_mm256_srli_epi32(v0, 2), three), _mm256_and_si256(_mm256_srli_epi32(v1, 2), three));
            Q2_SUB(2, _mm256_and_si256(_mm256_srli_epi32(v0, 4), three), _mm256_and_si256(_mm256_srli_epi32(v1, 4), three));
            Q2_SUB(3, _mm256_srli_epi32(v0, 6), _mm256_srli_epi32(v1, 6));
#undef Q2_SUB
        }
}

/* the 8 lanes' sum as a tree: at small widths a row is one block, and a 7-add chain
 * per row showed in profiles */
static inline float hsum8(__m256 v)
{
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

static inline float finish_q2(int type, const __m256 *a)
{
    if (type == T_IQ2_XXS) return hsum8(_mm256_add_ps(a[0], a[1]));
    return hsum8(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])))
         - hsum8(_mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])));
}

/* Several tokens: register tiles. tile_dots_q2 lays its rows' blocks out once
 * (qblock), LAY_BLOCKS at a time so that they stay in L1, and runs a tile of R
 * rows x T tokens at a time over them, so each code vector loaded feeds T
 * products and each x vector R, with the sums in registers over the chunk
 * (at small widths the whole row). Each pair's operations are those of fused_*
 * above, in the same order (same products, chains and lanes): only the
 * independent chains of different pairs interleave differently. The row is
 * walked once per accumulator so that few stay live: IQ2_XXS acc[p] takes
 * groups p, p + 2, p + 4, p + 6 of every block, Q2_K acc[a] and acc[4 + a]
 * sub-blocks 2a, 2a + 1, 2a + 8, 2a + 9, the order they reach it in fused_*. */
#define AI static inline __attribute__((always_inline))  /* R and T become constants: the tile's arrays are registers */
#define TILE_MAX 4  /* bound on R and T for the arrays */
#define UNROLL _Pragma("GCC unroll 4")

/* y[t * RT + r] for rows lay[r * nb ..] (blocks from column xo on) and tokens xs[t], r < R, t < T.
 * A row laid out in several chunks carries its sums over in am (64 floats per pair): loaded
 * unless first, stored unless last, when the pair is finished instead. */
AI void tile_iq2_xxs(const qblock *lay, int64_t nb, int64_t xo, const float *const *xs, int R, int T, float *y,
                     float *am, int first, int last)
{
    __m256 fin[2][TILE_MAX][TILE_MAX];
    UNROLL for (int p = 0; p < 2; p++) {
        __m256 acc[TILE_MAX][TILE_MAX];
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int t = 0; t < T; t++)
            acc[r][t] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(am + 64 * (t * RT + r) + 8 * p);
        for (int64_t ib = 0; ib < nb; ib++)
            UNROLL for (int g = p; g < 8; g += 2) {
                __m256 s[TILE_MAX][TILE_MAX];
                UNROLL for (int k = 0; k < 4; k++) {
                    __m256 xv[TILE_MAX];
                    UNROLL for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_ps(xs[t] + xo + 256 * ib + 32 * g + 8 * k);
                    UNROLL for (int r = 0; r < R; r++) {
                        const __m256 q = _mm256_load_ps(lay[r * nb + ib].q + 32 * g + 8 * k);
                        UNROLL for (int t = 0; t < T; t++)
                            s[r][t] = k ? _mm256_fmadd_ps(q, xv[t], s[r][t]) : _mm256_mul_ps(q, xv[t]);
                    }
                }
                UNROLL for (int r = 0; r < R; r++) {
                    const __m256 sc = _mm256_set1_ps(lay[r * nb + ib].sc[g]);
                    UNROLL for (int t = 0; t < T; t++) acc[r][t] = _mm256_fmadd_ps(sc, s[r][t], acc[r][t]);
                }
            }
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int t = 0; t < T; t++) {
            fin[p][r][t] = acc[r][t];
            if (!last) _mm256_storeu_ps(am + 64 * (t * RT + r) + 8 * p, acc[r][t]);
        }
    }
    if (last) UNROLL for (int r = 0; r < R; r++) UNROLL for (int t = 0; t < T; t++) {
        const __m256 a[2] = {fin[0][r][t], fin[1][r][t]};
        y[t * RT + r] = finish_q2(T_IQ2_XXS, a);
    }
}

AI void tile_q2_k(const qblock *lay, int64_t nb, int64_t xo, const float *const *xs, int R, int T, float *y,
                  float *am, int first, int last)
{
    __m256 fin[8][TILE_MAX][TILE_MAX];
    UNROLL for (int a = 0; a < 4; a++) {
        __m256 acc[TILE_MAX][TILE_MAX], macc[TILE_MAX][TILE_MAX];
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int t = 0; t < T; t++) {
            acc[r][t] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(am + 64 * (t * RT + r) + 8 * a);
            macc[r][t] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(am + 64 * (t * RT + r) + 8 * (4 + a));
        }
        for (int64_t ib = 0; ib < nb; ib++)
            UNROLL for (int i = 0; i < 4; i++) {
                const int j = 2 * a + (i & 1) + 8 * (i >> 1);
                __m256 x0[TILE_MAX], x1[TILE_MAX], xsum[TILE_MAX];
                UNROLL for (int t = 0; t < T; t++) {
                    x0[t] = _mm256_loadu_ps(xs[t] + xo + 256 * ib + 16 * j);
                    x1[t] = _mm256_loadu_ps(xs[t] + xo + 256 * ib + 16 * j + 8);
                    xsum[t] = _mm256_add_ps(x0[t], x1[t]);
                }
                UNROLL for (int r = 0; r < R; r++) {
                    const qblock *o = lay + r * nb + ib;
                    const __m256 q0 = _mm256_load_ps(o->q + 16 * j), q1 = _mm256_load_ps(o->q + 16 * j + 8);
                    const __m256 sc = _mm256_set1_ps(o->sc[j]), mn = _mm256_set1_ps(o->mn[j]);
                    UNROLL for (int t = 0; t < T; t++) {
                        const __m256 s = _mm256_fmadd_ps(q1, x1[t], _mm256_mul_ps(q0, x0[t]));
                        acc[r][t] = _mm256_fmadd_ps(sc, s, acc[r][t]);
                        macc[r][t] = _mm256_fmadd_ps(mn, xsum[t], macc[r][t]);
                    }
                }
            }
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int t = 0; t < T; t++) {
            fin[a][r][t] = acc[r][t];
            fin[4 + a][r][t] = macc[r][t];
            if (!last) {
                _mm256_storeu_ps(am + 64 * (t * RT + r) + 8 * a, acc[r][t]);
                _mm256_storeu_ps(am + 64 * (t * RT + r) + 8 * (4 + a), macc[r][t]);
            }
        }
    }
    if (last) UNROLL for (int r = 0; r < R; r++) UNROLL for (int t = 0; t < T; t++) {
        __m256 v[8];
        for (int i = 0; i < 8; i++) v[i] = fin[i][r][t];
        y[t * RT + r] = finish_q2(T_Q2_K, v);
    }
}

/* Tile shapes (rows x tokens). Measured on a 2-core EPYC (AVX2, 16 ymm registers): 4 x 1
 * beat 2 x 2, 2 x 3, 3 x 2, 4 x 2 and 1 x 4 by 10-30% for both types (with more tokens
 * per tile the sums no longer fit the registers); AVX-512's 32 may favour wider tiles. */
#define IQ2_R 4
#define IQ2_T 1
#define Q2K_R 4
#define Q2K_T 1

/* every pair of nr rows x nx tokens: whole tiles, then the tokens left over, then rows left over */
#define TILE_WALK(tile, TR, TT) do { \
        int r = 0; \
        for (; r + (TR) <= nr; r += (TR)) { \
            int t = 0; \
            for (; t + (TT) <= nx; t += (TT)) tile(lay + r * n, n, xo, xs + t, (TR), (TT), y + t * RT + r, am + 64 * (t * RT + r), first, last); \
            for (; t < nx; t++) tile(lay + r * n, n, xo, xs + t, (TR), 1, y + t * RT + r, am + 64 * (t * RT + r), first, last); \
        } \
        for (; r < nr; r++) { \
            int t = 0; \
            for (; t + (TT) <= nx; t += (TT)) tile(lay + r * n, n, xo, xs + t, 1, (TT), y + t * RT + r, am + 64 * (t * RT + r), first, last); \
            for (; t < nx; t++) tile(lay + r * n, n, xo, xs + t, 1, 1, y + t * RT + r, am + 64 * (t * RT + r), first, last); \
        } \
    } while (0)

/* floats of scratch tile_dots_q2 needs for rows of `cols` values and up to ntok tokens:
 * the carried sums when a row takes several chunks, then the laid-out blocks (aligned inside) */
size_t q2_floats(int64_t cols, int64_t ntok)
{
    return (cols / 256 > LAY_BLOCKS ? (size_t)ntok * RT * 64 : 0) + RT * LAY_BLOCKS * (sizeof(qblock) / sizeof(float)) + 8;
}

int q2_tile_dots(const uint8_t *const *rows, int nr, int type, int64_t cols, const float *const *xs, int nx,
                 float *restrict scratch, float *restrict y)
{
    if (type != T_IQ2_XXS && type != T_Q2_K) return 0;
    const int iq2 = type == T_IQ2_XXS, bb = iq2 ? 66 : 84;
    const int64_t nb = cols / 256;
    if (nx == 1) {  /* decode: each block is used once, so its codes stay in registers */
        for (int r = 0; r < nr; r++) {
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int64_t ib = 0; ib < nb; ib++) {
                const uint8_t *block = rows[r] + ib * bb;
                prefetch_ahead(block);
                if (iq2) fused_iq2_xxs(block, xs[0] + 256 * ib, a);
                else fused_q2_k(block, xs[0] + 256 * ib, a);
            }
            y[r] = finish_q2(type, a);
        }
        return 1;
    }
    float *am = scratch;
    qblock *lay = (qblock *)(((uintptr_t)(scratch + (nb > LAY_BLOCKS ? (size_t)nx * RT * 64 : 0)) + 31) & ~(uintptr_t)31);
    for (int64_t c0 = 0; c0 < nb; c0 += LAY_BLOCKS) {
        const int64_t n = nb - c0 < LAY_BLOCKS ? nb - c0 : LAY_BLOCKS, xo = 256 * c0;
        const int first = c0 == 0, last = c0 + n == nb;
        for (int r = 0; r < nr; r++)
            for (int64_t i = 0; i < n; i++) {
                if (iq2) lay_iq2_xxs(rows[r] + (c0 + i) * bb, lay + r * n + i);
                else lay_q2_k(rows[r] + (c0 + i) * bb, lay + r * n + i);
            }
        if (iq2) TILE_WALK(tile_iq2_xxs, IQ2_R, IQ2_T);
        else TILE_WALK(tile_q2_k, Q2K_R, Q2K_T);
    }
    return 1;
}
#undef TILE_WALK
#undef UNROLL
#undef AI
#else
void q2_tiles_init(const uint8_t (*grid)[8], const uint8_t (*neg)[8]) { (void)grid; (void)neg; }
size_t q2_floats(int64_t cols, int64_t ntok) { (void)cols; (void)ntok; return 0; }
int q2_tile_dots(const uint8_t *const *rows, int nr, int type, int64_t cols, const float *const *xs, int nx,
                 float *restrict scratch, float *restrict y)
{
    (void)rows; (void)nr; (void)type; (void)cols; (void)xs; (void)nx; (void)scratch; (void)y;
    return 0;
}
#endif

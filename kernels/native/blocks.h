/* blocks.h: what the native expert sources share: the GGML type codes, error
 * codes, unaligned field loads, the exact f16 widening, and the 8-bit
 * activation blocks (Q8_K) of q8k.c. Block layouts: docs/spec/quant-kernels.md §1. */
#ifndef MAGNETAR_BLOCKS_H
#define MAGNETAR_BLOCKS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { T_F32 = 0, T_F16 = 1, T_Q8_0 = 8, T_Q2_K = 10, T_Q4_K = 12, T_IQ2_XXS = 16 };
enum { E_TYPE = -1, E_SHAPE = -2, E_ID = -3, E_NOMEM = -4, E_INIT = -5 };

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }  /* blocks are only 2-byte aligned */
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* A decode step streams each expert's rows from memory once, and the hardware prefetchers
 * alone left its loads waiting (issue 16): asking for the bytes 2 KiB ahead of each block
 * took the f32 expert step at decode shape (6 experts at Flash widths, 42 MB) from 11.2 to
 * 8.5 ms on a 2-core Sapphire Rapids VM. (The 8-bit tiles, bound by their instructions at
 * one token, did not move.) Past a row's end is the next row; past a buffer's, nothing. */
#define PREFETCH_BYTES 2048
static inline void prefetch_ahead(const uint8_t *p) { __builtin_prefetch(p + PREFETCH_BYTES); }

/* The 6-bit scales and mins of a Q4_K block's 8 sub-blocks, packed in 12 bytes. */
static inline void q4_k_scales(const uint8_t *p, uint8_t *sc, uint8_t *mn)
{
    for (int j = 0; j < 4; j++) {
        sc[j] = p[j] & 63;
        mn[j] = p[j + 4] & 63;
        sc[j + 4] = (uint8_t)((p[j + 8] & 15) | ((p[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4));
    }
}

/* Exact f16 -> f32 (subnormals, inf and NaN included). */
static inline float f16(uint16_t h)
{
    uint32_t em = h & 0x7fffu, bits;
    float f;
    if (em >= 0x7c00u) bits = (em << 13) | 0x7f800000u;              /* inf / NaN */
    else if (em >= 0x0400u) bits = (em << 13) + ((127u - 15u) << 23); /* normal: rebias */
    else { f = (float)em * 5.9604644775390625e-08f; memcpy(&bits, &f, 4); } /* subnormal: em * 2^-24, exact */
    bits |= (uint32_t)(h & 0x8000u) << 16;
    memcpy(&f, &bits, 4);
    return f;
}

#define RT 4  /* weight rows dotted together, so each activation load feeds RT rows */

/* q2_tiles.c: f32 products of IQ2_XXS and Q2_K rows from their codes (AVX2 + FMA builds).
 * q2_tile_dots fills y[t * RT + r] = rows[r] . xs[t] and returns 1, or returns 0 where it
 * does not apply (another type, or a build without those instructions); scratch holds
 * q2_floats(cols, nx) floats. */
void q2_tiles_init(const uint8_t (*grid)[8], const uint8_t (*neg)[8]);
size_t q2_floats(int64_t cols, int64_t ntok);
int q2_tile_dots(const uint8_t *const *rows, int nr, int type, int64_t cols, const float *const *xs, int nx,
                 float *restrict scratch, float *restrict y);

/* 256 activations as int8 codes times d, with the sums of each 16 codes (what the
 * K-quants' mins multiply). 292 bytes, GGML's Q8_K layout. */
typedef struct { float d; int8_t qs[256]; int16_t bsums[16]; } q8k_block;

void q8k_init(const uint8_t (*grid)[8], const uint8_t (*neg)[8]);
int q8k_supported(int type);
void q8k_quantize(const float *x, int64_t n, q8k_block *y);

/* A weight row made ready for `tokens` tokens (q8k_prepare; scratch: Q8K_PREP_BYTES per block),
 * and out[t] = row . ys[t] for n tokens (q8k_dots): a token's bits whatever n, less work per token. */
#define Q8K_PREP_BYTES 512
typedef struct { int type; const uint8_t *row; int64_t nb; const uint8_t *mag; const int8_t *sgn; } q8k_row;
void q8k_prepare(q8k_row *r, int type, const uint8_t *row, int64_t nb, int tokens, uint8_t *scratch);
void q8k_dots(const q8k_row *r, const q8k_block *const *ys, int n, float *out);

#endif

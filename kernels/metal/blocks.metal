// blocks.metal: decoders of GGUF weight blocks (docs/spec/quant-kernels.md section 1).
//
// Pasted into every kernel's header by kernels/metal.py, after the IQ2_XXS
// tables mg_iq2_grid / mg_iq2_signs (generated there from kernels.reference).
// ASCII only: MLX hands the whole source to Metal as an ASCII string.
//
// Every kernel sees a weight row as a run of 32-value chunks:
//   F32, F16              one chunk = 32 plain values (128 or 64 bytes)
//   Q8_0                  one chunk = one 34-byte block
//   Q2_K, Q4_K, IQ2_XXS   eight chunks per 256-value block (84, 144, 66 bytes)
// MgChunk<QT> ch; ch.load(row, c) reads what chunk c shares (scales, base
// pointer); ch.get8(s, grid, signs) then returns its values 8s..8s+7
// (s = 0..3) as an MgF8 (lo = values +0..+3, hi = +4..+7).
//
// Bit-exact with kernels/reference.py: an f16 scale times small integers (a
// sub-block scale, a code, a grid byte, 0.5 + ls) is exact in f32, so every
// product below is exact and the only rounding is the K-quants' single
// subtraction (d*sc)*q - (dmin*m), written in the reference's order. A fused
// multiply-add, if the compiler forms one, gives the same bits (its product
// is exact anyway).
//
// Loads follow the formats' alignment: Q8_0 and IQ2_XXS blocks are only
// 2-byte aligned (34 and 66 bytes), so they are read as bytes / ushort;
// Q2_K (84) and Q4_K (144) code bytes as uint words; F16 as half4, F32 as
// float4 (a row is 64 or 128 bytes per chunk; buffers start 16-byte aligned).

enum MgType : int {
  MG_F32 = 0, MG_F16 = 1, MG_Q8_0 = 8, MG_Q2_K = 10, MG_Q4_K = 12, MG_IQ2_XXS = 16
};

// Values and bytes of one storage block of type qt; rows are whole blocks.
constexpr int mg_block_values(int qt) {
  return (qt == MG_F32 || qt == MG_F16) ? 1 : qt == MG_Q8_0 ? 32 : 256;
}
constexpr int mg_block_bytes(int qt) {
  return qt == MG_F32 ? 4 : qt == MG_F16 ? 2 : qt == MG_Q8_0 ? 34 : qt == MG_Q2_K ? 84 : qt == MG_Q4_K ? 144 : 66;
}
constexpr int mg_row_bytes(int qt, int cols) { return cols / mg_block_values(qt) * mg_block_bytes(qt); }

// The IQ2_XXS tables live in threadgroup memory while a kernel runs. Kernels
// that decode no IQ2_XXS declare 1-element stand-ins (never read).
constexpr bool mg_uses_tables(int qt_a, int qt_b = -1) { return qt_a == MG_IQ2_XXS || qt_b == MG_IQ2_XXS; }
constexpr int mg_grid_words(bool used) { return used ? 512 : 1; }
constexpr int mg_sign_bytes(bool used) { return used ? 128 : 1; }

// Copy the constant tables into the threadgroup's arrays, then barrier.
// Every thread of the threadgroup must call it (before any of them returns):
// thread `tid` of `n` copies words tid, tid + n, ...
inline void mg_stage_tables(threadgroup uint* grid, threadgroup uint8_t* signs, uint tid, uint n) {
  for (uint i = tid; i < 512; i += n) grid[i] = mg_iq2_grid[i];
  for (uint i = tid; i < 128; i += n) signs[i] = mg_iq2_signs[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// An f16 bit pattern widened to f32 (exact), and the f16 stored at p (2-byte aligned).
inline float mg_f16(ushort bits) { return float(as_type<half>(bits)); }
inline float mg_f16_at(const device uint8_t* p) { return mg_f16(*((const device ushort*)p)); }

// Eight consecutive values of a chunk.
struct MgF8 {
  float4 lo;  // values 8s+0 .. 8s+3
  float4 hi;  // values 8s+4 .. 8s+7
};
inline MgF8 mg_f8(float4 lo, float4 hi) {
  MgF8 v;
  v.lo = lo;
  v.hi = hi;
  return v;
}

template <int QT> struct MgChunk;

// F32: chunk c is floats 32c..32c+31 of the row.
template <> struct MgChunk<MG_F32> {
  const device float4* p;
  void load(const device uint8_t* row, int c) { p = (const device float4*)(row + 128 * c); }
  MgF8 get8(int s, const threadgroup uint*, const threadgroup uint8_t*) const {
    return mg_f8(p[2 * s], p[2 * s + 1]);
  }
};

// F16: chunk c is halves 32c..32c+31 of the row.
template <> struct MgChunk<MG_F16> {
  const device half4* p;
  void load(const device uint8_t* row, int c) { p = (const device half4*)(row + 64 * c); }
  MgF8 get8(int s, const threadgroup uint*, const threadgroup uint8_t*) const {
    return mg_f8(float4(p[2 * s]), float4(p[2 * s + 1]));
  }
};

// Q8_0 block: d (f16), then 32 int8 codes; x = d * q.
template <> struct MgChunk<MG_Q8_0> {
  const device packed_char4* q;  // the 32 codes as 8 groups of 4 (1-byte aligned type)
  float d;
  void load(const device uint8_t* row, int c) {
    const device uint8_t* b = row + 34 * c;  // chunk c is block c
    d = mg_f16_at(b);
    q = (const device packed_char4*)(b + 2);
  }
  MgF8 get8(int s, const threadgroup uint*, const threadgroup uint8_t*) const {
    return mg_f8(d * float4(char4(q[2 * s])), d * float4(char4(q[2 * s + 1])));
  }
};

// Q2_K block: scales[16] (low nibble: scale sc, high nibble: min m of a
// 16-value sub-block), qs[64] (2-bit codes), d (f16 at byte 80), dmin (82).
// Byte qs[32h + l] holds the values 128h + 32j + l at bit shift 2j (j = 0..3).
// Chunk c of a block (c = 0..7) is half h = c / 4, bit plane j = c % 4: its
// value l (0..31) is bits 2j..2j+1 of qs[32h + l], in sub-block 8h + 2j + l/16.
template <> struct MgChunk<MG_Q2_K> {
  const device uint* q;  // qs[32h .. 32h+31] as 8 words
  uint shift;            // 2j
  float dl[2];           // d * sc of sub-blocks 8h+2j (values 0..15) and 8h+2j+1 (16..31)
  float ml[2];           // dmin * m of the same two sub-blocks
  void load(const device uint8_t* row, int c) {
    const device uint8_t* b = row + 84 * (c >> 3);  // the block: 8 chunks per block
    const int h = (c >> 2) & 1, j = c & 3;
    const float d = mg_f16_at(b + 80), dmin = mg_f16_at(b + 82);
    for (int i = 0; i < 2; ++i) {
      const uint sm = b[8 * h + 2 * j + i];  // scales[sub-block 8h + 2j + i]
      dl[i] = d * float(sm & 15u);
      ml[i] = dmin * float(sm >> 4);
    }
    q = (const device uint*)(b + 16 + 32 * h);
    shift = uint(2 * j);
  }
  MgF8 get8(int s, const threadgroup uint*, const threadgroup uint8_t*) const {
    const float d = dl[s >> 1], m = ml[s >> 1];  // values 8s..8s+7 lie in sub-block s / 2 of the chunk
    // Word q[2s] holds bytes 8s..8s+3 (little-endian); shifting the word by 2j and
    // masking each byte to 2 bits yields the four codes; q[2s+1] the next four.
    const float4 lo = float4(as_type<uchar4>((q[2 * s] >> shift) & 0x03030303u));
    const float4 hi = float4(as_type<uchar4>((q[2 * s + 1] >> shift) & 0x03030303u));
    return mg_f8(d * lo - m, d * hi - m);
  }
};

// Q4_K block: d (f16), dmin (f16), 12 bytes of packed 6-bit scales and mins,
// qs[128]. Sub-block j (32 values) is chunk j: the low (j even) or high (j
// odd) nibbles of qs[32 * (j/2) + l], l = 0..31.
template <> struct MgChunk<MG_Q4_K> {
  const device uint* q;  // qs[32 * (j/2) ..] as 8 words
  uint shift;            // 0 or 4
  float dl, ml;          // d * sc_j, dmin * m_j
  void load(const device uint8_t* row, int c) {
    const device uint8_t* b = row + 144 * (c >> 3);
    const int j = c & 7;
    const float d = mg_f16_at(b), dmin = mg_f16_at(b + 2);
    const device uint8_t* sc = b + 4;  // the 12 packed bytes
    uint scale, mn;
    if (j < 4) {  // 6 low bits of bytes j and j+4
      scale = sc[j] & 63u;
      mn = sc[j + 4] & 63u;
    } else {  // a nibble of byte j+4, topped by the 2 high bits of byte j-4 (scale) or j (min)
      scale = (sc[j + 4] & 15u) | ((uint(sc[j - 4]) >> 6) << 4);
      mn = (uint(sc[j + 4]) >> 4) | ((uint(sc[j]) >> 6) << 4);
    }
    dl = d * float(scale);
    ml = dmin * float(mn);
    q = (const device uint*)(b + 16 + 32 * (j >> 1));
    shift = uint(4 * (j & 1));
  }
  MgF8 get8(int s, const threadgroup uint*, const threadgroup uint8_t*) const {
    const float4 lo = float4(as_type<uchar4>((q[2 * s] >> shift) & 0x0f0f0f0fu));
    const float4 hi = float4(as_type<uchar4>((q[2 * s + 1] >> shift) & 0x0f0f0f0fu));
    return mg_f8(dl * lo - ml, dl * hi - ml);
  }
};

// IQ2_XXS block: d (f16), then per 32-value group (= chunk) two little-endian
// u32, read as ushort pairs (the block is 2-byte aligned): word A = four
// grid indices (one byte per 8 values), word B = four 7-bit sign indices
// (bits 0-6, 7-13, 14-20, 21-27) and the scale ls (bits 28-31).
// x = d * (0.5 + ls) * 0.25 * grid[g][i] * (bit i of signs[s] ? -1 : 1).
// grid: 256 patterns as 2 words each, byte i of word 2g + i/4 = lane i's
// magnitude (8, 25 or 43); signs: the 8-bit sign masks of the 128 indices.
template <> struct MgChunk<MG_IQ2_XXS> {
  uint grid_idx;   // word A
  uint sign_word;  // word B
  float db;        // d * (0.5 + ls) * 0.25
  void load(const device uint8_t* row, int c) {
    const device ushort* b = (const device ushort*)(row + 66 * (c >> 3));
    const device ushort* g = b + 1 + 4 * (c & 7);  // skip d, then 4 ushorts per group
    grid_idx = uint(g[0]) | (uint(g[1]) << 16);
    sign_word = uint(g[2]) | (uint(g[3]) << 16);
    db = mg_f16(b[0]) * (0.5f + float(sign_word >> 28)) * 0.25f;
  }
  MgF8 get8(int s, const threadgroup uint* grid, const threadgroup uint8_t* signs) const {
    const uint gi = (grid_idx >> (8 * s)) & 255u;    // pattern of values 8s..8s+7
    const uint sb = signs[(sign_word >> (7 * s)) & 127u];
    const float4 lo = float4(as_type<uchar4>(grid[2 * gi]));
    const float4 hi = float4(as_type<uchar4>(grid[2 * gi + 1]));
    // -1 where bit i of the sign mask is set (lanes 0-3 in lo, 4-7 in hi).
    const float4 sl = select(float4(1.0f), float4(-1.0f), (uint4(sb) & uint4(1u, 2u, 4u, 8u)) != 0u);
    const float4 sh = select(float4(1.0f), float4(-1.0f), (uint4(sb) & uint4(16u, 32u, 64u, 128u)) != 0u);
    return mg_f8(db * lo * sl, db * hi * sh);
  }
};

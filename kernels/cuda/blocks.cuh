// blocks.cuh: per-type decoders for GGUF weight blocks (docs/spec/quant-kernels.md §1).
//
// Every kernel sees a weight row as a run of 32-value chunks:
//   F32, F16   one chunk = 32 plain values (128 or 64 bytes);
//   Q8_0       one chunk = one 34-byte block;
//   Q2_K, Q4_K, IQ2_XXS   eight chunks per 256-value block (84, 144, 66 bytes).
// MgChunk<QT>::load(row, c) reads the scales of chunk c once; get8(s, v)
// then yields its values 8s..8s+7 (s = 0..3) as floats.
//
// Bit-exact with kernels/reference.py: an f16 scale times a small integer
// (a sub-block scale, a code, a grid byte) is exact in f32, so all products
// below are exact, and the only rounding is the single subtraction of the
// K-quants, (d*sc)*q - (dmin*m), done in the reference's order. (A fused
// multiply-add gives the same bits, since its product is exact anyway.)
//
// Loads respect the format's alignment: Q8_0 and IQ2_XXS blocks are only
// 2-byte aligned and are read as u16; Q2_K/Q4_K as u32; F32 as float4
// (row starts are 16-byte aligned when cols is a multiple of 32).
//
// Needs mg_iq2_grid / mg_iq2_signs (emitted by kernels/cuda.py before this).

enum MgType : int {
  MG_F32 = 0, MG_F16 = 1, MG_Q8_0 = 8, MG_Q2_K = 10, MG_Q4_K = 12, MG_IQ2_XXS = 16
};

// Values and bytes of one storage block; rows are whole blocks.
template <int QT> struct MgFormat;
template <> struct MgFormat<MG_F32> { static constexpr int values = 32, bytes = 128; };
template <> struct MgFormat<MG_F16> { static constexpr int values = 32, bytes = 64; };
template <> struct MgFormat<MG_Q8_0> { static constexpr int values = 32, bytes = 34; };
template <> struct MgFormat<MG_Q2_K> { static constexpr int values = 256, bytes = 84; };
template <> struct MgFormat<MG_Q4_K> { static constexpr int values = 256, bytes = 144; };
template <> struct MgFormat<MG_IQ2_XXS> { static constexpr int values = 256, bytes = 66; };

template <int QT>
__host__ __device__ constexpr int mg_row_bytes(int cols) {
  return cols / MgFormat<QT>::values * MgFormat<QT>::bytes;
}

// The IQ2_XXS tables as the decoders read them: in shared memory, staged
// once per thread block by mg_stage_tables (2 KiB grid + 128 B signs).
struct MgTables {
  const uint64_t* grid;  // 256 patterns, byte i = magnitude of lane i (8, 25 or 43)
  const uint8_t* signs;  // 128 sign bytes; bit i set = lane i negative
};

// Copy the constant tables into the block's shared arrays, then barrier.
// Call it before any thread of the block returns.
__device__ __forceinline__ void mg_stage_tables(uint64_t* grid, uint8_t* signs) {
  const int n = blockDim.x * blockDim.y * blockDim.z;
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  for (int i = tid; i < 256; i += n) grid[i] = mg_iq2_grid[i];
  for (int i = tid; i < 128; i += n) signs[i] = mg_iq2_signs[i];
  __syncthreads();
}

template <int QT> struct MgChunk;

template <> struct MgChunk<MG_F32> {
  const float4* p;
  __device__ __forceinline__ void load(const uint8_t* row, int c) {
    p = reinterpret_cast<const float4*>(row + 128 * c);
  }
  __device__ __forceinline__ void get8(int s, float v[8], const MgTables&) const {
    const float4 a = p[2 * s], b = p[2 * s + 1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
};

template <> struct MgChunk<MG_F16> {
  const uint32_t* p;
  __device__ __forceinline__ void load(const uint8_t* row, int c) {
    p = reinterpret_cast<const uint32_t*>(row + 64 * c);
  }
  __device__ __forceinline__ void get8(int s, float v[8], const MgTables&) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = p[4 * s + i];
      v[2 * i] = mg_f16(uint16_t(w & 0xffffu));
      v[2 * i + 1] = mg_f16(uint16_t(w >> 16));
    }
  }
};

// Q8_0: d (f16), then 32 int8 codes; x = d * q.
template <> struct MgChunk<MG_Q8_0> {
  const uint16_t* q;
  float d;
  __device__ __forceinline__ void load(const uint8_t* row, int c) {
    const uint16_t* b = reinterpret_cast<const uint16_t*>(row + 34 * c);
    d = mg_f16(b[0]);
    q = b + 1;
  }
  __device__ __forceinline__ void get8(int s, float v[8], const MgTables&) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t w = q[4 * s + i];
      v[2 * i] = d * float(int8_t(w & 0xff));
      v[2 * i + 1] = d * float(int8_t(w >> 8));
    }
  }
};

// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin.
// Chunk c of a block is half h = c/4, plane j = c%4: value l (0..31) is
// bits 2j..2j+1 of qs[32h + l], in sub-block 8h + 2j + l/16.
template <> struct MgChunk<MG_Q2_K> {
  const uint32_t* q;
  int shift;
  float dl[2], ml[2];
  __device__ __forceinline__ void load(const uint8_t* row, int c) {
    const uint8_t* b = row + 84 * (c >> 3);
    const int h = (c >> 2) & 1, j = c & 3;
    const float d = mg_f16(*reinterpret_cast<const uint16_t*>(b + 80));
    const float dmin = mg_f16(*reinterpret_cast<const uint16_t*>(b + 82));
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int sm = b[8 * h + 2 * j + k];
      dl[k] = d * float(sm & 15);
      ml[k] = dmin * float(sm >> 4);
    }
    q = reinterpret_cast<const uint32_t*>(b + 16 + 32 * h);
    shift = 2 * j;
  }
  __device__ __forceinline__ void get8(int s, float v[8], const MgTables&) const {
    const float d = s < 2 ? dl[0] : dl[1], m = s < 2 ? ml[0] : ml[1];  // no local-memory indexing
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const uint32_t w = q[2 * s + k] >> shift;
#pragma unroll
      for (int i = 0; i < 4; ++i) v[4 * k + i] = d * float((w >> (8 * i)) & 3u) - m;
    }
  }
};

// Q4_K: d, dmin, 12 bytes of packed 6-bit scales/mins, qs[128]. Chunk c is
// sub-block c: the low (c even) or high (c odd) nibbles of qs[32*(c/2) + l].
template <> struct MgChunk<MG_Q4_K> {
  const uint32_t* q;
  int shift;
  float dl, ml;
  __device__ __forceinline__ void load(const uint8_t* row, int c) {
    const uint8_t* b = row + 144 * (c >> 3);
    const int j = c & 7;
    const float d = mg_f16(*reinterpret_cast<const uint16_t*>(b));
    const float dmin = mg_f16(*reinterpret_cast<const uint16_t*>(b + 2));
    const uint8_t* s = b + 4;
    int sc, mn;
    if (j < 4) {
      sc = s[j] & 63;
      mn = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
      mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    dl = d * float(sc);
    ml = dmin * float(mn);
    q = reinterpret_cast<const uint32_t*>(b + 16 + 32 * (j >> 1));
    shift = 4 * (j & 1);
  }
  __device__ __forceinline__ void get8(int s, float v[8], const MgTables&) const {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const uint32_t w = q[2 * s + k] >> shift;
#pragma unroll
      for (int i = 0; i < 4; ++i) v[4 * k + i] = dl * float((w >> (8 * i)) & 15u) - ml;
    }
  }
};

// IQ2_XXS: d, then per 32-value group two u32 (read as u16 pairs): four
// grid indices, then four 7-bit sign indices and the 4-bit scale ls.
// x = d * (0.5 + ls) * 0.25 * grid[g][i] * (sign bit i ? -1 : 1).
template <> struct MgChunk<MG_IQ2_XXS> {
  uint32_t grid_idx, sign_word;
  float db;
  __device__ __forceinline__ void load(const uint8_t* row, int c) {
    const uint16_t* b = reinterpret_cast<const uint16_t*>(row + 66 * (c >> 3));
    const uint16_t* g = b + 1 + 4 * (c & 7);
    grid_idx = uint32_t(g[0]) | (uint32_t(g[1]) << 16);
    sign_word = uint32_t(g[2]) | (uint32_t(g[3]) << 16);
    db = mg_f16(b[0]) * (0.5f + float(sign_word >> 28)) * 0.25f;
  }
  __device__ __forceinline__ void get8(int s, float v[8], const MgTables& t) const {
    const uint64_t pattern = t.grid[(grid_idx >> (8 * s)) & 255u];
    const uint32_t signs = t.signs[(sign_word >> (7 * s)) & 127u];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float m = db * float(uint32_t(pattern >> (8 * i)) & 255u);
      v[i] = (signs >> i) & 1u ? -m : m;
    }
  }
};

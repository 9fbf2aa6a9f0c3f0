// prelude.h: the CUDA subset that kernels/cuda uses, emulated on the CPU on
// top of fibers.h (threads as fibers, barriers, lane exchanges; read it
// first).
//
// emulator.py builds one shared library per kernel instance from, in order:
// the EMU_* macros, fibers.h, this file, kernels/cuda.py's header(), the
// kernel body wrapped as MLX wraps it (kernels/cuda.py's wrapped_kernel,
// inside namespace mlx::core::cu), and an extern "C" entry point that calls
// emu::cuda_launch. See emulator.py's docstring for what this does and does
// not prove.
//
// On top of fibers.h: blocks run one after another over the grid;
// __syncthreads() is fibers.h's barrier, a warp shuffle its exchange (each
// lane reads the value its source lane contributed). Shared memory is one
// copy (blocks do not overlap in time), filled with 0xff bytes (NaN floats,
// -1 ints) before each block.
//
// Strict checks, besides fibers.h's, reported as a launch error:
//   - a shuffle with a mask other than all lanes, or a bad width;
//   - float4 is 16-byte aligned here as on the GPU, so fibers.h's alignment
//     check covers float4 loads;
//   - a block size that is 0, over 1024 or not a whole number of warps.

#ifndef EMU_HIP
#error "emulator.py defines EMU_HIP (1: compile portable.cuh's HIP branch)"
#endif

#if EMU_HIP
#define __HIPCC__ 1  // portable.cuh's HIP branch; its #includes find empty stub headers
#define __AMDGCN_WAVEFRONT_SIZE EMU_WARP
#else
#define __CUDACC_RTC__ 1  // as under NVRTC: portable.cuh includes nothing
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__ static const
#define __shared__ static __attribute__((section("emu_shared")))

// ---------------------------------------------------------------------------
// Types and conversions

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

struct __half {
  uint16_t bits;
};
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline float __half2float(__half h) {  // exact: every f16 is an f32
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 31u, man = h.bits & 1023u;
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);  // inf, nan
  } else if (exp == 0) {
    const float v = std::ldexp(float(man), -24);  // zero, subnormal
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float __uint_as_float(unsigned int b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int b;
  std::memcpy(&b, &f, 4);
  return b;
}

// ---------------------------------------------------------------------------
// Blocks over the grid

extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

namespace emu {

inline Idx3 grid_dim;
inline void (*kernel)(void**);
inline void** kernel_args;

inline void run_kernel() { kernel(kernel_args); }

// Run `body` (which calls the wrapped kernel) over the whole grid (in
// blocks). Returns 0, or 1 with the first problem in `error`.
inline int cuda_launch(const unsigned grid[3], const unsigned block[3], uint64_t seed, void (*body)(void**),
                       void** args) {
  grid_dim = Idx3{grid[0], grid[1], grid[2]};
  const unsigned long long n = 1ull * block[0] * block[1] * block[2];
  error.clear();
  if (n == 0 || n > 1024 || n % EMU_WARP) {
    fail("block of " + std::to_string(n) + " threads: need 1..1024 and a multiple of the warp (" +
         std::to_string(EMU_WARP) + ")");
    return 1;
  }
  if (1ull * grid[0] * grid[1] * grid[2] == 0) {
    fail("empty grid (a CUDA launch error)");
    return 1;
  }
  kernel = body;
  kernel_args = args;
  if (!begin(seed, n, run_kernel)) return 1;
  for (unsigned z = 0; z < grid[2] && error.empty(); ++z)
    for (unsigned y = 0; y < grid[1] && error.empty(); ++y)
      for (unsigned x = 0; x < grid[0] && error.empty(); ++x) {
        if (__start_emu_shared != __stop_emu_shared) {
          std::memset(__start_emu_shared, 0xff, size_t(__stop_emu_shared - __start_emu_shared));
        }
        run_group(Idx3{x, y, z}, Idx3{block[0], block[1], block[2]});
      }
  return finish();
}

inline float shfl_down(unsigned mask, float v, unsigned delta, int width, unsigned site) {
  if (mask != 0xffffffffu) fail(where() + ": a shuffle with a partial mask (not emulated)");
  if (width <= 0 || width > EMU_WARP || (width & (width - 1))) fail(where() + ": a bad shuffle width");
  const float* lanes = exchange(v, "shuffle", delta | unsigned(width) << 16, site);
  const int l = lane();
  return l % width + delta < unsigned(width) ? lanes[l + delta] : v;
}

}  // namespace emu

// ---------------------------------------------------------------------------
// What kernels see

#define threadIdx (static_cast<const ::emu::Idx3&>(::emu::cur->pos))
#define blockIdx (static_cast<const ::emu::Idx3&>(::emu::group_idx))
#define blockDim (static_cast<const ::emu::Idx3&>(::emu::group_dim))
#define gridDim (static_cast<const ::emu::Idx3&>(::emu::grid_dim))

// The last parameters (not CUDA's) default to the caller's line: fibers.h
// checks that a block's threads meet at one barrier or shuffle.
inline void __syncthreads(unsigned site = __builtin_LINE()) { emu::barrier(site); }

inline float __shfl_down_sync(unsigned mask, float v, unsigned delta, int width = EMU_WARP,
                              unsigned site = __builtin_LINE()) {
  return emu::shfl_down(mask, v, delta, width, site);
}
#if EMU_HIP
inline float __shfl_down(float v, unsigned delta, int width = EMU_WARP,
                         unsigned site = __builtin_LINE()) {  // HIP: no mask, all lanes
  return emu::shfl_down(0xffffffffu, v, delta, width, site);
}
#endif

// Atomic by construction: one fiber runs at a time and this never yields.
// The order of the additions is the scheduler's, not a GPU's.
inline float atomicAdd(float* address, float v) {
  const float old = *address;
  *address = old + v;
  return old;
}

// MLX's prelude defines this too (kernels/cuda.py _PRELUDE): a kernel using
// `inf` as a name breaks here as it would there.
#define inf __builtin_huge_valf()

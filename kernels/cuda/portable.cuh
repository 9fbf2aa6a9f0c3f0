// portable.cuh: the few things that differ between CUDA (nvcc, NVRTC) and HIP.
//
// Pasted first into every kernel's header by kernels/cuda.py. Under NVRTC,
// MLX's own prelude has already included <cuda_fp16.h> and the cuda::std
// headers (which give the fixed-width integer types), so nothing is
// included there; plain nvcc and hipcc get their headers here. The headers
// are pasted text, not included files, so they carry no include guards.

#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#elif !defined(__CUDACC_RTC__)
#include <cstdint>
#include <cuda_fp16.h>
#endif

// Threads per warp (CUDA) or wavefront (AMD: 64 on CDNA/GCN, 32 on RDNA).
// Every reduction and lane split is written in terms of MG_WARP.
#if defined(__HIPCC__)
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define MG_WARP __AMDGCN_WAVEFRONT_SIZE
#else
#define MG_WARP 64  // host pass of hipcc: device code is parsed, not generated
#endif
#else
#define MG_WARP 32
#endif

// Sum of v over the whole warp; the total lands in lane 0. Every lane of
// the warp must call it (no lane may have returned).
__device__ __forceinline__ float mg_warp_sum(float v) {
#pragma unroll
  for (int offset = MG_WARP / 2; offset > 0; offset >>= 1) {
#if defined(__HIPCC__)
    v += __shfl_down(v, offset, MG_WARP);
#else
    v += __shfl_down_sync(0xffffffffu, v, offset);
#endif
  }
  return v;
}

// Max of v over the whole warp, in lane 0 (as mg_warp_sum).
__device__ __forceinline__ float mg_warp_max(float v) {
#pragma unroll
  for (int offset = MG_WARP / 2; offset > 0; offset >>= 1) {
#if defined(__HIPCC__)
    v = fmaxf(v, __shfl_down(v, offset, MG_WARP));
#else
    v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, offset));
#endif
  }
  return v;
}

// An f16 bit pattern widened to f32 (exact: every f16 is an f32).
__device__ __forceinline__ float mg_f16(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

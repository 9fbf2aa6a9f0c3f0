// prelude.h: the CUDA subset that kernels/cuda uses, emulated on the CPU.
//
// emulator.py builds one shared library per kernel instance from, in order:
// the EMU_* macros, this file, kernels/cuda.py's header(), the kernel body
// wrapped as MLX wraps it (kernels/cuda.py's wrapped_kernel, inside
// namespace mlx::core::cu), and an extern "C" entry point that calls
// emu::launch. See emulator.py's docstring for what this does and does not
// prove.
//
// Execution model. Every CUDA thread of a block is a fiber on the calling OS
// thread (started with makecontext/setcontext, switched with
// _setjmp/_longjmp, which skip the signal-mask system calls of
// swapcontext); blocks run one after another. A fiber runs until it
// reaches __syncthreads(), a warp shuffle or the end of the kernel, then the
// scheduler picks another. __syncthreads() releases the block when all of its
// threads have arrived; a shuffle releases its warp when all EMU_WARP lanes
// have arrived, and each lane then reads the value its source lane
// contributed. Released threads resume in a seeded random order. Shared
// memory is one copy (blocks do not overlap in time), filled with 0xff bytes
// (NaN floats, -1 ints) before each block.
//
// Strict checks, reported as a launch error (emu_error()):
//   - a barrier or shuffle that not every thread of the block or warp
//     reaches (a hang or undefined behaviour on a GPU): __syncthreads() after
//     some thread of the block returned, a return while others wait at one,
//     the same for a warp's lanes and a shuffle, or no thread able to run;
//   - a shuffle with a mask other than all lanes, or with lanes disagreeing
//     on the offset or width;
//   - a misaligned load or store (g++ -fsanitize=alignment; the handler is
//     below, no sanitizer runtime is linked): float4 is 16-byte aligned here
//     as on the GPU;
//   - a block size that is 0, over 1024 or not a whole number of warps.

#undef _FORTIFY_SOURCE  // its longjmp check refuses jumps between stacks
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector>

#ifndef EMU_WARP
#error "emulator.py defines EMU_WARP (lanes per warp) and EMU_HIP (1: compile portable.cuh's HIP branch)"
#endif

#if EMU_HIP
#define __HIPCC__ 1  // portable.cuh's HIP branch; its #includes find empty stub headers
#define __AMDGCN_WAVEFRONT_SIZE EMU_WARP
#else
#define __CUDACC_RTC__ 1  // as under NVRTC: portable.cuh includes nothing
#endif

#define EMU_EXPORT __attribute__((visibility("default")))  // the entry points emulator.py calls

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__ static const
#define __shared__ static __attribute__((section("emu_shared")))

// ---------------------------------------------------------------------------
// Types and conversions

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

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

// ---------------------------------------------------------------------------
// Threads, warps, scheduler

extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

namespace emu {

enum State { RUNNABLE, AT_SYNCTHREADS, AT_SHUFFLE, EXITED };

struct Thread {
  ucontext_t start;  // where the fiber begins
  jmp_buf resume;    // where it stopped
  bool started;
  dim3 idx;
  int lin;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  State state;
  unsigned shuffles;  // shuffles this thread has completed
};

struct Warp {  // one round of a shuffle; two rounds alternate (see shfl_down)
  int waiting, exited;
  float value[2][EMU_WARP];
  unsigned delta[2][EMU_WARP];
  int width[2][EMU_WARP];
};

constexpr size_t STACK_BYTES = 64 * 1024;

inline dim3 grid_dim, block_dim, block_idx;
inline Thread* cur;
inline std::vector<Thread> threads;
inline std::vector<Warp> warps;
inline std::vector<int> ready;
inline size_t ready_head;
inline int at_barrier, exited;
inline jmp_buf scheduler;
inline char* stacks;
inline size_t stack_count;
inline uint64_t rng;
inline void (*kernel)(void**);
inline void** kernel_args;
inline std::string error;

inline void fail(const std::string& message) {
  if (error.empty()) error = message;
}

inline std::string where() {
  char buf[96];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread %d", block_idx.x, block_idx.y, block_idx.z,
                cur ? cur->lin : -1);
  return buf;
}

inline uint64_t next_random() {  // xorshift64
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

// Queue threads first..first+count-1 (stride `stride`) in a random order.
inline void make_ready(int first, int count, int stride) {
  const size_t start = ready.size();
  for (int i = 0; i < count; ++i) ready.push_back(first + i * stride);
  for (size_t i = ready.size() - 1; i > start; --i) {
    const size_t j = start + next_random() % (i - start + 1);
    std::swap(ready[i], ready[j]);
  }
}

// Leave the running fiber for the scheduler, which resumes it once released.
inline void yield(State state) {
  cur->state = state;
  if (!_setjmp(cur->resume)) _longjmp(scheduler, 1);
}

inline float shfl_down(unsigned mask, float v, unsigned delta, int width) {
  if (mask != 0xffffffffu) fail(where() + ": a shuffle with a partial mask (not emulated)");
  if (width <= 0 || width > EMU_WARP || (width & (width - 1))) fail(where() + ": a bad shuffle width");
  Thread& t = *cur;
  const int lane = t.lin % EMU_WARP, round = t.shuffles & 1;
  Warp& w = warps[t.lin / EMU_WARP];
  w.value[round][lane] = v;
  w.delta[round][lane] = delta;
  w.width[round][lane] = width;
  yield(AT_SHUFFLE);  // back when every lane of the warp has written its value
  ++t.shuffles;
  // A lane can write this round's slot again only after the next shuffle,
  // which needs every lane, so all lanes have read this round by then.
  return lane % width + delta < unsigned(width) ? w.value[round][lane + delta] : v;
}

inline void fiber_main() {
  kernel(kernel_args);
  cur->state = EXITED;
  _longjmp(scheduler, 1);  // never returns
}

// What the scheduler does after thread t stopped running.
inline void on_stop(Thread& t) {
  const int n = int(threads.size());
  if (t.state == EXITED) {
    Warp& w = warps[t.lin / EMU_WARP];
    ++exited;
    ++w.exited;
    if (at_barrier) {
      fail(where() + ": returned while " + std::to_string(at_barrier) + " thread(s) wait at __syncthreads()");
    } else if (w.waiting) {
      fail(where() + ": returned while " + std::to_string(w.waiting) + " lane(s) of its warp wait at a shuffle");
    }
  } else if (t.state == AT_SYNCTHREADS) {
    if (exited) {
      fail(where() + ": __syncthreads() after " + std::to_string(exited) + " thread(s) of the block returned");
    } else if (++at_barrier == n) {
      at_barrier = 0;
      make_ready(0, n, 1);
    }
  } else if (t.state == AT_SHUFFLE) {
    const int first = t.lin / EMU_WARP * EMU_WARP, round = t.shuffles & 1;
    Warp& w = warps[t.lin / EMU_WARP];
    if (w.exited) {
      fail(where() + ": a warp shuffle after " + std::to_string(w.exited) + " lane(s) of the warp returned");
    } else if (++w.waiting == EMU_WARP) {
      w.waiting = 0;
      for (int lane = 1; lane < EMU_WARP; ++lane) {
        if (w.delta[round][lane] != w.delta[round][0] || w.width[round][lane] != w.width[round][0]) {
          fail(where() + ": lanes of one warp shuffle with different offsets or widths (divergent shuffles)");
        }
      }
      make_ready(first, EMU_WARP, 1);
    }
  }
}

inline void run_block() {
  const int n = int(threads.size());
  if (__start_emu_shared != __stop_emu_shared) {
    std::memset(__start_emu_shared, 0xff, size_t(__stop_emu_shared - __start_emu_shared));
  }
  for (int i = 0; i < n; ++i) {
    Thread& t = threads[i];
    t.lin = i;
    t.idx.x = i % block_dim.x;
    t.idx.y = i / block_dim.x % block_dim.y;
    t.idx.z = i / (block_dim.x * block_dim.y);
    t.state = RUNNABLE;
    t.started = false;
    t.shuffles = 0;
    t.start.uc_stack.ss_sp = stacks + size_t(i) * STACK_BYTES;
    t.start.uc_stack.ss_size = STACK_BYTES;
    t.start.uc_link = nullptr;
    makecontext(&t.start, fiber_main, 0);
  }
  for (Warp& w : warps) w.waiting = w.exited = 0;
  at_barrier = exited = 0;
  ready.clear();
  ready_head = 0;
  make_ready(0, n, 1);
  while (error.empty()) {
    if (ready_head == ready.size()) {
      ready.clear();
      ready_head = 0;
      if (exited == n) return;
      int at_shuffle = 0;
      for (const Thread& t : threads) at_shuffle += t.state == AT_SHUFFLE;
      cur = nullptr;
      fail(where() + ": deadlock: " + std::to_string(at_barrier) + " thread(s) wait at __syncthreads(), " +
           std::to_string(at_shuffle) + " at a warp shuffle, " + std::to_string(exited) + " returned");
      return;
    }
    Thread& t = threads[ready[ready_head++]];
    t.state = RUNNABLE;
    cur = &t;
    if (!_setjmp(scheduler)) {
      if (t.started) _longjmp(t.resume, 1);
      t.started = true;
      setcontext(&t.start);
    }
    on_stop(t);
  }
}

inline void reserve_stacks(size_t n) {
  if (n <= stack_count) return;
  if (stacks) munmap(stacks, stack_count * STACK_BYTES);
  void* p = mmap(nullptr, n * STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    stacks = nullptr;
    stack_count = 0;
    return;
  }
  stacks = static_cast<char*>(p);
  stack_count = n;
  // A guard page at the low end of each stack: an overflow faults instead of
  // silently writing into the neighbouring fiber's stack.
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  for (size_t i = 0; i < n; ++i) mprotect(stacks + i * STACK_BYTES, page, PROT_NONE);
}

// Run `body` (which calls the wrapped kernel) over the whole grid. Returns 0,
// or 1 with the first problem in `error`.
inline int launch(const unsigned grid[3], const unsigned block[3], uint64_t seed, void (*body)(void**),
                  void** args) {
  error.clear();
  cur = nullptr;
  grid_dim = dim3{grid[0], grid[1], grid[2]};
  block_dim = dim3{block[0], block[1], block[2]};
  block_idx = dim3{0, 0, 0};
  const unsigned long long n = 1ull * block[0] * block[1] * block[2];
  if (n == 0 || n > 1024 || n % EMU_WARP) {
    fail("block of " + std::to_string(n) + " threads: need 1..1024 and a multiple of the warp (" +
         std::to_string(EMU_WARP) + ")");
    return 1;
  }
  if (1ull * grid[0] * grid[1] * grid[2] == 0) {
    fail("empty grid (a CUDA launch error)");
    return 1;
  }
  reserve_stacks(n);
  if (!stacks) {
    fail("cannot allocate fiber stacks");
    return 1;
  }
  threads.assign(n, Thread{});
  for (Thread& t : threads) getcontext(&t.start);  // makecontext, per block, needs one
  warps.assign(n / EMU_WARP, Warp{});
  rng = seed * 0x9e3779b97f4a7c15ull + 0x2545f4914f6cdd1dull;
  kernel = body;
  kernel_args = args;
  for (unsigned z = 0; z < grid[2] && error.empty(); ++z)
    for (unsigned y = 0; y < grid[1] && error.empty(); ++y)
      for (unsigned x = 0; x < grid[0] && error.empty(); ++x) {
        block_idx = dim3{x, y, z};
        run_block();
      }
  return error.empty() ? 0 : 1;
}

}  // namespace emu

// ---------------------------------------------------------------------------
// What kernels see

#define threadIdx (static_cast<const dim3&>(::emu::cur->idx))
#define blockIdx (static_cast<const dim3&>(::emu::block_idx))
#define blockDim (static_cast<const dim3&>(::emu::block_dim))
#define gridDim (static_cast<const dim3&>(::emu::grid_dim))

inline void __syncthreads() { emu::yield(emu::AT_SYNCTHREADS); }

inline float __shfl_down_sync(unsigned mask, float v, unsigned delta, int width = EMU_WARP) {
  return emu::shfl_down(mask, v, delta, width);
}
#if EMU_HIP
inline float __shfl_down(float v, unsigned delta, int width = EMU_WARP) {  // HIP: no mask, all lanes
  return emu::shfl_down(0xffffffffu, v, delta, width);
}
#endif

// Atomic by construction: one fiber runs at a time and this never yields.
// The order of the additions is the scheduler's, not a GPU's.
inline float atomicAdd(float* address, float v) {
  const float old = *address;
  *address = old + v;
  return old;
}

// The handler g++'s -fsanitize=alignment calls on a misaligned access (the
// layout of its first argument is the sanitizer ABI's TypeMismatchData).
struct EmuSourceLocation {
  const char* file;
  uint32_t line, column;
};
struct EmuTypeMismatch {
  EmuSourceLocation loc;
  const void* type;
  unsigned char log_alignment, kind;
};
extern "C" void __ubsan_handle_type_mismatch_v1(EmuTypeMismatch* data, void* pointer) {
  char buf[160];
  std::snprintf(buf, sizeof buf, ": misaligned access at line %u of the generated source (%p, needs %u bytes)",
                data->loc.line, pointer, 1u << data->log_alignment);
  emu::fail(emu::where() + buf);
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(EmuTypeMismatch* data, void* pointer) {
  __ubsan_handle_type_mismatch_v1(data, pointer);
}

// MLX's prelude defines this too (kernels/cuda.py _PRELUDE): a kernel using
// `inf` as a name breaks here as it would there.
#define inf __builtin_huge_valf()

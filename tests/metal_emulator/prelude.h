// prelude.h: the Metal Shading Language subset that kernels/metal uses,
// emulated on the CPU on top of tests/gpu_emulator/fibers.h (threads as
// fibers, barriers, lane exchanges; read it first).
//
// emulator.py builds one shared library per kernel instance from, in order:
// the EMU_* macros, fibers.h, this file, the program MLX would compile
// (kernels/metal.py's generated_source: header, then the body in the
// signature MLX generates, then its explicit instantiation) with its
// threadgroup declarations rewritten (below), and an extern "C" entry point
// that calls emu::metal_launch. See emulator.py's docstring for what this
// does and does not prove.
//
// On top of fibers.h:
//   - the grid is counted in threads, as dispatchThreads takes it: the
//     threadgroups at its far edges hold only the threads inside it
//     (non-uniform threadgroups), and their simdgroups may be partial;
//   - the position attributes are computed per thread (EmuPosition) and passed
//     as the kernel's [[attribute]] parameters, as Metal does;
//   - threadgroup_barrier() is fibers.h's barrier, simd_sum an exchange of
//     the simdgroup's lanes summed as a pairwise tree (simd_max likewise);
//   - threadgroup memory: MSL declares it only at kernel scope, so
//     emulator.py rewrites each `threadgroup T name[N];` into a static array
//     and a call to emu::threadgroup_memory, which fills it with 0xff bytes
//     (NaN floats, -1 ints) the first time a thread of each threadgroup gets
//     there; one copy, as threadgroups run one after another;
//   - address spaces: `device` and `thread` are defined away; `constant`
//     becomes `volatile`, so a `constant` pointer (MLX passes an input of
//     fewer than 8 elements as one) does not convert to a `device` one, a
//     compile error here as in MSL (the reverse conversion passes here);
//   - MSL vectors (float4, half4, uchar4, uint3, packed_char4, ...) with
//     their alignment (float4 16 bytes, a 3-vector the size of a 4-vector,
//     packed_T the alignment of T), so fibers.h's alignment check covers
//     vector loads; `half` is _Float16, so f16 conversions are IEEE-exact.
//
// Strict checks, besides fibers.h's, reported as a launch error:
//   - simd_sum in a simdgroup of which not every thread takes part (Metal
//     would sum the active threads; these kernels are written so that all
//     32 lanes always do);
//   - more than 32 KiB of threadgroup memory declared (Apple GPUs' limit;
//     each array counted rounded up to 16 bytes);
//   - a threadgroup of 0 or over 1024 threads, an empty grid.

#include <type_traits>

using uchar = unsigned char;  // uint, ushort, ulong: glibc's identical typedefs may exist too
using ushort = unsigned short;
using uint = unsigned int;
using ulong = unsigned long;
static_assert(sizeof(ulong) == 8 && char(-1) < 0, "MSL: ulong has 64 bits, char is signed");

namespace metal {

using half = _Float16;

// ---------------------------------------------------------------------------
// Vectors

template <typename T, int N>
struct vec_data;
template <typename T>
struct vec_data<T, 2> {
  union {
    T e[2];
    struct {
      T x, y;
    };
  };
};
template <typename T>
struct vec_data<T, 3> {
  union {
    T e[3];
    struct {
      T x, y, z;
    };
  };
};
template <typename T>
struct vec_data<T, 4> {
  union {
    T e[4];
    struct {
      T x, y, z, w;
    };
  };
};

// Tn (Packed: packed_Tn). A scalar converts implicitly (broadcast), as in
// MSL; another vector of n components only explicitly. Operators take their
// operands by value: -fsanitize=alignment checks every reference bound,
// and those checks keep g++ from fusing multiply-adds (contract=True).
template <typename T, int N, bool Packed = false>
struct alignas(Packed ? alignof(T) : sizeof(T) * (N == 3 ? 4 : N)) vec : vec_data<T, N> {
  vec() = default;
  vec(T s) {
    for (int i = 0; i < N; ++i) this->e[i] = s;
  }
  template <typename... A, typename = std::enable_if_t<sizeof...(A) == N>>
  vec(A... a) {
    const T v[N] = {T(a)...};
    for (int i = 0; i < N; ++i) this->e[i] = v[i];
  }
  template <typename U, bool P>
  explicit vec(const vec<U, N, P>& v) {
    for (int i = 0; i < N; ++i) this->e[i] = T(v.e[i]);
  }
  T& operator[](int i) { return this->e[i]; }
  const T& operator[](int i) const { return this->e[i]; }

#define EMU_VEC_OP(op)                                        \
  friend vec operator op(vec a, vec b) {                      \
    vec r;                                                    \
    for (int i = 0; i < N; ++i) r.e[i] = T(a.e[i] op b.e[i]); \
    return r;                                                 \
  }                                                           \
  vec& operator op##=(vec b) { return *this = *this op b; }
  EMU_VEC_OP(+)
  EMU_VEC_OP(-)
  EMU_VEC_OP(*)
  EMU_VEC_OP(/)
  EMU_VEC_OP(&)
  EMU_VEC_OP(|)
  EMU_VEC_OP(^)
  EMU_VEC_OP(<<)
  EMU_VEC_OP(>>)
#undef EMU_VEC_OP
  friend vec operator-(vec a) { return vec(T(0)) - a; }
#define EMU_VEC_CMP(op)                                      \
  friend vec<bool, N> operator op(vec a, vec b) {            \
    vec<bool, N> r;                                          \
    for (int i = 0; i < N; ++i) r.e[i] = a.e[i] op b.e[i];   \
    return r;                                                \
  }
  EMU_VEC_CMP(==)
  EMU_VEC_CMP(!=)
  EMU_VEC_CMP(<)
  EMU_VEC_CMP(<=)
  EMU_VEC_CMP(>)
  EMU_VEC_CMP(>=)
#undef EMU_VEC_CMP
};

#define EMU_VECTORS(T)                                                                      \
  using T##2 = vec<T, 2>;                                                                   \
  using T##3 = vec<T, 3>;                                                                   \
  using T##4 = vec<T, 4>;                                                                   \
  using packed_##T##2 = vec<T, 2, true>;                                                    \
  using packed_##T##3 = vec<T, 3, true>;                                                    \
  using packed_##T##4 = vec<T, 4, true>;
EMU_VECTORS(bool)
EMU_VECTORS(char)
EMU_VECTORS(uchar)
EMU_VECTORS(short)
EMU_VECTORS(ushort)
EMU_VECTORS(int)
EMU_VECTORS(uint)
EMU_VECTORS(half)
EMU_VECTORS(float)
#undef EMU_VECTORS

// ---------------------------------------------------------------------------
// Functions

template <typename T, typename U>
T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: the types differ in size");
  T t;
  std::memcpy(&t, &u, sizeof t);
  return t;
}

template <typename T, int N, bool P>
T dot(const vec<T, N, P>& a, const vec<T, N, P>& b) {
  T s = a.e[0] * b.e[0];
  for (int i = 1; i < N; ++i) s += a.e[i] * b.e[i];
  return s;
}

// c ? b : a, per component.
template <typename T, int N, bool P>
vec<T, N, P> select(const vec<T, N, P>& a, const vec<T, N, P>& b, const vec<bool, N>& c) {
  vec<T, N, P> r;
  for (int i = 0; i < N; ++i) r.e[i] = c.e[i] ? b.e[i] : a.e[i];
  return r;
}

template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
template <typename T>
T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }

inline float fabs(float x) { return std::fabs(x); }
inline float rint(float x) { return std::nearbyint(x); }  // ties to even, as MSL's rint
inline float copysign(float x, float y) { return std::copysign(x, y); }

namespace precise {
inline float exp(float x) { return std::exp(x); }  // the CPU's expf, not Apple's (both within a few ulp)
inline float sqrt(float x) { return std::sqrt(x); }  // correctly rounded, as IEEE asks of both
inline float cos(float x) { return std::cos(x); }  // the CPU's, not Apple's (both within a few ulp)
inline float sin(float x) { return std::sin(x); }
}  // namespace precise

// ---------------------------------------------------------------------------
// Synchronisation

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

// The last parameters (not MSL's) default to the caller's line: fibers.h
// checks that a threadgroup's threads meet at one barrier, a simdgroup's
// lanes at one simd_sum.

// An execution barrier of the whole threadgroup. Memory needs no fence here
// (one fiber runs at a time), so the flags are not checked.
inline void threadgroup_barrier(mem_flags, unsigned site = __builtin_LINE()) { emu::barrier(site); }

inline float simd_sum(float v, unsigned site = __builtin_LINE()) {
  const float* lanes = emu::exchange(v, "simd_sum", 0, site);
  const int n = emu::warp_lanes();
  float s[EMU_WARP];
  for (int i = 0; i < n; ++i) s[i] = lanes[i];
  for (int d = 1; d < n; d *= 2)
    for (int i = 0; i + d < n; i += 2 * d) s[i] += s[i + d];
  return s[0];
}

inline float simd_max(float v, unsigned site = __builtin_LINE()) {
  const float* lanes = emu::exchange(v, "simd_max", 0, site);
  float m = lanes[0];
  for (int i = 1; i < emu::warp_lanes(); ++i) m = std::fmax(m, lanes[i]);
  return m;
}

}  // namespace metal

using namespace metal;  // as MLX's utils.h, which precedes every metal_kernel source

// ---------------------------------------------------------------------------
// Threadgroups over the grid

namespace emu {

inline Idx3 grid_threads, tg_size, tg_count;  // the dispatch: its grid, threadgroup size, threadgroups
inline unsigned long long tg_serial;          // bumped for each threadgroup

struct ThreadgroupArray {
  void* p;
  unsigned long long serial;  // the threadgroup that last poisoned it
};
inline std::vector<ThreadgroupArray> tg_arrays;  // this kernel's, once reached
inline size_t tg_bytes;                           // their total
constexpr size_t TG_MEMORY_LIMIT = 32 * 1024;

// Called where a threadgroup array is declared: poison it once per threadgroup.
inline void threadgroup_memory(void* p, size_t bytes) {
  for (ThreadgroupArray& a : tg_arrays) {
    if (a.p == p) {
      if (a.serial != tg_serial) std::memset(p, 0xff, bytes);
      a.serial = tg_serial;
      return;
    }
  }
  std::memset(p, 0xff, bytes);
  tg_arrays.push_back(ThreadgroupArray{p, tg_serial});
  tg_bytes += (bytes + 15) / 16 * 16;
  if (tg_bytes > TG_MEMORY_LIMIT) {
    fail(where() + ": " + std::to_string(tg_bytes) + " bytes of threadgroup memory, over the 32 KiB of Apple GPUs");
  }
}

// Run `body` (which calls the kernel) over a grid of threads in threadgroups
// of `group` (dispatchThreads). Returns 0, or 1 with the first problem in `error`.
inline int metal_launch(const unsigned grid[3], const unsigned group[3], uint64_t seed, void (*body)()) {
  error.clear();
  const unsigned long long n = 1ull * group[0] * group[1] * group[2];
  if (n == 0 || n > 1024) {
    fail("threadgroup of " + std::to_string(n) + " threads: Metal takes 1..1024");
    return 1;
  }
  if (1ull * grid[0] * grid[1] * grid[2] == 0) {
    fail("empty grid");
    return 1;
  }
  grid_threads = Idx3{grid[0], grid[1], grid[2]};
  tg_size = Idx3{group[0], group[1], group[2]};
  tg_count = Idx3{(grid[0] + group[0] - 1) / group[0], (grid[1] + group[1] - 1) / group[1],
                  (grid[2] + group[2] - 1) / group[2]};
  if (!begin(seed, n, body)) return 1;
  for (unsigned z = 0; z < tg_count.z && error.empty(); ++z)
    for (unsigned y = 0; y < tg_count.y && error.empty(); ++y)
      for (unsigned x = 0; x < tg_count.x && error.empty(); ++x) {
        ++tg_serial;
        run_group(Idx3{x, y, z}, Idx3{std::min(group[0], grid[0] - x * group[0]),
                                      std::min(group[1], grid[1] - y * group[1]),
                                      std::min(group[2], grid[2] - z * group[2])});
      }
  return finish();
}

}  // namespace emu

// The position attributes MLX may declare (kernels/metal.py THREAD_ATTRIBUTES,
// less grid_origin and grid_size, which belong to stage-in dispatches) for the
// running thread.
struct EmuPosition {
  uint dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup;
  uint quadgroup_index_in_threadgroup, quadgroups_per_threadgroup;
  uint simdgroup_index_in_threadgroup, simdgroups_per_threadgroup, thread_execution_width;
  uint thread_index_in_quadgroup, thread_index_in_simdgroup, thread_index_in_threadgroup;
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threadgroups_per_grid, threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};

inline EmuPosition emu_position() {
  const emu::Thread& t = *emu::cur;
  const emu::Idx3 at = emu::group_idx, size = emu::group_dim, nominal = emu::tg_size;
  const uint n = size.x * size.y * size.z, n_nominal = nominal.x * nominal.y * nominal.z, lin = uint(t.lin);
  EmuPosition p;
  p.dispatch_quadgroups_per_threadgroup = (n_nominal + 3) / 4;
  p.dispatch_simdgroups_per_threadgroup = (n_nominal + EMU_WARP - 1) / EMU_WARP;
  p.dispatch_threads_per_threadgroup = uint3(nominal.x, nominal.y, nominal.z);
  p.quadgroup_index_in_threadgroup = lin / 4;
  p.quadgroups_per_threadgroup = (n + 3) / 4;
  p.simdgroup_index_in_threadgroup = lin / EMU_WARP;
  p.simdgroups_per_threadgroup = (n + EMU_WARP - 1) / EMU_WARP;
  p.thread_execution_width = EMU_WARP;
  p.thread_index_in_quadgroup = lin % 4;
  p.thread_index_in_simdgroup = lin % EMU_WARP;
  p.thread_index_in_threadgroup = lin;
  p.thread_position_in_grid = uint3(at.x * nominal.x + t.pos.x, at.y * nominal.y + t.pos.y, at.z * nominal.z + t.pos.z);
  p.thread_position_in_threadgroup = uint3(t.pos.x, t.pos.y, t.pos.z);
  p.threadgroup_position_in_grid = uint3(at.x, at.y, at.z);
  p.threadgroups_per_grid = uint3(emu::tg_count.x, emu::tg_count.y, emu::tg_count.z);
  p.threads_per_grid = uint3(emu::grid_threads.x, emu::grid_threads.y, emu::grid_threads.z);
  p.threads_per_simdgroup = EMU_WARP;
  p.threads_per_threadgroup = uint3(size.x, size.y, size.z);
  return p;
}

// ---------------------------------------------------------------------------
// Address spaces (last: the words are MSL keywords from here on)

#define device
#define thread
#define threadgroup
#define constant volatile

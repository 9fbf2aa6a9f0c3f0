// fibers.h: the GPU-independent core of the kernel emulators, shared by
// tests/cuda_emulator (prelude.h: CUDA / HIP) and tests/metal_emulator
// (prelude.h: Metal). Each emulator's Python side (harness.py builds and
// runs the library) pastes, in order: its EMU_* macros, this file, its own
// prelude, the kernel source and an extern "C" entry point that calls the
// prelude's launch, which calls emu::begin, emu::run_group once per block /
// threadgroup, and emu::finish.
//
// Names: a "group" is a CUDA block or a Metal threadgroup, a "warp" a CUDA
// warp, HIP wavefront or Metal simdgroup (EMU_WARP lanes; the last warp of a
// group whose size is no multiple of EMU_WARP has fewer). The front end
// defines EMU_GROUP, EMU_BARRIER and EMU_WARP_NAME, the words its messages
// use ("block", "__syncthreads()", "warp" for CUDA).
//
// Execution model. Every thread of a group is a fiber on the calling OS
// thread (started with makecontext/setcontext, switched with
// _setjmp/_longjmp, which skip the signal-mask system calls of
// swapcontext); groups run one after another. A fiber runs until it reaches
// a barrier, a lane exchange or the end of the kernel, then the scheduler
// picks another. A barrier releases the group when all of its threads have
// arrived; an exchange (the building block of warp shuffles and simdgroup
// reductions) releases its warp when all of its lanes have arrived, and
// each lane then reads what every lane contributed. Released threads resume
// in a seeded random order. Group memory (__shared__, threadgroup) is the
// front end's business: it poisons it for each group.
//
// Strict checks, reported as a launch error (emu_error()):
//   - a barrier or exchange that not every thread of the group or warp
//     reaches (a hang or undefined behaviour on a GPU): a barrier after some
//     thread of the group returned, a return while others wait at one, the
//     same for a warp's lanes and an exchange, or no thread able to run;
//   - threads of one group waiting at barriers on different lines of the
//     source, or lanes of one warp meeting at different exchanges, on
//     different lines or with different arguments (a shuffle offset, say):
//     divergent control flow, undefined on a GPU;
//   - a misaligned load or store (g++ -fsanitize=alignment; the handler is
//     at the end of this file, no sanitizer runtime is linked);
//   - a memory fault (SIGSEGV, SIGBUS) while a fiber runs: harness.py puts
//     an inaccessible page beyond each buffer's guard bytes, and each fiber
//     stack has one at its low end, so an access far outside a buffer or a
//     stack overflow ends the launch with an error instead of the process.

#undef _FORTIFY_SOURCE  // its longjmp check refuses jumps between stacks
#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <pthread.h>
#include <string>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector>

#if !defined(EMU_WARP) || !defined(EMU_GROUP) || !defined(EMU_BARRIER) || !defined(EMU_WARP_NAME)
#error "the emulator defines EMU_WARP (lanes per warp) and the words EMU_GROUP, EMU_BARRIER, EMU_WARP_NAME"
#endif

#define EMU_EXPORT __attribute__((visibility("default")))  // the entry points the Python side calls

namespace emu {

struct Idx3 {
  unsigned x, y, z;
};

enum State { RUNNABLE, AT_BARRIER, AT_EXCHANGE, EXITED };

struct Thread {
  ucontext_t start;  // where the fiber begins
  jmp_buf resume;    // where it stopped
  bool started;
  Idx3 pos;  // position in the group
  int lin;   // pos.x + dim.x * (pos.y + dim.y * pos.z)
  State state;
  unsigned site;       // the source line of the barrier it waits at
  unsigned exchanges;  // exchanges this thread has completed
};

struct Warp {  // one round of an exchange; two rounds alternate (see exchange)
  int lanes, waiting, exited;
  float value[2][EMU_WARP];
  const char* op[2][EMU_WARP];
  unsigned arg[2][EMU_WARP], site[2][EMU_WARP];
};

constexpr size_t STACK_BYTES = 64 * 1024;

inline Idx3 group_dim, group_idx;  // the running group: its size and position
inline Thread* cur;
inline std::vector<Thread> threads;  // the first n_threads are the running group's
inline std::vector<Warp> warps;
inline int n_threads;
inline std::vector<int> ready;
inline size_t ready_head;
inline int at_barrier, exited;
inline unsigned barrier_site;  // the line of the barrier the first waiting thread reached
inline jmp_buf scheduler;
inline char* stacks;
inline size_t stack_count;
inline uint64_t rng;
inline void (*body)();  // what every fiber runs
inline std::string error;
inline pthread_t launcher;  // the OS thread running the launch
inline struct sigaction saved_segv, saved_bus;
inline stack_t saved_altstack;
alignas(16) inline char fault_stack[64 * 1024];  // where on_fault runs (the fiber's stack may be what overflowed)

inline void fail(const std::string& message) {
  if (error.empty()) error = message;
}

inline std::string where() {
  char buf[96];
  std::snprintf(buf, sizeof buf, EMU_GROUP " (%u,%u,%u) thread %d", group_idx.x, group_idx.y, group_idx.z,
                cur ? cur->lin : -1);
  return buf;
}

inline uint64_t next_random() {  // xorshift64
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

// Queue threads first..first+count-1 in a random order.
inline void make_ready(int first, int count) {
  const size_t start = ready.size();
  for (int i = 0; i < count; ++i) ready.push_back(first + i);
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

// A barrier of the whole group, called on source line `site`.
inline void barrier(unsigned site) {
  cur->site = site;
  yield(AT_BARRIER);
}

inline int lane() { return cur->lin % EMU_WARP; }

inline int warp_lanes() { return warps[cur->lin / EMU_WARP].lanes; }

// Contribute v to an exchange named op, called on source line `site` with
// arguments arg (every lane must meet at the same line with the same
// arguments); returns the values of all lanes of the warp, valid until this
// thread's next exchange.
inline const float* exchange(float v, const char* op, unsigned arg, unsigned site) {
  Thread& t = *cur;
  const int round = t.exchanges & 1;
  Warp& w = warps[t.lin / EMU_WARP];
  w.value[round][lane()] = v;
  w.op[round][lane()] = op;
  w.arg[round][lane()] = arg;
  w.site[round][lane()] = site;
  yield(AT_EXCHANGE);  // back when every lane of the warp has written its value
  ++t.exchanges;
  // A lane can write this round's slot again only after the next exchange,
  // which needs every lane, so all lanes have read this round by then.
  return w.value[round];
}

inline void fiber_main() {
  body();
  cur->state = EXITED;
  _longjmp(scheduler, 1);  // never returns
}

// The exchange that lanes of thread t's warp wait in.
inline const char* waited_op(const Thread& t) {
  const int first = t.lin / EMU_WARP * EMU_WARP;
  for (int i = first; i < first + warps[t.lin / EMU_WARP].lanes; ++i) {
    if (threads[i].state == AT_EXCHANGE) return warps[t.lin / EMU_WARP].op[threads[i].exchanges & 1][i - first];
  }
  return "an exchange";
}

// What the scheduler does after thread t stopped running.
inline void on_stop(Thread& t) {
  const int n = n_threads;
  Warp& w = warps[t.lin / EMU_WARP];
  if (t.state == EXITED) {
    ++exited;
    ++w.exited;
    if (at_barrier) {
      fail(where() + ": returned while " + std::to_string(at_barrier) + " thread(s) wait at " EMU_BARRIER);
    } else if (w.waiting) {
      fail(where() + ": returned while " + std::to_string(w.waiting) + " lane(s) of its " EMU_WARP_NAME
           " wait in " + waited_op(t));
    }
  } else if (t.state == AT_BARRIER) {
    if (exited) {
      fail(where() + ": " EMU_BARRIER " after " + std::to_string(exited) + " thread(s) of the " EMU_GROUP
           " returned");
    } else if (at_barrier && t.site != barrier_site) {
      fail(where() + ": " EMU_BARRIER " on line " + std::to_string(t.site) + " while others wait at the one on line " +
           std::to_string(barrier_site) + " of the generated source (divergent control flow)");
    } else {
      barrier_site = t.site;
      if (++at_barrier == n) {
        at_barrier = 0;
        make_ready(0, n);
      }
    }
  } else if (t.state == AT_EXCHANGE) {
    const int first = t.lin / EMU_WARP * EMU_WARP, round = t.exchanges & 1;
    if (w.exited) {
      fail(where() + ": " + w.op[round][lane()] + " after " + std::to_string(w.exited) + " lane(s) of the "
           EMU_WARP_NAME " returned");
    } else if (++w.waiting == w.lanes) {
      w.waiting = 0;
      for (int i = 1; i < w.lanes; ++i) {
        if (w.op[round][i] != w.op[round][0] || w.arg[round][i] != w.arg[round][0] ||
            w.site[round][i] != w.site[round][0]) {
          fail(where() + ": lanes of one " EMU_WARP_NAME " meet in " + w.op[round][0] + " on line " +
               std::to_string(w.site[round][0]) + " and " + w.op[round][i] + " on line " +
               std::to_string(w.site[round][i]) + " of the generated source, or with different arguments"
               " (divergent control flow)");
        }
      }
      make_ready(first, w.lanes);
    }
  }
}

// Run every thread of the group at position idx, of size dim, to its end.
inline void run_group(Idx3 idx, Idx3 dim) {
  group_idx = idx;
  group_dim = dim;
  const int n = n_threads = int(dim.x * dim.y * dim.z);
  for (int i = 0; i < n; ++i) {
    Thread& t = threads[i];
    t.lin = i;
    t.pos = Idx3{i % dim.x, i / dim.x % dim.y, i / (dim.x * dim.y)};
    t.state = RUNNABLE;
    t.started = false;
    t.exchanges = 0;
    t.start.uc_stack.ss_sp = stacks + size_t(i) * STACK_BYTES;
    t.start.uc_stack.ss_size = STACK_BYTES;
    t.start.uc_link = nullptr;
    makecontext(&t.start, fiber_main, 0);
  }
  for (int i = 0; i < (n + EMU_WARP - 1) / EMU_WARP; ++i) {
    warps[i].lanes = std::min(EMU_WARP, n - i * EMU_WARP);
    warps[i].waiting = warps[i].exited = 0;
  }
  at_barrier = exited = 0;
  ready.clear();
  ready_head = 0;
  make_ready(0, n);
  while (error.empty()) {
    if (ready_head == ready.size()) {
      ready.clear();
      ready_head = 0;
      if (exited == n) return;
      int at_exchange = 0;
      for (int i = 0; i < n; ++i) at_exchange += threads[i].state == AT_EXCHANGE;
      cur = nullptr;
      fail(where() + ": deadlock: " + std::to_string(at_barrier) + " thread(s) wait at " EMU_BARRIER ", " +
           std::to_string(at_exchange) + " at a " EMU_WARP_NAME " exchange, " + std::to_string(exited) +
           " returned");
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
  // A guard page at the low end of each stack: an overflow faults (see
  // on_fault) instead of silently writing into the neighbouring fiber's stack.
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  for (size_t i = 0; i < n; ++i) mprotect(stacks + i * STACK_BYTES, page, PROT_NONE);
}

// A memory fault in a fiber of this launch fails the launch and returns to
// the scheduler; any other goes back to the handler that was there before.
inline void on_fault(int sig, siginfo_t* info, void*) {
  if (!cur || !pthread_equal(pthread_self(), launcher)) {
    sigaction(sig, sig == SIGSEGV ? &saved_segv : &saved_bus, nullptr);
    return;  // the access faults again, now into that handler
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, ": memory fault at %p (past a buffer's guard bytes, or a fiber stack overflow)",
                info->si_addr);
  fail(where() + buf);
  _longjmp(scheduler, 1);  // SA_NODEFER: no signal mask to restore
}

// Start a launch whose groups have at most max_threads threads, each
// running fiber_body. False (with `error` set) if it cannot run; otherwise
// end it with finish().
inline bool begin(uint64_t seed, size_t max_threads, void (*fiber_body)()) {
  error.clear();
  cur = nullptr;
  group_idx = Idx3{0, 0, 0};
  reserve_stacks(max_threads);
  if (!stacks) {
    fail("cannot allocate fiber stacks");
    return false;
  }
  threads.assign(max_threads, Thread{});
  for (Thread& t : threads) getcontext(&t.start);  // makecontext, per group, needs one
  warps.assign((max_threads + EMU_WARP - 1) / EMU_WARP, Warp{});
  rng = seed * 0x9e3779b97f4a7c15ull + 0x2545f4914f6cdd1dull;
  body = fiber_body;
  launcher = pthread_self();
  stack_t ss{};
  ss.ss_sp = fault_stack;
  ss.ss_size = sizeof fault_stack;
  sigaltstack(&ss, &saved_altstack);
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &saved_segv);
  sigaction(SIGBUS, &sa, &saved_bus);
  return true;
}

// End a launch begun: the previous fault handlers back. Returns 0, or 1
// with the first problem in `error`.
inline int finish() {
  cur = nullptr;
  // Every kernel instance is its own library with its own stacks: kept between launches, a
  // stack and its guard page (two mappings) per thread per library reached the kernel's
  // 65530-mapping limit over a whole test run, and dlopen then failed ("failed to map segment").
  if (stacks) munmap(stacks, stack_count * STACK_BYTES);
  stacks = nullptr;
  stack_count = 0;
  sigaction(SIGSEGV, &saved_segv, nullptr);
  sigaction(SIGBUS, &saved_bus, nullptr);
  sigaltstack(&saved_altstack, nullptr);
  return error.empty() ? 0 : 1;
}

}  // namespace emu

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

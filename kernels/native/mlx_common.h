// mlx_common.h: what every primitive of the MLX extension (mlx_ops.cpp, mlx_q8.cpp,
// mlx_attention.cpp, mlx_moe.cpp) needs the same way: the start of eval_cpu, strided
// views of the inputs that a queued task reads, a chunk's rows split over threads, an
// 8-sum dot product, and the RMS norm's bit-exact scale.

#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <stdexcept>
#include <string>
#include <mutex>
#include <thread>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlx_ext {

// The start of a primitive's eval_cpu: each output that has no buffer yet gets one of its own
// (a primitive that hands an input's buffer on to an output, as the decode attention does with
// its state, sets that output first), and the CPU stream's encoder is told of every input and
// output, as MLX's own CPU primitives do; the caller then dispatches its task on it.
inline mlx::core::cpu::CommandEncoder& begin_eval(mlx::core::Stream stream, const std::vector<mlx::core::array>& in,
                                                  std::vector<mlx::core::array>& out) {
  for (auto& o : out)
    if (!o.data_shared_ptr()) o.set_data(mlx::core::allocator::malloc(o.nbytes()));
  auto& encoder = mlx::core::cpu::get_command_encoder(stream);
  for (const auto& a : in) encoder.set_input_array(a);
  for (auto& o : out) encoder.set_output_array(o);
  return encoder;
}

// An input as a queued task reads it: its buffer, shape and strides (in elements). Held by
// value, without allocating, so eval_cpu copies it into the task; the strides past ndim are
// 0, so a kernel may index a lower-rank input with more axes.
struct View {
  static constexpr int kMaxDims = 8;  // more than any input of these ops has
  const void* data = nullptr;  // nullptr: an optional input that was not given
  int ndim = 0;
  std::array<int, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};
  bool row_contiguous = false;  // its buffer already holds it as row-major elements (no broadcast)

  template <typename T>
  const T* as() const {
    return static_cast<const T*>(data);
  }
  int64_t size() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
};

inline View view(const mlx::core::array& a) {
  if (a.ndim() > View::kMaxDims)
    throw std::invalid_argument("an input of " + std::to_string(a.ndim()) + " axes (at most " +
                                std::to_string(View::kMaxDims) + ")");
  View v;
  v.data = a.data<void>();
  v.ndim = int(a.ndim());
  for (int d = 0; d < v.ndim; ++d) v.shape[d] = a.shape(d), v.strides[d] = a.strides(d);
  v.row_contiguous = a.flags().row_contiguous;
  return v;
}

// The view's elements in row-major order into dst (size() of them), the last axis a run at a time.
template <typename T>
void gather(const View& a, T* dst) {
  if (a.ndim == 0) {
    dst[0] = a.as<T>()[0];
    return;
  }
  const int last = a.ndim - 1, run = a.shape[last];
  const int64_t step = a.strides[last], n = a.size();
  std::array<int, View::kMaxDims> index{};  // of the run's position along the leading axes
  for (int64_t at = 0; at < n; at += run) {
    int64_t offset = 0;
    for (int d = 0; d < last; ++d) offset += index[d] * a.strides[d];
    const T* src = a.as<T>() + offset;
    if (step == 1)
      std::memcpy(dst + at, src, sizeof(T) * run);
    else
      for (int i = 0; i < run; ++i) dst[at + i] = src[i * step];
    for (int d = last - 1; d >= 0; --d) {
      if (++index[d] < a.shape[d]) break;
      index[d] = 0;
    }
  }
}

// The view as dense row-major elements: its own buffer when it already is, else gathered into copy.
template <typename T>
const T* dense(const View& a, std::vector<T>& copy) {
  if (a.row_contiguous) return a.as<T>();
  copy.resize(size_t(a.size()));
  gather(a, copy.data());
  return copy.data();
}

// Helper threads kept for the process: starting a thread per product cost ~50 us on a 2-core
// VM, and a mini-flash decode token split 31 products. After a job a helper polls ~kPollUs for
// the next (a layer's products come back to back), then sleeps, so an idle engine does not hold
// a core that the experts' OpenMP threads or another process need.
class Helpers {
 public:
  static Helpers& get() {
    static Helpers* helpers = new Helpers();  // never destroyed: its threads block until exit
    return *helpers;
  }

  // work() on the calling thread and on parts - 1 helpers, returning when all have. A job
  // that finds the helpers busy (another thread's) runs on its caller alone.
  template <typename Work>
  void run(int parts, Work& work) {
    parts = std::min(parts, kMaxHelpers + 1);
    std::unique_lock<std::mutex> own(busy_, std::try_to_lock);
    if (parts <= 1 || !own.owns_lock()) {
      work();
      return;
    }
    while (threads_ < parts - 1) {
      std::thread(&Helpers::serve, this).detach();
      ++threads_;
    }
    job_ = [](void* w) { (*static_cast<Work*>(w))(); };
    arg_ = &work;
    done_.store(0, std::memory_order_relaxed);
    tickets_.store(parts - 1, std::memory_order_release);  // a helper holding a ticket sees the job
    {
      std::lock_guard<std::mutex> lock(sleep_);
      round_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work();
    while (done_.load(std::memory_order_acquire) < parts - 1) std::this_thread::yield();
  }

 private:
  static constexpr int kMaxHelpers = 3;
  static constexpr int kPollUs = 50;

  // Each round's tickets go to whichever helpers claim them first, so one that wakes late
  // finds none left rather than running a job twice.
  void serve() {
    uint64_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kPollUs);
      while (round_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      {
        std::unique_lock<std::mutex> lock(sleep_);
        wake_.wait(lock, [&] { return round_.load(std::memory_order_acquire) != seen; });
        seen = round_.load(std::memory_order_acquire);
      }
      while (tickets_.fetch_sub(1, std::memory_order_acq_rel) > 0) {
        job_(arg_);
        done_.fetch_add(1, std::memory_order_release);
      }
    }
  }

  std::mutex busy_, sleep_;
  std::condition_variable wake_;
  std::atomic<uint64_t> round_{0};
  std::atomic<int> tickets_{0}, done_{0};
  void (*job_)(void*) = nullptr;
  void* arg_ = nullptr;
  int threads_ = 0;
};

// body(r0, r1) over rows [0, n), split into up to 4 ranges run on as many threads (the
// caller's one of them) when the rows' work (n * per_row multiply-adds or values) pays for
// them: a prefill chunk's token rows, or the decode attention's heads at Flash widths. Each
// row is worked alone, so its bits do not depend on the split.
template <typename Body>
void split_rows(int64_t n, int64_t per_row, Body body) {
  constexpr int64_t kWorkPerThread = 1 << 19;
  static const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t parts = std::min<int64_t>({hw, 4, n, std::max<int64_t>(1, n * per_row / kWorkPerThread)});
  if (parts <= 1) {
    body(int64_t(0), n);
    return;
  }
  const int64_t per = (n + parts - 1) / parts;
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i = next.fetch_add(1); i < parts; i = next.fetch_add(1)) body(std::min(n, i * per), std::min(n, (i + 1) * per));
  };
  Helpers::get().run(int(parts), work);
}

// dot(w[0..n), x[0..n)) with 8 independent partial sums, so the compiler can vectorize it
// without reassociating floats on its own (mlx_ops.cpp's row_dot takes F16 rows through F16C).
template <typename W>
float dot(const W* w, const float* x, int n) {
  float acc[8] = {};
  int k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) acc[l] += float(w[k + l]) * x[k + l];
  for (; k < n; ++k) acc[0] += float(w[k]) * x[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// For a function whose products and sums must each be rounded, as MLX's separate ops round
// them: the build's -ffp-contract=fast would fuse a multiply into the add after it. On GCC
// the function also stays out of line, so that no caller's flags apply to its body; on clang
// its body starts with `#pragma clang fp contract(off)`.
#if defined(__clang__)
#define MLX_EXT_ROUNDED_STEPS
#else
#define MLX_EXT_ROUNDED_STEPS __attribute__((optimize("fp-contract=off"), noinline))
#endif

// 1 / sqrt(mean(x^2) + eps) as MLX's ops compute it on this CPU, bit for bit: each square
// rounded, summed in order (its reduction is scalar here), times 1/n, plus eps.
MLX_EXT_ROUNDED_STEPS inline float inverse_rms(const float* x, int n, float eps) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += x[i] * x[i];
  return 1.0f / std::sqrt(sum * float(1.0 / n) + eps);
}

}  // namespace mlx_ext

// mlx_moe.cpp: the routed-expert step as one MLX primitive (registered into
// mlx_ops.cpp's module), so the CPU decode step is one compiled graph instead of
// a graph cut at every layer's experts (issue 16).
//
// The kernel is not repeated here: eval_cpu calls mg_moe of the native expert
// library (experts.c, built and loaded by kernels/native.py, whose IQ2_XXS grid it
// initialized). bind_experts(path) looks that already-loaded library up with
// RTLD_NOLOAD, so the primitive runs the very code, and bits, the host path runs.

#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlx_common.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace mlx_ext;

namespace {

// experts.c: int mg_moe(x, T, D, ids, wts, K, E, F, gate, gt, g_rb, up, ut, u_rb, down, dt, d_rb,
//                       limit, out, slot_of, S, act)
using MoeEntry = int (*)(const float*, int64_t, int64_t, const int32_t*, const float*, int64_t, int64_t, int64_t,
                         const uint8_t*, int, int64_t, const uint8_t*, int, int64_t, const uint8_t*, int, int64_t,
                         float, float*, const int32_t*, int64_t, int);

std::atomic<MoeEntry> moe_entry{nullptr};

void bind_experts(const std::string& path) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);  // the copy ctypes loaded and initialized
  if (!lib) throw std::runtime_error("routed_experts: the native expert library is not loaded: " + path);
  auto entry = reinterpret_cast<MoeEntry>(dlsym(lib, "mg_moe"));
  dlclose(lib);  // drops only our reference; ctypes keeps it loaded
  if (!entry) throw std::runtime_error("routed_experts: no mg_moe in " + path);
  moe_entry.store(entry);
}

struct Types {
  int gate, up, down;
  float limit;
  int act;  // mg_moe's activation mode: 0 f32, 1 Q8_K
  bool operator==(const Types&) const = default;
};

// An expert stack [E, rows, row_bytes] read where it lies: on the CPU a slice of the model
// file's mapping, so the model is not copied into anonymous memory at load (the page cache
// holds it once). The handle keeps its owner (a numpy memmap view, or an mx.array's
// buffer) referenced.
using Stack = nb::ndarray<const uint8_t, nb::ndim<3>, nb::c_contig, nb::device::cpu>;

struct Stacks {
  Stack gate, up, down;
};

// The last holder of a node's stacks may be an MLX worker thread (the task outlives the
// node, which eval detaches as soon as the task is queued). Dropping a Python reference
// there would wait for the GIL, which the main thread may hold while it waits for that
// worker; so off the GIL the release is queued for the interpreter to run
// (Py_AddPendingCall takes no lock). Once the interpreter is gone, or if its queue of
// pending calls is full, it is left undone: a leak, never a wait.
bool interpreter_gone() {
#if PY_VERSION_HEX >= 0x030D0000
  return !Py_IsInitialized() || Py_IsFinalizing();
#else
  return !Py_IsInitialized() || _Py_IsFinalizing();
#endif
}

void release_stacks(Stacks* stacks) {
  if (interpreter_gone()) return;
  if (PyGILState_Check()) {
    delete stacks;
    return;
  }
  (void)Py_AddPendingCall([](void* p) { delete static_cast<Stacks*>(p); return 0; }, stacks);
}

class RoutedExperts : public mx::Primitive {
 public:
  RoutedExperts(mx::Stream stream, Types types, std::shared_ptr<const Stacks> stacks)
      : mx::Primitive(stream), types_(types), stacks_(std::move(stacks)) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& encoder = begin_eval(stream(), in, out);
    // the task holds the stacks too: a node detached before its task runs must not free them
    encoder.dispatch([in, yp = out[0].data<float>(), t = types_, stacks = stacks_]() {
      const mx::array &x = in[0], &ids = in[1], &w = in[2];
      const Stack &g = stacks->gate, &u = stacks->up, &d = stacks->down;
      MoeEntry entry = moe_entry.load();
      if (!entry) throw std::runtime_error("routed_experts: bind_experts was not called");
      std::vector<float> xc, wc;  // x, ids and weights as dense rows (a graph may hand over strided views)
      std::vector<int32_t> idc;
      const int64_t E = g.shape(0);
      const int rc = entry(dense(view(x), xc), x.shape(0), x.shape(1), dense(view(ids), idc), dense(view(w), wc),
                           ids.shape(1), E, g.shape(1), g.data(), t.gate, g.shape(2), u.data(), t.up, u.shape(2),
                           d.data(), t.down, d.shape(2), t.limit, yp, nullptr, E, t.act);
      if (rc) throw std::runtime_error("routed_experts: the native kernel failed (code " + std::to_string(rc) + ")");
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("routed_experts has a CPU kernel only (the GPU backends have their own)");
  }

  const char* name() const override { return "MagnetarRoutedExperts"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const RoutedExperts&>(other);
    return types_ == o.types_ && stacks_->gate.data() == o.stacks_->gate.data() &&
           stacks_->up.data() == o.stacks_->up.data() && stacks_->down.data() == o.stacks_->down.data();
  }

 private:
  Types types_;
  std::shared_ptr<const Stacks> stacks_;
};

mx::array routed_experts(const mx::array& x, const mx::array& ids, const mx::array& w, const Stack& gate,
                         int gate_type, const Stack& up, int up_type, const Stack& down, int down_type,
                         float limit, int act) {
  if (x.ndim() != 2 || x.dtype() != mx::float32)
    throw std::invalid_argument("routed_experts: x must be float32 [T, D]");
  if (ids.ndim() != 2 || ids.dtype() != mx::int32 || ids.shape(0) != x.shape(0) || w.shape() != ids.shape() ||
      w.dtype() != mx::float32)
    throw std::invalid_argument("routed_experts: ids int32 and weights float32, both [T, K]");
  if (up.shape(0) != gate.shape(0) || down.shape(0) != gate.shape(0) || up.shape(1) != gate.shape(1) ||
      down.shape(1) != size_t(x.shape(1)))
    throw std::invalid_argument("routed_experts: gate/up must be [E, F, *] and down [E, D, *]");
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<RoutedExperts>(mx::default_stream(mx::Device::cpu),
                                                   Types{gate_type, up_type, down_type, limit, act},
                                                   std::shared_ptr<const Stacks>(new Stacks{gate, up, down},
                                                                                 release_stacks)),
                   {x, ids, w});
}

}  // namespace

void register_moe(nb::module_& m) {
  m.def("bind_experts", &bind_experts, nb::arg("path"),
        "point routed_experts at mg_moe of the native expert library already loaded from path");
  m.def("routed_experts", &routed_experts, nb::arg("x"), nb::arg("ids"), nb::arg("weights"), nb::arg("gate"),
        nb::arg("gate_type"), nb::arg("up"), nb::arg("up_type"), nb::arg("down"), nb::arg("down_type"),
        nb::arg("limit"), nb::arg("act") = 0,
        "x [T, D] float32, ids int32 / weights float32 [T, K], raw expert stacks (contiguous uint8 [E, rows, "
        "row_bytes] buffers, read in place) with their GGML types -> [T, D]");
}

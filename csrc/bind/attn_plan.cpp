// _C.host.plan_attention(q_ranges, k_ranges, types, total_q, total_k, block_m, block_n) -> dict of int32
// numpy arrays (plan format: magi_kernels/plan/planner.py). Takes numpy arrays, so no torch ABI.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "bind/bindings.h"
#include "host/attn_plan.h"

namespace magi::bind {
namespace {

using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// Hand the vector's buffer to numpy without a copy (a capsule owns the moved vector).
template <class Vec>
py::array_t<int32_t> to_numpy(Vec&& v) {
  using V = std::decay_t<Vec>;
  auto* owner = new V(std::move(v));
  py::capsule free_when_done(owner, [](void* p) { delete static_cast<V*>(p); });
  return py::array_t<int32_t>({static_cast<py::ssize_t>(owner->size())}, {sizeof(int32_t)}, owner->data(),
                              free_when_done);
}

py::dict plan_attention_py(const I32& q_ranges, const I32& k_ranges, const I32& types, int64_t total_q,
                           int64_t total_k, int64_t block_m, int64_t block_n) {
  const int64_t n = types.size();
  if (q_ranges.size() != 2 * n || k_ranges.size() != 2 * n)
    throw std::invalid_argument("plan_attention: q_ranges and k_ranges must be [n, 2] with n = len(types) = " +
                                std::to_string(n));
  if (total_q < 0 || total_k < 0) throw std::invalid_argument("plan_attention: totals must be >= 0");
  if (block_m <= 0 || block_n <= 0) throw std::invalid_argument("plan_attention: block sizes must be > 0");
  const int32_t* qr = q_ranges.data();
  const int32_t* kr = k_ranges.data();
  const int32_t* ty = types.data();
  for (int64_t s = 0; s < n; ++s) {  // cheap guard: the planner indexes by these values
    if (qr[2 * s] < 0 || qr[2 * s] > qr[2 * s + 1] || qr[2 * s + 1] > total_q || kr[2 * s] < 0 ||
        kr[2 * s] > kr[2 * s + 1] || kr[2 * s + 1] > total_k || ty[s] < 0 || ty[s] > 3)
      throw std::invalid_argument("plan_attention: slice " + std::to_string(s) + " is out of bounds or invalid");
  }
  host::AttnPlanOut out;
  {
    py::gil_scoped_release release;
    host::plan_attention(qr, kr, ty, n, total_q, total_k, block_m, block_n, out);
  }
  if (out.q_kidx.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()) ||
      out.mask_slices.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    throw std::overflow_error("plan_attention: plan does not fit int32 indices; use larger tiles");
  py::dict d;
  d["q_ptr"] = to_numpy(std::move(out.q_ptr));
  d["q_nfull"] = to_numpy(std::move(out.q_nfull));
  d["q_kidx"] = to_numpy(std::move(out.q_kidx));
  d["q_pptr"] = to_numpy(std::move(out.q_pptr));
  d["p_mptr"] = to_numpy(std::move(out.p_mptr));
  d["mask_slices"] = to_numpy(std::move(out.mask_slices));
  d["k_ptr"] = to_numpy(std::move(out.k_ptr));
  d["k_nfull"] = to_numpy(std::move(out.k_nfull));
  d["k_qidx"] = to_numpy(std::move(out.k_qidx));
  d["k_pptr"] = to_numpy(std::move(out.k_pptr));
  d["k_pent"] = to_numpy(std::move(out.k_pent));
  return d;
}

}  // namespace

void attn_plan(py::module_& host) {
  host.def("plan_attention", &plan_attention_py, py::arg("q_ranges"), py::arg("k_ranges"), py::arg("types"),
           py::arg("total_q"), py::arg("total_k"), py::arg("block_m"), py::arg("block_n"),
           "Block-sparse attention plan (see magi_kernels/plan/planner.py for the format).");
}

}  // namespace magi::bind

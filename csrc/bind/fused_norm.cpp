// Python bindings for the fused norm kernels: the parameter structs (filled field by field from
// Python), the CUDA launchers (only when built with nvcc) and the SIMT-emulated launchers + emulator
// self-tests (always). Everything crosses as plain integers/floats, never as torch types.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bind/bindings.h"
#include "kernels/fused_norm_params.h"

// Defined in csrc/simt/fused_norm_simt.cpp (emulator self-test kernels).
namespace magi::simt_selftest {
std::vector<float> shfl(const std::string& kind, const std::vector<float>& in, int arg, int width, unsigned mask);
std::vector<float> block_sum(const std::vector<float>& in, int rows, int threads);
std::vector<int64_t> indices(std::vector<unsigned> grid, std::vector<unsigned> block);
void broken(int which, int threads);
std::vector<float> round_trip(const std::vector<float>& in, int dtype);
}  // namespace magi::simt_selftest

namespace magi::bind {

void fused_norm(py::module_& m, py::module_& cuda, py::module_& simt) {
  using magi::GatedPostNormParams;
  using magi::QkNormRopeParams;
  namespace k = magi::kernels;

#define MAGI_RW(cls, f) .def_readwrite(#f, &cls::f)
  py::class_<QkNormRopeParams>(m, "QkNormRopeParams", "raw-pointer parameter block of qk_norm_rope (see csrc/kernels/fused_norm_params.h)")
      .def(py::init<>())
      MAGI_RW(QkNormRopeParams, q) MAGI_RW(QkNormRopeParams, k) MAGI_RW(QkNormRopeParams, q_out)
      MAGI_RW(QkNormRopeParams, k_out) MAGI_RW(QkNormRopeParams, cos) MAGI_RW(QkNormRopeParams, sin)
      MAGI_RW(QkNormRopeParams, q_weight) MAGI_RW(QkNormRopeParams, q_bias) MAGI_RW(QkNormRopeParams, k_weight)
      MAGI_RW(QkNormRopeParams, k_bias) MAGI_RW(QkNormRopeParams, tokens) MAGI_RW(QkNormRopeParams, hq)
      MAGI_RW(QkNormRopeParams, hk) MAGI_RW(QkNormRopeParams, head_dim) MAGI_RW(QkNormRopeParams, q_stride)
      MAGI_RW(QkNormRopeParams, k_stride) MAGI_RW(QkNormRopeParams, q_out_stride)
      MAGI_RW(QkNormRopeParams, k_out_stride) MAGI_RW(QkNormRopeParams, rope_rows)
      MAGI_RW(QkNormRopeParams, rotary_dim) MAGI_RW(QkNormRopeParams, interleaved) MAGI_RW(QkNormRopeParams, norm)
      MAGI_RW(QkNormRopeParams, hidden_scope) MAGI_RW(QkNormRopeParams, weight_offset)
      MAGI_RW(QkNormRopeParams, eps) MAGI_RW(QkNormRopeParams, in_dtype) MAGI_RW(QkNormRopeParams, out_dtype)
      .def("check", [](const QkNormRopeParams& p) { return k::check_qk_norm_rope(p); },
           "'' if the block is valid, else the field and the rule it breaks");

  py::class_<GatedPostNormParams>(m, "GatedPostNormParams", "raw-pointer parameter block of gated_post_norm_residual")
      .def(py::init<>())
      MAGI_RW(GatedPostNormParams, x) MAGI_RW(GatedPostNormParams, gate) MAGI_RW(GatedPostNormParams, residual)
      MAGI_RW(GatedPostNormParams, out) MAGI_RW(GatedPostNormParams, gate_index) MAGI_RW(GatedPostNormParams, weight)
      MAGI_RW(GatedPostNormParams, bias) MAGI_RW(GatedPostNormParams, tokens) MAGI_RW(GatedPostNormParams, hidden)
      MAGI_RW(GatedPostNormParams, gate_rows) MAGI_RW(GatedPostNormParams, x_stride)
      MAGI_RW(GatedPostNormParams, gate_stride) MAGI_RW(GatedPostNormParams, residual_stride)
      MAGI_RW(GatedPostNormParams, out_stride) MAGI_RW(GatedPostNormParams, norm)
      MAGI_RW(GatedPostNormParams, weight_offset) MAGI_RW(GatedPostNormParams, eps)
      MAGI_RW(GatedPostNormParams, x_dtype) MAGI_RW(GatedPostNormParams, gate_dtype)
      MAGI_RW(GatedPostNormParams, residual_dtype) MAGI_RW(GatedPostNormParams, out_dtype)
      .def("check", [](const GatedPostNormParams& p) { return k::check_gated_post_norm(p); },
           "'' if the block is valid, else the field and the rule it breaks");
#undef MAGI_RW

  // The emulator is single-threaded and slow; the GIL stays held so concurrent Python callers
  // simply queue (the emulator also serializes launches itself).
  simt.def("qk_norm_rope", &k::simt_qk_norm_rope, py::arg("params"),
           "run qk_norm_rope's CUDA source on the CPU under the SIMT emulator (host pointers)");
  simt.def("gated_post_norm_residual", &k::simt_gated_post_norm_residual, py::arg("params"),
           "run gated_post_norm_residual's CUDA source on the CPU under the SIMT emulator (host pointers)");
  simt.def("selftest_shfl", &magi::simt_selftest::shfl, py::arg("kind"), py::arg("values"), py::arg("arg"),
           py::arg("width") = 32, py::arg("mask") = 0xffffffffu,
           "one block, len(values) threads: out[t] = __shfl_<kind>_sync(mask, values[t], arg, width)");
  simt.def("selftest_block_sum", &magi::simt_selftest::block_sum, py::arg("values"), py::arg("rows"),
           py::arg("threads"), "row sums via block_allreduce_sum, one block of `threads` per row");
  simt.def("selftest_indices", &magi::simt_selftest::indices, py::arg("grid"), py::arg("block"),
           "(blockIdx.xyz, threadIdx.xyz) of every thread, block-major");
  simt.def("selftest_round_trip", &magi::simt_selftest::round_trip, py::arg("values"), py::arg("dtype"),
           "float -> fp16 (1) / bf16 (2) -> float with the emulator's conversions");
  simt.def("selftest_broken", &magi::simt_selftest::broken, py::arg("which"), py::arg("threads"),
           "deliberately broken kernels (0..6); each must raise RuntimeError");

#ifdef MAGI_WITH_CUDA
  // Device launchers: pointers are device addresses, `stream` is a cudaStream_t as an integer
  // (torch.cuda.current_stream().cuda_stream). They enqueue and return without synchronizing. The
  // GIL is released: a launch is short, and blocking other Python threads on the driver is pointless.
  cuda.def("qk_norm_rope", &k::cuda_qk_norm_rope, py::arg("params"), py::arg("stream"),
           py::call_guard<py::gil_scoped_release>());
  cuda.def("gated_post_norm_residual", &k::cuda_gated_post_norm_residual, py::arg("params"), py::arg("stream"),
           py::call_guard<py::gil_scoped_release>());
#else
  (void)cuda;
#endif
}

}  // namespace magi::bind

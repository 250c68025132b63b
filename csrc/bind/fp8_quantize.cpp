// Python bindings of the fp8 quantization kernels: the parameter struct, the CUDA launcher (only when
// built with nvcc) and the SIMT-emulated launcher (always). Plain integers/floats cross, never torch types.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "bind/bindings.h"
#include "kernels/fp8_quantize_params.h"

namespace magi::bind {

void fp8_quantize(py::module_& m, py::module_& cuda, py::module_& simt) {
  using magi::Fp8QuantParams;
  namespace k = magi::kernels;

#define MAGI_RW(f) .def_readwrite(#f, &Fp8QuantParams::f)
  py::class_<Fp8QuantParams>(m, "Fp8QuantParams", "raw-pointer parameter block of fp8_quant (see csrc/kernels/fp8_quantize_params.h)")
      .def(py::init<>())
      MAGI_RW(x) MAGI_RW(q) MAGI_RW(scale_in) MAGI_RW(scale_out) MAGI_RW(rows) MAGI_RW(cols) MAGI_RW(x_stride)
      MAGI_RW(q_stride) MAGI_RW(scale_out_stride) MAGI_RW(mode) MAGI_RW(bf16_round) MAGI_RW(in_dtype)
      .def("check", [](const Fp8QuantParams& p) { return k::check_fp8_quant(p); },
           "'' if the block is valid, else the field and the rule it breaks");
#undef MAGI_RW

  simt.def("fp8_quant", &k::simt_fp8_quant, py::arg("params"),
           "run fp8_quant's CUDA source on the CPU under the SIMT emulator (host pointers)");
  simt.def(
      "e4m3_encode",
      [](const std::vector<float>& values) {
        std::vector<uint8_t> out(values.size());
        for (size_t i = 0; i < values.size(); ++i) out[i] = k::simt_e4m3_encode(values[i]);
        return out;
      },
      py::arg("values"), "the kernels' fp32 -> e4m3fn byte encoder (inputs must be clamped to +-448 or NaN)");

#ifdef MAGI_WITH_CUDA
  // Enqueues on `stream` (cudaStream_t as an int) without synchronizing; the GIL is released.
  cuda.def("fp8_quant", &k::cuda_fp8_quant, py::arg("params"), py::arg("stream"),
           py::call_guard<py::gil_scoped_release>());
#else
  (void)cuda;
#endif
}

}  // namespace magi::bind

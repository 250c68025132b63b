// One registration function per kernel family; each lives in csrc/bind/<family>.cpp.
// `cuda` holds launchers for real GPUs (present only when built with nvcc), `simt` the same kernel
// sources compiled for the CPU under the SIMT emulator (tests), `host` plain host C++ (planner, ...).
#pragma once
#include <pybind11/pybind11.h>

namespace magi::bind {
namespace py = pybind11;
void fused_norm(py::module_& m, py::module_& cuda, py::module_& simt);
void attn_plan(py::module_& host);
void fp8_quantize(py::module_& m, py::module_& cuda, py::module_& simt);
}  // namespace magi::bind

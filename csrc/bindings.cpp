#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bind/bindings.h"

namespace py = pybind11;

#ifndef MAGI_CUDA_ARCHS_STR
#define MAGI_CUDA_ARCHS_STR ""
#endif
#ifndef MAGI_NVCC_VERSION_STR
#define MAGI_NVCC_VERSION_STR ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "magi-kernels native extension (torch-ABI-free: pointers + stream handles)";
  m.def("build_info", []() {
    py::dict info;
#ifdef MAGI_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = std::string(MAGI_CUDA_ARCHS_STR);
    info["nvcc_version"] = std::string(MAGI_NVCC_VERSION_STR);
    info["simt"] = true;
    return info;
  });
  py::module_ cuda = m.def_submodule("cuda", "CUDA launchers (raw device pointers, cudaStream_t as int)");
  py::module_ simt = m.def_submodule("simt", "the CUDA kernel sources executed on the CPU (testing)");
  py::module_ host = m.def_submodule("host", "host-side C++ (planning)");
  (void)host;
  magi::bind::norm_rope(m, cuda, simt);
  magi::bind::attn_plan(host);
  magi::bind::fp8_quant(m, cuda, simt);
}

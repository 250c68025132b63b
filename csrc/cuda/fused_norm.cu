// nvcc translation unit for the fused norm kernels: instantiates csrc/kernels/*.cuh as real device
// code and exports plain C++ launchers (declared in kernels/fused_norm_params.h). No pybind11 here:
// nvcc only ever sees CUDA + the standard library, which keeps this TU fast to compile and free of
// host-compiler quirks; csrc/bind/fused_norm.cpp wraps these for Python.
#include "kernels/gated_post_norm_residual.cuh"
#include "kernels/qk_norm_rope.cuh"

namespace magi::kernels {

void cuda_qk_norm_rope(const QkNormRopeParams& p, int64_t stream) {
  launch_qk_norm_rope(p, reinterpret_cast<cudaStream_t>(stream));
}

void cuda_gated_post_norm_residual(const GatedPostNormParams& p, int64_t stream) {
  launch_gated_post_norm_residual(p, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace magi::kernels

// nvcc translation unit of the fp8 quantization kernels (csrc/kernels/fp8_quantize.cuh): device code plus
// the plain C++ launcher declared in kernels/fp8_quantize_params.h. No pybind11 here (see fused_norm.cu).
#include "kernels/fp8_quantize.cuh"

namespace magi::kernels {

void cuda_fp8_quant(const Fp8QuantParams& p, int64_t stream) { launch_fp8_quant(p, reinterpret_cast<cudaStream_t>(stream)); }

}  // namespace magi::kernels

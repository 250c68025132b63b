// The fp8 quantization kernels (csrc/kernels/fp8_quantize.cuh) compiled for the CPU against the SIMT
// emulator. Host compiler only; never needs the CUDA toolkit.
#include "kernels/fp8_quantize.cuh"

namespace magi::kernels {

void simt_fp8_quant(const Fp8QuantParams& p) { launch_fp8_quant(p, nullptr); }

// Exposes the kernels' integer e4m3 encoder so tests can sweep every fp32 pattern class against torch.
uint8_t simt_e4m3_encode(float y) { return fp8q::e4m3_encode(y); }

}  // namespace magi::kernels

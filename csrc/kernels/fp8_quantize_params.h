// Plain C++ parameter block of the fp8 (e4m3fn) quantization kernels (csrc/kernels/fp8_quantize.cuh).
//
// Same ABI rules as fused_norm_params.h: raw pointers (tensor.data_ptr()), sizes and strides in
// elements, dtype codes; no torch types, so _C loads without libtorch. Passed by value as the kernel
// argument. Semantics: magi_kernels/reference/fp8.py.
#pragma once
#include <cstdint>
#include <string>

#include "kernels/fused_norm_params.h"  // DTypeCode (one set of dtype codes for every family)

namespace magi {

// Granularity codes shared with magi_kernels/kernels/cuda/fp8_quant.py. A dynamic per-tensor scale is
// computed by the caller (a grid-wide amax) and then passed as a static "tensor" scale.
enum Fp8Mode : int32_t { kFp8Tensor = 0, kFp8Channel = 1, kFp8Row = 2, kFp8Block1x128 = 3, kFp8Block128x128 = 4 };

struct Fp8QuantParams {
  int64_t x = 0;          // [rows, cols] fp32/fp16/bf16, unit column stride
  int64_t q = 0;          // [rows, cols] e4m3 bytes
  int64_t scale_in = 0;   // fp32: (1,) for tensor, (cols,) for channel; unused by dynamic modes
  int64_t scale_out = 0;  // fp32: (rows, 1) row, (rows, ceil(cols/128)) 1x128, (ceil(rows/128), ceil(cols/128)) 128x128
  int64_t rows = 0, cols = 0;
  int64_t x_stride = 0, q_stride = 0;  // row strides (elements)
  int64_t scale_out_stride = 0;        // row stride of scale_out (elements)
  int32_t mode = kFp8Tensor;
  int32_t bf16_round = 0;              // 1: round the clamped value to bf16 before e4m3 (MAGI-1's order)
  int32_t in_dtype = kFloat32;
};

namespace kernels {
// "" when the block is valid, else the field and the rule it broke (both launchers call it).
inline std::string check_fp8_quant(const Fp8QuantParams& p) {
  auto bad = [](const char* field, const std::string& rule) { return std::string("Fp8QuantParams.") + field + " " + rule; };
  if (p.rows < 0 || p.cols < 0) return bad("rows/cols", "must be >= 0");
  if (p.rows == 0 || p.cols == 0) return "";
  if (p.mode < kFp8Tensor || p.mode > kFp8Block128x128)
    return bad("mode", "must be 0 (tensor), 1 (channel), 2 (row), 3 (block1x128) or 4 (block128x128), got " + std::to_string(p.mode));
  if (!p.x || !p.q) return bad("x/q", "must be non-null pointers");
  if (p.mode <= kFp8Channel && !p.scale_in) return bad("scale_in", "must be set for the static modes (tensor, channel)");
  if (p.mode >= kFp8Row && !p.scale_out) return bad("scale_out", "must be set for the dynamic modes (row, block1x128, block128x128)");
  if (p.x_stride < p.cols && p.rows > 1) return bad("x_stride", "must be >= cols");
  if (p.q_stride < p.cols && p.rows > 1) return bad("q_stride", "must be >= cols");
  if (p.in_dtype < kFloat32 || p.in_dtype > kBFloat16) return bad("in_dtype", "must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (p.bf16_round != 0 && p.bf16_round != 1) return bad("bf16_round", "must be 0 or 1");
  // Rows (or 128-row tiles) go on grid x (< 2^31 blocks); column chunks on grid y, capped at 65535.
  if (p.rows > 0x7fffffff) return bad("rows", "must be < 2^31");
  if ((p.cols + 1023) / 1024 > 65535 || (p.cols + 127) / 128 > 65535)
    return bad("cols", "must be <= 65535 * 128 (grid y limit)");
  return "";
}

// Host entry points: CUDA only when built with nvcc (csrc/cuda/fp8_quantize.cu), SIMT always
// (csrc/simt/fp8_quantize_simt.cpp). Both throw std::runtime_error on failure.
void cuda_fp8_quant(const Fp8QuantParams& p, int64_t stream);
void simt_fp8_quant(const Fp8QuantParams& p);
// The e4m3 byte of one fp32 value (|y| <= 448 or NaN) via the kernels' encoder, for unit tests.
uint8_t simt_e4m3_encode(float y);
}  // namespace kernels

}  // namespace magi

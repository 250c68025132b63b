// Plain C++ parameter blocks for the fused norm kernels (qk_norm_rope, gated_post_norm_residual).
//
// These structs are the whole ABI between Python and the kernels: Python fills them through pybind11
// (def_readwrite) with raw pointers (tensor.data_ptr()), sizes, strides in *elements* and dtype codes.
// No torch types appear here, so _C builds and loads without libtorch. The same struct is passed by
// value as the kernel argument (it is trivially copyable and a few hundred bytes, well under the
// 4 KiB kernel-parameter limit), which keeps the launcher and the kernel signature in sync.
#pragma once
#include <cstdint>
#include <string>

namespace magi {

// Element type codes shared with magi_kernels/kernels/cuda/*.py.
enum DTypeCode : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum NormCode : int32_t { kLayerNorm = 0, kRmsNorm = 1 };

struct QkNormRopeParams {
  // Pointers (0 = absent for the optional ones). q/k: [T, H, D] with packed heads.
  int64_t q = 0, k = 0, q_out = 0, k_out = 0;
  int64_t cos = 0, sin = 0;                // fp32 [rope_rows, rotary_dim / 2]; token t uses row t % rope_rows
  int64_t q_weight = 0, q_bias = 0;        // fp32 [D] ("head" scope) or [Hq * D] ("hidden" scope)
  int64_t k_weight = 0, k_bias = 0;
  int64_t tokens = 0, hq = 0, hk = 0, head_dim = 0;
  int64_t q_stride = 0, k_stride = 0;      // token strides of q / k (elements)
  int64_t q_out_stride = 0, k_out_stride = 0;
  int64_t rope_rows = 1;
  int32_t rotary_dim = 0;                  // 0 = no rotary
  int32_t interleaved = 0;                 // 1: GPT-J pairs (2i, 2i+1); 0: NeoX pairs (i, i + r/2)
  int32_t norm = kLayerNorm;
  int32_t hidden_scope = 0;                // 1: normalize over H*D; 0: per head over D
  float weight_offset = 0.f;
  float eps = 1e-6f;
  int32_t in_dtype = kFloat32;             // q and k share a dtype
  int32_t out_dtype = kFloat32;
};

struct GatedPostNormParams {
  int64_t x = 0, gate = 0, residual = 0, out = 0;
  int64_t gate_index = 0;                  // int32 [T]; 0: token t uses gate row t
  int64_t weight = 0, bias = 0;            // fp32 [H] or 0
  int64_t tokens = 0, hidden = 0, gate_rows = 0;
  int64_t x_stride = 0, gate_stride = 0, residual_stride = 0, out_stride = 0;  // row strides (elements)
  int32_t norm = kLayerNorm;
  float weight_offset = 1.f;
  float eps = 1e-6f;
  int32_t x_dtype = kFloat32, gate_dtype = kFloat32, residual_dtype = kFloat32, out_dtype = kFloat32;
};

// Largest normalized row a block-per-row kernel handles: 1024 threads x 16 values cached in registers.
constexpr int64_t kMaxBlockRow = 16384;
// Largest head_dim of the warp-per-head kernel: 32 lanes x 16 values.
constexpr int64_t kMaxHeadDim = 512;

namespace kernels {
// Validate a parameter block; returns "" when fine, else the field and the rule it broke. Shared by
// both launchers so the emulator rejects exactly what the GPU path rejects. (Python validates the
// user-facing arguments first; these guard the raw ABI against a mis-filled struct.)
inline std::string check_qk_norm_rope(const QkNormRopeParams& p) {
  auto bad = [](const char* field, const std::string& rule) { return std::string("QkNormRopeParams.") + field + " " + rule; };
  if (p.tokens < 0) return bad("tokens", "must be >= 0");
  if (p.tokens == 0) return "";
  if (!p.q || !p.k || !p.q_out || !p.k_out) return bad("q/k/q_out/k_out", "must be non-null pointers");
  if (p.hq < 1 || p.hk < 1) return bad("hq/hk", "must be >= 1");
  if (p.head_dim < 1 || p.head_dim > kMaxHeadDim) return bad("head_dim", "must be in [1, 512], got " + std::to_string(p.head_dim));
  if (p.rotary_dim < 0 || p.rotary_dim % 2 || p.rotary_dim > p.head_dim)
    return bad("rotary_dim", "must be even and in [0, head_dim], got " + std::to_string(p.rotary_dim));
  if (p.rotary_dim && (!p.cos || !p.sin || p.rope_rows < 1)) return bad("cos/sin/rope_rows", "must be set when rotary_dim > 0");
  if (p.hidden_scope && (p.hq > p.hk ? p.hq : p.hk) * p.head_dim > kMaxBlockRow)
    return bad("hidden_scope", "rows (H*head_dim) must be <= 16384 elements");
  if (p.norm != kLayerNorm && p.norm != kRmsNorm) return bad("norm", "must be 0 (layernorm) or 1 (rmsnorm)");
  for (int32_t dt : {p.in_dtype, p.out_dtype})
    if (dt < kFloat32 || dt > kBFloat16) return bad("in_dtype/out_dtype", "must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (!(p.eps > 0.f)) return bad("eps", "must be > 0");
  return "";
}

inline std::string check_gated_post_norm(const GatedPostNormParams& p) {
  auto bad = [](const char* field, const std::string& rule) { return std::string("GatedPostNormParams.") + field + " " + rule; };
  if (p.tokens < 0) return bad("tokens", "must be >= 0");
  if (p.tokens == 0) return "";
  if (!p.x || !p.gate || !p.residual || !p.out) return bad("x/gate/residual/out", "must be non-null pointers");
  if (p.hidden < 1 || p.hidden > kMaxBlockRow) return bad("hidden", "must be in [1, 16384], got " + std::to_string(p.hidden));
  if (p.gate_rows < 1) return bad("gate_rows", "must be >= 1");
  if (!p.gate_index && p.gate_rows < p.tokens) return bad("gate_rows", "must be >= tokens when gate_index is absent");
  if (p.norm != kLayerNorm && p.norm != kRmsNorm) return bad("norm", "must be 0 (layernorm) or 1 (rmsnorm)");
  for (int32_t dt : {p.x_dtype, p.gate_dtype, p.residual_dtype, p.out_dtype})
    if (dt < kFloat32 || dt > kBFloat16) return bad("*_dtype", "must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (!(p.eps > 0.f)) return bad("eps", "must be > 0");
  return "";
}

// Host entry points. The CUDA ones exist only when _C is built with nvcc (csrc/cuda/fused_norm.cu);
// the SIMT ones always (csrc/simt/fused_norm_simt.cpp). Both throw std::runtime_error on failure.
void cuda_qk_norm_rope(const QkNormRopeParams& p, int64_t stream);
void cuda_gated_post_norm_residual(const GatedPostNormParams& p, int64_t stream);
void simt_qk_norm_rope(const QkNormRopeParams& p);
void simt_gated_post_norm_residual(const GatedPostNormParams& p);
}  // namespace kernels

}  // namespace magi

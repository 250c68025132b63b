// gated_post_norm_residual: out[t] = residual[t] + norm(x[t] * gate[gate_index[t]]) * gamma + beta,
// fp32 inside, one pass over memory. Semantics: magi_kernels/reference/gated_post_norm_residual.py.
//
// Compiled by nvcc and by the host compiler under the SIMT emulator from this one source (see
// qk_norm_rope.cuh). One block per token row; each thread caches VPT products x*gate in registers, so
// x and gate are read once, then residual is read and out written once.
//
// x and out (the two full-size streams whose element type is most varied in practice) are template
// parameters; gate and residual types are run-time codes read through load_dyn (a grid-uniform
// branch), which keeps the instantiation count at 3 x 3 x 3 instead of 3^4 x 3.
#pragma once

#include "magi/device.h"
#include "kernels/fused_norm_params.h"
#include "kernels/qk_norm_rope.cuh"  // affine(), row_config(), dispatch_dtype()

namespace magi {
inline namespace MAGI_BACKEND_NS {
namespace gpnr {

template <class Tx, class Tout, int VPT>
__global__ void __launch_bounds__(qknr::kMaxBlockThreads) gated_post_norm_kernel(const GatedPostNormParams p) {
  __shared__ float scratch[kWarp];
  const int64_t t = blockIdx.x;
  const int n = static_cast<int>(p.hidden);
  const int tid = threadIdx.x, nt = blockDim.x;
  Tout* out = qknr::mptr<Tout>(p.out) + t * p.out_stride;

  const int64_t g = p.gate_index ? static_cast<int64_t>(qknr::cptr<int32_t>(p.gate_index)[t]) : t;
  if (g < 0 || g >= p.gate_rows) {
    // A bad index must never turn into an out-of-bounds read: poison the row instead. g is the same
    // for every thread of the block, so the whole block returns before any barrier.
    for (int e = tid; e < n; e += nt) out[e] = from_float<Tout>(qnan());
    return;
  }
  const Tx* x = qknr::cptr<Tx>(p.x) + t * p.x_stride;
  const void* gate = reinterpret_cast<const void*>(p.gate);
  const int64_t grow = g * p.gate_stride;
  const float* w = qknr::cptr<float>(p.weight);
  const float* b = qknr::cptr<float>(p.bias);

  float v[VPT];
  float s = 0.f;
MAGI_UNROLL
  for (int j = 0; j < VPT; ++j) {
    const int e = j * nt + tid;
    v[j] = e < n ? to_float(x[e]) * load_dyn(gate, p.gate_dtype, grow + e) : 0.f;
    s += v[j];
  }
  float mean = 0.f;
  if (p.norm == kLayerNorm) {
    mean = block_allreduce_sum(s, scratch) / static_cast<float>(n);
    s = 0.f;
MAGI_UNROLL
    for (int j = 0; j < VPT; ++j) {
      const float c = j * nt + tid < n ? v[j] - mean : 0.f;
      s += c * c;
    }
  } else {
    s = 0.f;
MAGI_UNROLL
    for (int j = 0; j < VPT; ++j) s += v[j] * v[j];
  }
  const float rstd = rsqrt(block_allreduce_sum(s, scratch) / static_cast<float>(n) + p.eps);

  const void* res = reinterpret_cast<const void*>(p.residual);
  const int64_t rrow = t * p.residual_stride;
MAGI_UNROLL
  for (int j = 0; j < VPT; ++j) {
    const int e = j * nt + tid;
    if (e < n) {
      const float y = qknr::affine(v[j], mean, rstd, w, b, e, p.weight_offset);
      out[e] = from_float<Tout>(y + load_dyn(res, p.residual_dtype, rrow + e));
    }
  }
}

template <class Tx, class Tout>
inline void launch_typed(const GatedPostNormParams& p, cudaStream_t stream) {
  if (p.tokens > 0x7fffffff) throw std::runtime_error("gated_post_norm_residual: too many rows for one launch");
  int vpt, threads;
  qknr::row_config(p.hidden, vpt, threads);
  const dim3 grid(static_cast<unsigned>(p.tokens)), block(threads);
  if (vpt == 4) MAGI_LAUNCH(gated_post_norm_kernel<Tx, Tout, 4>, grid, block, 0, stream, p);
  else if (vpt == 8) MAGI_LAUNCH(gated_post_norm_kernel<Tx, Tout, 8>, grid, block, 0, stream, p);
  else MAGI_LAUNCH(gated_post_norm_kernel<Tx, Tout, 16>, grid, block, 0, stream, p);
}

}  // namespace gpnr

// Validates p (throws std::invalid_argument naming the field) and launches on `stream`.
inline void launch_gated_post_norm_residual(const GatedPostNormParams& p, cudaStream_t stream) {
  const std::string err = kernels::check_gated_post_norm(p);
  if (!err.empty()) throw std::invalid_argument("gated_post_norm_residual: " + err);
  if (p.tokens == 0) return;
  qknr::dispatch_dtype(p.x_dtype, [&](auto tx) {
    qknr::dispatch_dtype(p.out_dtype, [&](auto tout) {
      gpnr::launch_typed<typename decltype(tx)::type, typename decltype(tout)::type>(p, stream);
    });
  });
}

}  // namespace MAGI_BACKEND_NS
}  // namespace magi

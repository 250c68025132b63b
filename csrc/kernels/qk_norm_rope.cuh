// qk_norm_rope: LayerNorm/RMSNorm of q and k (per head or over all heads), affine, then rotary on the
// first rotary_dim dims, for q and k in ONE launch. Semantics: magi_kernels/reference/qk_norm_rope.py.
//
// Compiled twice from this one source: by nvcc (csrc/cuda/fused_norm.cu) and by the host compiler
// against the SIMT emulator (csrc/simt/fused_norm_simt.cpp). Keep it free of #ifdef __CUDACC__:
// everything backend-specific lives in magi/device.h.
//
// Design (bandwidth-bound: each input byte is read from DRAM once, each output byte written once):
//  * "head" scope: one warp per (token, head). Lane l owns elements l, l+32, ... (VPT of them, cached
//    in registers); consecutive lanes touch consecutive elements, so every load/store is coalesced.
//    Mean and variance are warp butterfly reductions; no shared memory, no block barrier.
//  * "hidden" scope: one block per (token, q-or-k) row of H*D contiguous elements, block reduction
//    (warp shuffles + 32 floats of shared memory + __syncthreads).
//  * Rotary: an element's partner (i +- r/2 for NeoX, i^1 for interleaved) usually lives in another
//    lane, so instead of a cross-lane exchange the partner is recomputed: its input element is
//    re-read (a cache hit: this warp loaded the same line a moment ago) and normalized with the same
//    mean/rstd and affine params, which gives bit-identical values to what its owner computes. This
//    works for every rotary_dim and head_dim with no shared memory and no extra synchronization.
//  * LayerNorm is two-pass over the cached registers (mean, then mean of (x-mean)^2), like the
//    reference; this avoids the cancellation of the one-pass E[x^2]-E[x]^2 formula.
#pragma once

#include "magi/device.h"
#include "kernels/fused_norm_params.h"

namespace magi {
inline namespace MAGI_BACKEND_NS {
namespace qknr {

constexpr int kHeadWarpsPerBlock = 4;  // 128 threads: 4 (token, head) items per block
constexpr int kMaxBlockThreads = 1024;

template <class T>
MAGI_DEVICE const T* cptr(int64_t p) { return reinterpret_cast<const T*>(p); }
template <class T>
MAGI_DEVICE T* mptr(int64_t p) { return reinterpret_cast<T*>(p); }

// gamma/beta applied to a normalized value. gamma = w + offset; without w it is the offset, or 1 when
// the offset is 0 (the reference skips the multiply then; y * 1 is exact, so the results agree).
MAGI_DEVICE float affine(float v, float mean, float rstd, const float* w, const float* b, int64_t i, float off) {
  float y = (v - mean) * rstd;
  const float g = w ? w[i] + off : (off != 0.f ? off : 1.f);
  y = y * g;
  if (b) y = y + b[i];
  return y;
}

struct Rope {
  const float* cos;  // already offset to this token's row
  const float* sin;
  int rotary_dim;    // 0 = off
  bool interleaved;
};

// Final value of element e of a row whose normalized+affine value is yv; d = e's index inside its
// head. Applies the rotary rotation by recomputing the partner element (see the file comment).
template <class Tin>
MAGI_DEVICE float rotate(const Tin* x, int64_t e, int d, float yv, float mean, float rstd, const float* w,
                         const float* b, float off, const Rope& rope) {
  if (d >= rope.rotary_dim) return yv;
  int partner, col;
  bool low;  // low member of its pair: out = y*cos - y_partner*sin; high: out = y_partner*sin + y*cos
  if (rope.interleaved) {
    col = d >> 1;
    low = (d & 1) == 0;
    partner = d ^ 1;
  } else {
    const int half = rope.rotary_dim >> 1;
    low = d < half;
    col = low ? d : d - half;
    partner = low ? d + half : d - half;
  }
  const int64_t pe = e - d + partner;
  const float yp = affine(to_float(__ldg(x + pe)), mean, rstd, w, b, pe, off);
  const float c = rope.cos[col], s = rope.sin[col];
  return low ? yv * c - yp * s : yp * s + yv * c;
}

// One warp per (token, head). VPT = ceil(head_dim / 32) rounded up to a compiled bucket.
template <class Tin, class Tout, int VPT>
__global__ void __launch_bounds__(kHeadWarpsPerBlock * kWarp) qk_norm_rope_head_kernel(const QkNormRopeParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t heads = p.hq + p.hk;
  const int64_t item = int64_t(blockIdx.x) * kHeadWarpsPerBlock + threadIdx.x / kWarp;
  // The tail block's idle warps leave as whole warps, and this kernel has no block barrier, so the
  // remaining warps' full-mask shuffles are unaffected.
  if (item >= p.tokens * heads) return;
  const int64_t t = item / heads, h = item - t * heads;
  const bool is_q = h < p.hq;
  const int64_t hh = is_q ? h : h - p.hq;
  const int D = static_cast<int>(p.head_dim);
  const Tin* x = cptr<Tin>(is_q ? p.q : p.k) + t * (is_q ? p.q_stride : p.k_stride) + hh * D;
  Tout* y = mptr<Tout>(is_q ? p.q_out : p.k_out) + t * (is_q ? p.q_out_stride : p.k_out_stride) + hh * D;
  const float* w = cptr<float>(is_q ? p.q_weight : p.k_weight);
  const float* b = cptr<float>(is_q ? p.q_bias : p.k_bias);

  float v[VPT];
  float s = 0.f;
MAGI_UNROLL
  for (int j = 0; j < VPT; ++j) {
    const int d = j * kWarp + lane;
    v[j] = d < D ? to_float(x[d]) : 0.f;
    s += v[j];
  }
  float mean = 0.f;
  if (p.norm == kLayerNorm) {
    mean = warp_allreduce_sum(s) / static_cast<float>(D);
    s = 0.f;
MAGI_UNROLL
    for (int j = 0; j < VPT; ++j) {
      const float c = j * kWarp + lane < D ? v[j] - mean : 0.f;
      s += c * c;
    }
  } else {
    s = 0.f;
MAGI_UNROLL
    for (int j = 0; j < VPT; ++j) s += v[j] * v[j];  // padding lanes hold 0
  }
  const float rstd = rsqrt(warp_allreduce_sum(s) / static_cast<float>(D) + p.eps);

  Rope rope{nullptr, nullptr, p.rotary_dim, p.interleaved != 0};
  if (p.rotary_dim) {
    const int64_t row = (t % p.rope_rows) * (p.rotary_dim / 2);
    rope.cos = cptr<float>(p.cos) + row;
    rope.sin = cptr<float>(p.sin) + row;
  }
MAGI_UNROLL
  for (int j = 0; j < VPT; ++j) {
    const int d = j * kWarp + lane;
    if (d < D) {
      const float yv = affine(v[j], mean, rstd, w, b, d, p.weight_offset);
      y[d] = from_float<Tout>(rotate(x, d, d, yv, mean, rstd, w, b, p.weight_offset, rope));
    }
  }
}

// One block per (token, q-or-k): blockIdx.x = 2 * token + (0 for q, 1 for k). Row = H*D contiguous
// elements (heads are packed); weight/bias are indexed by the row position.
template <class Tin, class Tout, int VPT>
__global__ void __launch_bounds__(kMaxBlockThreads) qk_norm_rope_hidden_kernel(const QkNormRopeParams p) {
  __shared__ float scratch[kWarp];
  const int64_t t = blockIdx.x / 2;
  const bool is_q = blockIdx.x % 2 == 0;
  const int D = static_cast<int>(p.head_dim);
  const int n = static_cast<int>((is_q ? p.hq : p.hk) * D);
  const Tin* x = cptr<Tin>(is_q ? p.q : p.k) + t * (is_q ? p.q_stride : p.k_stride);
  Tout* y = mptr<Tout>(is_q ? p.q_out : p.k_out) + t * (is_q ? p.q_out_stride : p.k_out_stride);
  const float* w = cptr<float>(is_q ? p.q_weight : p.k_weight);
  const float* b = cptr<float>(is_q ? p.q_bias : p.k_bias);
  const int tid = threadIdx.x, nt = blockDim.x;

  float v[VPT];
  float s = 0.f;
MAGI_UNROLL
  for (int j = 0; j < VPT; ++j) {
    const int e = j * nt + tid;
    v[j] = e < n ? to_float(x[e]) : 0.f;
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

  Rope rope{nullptr, nullptr, p.rotary_dim, p.interleaved != 0};
  if (p.rotary_dim) {
    const int64_t row = (t % p.rope_rows) * (p.rotary_dim / 2);
    rope.cos = cptr<float>(p.cos) + row;
    rope.sin = cptr<float>(p.sin) + row;
  }
MAGI_UNROLL
  for (int j = 0; j < VPT; ++j) {
    const int e = j * nt + tid;
    if (e < n) {
      const float yv = affine(v[j], mean, rstd, w, b, e, p.weight_offset);
      y[e] = from_float<Tout>(rotate(x, e, e % D, yv, mean, rstd, w, b, p.weight_offset, rope));
    }
  }
}

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) for the element type named by a dtype code.
template <class F>
inline void dispatch_dtype(int32_t code, F&& f) {
  switch (code) {
    case kFloat16: f(Tag<__half>{}); break;
    case kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: f(Tag<float>{}); break;
  }
}

// Register-cache size and block size for a block-per-row kernel: the smallest VPT bucket that covers
// the row with <= 512 threads (enough warps per block to hide latency, several blocks per SM), and
// 1024 threads x 16 for the largest rows.
inline void row_config(int64_t n, int& vpt, int& threads) {
  vpt = n <= 4 * 512 ? 4 : n <= 8 * 512 ? 8 : 16;
  int64_t th = (n + vpt - 1) / vpt;
  th = (th + kWarp - 1) / kWarp * kWarp;
  threads = static_cast<int>(th < kWarp ? kWarp : th);
}

template <class Tin, class Tout>
inline void launch_typed(const QkNormRopeParams& p, cudaStream_t stream) {
  if (!p.hidden_scope) {
    const int64_t items = p.tokens * (p.hq + p.hk);
    const int64_t blocks = (items + kHeadWarpsPerBlock - 1) / kHeadWarpsPerBlock;
    if (blocks > 0x7fffffff) throw std::runtime_error("qk_norm_rope: tokens * heads is too large for one launch");
    const dim3 grid(static_cast<unsigned>(blocks)), block(kHeadWarpsPerBlock * kWarp);
    const int64_t vpt = (p.head_dim + kWarp - 1) / kWarp;
    if (vpt <= 2) MAGI_LAUNCH(qk_norm_rope_head_kernel<Tin, Tout, 2>, grid, block, 0, stream, p);
    else if (vpt <= 4) MAGI_LAUNCH(qk_norm_rope_head_kernel<Tin, Tout, 4>, grid, block, 0, stream, p);
    else if (vpt <= 8) MAGI_LAUNCH(qk_norm_rope_head_kernel<Tin, Tout, 8>, grid, block, 0, stream, p);
    else MAGI_LAUNCH(qk_norm_rope_head_kernel<Tin, Tout, 16>, grid, block, 0, stream, p);
  } else {
    if (2 * p.tokens > 0x7fffffff) throw std::runtime_error("qk_norm_rope: too many tokens for one launch");
    int vpt, threads;
    row_config((p.hq > p.hk ? p.hq : p.hk) * p.head_dim, vpt, threads);
    const dim3 grid(static_cast<unsigned>(2 * p.tokens)), block(threads);
    if (vpt == 4) MAGI_LAUNCH(qk_norm_rope_hidden_kernel<Tin, Tout, 4>, grid, block, 0, stream, p);
    else if (vpt == 8) MAGI_LAUNCH(qk_norm_rope_hidden_kernel<Tin, Tout, 8>, grid, block, 0, stream, p);
    else MAGI_LAUNCH(qk_norm_rope_hidden_kernel<Tin, Tout, 16>, grid, block, 0, stream, p);
  }
}

}  // namespace qknr

// Validates p (throws std::invalid_argument naming the field) and launches on `stream`.
inline void launch_qk_norm_rope(const QkNormRopeParams& p, cudaStream_t stream) {
  const std::string err = kernels::check_qk_norm_rope(p);
  if (!err.empty()) throw std::invalid_argument("qk_norm_rope: " + err);
  if (p.tokens == 0) return;
  qknr::dispatch_dtype(p.in_dtype, [&](auto tin) {
    qknr::dispatch_dtype(p.out_dtype, [&](auto tout) {
      qknr::launch_typed<typename decltype(tin)::type, typename decltype(tout)::type>(p, stream);
    });
  });
}

}  // namespace MAGI_BACKEND_NS
}  // namespace magi

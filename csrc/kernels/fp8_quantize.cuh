// fp8 (e4m3fn) quantization: static per-tensor / per-channel divisors, dynamic per-row, 1x128 and
// 128x128 block scales. Semantics: magi_kernels/reference/fp8.py (bit-exact with its torch ops).
//
// Compiled twice from this one source: by nvcc (csrc/cuda/fp8_quantize.cu) and by the host compiler
// against the SIMT emulator (csrc/simt/fp8_quantize_simt.cpp); no #ifdef __CUDACC__ here.
//
// Numerics shared by every kernel:
//  * y = x / s is the IEEE fp32 division (nvcc's default -prec-div=true; the reference divides).
//  * clamp to +-448 with comparisons, so NaN passes through and +-inf saturates (no fminf/fmaxf,
//    which would turn NaN into the bound).
//  * the optional bf16 rounding and the e4m3 encoding are done in integer arithmetic on the fp32 bits
//    (round-to-nearest-even, sign kept on underflow, NaN -> 0x7F | sign). The same code runs under
//    nvcc and the emulator, so what the CPU tests prove bit-exact is what the GPU executes; the
//    hardware cvt.rn.satfinite.e4m3x2 would be faster but is only reachable under nvcc, where it
//    cannot be tested here.
//  * dynamic amax: each element contributes |x|, or +inf if x is NaN/inf, so a single max reduction
//    also carries "this group is non-finite" (scale NaN, as the reference); |x| <= FLT_MAX otherwise.
//
// Kernels (bandwidth-bound; reads are coalesced along the row, one byte stored per element):
//  * static:       grid (rows, ceil(cols/1024)), 256 threads x 4 columns, scale from scale_in.
//  * row:          one block per row, block max reduction (warp shuffles + 32 floats of smem); the row
//                  is read twice (amax pass, then quantize pass; the second read mostly hits L2).
//  * block1x128:   one warp per (row, 128-column group), 4 groups per 128-thread block; each lane
//                  caches 4 values, warp shuffle max; no shared memory, no block barrier.
//  * block128x128: one 512-thread block per 128x128 tile; each thread caches 8 rows x 4 columns in
//                  registers, block max reduction, then quantizes from registers (one DRAM read).
#pragma once

#include "magi/device.h"
#include "kernels/fp8_quantize_params.h"

namespace magi {
inline namespace MAGI_BACKEND_NS {
namespace fp8q {

constexpr float kQMax = 448.f;
constexpr float kAmaxFloor = 1e-12f;  // reference AMAX_FLOOR (clamp_min on an fp32 tensor: 1e-12f)
constexpr float kFltMax = 3.40282347e+38f;
constexpr int kGroup = 128;
constexpr int kStaticThreads = 256, kStaticVpt = 4;  // 1024 columns per block
constexpr int kRowThreads = 256;
constexpr int kB1Warps = 4;
constexpr int kTileThreads = 512;                    // 16 warps
constexpr int kTileRowsPerThread = kGroup / (kTileThreads / kWarp);  // 8
constexpr int kColsPerLane = kGroup / kWarp;                         // 4

template <class T>
MAGI_DEVICE const T* cptr(int64_t p) { return reinterpret_cast<const T*>(p); }
template <class T>
MAGI_DEVICE T* mptr(int64_t p) { return reinterpret_cast<T*>(p); }

MAGI_DEVICE uint32_t fbits(float f) { return static_cast<uint32_t>(__float_as_int(f)); }
MAGI_DEVICE float bitsf(uint32_t b) { return __int_as_float(static_cast<int>(b)); }

// fp32 -> nearest-even bf16 value (kept in fp32). NaN is returned as is (the e4m3 encoder maps any
// NaN to the NaN code). No overflow case: the input is already clamped to +-448.
MAGI_DEVICE float bf16_rne(float y) {
  const uint32_t b = fbits(y);
  if ((b & 0x7fffffffu) > 0x7f800000u) return y;
  return bitsf((b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u);
}

// The e4m3fn byte of y (|y| <= 448 or NaN), identical to torch's y.to(torch.float8_e4m3fn).
MAGI_DEVICE uint8_t e4m3_encode(float y) {
  const uint32_t b = fbits(y);
  const uint32_t sign = (b >> 24) & 0x80u;
  const uint32_t mag = b & 0x7fffffffu;
  if (mag > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);
  uint32_t code;
  if (mag >= 0x3c800000u) {
    // Normal (>= 2^-6): RNE to 3 mantissa bits on the fp32 pattern; a mantissa carry rolls into the
    // exponent field, which is exactly the next binade. e4m3 bias 7 = fp32 bias 127 - 120.
    const uint32_t r = (mag + 0x7ffffu + ((mag >> 20) & 1u)) & 0xfff00000u;
    code = (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u);
  } else {
    // Subnormal: code = RNE(|y| * 2^9) in 0..8 (8 = 2^-6 = the smallest normal, also code 0x08).
    // |y| = sig * 2^(e - 150), so |y| * 2^9 = sig >> (141 - e) plus the rounding of the shifted-out bits.
    const uint32_t e = mag >> 23;
    if (e < 117u) {
      code = 0;  // |y| < 2^-10 (half of the smallest subnormal): rounds to (signed) zero
    } else {
      const uint32_t sig = (mag & 0x7fffffu) | 0x800000u;
      const uint32_t shift = 141u - e;  // 21..24
      const uint32_t half = 1u << (shift - 1);
      const uint32_t rem = sig & ((1u << shift) - 1u);
      code = sig >> shift;
      if (rem > half || (rem == half && (code & 1u))) ++code;
    }
  }
  return static_cast<uint8_t>(sign | code);
}

MAGI_DEVICE uint8_t quantize(float x, float s, bool bf16_round) {
  float y = x / s;
  y = y > kQMax ? kQMax : (y < -kQMax ? -kQMax : y);
  if (bf16_round) y = bf16_rne(y);
  return e4m3_encode(y);
}

// |x|, or +inf for NaN/inf (see the file comment).
MAGI_DEVICE float amax_term(float x) {
  const float a = bitsf(fbits(x) & 0x7fffffffu);
  return a <= kFltMax ? a : bitsf(0x7f800000u);
}

MAGI_DEVICE float fmax2(float a, float b) { return a > b ? a : b; }

// Reference: amax.clamp_min(1e-12) / 448 in fp32, NaN where the group held NaN/inf.
MAGI_DEVICE float scale_from_amax(float amax) {
  return amax <= kFltMax ? fmax2(amax, kAmaxFloor) / kQMax : qnan();
}

MAGI_DEVICE float warp_allreduce_max(float v) {
MAGI_UNROLL
  for (int off = kWarp / 2; off > 0; off >>= 1) v = fmax2(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Max over the block (blockDim.x a multiple of 32); every thread gets it. scratch: __shared__ float[32].
MAGI_DEVICE float block_allreduce_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_allreduce_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;  // 0 is neutral: every term is >= 0
  return warp_allreduce_max(v);
}

template <class T>
__global__ void __launch_bounds__(kStaticThreads) fp8_static_kernel(const Fp8QuantParams p) {
  const int64_t row = blockIdx.x;
  const T* x = cptr<T>(p.x) + row * p.x_stride;
  uint8_t* q = mptr<uint8_t>(p.q) + row * p.q_stride;
  const float* s = cptr<float>(p.scale_in);
  const bool channel = p.mode == kFp8Channel, bf = p.bf16_round != 0;
  const float s0 = __ldg(s);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * (kStaticThreads * kStaticVpt) + threadIdx.x;
MAGI_UNROLL
  for (int j = 0; j < kStaticVpt; ++j) {
    const int64_t c = c0 + j * kStaticThreads;
    if (c < p.cols) q[c] = quantize(to_float(__ldg(x + c)), channel ? __ldg(s + c) : s0, bf);
  }
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) fp8_row_kernel(const Fp8QuantParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = cptr<T>(p.x) + row * p.x_stride;
  uint8_t* q = mptr<uint8_t>(p.q) + row * p.q_stride;
  float amax = 0.f;
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) amax = fmax2(amax, amax_term(to_float(__ldg(x + c))));
  const float s = scale_from_amax(block_allreduce_max(amax, scratch));
  if (threadIdx.x == 0) mptr<float>(p.scale_out)[row * p.scale_out_stride] = s;
  const bool bf = p.bf16_round != 0;
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) q[c] = quantize(to_float(__ldg(x + c)), s, bf);
}

template <class T>
__global__ void __launch_bounds__(kB1Warps * kWarp) fp8_block1x128_kernel(const Fp8QuantParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t g = static_cast<int64_t>(blockIdx.y) * kB1Warps + threadIdx.x / kWarp;
  if (g * kGroup >= p.cols) return;  // the whole warp leaves together; this kernel has no block barrier
  const int64_t row = blockIdx.x;
  const T* x = cptr<T>(p.x) + row * p.x_stride + g * kGroup;
  uint8_t* q = mptr<uint8_t>(p.q) + row * p.q_stride + g * kGroup;
  const int64_t n = p.cols - g * kGroup;  // columns that exist in this group (ragged last group)
  float v[kColsPerLane];
  float amax = 0.f;
MAGI_UNROLL
  for (int j = 0; j < kColsPerLane; ++j) {
    const int c = lane + j * kWarp;
    v[j] = c < n ? to_float(__ldg(x + c)) : 0.f;
    amax = fmax2(amax, amax_term(v[j]));
  }
  const float s = scale_from_amax(warp_allreduce_max(amax));
  if (lane == 0) mptr<float>(p.scale_out)[row * p.scale_out_stride + g] = s;
  const bool bf = p.bf16_round != 0;
MAGI_UNROLL
  for (int j = 0; j < kColsPerLane; ++j) {
    const int c = lane + j * kWarp;
    if (c < n) q[c] = quantize(v[j], s, bf);
  }
}

template <class T>
__global__ void __launch_bounds__(kTileThreads) fp8_block128x128_kernel(const Fp8QuantParams p) {
  __shared__ float scratch[32];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kGroup, c0 = static_cast<int64_t>(blockIdx.y) * kGroup;
  const int64_t nr = p.rows - r0, nc = p.cols - c0;  // rows / columns of this (possibly ragged) tile
  const T* x = cptr<T>(p.x) + r0 * p.x_stride + c0;
  uint8_t* q = mptr<uint8_t>(p.q) + r0 * p.q_stride + c0;
  // Warp w owns tile rows w, w + 16, ...; lane l owns columns l, l + 32, l + 64, l + 96: each warp
  // load covers 128 contiguous elements of one row.
  float v[kTileRowsPerThread][kColsPerLane];
  float amax = 0.f;
MAGI_UNROLL
  for (int i = 0; i < kTileRowsPerThread; ++i) {
    const int r = warp + i * (kTileThreads / kWarp);
MAGI_UNROLL
    for (int j = 0; j < kColsPerLane; ++j) {
      const int c = lane + j * kWarp;
      v[i][j] = (r < nr && c < nc) ? to_float(__ldg(x + r * p.x_stride + c)) : 0.f;
      amax = fmax2(amax, amax_term(v[i][j]));
    }
  }
  const float s = scale_from_amax(block_allreduce_max(amax, scratch));
  if (threadIdx.x == 0) mptr<float>(p.scale_out)[blockIdx.x * p.scale_out_stride + blockIdx.y] = s;
  const bool bf = p.bf16_round != 0;
MAGI_UNROLL
  for (int i = 0; i < kTileRowsPerThread; ++i) {
    const int r = warp + i * (kTileThreads / kWarp);
MAGI_UNROLL
    for (int j = 0; j < kColsPerLane; ++j) {
      const int c = lane + j * kWarp;
      if (r < nr && c < nc) q[r * p.q_stride + c] = quantize(v[i][j], s, bf);
    }
  }
}

template <class T>
inline void launch_typed(const Fp8QuantParams& p, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(p.rows);
  const unsigned groups = static_cast<unsigned>((p.cols + kGroup - 1) / kGroup);
  switch (p.mode) {
    case kFp8Tensor:
    case kFp8Channel: {
      const unsigned chunks = static_cast<unsigned>((p.cols + kStaticThreads * kStaticVpt - 1) / (kStaticThreads * kStaticVpt));
      MAGI_LAUNCH(fp8_static_kernel<T>, dim3(rows, chunks), dim3(kStaticThreads), 0, stream, p);
      break;
    }
    case kFp8Row: {
      // Short rows get fewer threads (a multiple of 32) instead of idle warps.
      int64_t th = (p.cols + kWarp - 1) / kWarp * kWarp;
      th = th > kRowThreads ? kRowThreads : th;
      MAGI_LAUNCH(fp8_row_kernel<T>, dim3(rows), dim3(static_cast<unsigned>(th)), 0, stream, p);
      break;
    }
    case kFp8Block1x128:
      MAGI_LAUNCH(fp8_block1x128_kernel<T>, dim3(rows, (groups + kB1Warps - 1) / kB1Warps), dim3(kB1Warps * kWarp), 0,
                  stream, p);
      break;
    default:
      MAGI_LAUNCH(fp8_block128x128_kernel<T>, dim3(static_cast<unsigned>((p.rows + kGroup - 1) / kGroup), groups),
                  dim3(kTileThreads), 0, stream, p);
      break;
  }
}

}  // namespace fp8q

// Validates p (throws std::invalid_argument naming the field) and launches on `stream`.
inline void launch_fp8_quant(const Fp8QuantParams& p, cudaStream_t stream) {
  const std::string err = kernels::check_fp8_quant(p);
  if (!err.empty()) throw std::invalid_argument("fp8_quant: " + err);
  if (p.rows == 0 || p.cols == 0) return;
  switch (p.in_dtype) {
    case kFloat16: fp8q::launch_typed<__half>(p, stream); break;
    case kBFloat16: fp8q::launch_typed<__nv_bfloat16>(p, stream); break;
    default: fp8q::launch_typed<float>(p, stream); break;
  }
}

}  // namespace MAGI_BACKEND_NS
}  // namespace magi

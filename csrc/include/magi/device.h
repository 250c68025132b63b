// Portability layer: lets csrc/kernels/*.cuh be compiled by nvcc (real GPU code) and by a plain C++
// compiler against the SIMT emulator (magi/simt.h) without a single #ifdef in the kernels.
//
//   MAGI_DEVICE          device helper function (__device__ __forceinline__ / inline)
//   MAGI_LAUNCH(k, grid, block, smem, stream, args...)
//                        k<<<grid, block, smem, stream>>>(args...) under nvcc, the emulator's launch on
//                        the host. `k` may be a template-id with commas (the macro only forwards).
//   magi::to_float / magi::from_float<T>    fp32 <-> float / __half / __nv_bfloat16, round-to-nearest-even
//   magi::rsqrt, magi::qnan                 math whose spelling differs between device and host
//   MAGI_UNROLL          #pragma unroll for nvcc, nothing for the host compiler
//   MAGI_BACKEND_NS      inline namespace that differs per backend (see below)
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define MAGI_DEVICE __device__ __forceinline__
// Both the nvcc TU and the emulator TU instantiate the same templates (kernels, launchers) and end up
// in one shared library. Without distinct names the linker would merge e.g. the nvcc host stub of
// a kernel with the emulator's host function of the same mangled name. The inline namespace makes
// the names differ while the source keeps writing magi::foo.
#define MAGI_BACKEND_NS cuda_backend
#define MAGI_UNROLL _Pragma("unroll")
#else
#include "magi/simt.h"
#define MAGI_DEVICE inline
#define MAGI_BACKEND_NS simt_backend
#define MAGI_UNROLL  // the host compiler decides (gcc would warn about an unknown pragma)
#endif

namespace magi {
inline namespace MAGI_BACKEND_NS {

#if defined(__CUDACC__)
template <class Kernel, class... Args>
inline void launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("magi_kernels: CUDA launch failed: ") + cudaGetErrorString(err));
}
#else
template <class Kernel, class... Args>
inline void launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  // Arguments are captured by value, exactly as a CUDA launch copies kernel parameters.
  ::magi::simt::launch(grid, block, smem, [=]() { kernel(args...); });
}
#endif

#if defined(__CUDACC__)
MAGI_DEVICE float rsqrt(float x) { return rsqrtf(x); }
MAGI_DEVICE float qnan() { return __int_as_float(0x7fffffff); }
#else
MAGI_DEVICE float rsqrt(float x) { return 1.0f / std::sqrt(x); }
MAGI_DEVICE float qnan() { return std::numeric_limits<float>::quiet_NaN(); }
#endif

MAGI_DEVICE float to_float(float v) { return v; }
MAGI_DEVICE float to_float(__half v) { return __half2float(v); }
MAGI_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
MAGI_DEVICE T from_float(float v);
template <>
MAGI_DEVICE float from_float<float>(float v) { return v; }
template <>
MAGI_DEVICE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
MAGI_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Load element i of a buffer whose element type is only known at run time (dtype code from
// fused_norm_params.h). The switch is uniform across the grid, so it costs a predictable branch, and it
// keeps the number of template instantiations down for operands that are not the main data stream.
MAGI_DEVICE float load_dyn(const void* p, int32_t dtype, int64_t i) {
  switch (dtype) {
    case 1: return to_float(static_cast<const __half*>(p)[i]);
    case 2: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the 32 lanes of a warp; every lane gets the total. Butterfly order is fixed, so the
// result is identical in every lane (needed: lanes use it to normalize their own elements).
MAGI_DEVICE float warp_allreduce_sum(float v) {
MAGI_UNROLL
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
// `scratch` is a __shared__ float[32] owned by the caller. Each warp reduces the per-warp partials
// itself, which saves the broadcast barrier a "warp 0 reduces, then everyone reads" scheme needs.
MAGI_DEVICE float block_allreduce_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_allreduce_sum(v);
  __syncthreads();  // a previous call may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_allreduce_sum(v);
}

}  // namespace MAGI_BACKEND_NS
}  // namespace magi

#define MAGI_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::magi::launch_kernel(kernel, grid, block, smem, stream, __VA_ARGS__)

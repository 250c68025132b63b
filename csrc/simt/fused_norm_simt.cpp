// The fused norm kernels (csrc/kernels/*.cuh) compiled for the CPU against the SIMT emulator, plus a
// few emulator self-test kernels used by tests/harness/test_simt_emulator.py. Built with the host
// compiler only; never needs the CUDA toolkit.
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/gated_post_norm_residual.cuh"
#include "kernels/qk_norm_rope.cuh"

namespace magi::kernels {

void simt_qk_norm_rope(const QkNormRopeParams& p) { launch_qk_norm_rope(p, nullptr); }

void simt_gated_post_norm_residual(const GatedPostNormParams& p) { launch_gated_post_norm_residual(p, nullptr); }

}  // namespace magi::kernels

// ------------------------------------------------------------------------------------------------
// Emulator self-tests: small kernels that exercise one primitive each, with results the tests can
// compare against numpy.

namespace magi::simt_selftest {
namespace {

// out[t] = shuffle(in[t]) for every thread t of a single block.
__global__ void shfl_kernel(int kind, const float* in, float* out, int arg, int width, unsigned mask) {
  const unsigned t = threadIdx.x;
  const float v = in[t];
  if (!(mask >> (t % 32) & 1u)) {  // lanes outside the mask sit this one out (legal CUDA)
    out[t] = v;
    return;
  }
  float r = 0.f;
  switch (kind) {
    case 0: r = __shfl_sync(mask, v, arg, width); break;
    case 1: r = __shfl_up_sync(mask, v, arg, width); break;
    case 2: r = __shfl_down_sync(mask, v, arg, width); break;
    default: r = __shfl_xor_sync(mask, v, arg, width); break;
  }
  out[t] = r;
}

// out[row] = sum(in[row, :]) with one block per row, threads striding the row, block_allreduce_sum.
// Every thread checks it got the same total (the reduction must broadcast).
__global__ void block_sum_kernel(const float* in, float* out, int cols, int* mismatch) {
  __shared__ float scratch[32];
  const float* row = in + static_cast<int64_t>(blockIdx.x) * cols;
  float s = 0.f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) s += row[c];
  const float total = magi::block_allreduce_sum(s, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = total;
  __syncthreads();
  if (total != out[blockIdx.x]) atomicAdd(mismatch, 1);
}

// Encodes each thread's builtins so the test can check the 3-D index mapping.
__global__ void index_kernel(int64_t* out) {
  const int64_t threads = blockDim.x * blockDim.y * blockDim.z;
  const int64_t block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int64_t tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int64_t* o = out + 6 * (block * threads + tid);
  o[0] = blockIdx.x; o[1] = blockIdx.y; o[2] = blockIdx.z;
  o[3] = threadIdx.x; o[4] = threadIdx.y; o[5] = threadIdx.z;
}

// Deliberately broken kernels; each must make the launch throw.
__global__ void broken_kernel(int which, float* buf) {
  const int t = threadIdx.x;
  switch (which) {
    case 0:  // __syncthreads after a divergent early return
      if (t >= 32) return;
      __syncthreads();
      break;
    case 1:  // __syncthreads at two different call sites (if / else)
      if (t % 2) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      break;
    case 2:  // full-mask shuffle after some lanes of the warp exited
      if (t % 32 >= 16) return;
      buf[t] = __shfl_xor_sync(0xffffffffu, buf[t], 1);
      break;
    case 3:  // full-mask shuffle in a partial warp (block of 48 threads: lanes 16..31 of warp 1 missing)
      buf[t] = __shfl_down_sync(0xffffffffu, buf[t], 1);
      break;
    case 4:  // calling lane not in its own mask
      buf[t] = __shfl_xor_sync(0x0000ffffu, buf[t], 1);
      break;
    case 5:  // reads a lane outside the mask
      if (t % 32 < 16) buf[t] = __shfl_sync(0x0000ffffu, buf[t], 20);
      break;
    default:  // a device-side exception surfaces as an error, not a crash
      throw std::runtime_error("device code threw");
  }
}

}  // namespace

std::vector<float> shfl(const std::string& kind, const std::vector<float>& in, int arg, int width, unsigned mask) {
  int k = kind == "idx" ? 0 : kind == "up" ? 1 : kind == "down" ? 2 : kind == "xor" ? 3 : -1;
  if (k < 0) throw std::invalid_argument("shfl: kind must be idx, up, down or xor, got '" + kind + "'");
  if (in.empty() || in.size() > 1024) throw std::invalid_argument("shfl: needs 1..1024 values (one per thread)");
  std::vector<float> out(in.size());
  MAGI_LAUNCH(shfl_kernel, dim3(1), dim3(static_cast<unsigned>(in.size())), 0, nullptr, k, in.data(), out.data(), arg,
              width, mask);
  return out;
}

std::vector<float> block_sum(const std::vector<float>& in, int rows, int threads) {
  if (rows < 1 || in.size() % rows) throw std::invalid_argument("block_sum: len(values) must be a multiple of rows");
  std::vector<float> out(rows);
  int mismatch = 0;
  MAGI_LAUNCH(block_sum_kernel, dim3(rows), dim3(threads), 0, nullptr, in.data(), out.data(),
              static_cast<int>(in.size() / rows), &mismatch);
  if (mismatch) throw std::runtime_error("block_sum: threads disagree on the block total");
  return out;
}

std::vector<int64_t> indices(std::vector<unsigned> grid, std::vector<unsigned> block) {
  if (grid.size() != 3 || block.size() != 3) throw std::invalid_argument("indices: grid and block must have 3 entries");
  std::vector<int64_t> out(6ull * grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2]);
  MAGI_LAUNCH(index_kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), 0, nullptr, out.data());
  return out;
}

// values -> fp16 (dtype 1) or bf16 (dtype 2) with the emulator's round-to-nearest-even -> fp32, so the
// tests can compare bit patterns with torch's casts (subnormals, ties, overflow, NaN).
std::vector<float> round_trip(const std::vector<float>& in, int dtype) {
  if (dtype != 1 && dtype != 2) throw std::invalid_argument("round_trip: dtype must be 1 (fp16) or 2 (bf16)");
  std::vector<float> out(in.size());
  for (size_t i = 0; i < in.size(); ++i)
    out[i] = dtype == 1 ? magi::to_float(magi::from_float<__half>(in[i])) : magi::to_float(magi::from_float<__nv_bfloat16>(in[i]));
  return out;
}

void broken(int which, int threads) {
  std::vector<float> buf(threads, 1.f);
  MAGI_LAUNCH(broken_kernel, dim3(1), dim3(threads), 0, nullptr, which, buf.data());
}

}  // namespace magi::simt_selftest

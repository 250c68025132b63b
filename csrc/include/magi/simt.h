// SIMT emulator: runs CUDA kernel source on the CPU, one fiber per CUDA thread.
//
// Why: CI and most developer machines have no GPU, but the kernels in csrc/kernels/*.cuh must still be
// executed by the tests. This header provides just enough of the CUDA programming model for those
// kernels to compile with a plain C++17 compiler (no CUDA toolkit needed) and run with CUDA semantics
// for the things that matter to correctness: per-thread control flow, block barriers, warp shuffles,
// shared memory, and round-to-nearest-even fp16/bf16 conversions.
//
// How: a launch walks the grid one block at a time. Each thread of the block is a ucontext fiber with
// its own preallocated stack. The scheduler resumes every runnable fiber until it blocks (on
// __syncthreads, __syncwarp or a shuffle) or returns; then it releases whichever barrier is complete.
// When no fiber can run and no barrier can be released, the block is deadlocked (e.g. __syncthreads
// inside divergent code); the launch then throws magi::simt::Error describing who waits where.
// __shared__ variables become function-local statics: blocks never overlap in time, so one copy
// suffices. See csrc/README.md for what this model cannot show (timing, races, coalescing, ...).
//
// Include this only through magi/device.h (which picks it when not compiling with nvcc).
#pragma once

#if defined(__CUDACC__)
#error "magi/simt.h is the CPU emulation of CUDA; nvcc builds use the real runtime (include magi/device.h)"
#endif

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------------------------
// CUDA vocabulary types and qualifiers (global namespace, as in CUDA, so kernel source is unchanged).

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
typedef struct CUstream_st* cudaStream_t;  // opaque, never dereferenced by the emulator

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one after another, so one static copy of each __shared__ array serves every block.
// (Consequence: shared memory is not re-poisoned between blocks; see csrc/README.md.)
#define __shared__ static

namespace magi::simt {

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;

// Errors from the emulator (deadlock, bad shuffle mask, bad launch). pybind11 maps it to RuntimeError.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

enum class State { Ready, BlockBarrier, WarpBarrier, Done };

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  unsigned linear = 0;
  State state = State::Ready;
  // Where a blocked fiber waits (for matching barrier participants and for deadlock reports).
  const char* file = nullptr;
  int line = 0;
  const char* op = nullptr;
  unsigned mask = 0;
  // Shuffle exchange slot: a thread publishes its value here between the two warp barriers.
  unsigned char slot[8];
};

struct Engine {
  std::mutex mu;                      // one launch at a time (the state below is global)
  std::vector<Fiber> fibers;
  std::vector<void*> stacks;
  size_t stack_bytes = 256 * 1024;    // per fiber; touched lazily, with a guard page below
  ucontext_t sched;
  Fiber* cur = nullptr;
  dim3 grid, block, bidx;
  unsigned nthreads = 0;
  size_t dyn_smem = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr err;
};

inline Engine g_engine;

inline Fiber& self() {
  if (!g_engine.cur) throw Error("SIMT: a device builtin (threadIdx, __syncthreads, shuffle...) was used outside a kernel launch");
  return *g_engine.cur;
}

inline std::string where(const char* file, int line) {
  if (!file) return "?";
  const char* base = std::strrchr(file, '/');
  return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

inline std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

// Give control back to the scheduler; returns when this fiber is resumed.
inline void yield_to_scheduler() {
  Engine& e = g_engine;
  Fiber* f = e.cur;
  swapcontext(&f->ctx, &e.sched);
}

inline void fiber_entry() {
  Engine& e = g_engine;
  try {
    (*e.body)();
  } catch (...) {
    // Exceptions cannot cross swapcontext; park it for the scheduler to rethrow on the host stack.
    if (!e.err) e.err = std::current_exception();
  }
  e.cur->state = State::Done;
  // uc_link brings us back to the scheduler when this function returns.
}

inline void* alloc_stack(size_t bytes) {
  long page = sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw Error("SIMT: cannot allocate a fiber stack");
  // Guard page at the low end: a stack overflow in device code faults instead of corrupting memory.
  mprotect(p, page, PROT_NONE);
  return p;
}

inline void ensure_stacks(unsigned n) {
  Engine& e = g_engine;
  while (e.stacks.size() < n) e.stacks.push_back(alloc_stack(e.stack_bytes));
  if (e.fibers.size() < n) e.fibers.resize(n);
}

// Release the warp barrier(s) that are complete: every lane named in a waiting lane's mask waits
// with the same mask on the same operation. Returns true if any fiber became runnable.
inline bool release_warp_barriers() {
  Engine& e = g_engine;
  bool released = false;
  for (unsigned w = 0; w * kWarpSize < e.nthreads; ++w) {
    unsigned base = w * kWarpSize;
    for (unsigned l = 0; l < kWarpSize && base + l < e.nthreads; ++l) {
      Fiber& f = e.fibers[base + l];
      if (f.state != State::WarpBarrier) continue;
      bool complete = true;
      for (unsigned m = 0; m < kWarpSize && complete; ++m) {
        if (!(f.mask >> m & 1u)) continue;
        if (base + m >= e.nthreads) { complete = false; break; }
        const Fiber& g = e.fibers[base + m];
        complete = g.state == State::WarpBarrier && g.mask == f.mask && g.op == f.op;
      }
      if (!complete) continue;
      unsigned mask = f.mask;
      for (unsigned m = 0; m < kWarpSize; ++m)
        if (mask >> m & 1u) e.fibers[base + m].state = State::Ready;
      released = true;
    }
  }
  return released;
}

// Release __syncthreads when every thread of the block waits at the same call site.
inline bool release_block_barrier() {
  Engine& e = g_engine;
  const Fiber& f0 = e.fibers[0];
  for (unsigned i = 0; i < e.nthreads; ++i) {
    const Fiber& f = e.fibers[i];
    if (f.state != State::BlockBarrier || f.file != f0.file || f.line != f0.line) return false;
  }
  for (unsigned i = 0; i < e.nthreads; ++i) e.fibers[i].state = State::Ready;
  return true;
}

// Nothing can run: explain why, naming threads by linear id and barrier sites.
inline std::string describe_deadlock() {
  Engine& e = g_engine;
  std::ostringstream os;
  os << "SIMT deadlock in block " << dim_str(e.bidx) << " of grid " << dim_str(e.grid) << " (blockDim "
     << dim_str(e.block) << "): no thread can make progress.";
  auto key = [](const Fiber& f) {
    switch (f.state) {
      case State::Done: return std::string("exited");
      case State::BlockBarrier: return "wait in __syncthreads at " + where(f.file, f.line);
      case State::WarpBarrier: {
        std::ostringstream k;
        k << "wait in " << f.op << " (mask 0x" << std::hex << f.mask << std::dec << ") at " << where(f.file, f.line);
        return k.str();
      }
      default: return std::string("runnable");
    }
  };
  // Group threads by what they wait on; list each group's ids as compact ranges (truncated).
  std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
  for (unsigned t = 0; t < e.nthreads; ++t) {
    std::string k = key(e.fibers[t]);
    auto it = groups.begin();
    while (it != groups.end() && it->first != k) ++it;
    if (it == groups.end()) groups.push_back({k, {t}});
    else it->second.push_back(t);
  }
  for (const auto& g : groups) {
    os << " " << g.second.size() << " thread(s) [";
    size_t i = 0, shown = 0;
    while (i < g.second.size()) {
      size_t j = i;
      while (j + 1 < g.second.size() && g.second[j + 1] == g.second[j] + 1) ++j;
      if (shown == 6) { os << ", ..."; break; }
      os << (shown ? ", " : "") << g.second[i];
      if (j > i) os << ".." << g.second[j];
      ++shown;
      i = j + 1;
    }
    os << "] " << g.first << ";";
  }
  bool any_block = false, any_done = false;
  for (unsigned t = 0; t < e.nthreads; ++t) {
    any_block |= e.fibers[t].state == State::BlockBarrier;
    any_done |= e.fibers[t].state == State::Done;
  }
  if (any_block)
    os << " __syncthreads must be reached by every thread of the block at the same call site"
       << (any_done ? " (some threads already exited: barrier after a divergent return)" : " (divergent barrier)") << ".";
  else
    os << " A warp-synchronous operation waits for lanes of its mask that exited, do not exist, or wait elsewhere.";
  return os.str();
}

inline void run_block() {
  Engine& e = g_engine;
  for (unsigned i = 0; i < e.nthreads; ++i) {
    Fiber& f = e.fibers[i];
    f.linear = i;
    f.tid = dim3(i % e.block.x, (i / e.block.x) % e.block.y, i / (e.block.x * e.block.y));
    f.state = State::Ready;
    f.file = nullptr;
    f.op = nullptr;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = e.stacks[i];
    f.ctx.uc_stack.ss_size = e.stack_bytes + sysconf(_SC_PAGESIZE);
    f.ctx.uc_link = &e.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    // Run every runnable fiber until it blocks or exits. Threads run in linear-id order each round.
    for (unsigned i = 0; i < e.nthreads; ++i) {
      Fiber& f = e.fibers[i];
      if (f.state != State::Ready) continue;
      e.cur = &f;
      swapcontext(&e.sched, &f.ctx);
      e.cur = nullptr;
      if (e.err) std::rethrow_exception(e.err);
    }
    if (release_warp_barriers()) continue;
    if (release_block_barrier()) continue;
    bool all_done = true;
    for (unsigned i = 0; i < e.nthreads; ++i) all_done &= e.fibers[i].state == State::Done;
    if (all_done) return;
    throw Error(describe_deadlock());
  }
}

// Block on a warp barrier with `mask`. Validates the mask against the calling lane and the block.
inline void warp_wait(unsigned mask, const char* op, const char* file, int line) {
  Engine& e = g_engine;
  Fiber& f = self();
  unsigned lane = f.linear % kWarpSize, base = f.linear - lane;
  if (!(mask >> lane & 1u)) {
    std::ostringstream os;
    os << "SIMT: " << op << " at " << where(file, line) << " called by lane " << lane << " (thread " << f.linear
       << ", block " << dim_str(e.bidx) << ") with mask 0x" << std::hex << mask
       << " that does not include the calling lane";
    throw Error(os.str());
  }
  for (unsigned m = 0; m < kWarpSize; ++m) {
    if ((mask >> m & 1u) && base + m >= e.nthreads) {
      std::ostringstream os;
      os << "SIMT: " << op << " at " << where(file, line) << " names lane " << m << " in mask 0x" << std::hex << mask
         << std::dec << ", but the block has only " << e.nthreads
         << " threads (a partial last warp must not use a full mask)";
      throw Error(os.str());
    }
  }
  f.state = State::WarpBarrier;
  f.mask = mask;
  f.op = op;
  f.file = file;
  f.line = line;
  yield_to_scheduler();
}

enum class Shfl { Idx, Up, Down, Xor };

template <class T>
T shuffle(Shfl kind, unsigned mask, T v, int arg, int width, const char* op, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "SIMT shuffles move trivially copyable values of <= 8 bytes");
  Engine& e = g_engine;
  Fiber& f = self();
  if (width < 1 || width > kWarpSize || (width & (width - 1)))
    throw Error(std::string("SIMT: ") + op + " at " + where(file, line) + ": width must be a power of two in [1, 32]");
  const int lane = static_cast<int>(f.linear % kWarpSize);
  const unsigned base = f.linear - lane;
  std::memcpy(f.slot, &v, sizeof(T));
  warp_wait(mask, op, file, line);  // phase 1: every participant has published its value
  // Source lane, following the PTX shfl rules: the warp is split into segments of `width` lanes and
  // an out-of-segment source yields the caller's own value.
  const int seg = lane & ~(width - 1), seg_end = seg + width;
  int src = lane;
  switch (kind) {
    case Shfl::Idx: src = seg + (arg & (width - 1)); break;
    case Shfl::Up: src = lane - arg >= seg ? lane - arg : lane; break;
    case Shfl::Down: src = lane + arg < seg_end ? lane + arg : lane; break;
    case Shfl::Xor: src = (lane ^ arg) < seg_end && (lane ^ arg) >= seg ? (lane ^ arg) : lane; break;
  }
  if (!(mask >> src & 1u)) {
    std::ostringstream os;
    os << "SIMT: " << op << " at " << where(file, line) << ": lane " << lane << " reads lane " << src
       << ", which is not in mask 0x" << std::hex << mask << " (its value is undefined on a GPU)";
    throw Error(os.str());
  }
  T out;
  std::memcpy(&out, e.fibers[base + src].slot, sizeof(T));
  warp_wait(mask, op, file, line);  // phase 2: nobody overwrites a slot before every lane has read it
  return out;
}

}  // namespace detail

// Run `body` once per thread of each block of `grid`, blocks in order (x fastest). Throws Error on a
// deadlock and rethrows any exception escaping device code.
inline void launch(dim3 grid, dim3 block, size_t dyn_smem, const std::function<void()>& body) {
  detail::Engine& e = detail::g_engine;
  std::lock_guard<std::mutex> lock(e.mu);
  const unsigned long long n = 1ull * block.x * block.y * block.z;
  if (n == 0 || n > kMaxThreadsPerBlock || block.z > 64)
    throw Error("SIMT: invalid launch: blockDim " + detail::dim_str(block) + " (need 1..1024 threads, z <= 64)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw Error("SIMT: invalid launch: gridDim " + detail::dim_str(grid));
  e.nthreads = static_cast<unsigned>(n);
  e.grid = grid;
  e.block = block;
  e.dyn_smem = dyn_smem;
  e.body = &body;
  e.err = nullptr;
  detail::ensure_stacks(e.nthreads);
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          e.bidx = dim3(x, y, z);
          detail::run_block();
        }
  } catch (...) {
    // Fibers left blocked are abandoned (their stacks are reused by the next launch); device code
    // holds only trivially destructible locals, so nothing leaks.
    e.cur = nullptr;
    e.body = nullptr;
    e.err = nullptr;
    throw;
  }
  e.body = nullptr;
}

}  // namespace magi::simt

// ------------------------------------------------------------------------------------------------
// Built-in variables and intrinsics, spelled as in CUDA.

#define threadIdx (::magi::simt::detail::self().tid)
#define blockIdx (::magi::simt::detail::g_engine.bidx)
#define blockDim (::magi::simt::detail::g_engine.block)
#define gridDim (::magi::simt::detail::g_engine.grid)
#define warpSize (::magi::simt::kWarpSize)

// Barriers carry their call site so divergent __syncthreads at different lines are caught.
#define __syncthreads() ::magi::simt::syncthreads_at(__FILE__, __LINE__)
#define __syncwarp(...) ::magi::simt::syncwarp_at(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_sync(mask, v, src, ...) \
  ::magi::simt::detail::shuffle(::magi::simt::detail::Shfl::Idx, mask, v, src, ::magi::simt::width_or_32(__VA_ARGS__), "__shfl_sync", __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::magi::simt::detail::shuffle(::magi::simt::detail::Shfl::Up, mask, v, delta, ::magi::simt::width_or_32(__VA_ARGS__), "__shfl_up_sync", __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, delta, ...) \
  ::magi::simt::detail::shuffle(::magi::simt::detail::Shfl::Down, mask, v, delta, ::magi::simt::width_or_32(__VA_ARGS__), "__shfl_down_sync", __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::magi::simt::detail::shuffle(::magi::simt::detail::Shfl::Xor, mask, v, lane_mask, ::magi::simt::width_or_32(__VA_ARGS__), "__shfl_xor_sync", __FILE__, __LINE__)

namespace magi::simt {

inline int width_or_32() { return kWarpSize; }
inline int width_or_32(int w) { return w; }

inline void syncthreads_at(const char* file, int line) {
  detail::Fiber& f = detail::self();
  f.state = detail::State::BlockBarrier;
  f.file = file;
  f.line = line;
  f.op = "__syncthreads";
  detail::yield_to_scheduler();
}

inline void syncwarp_at(const char* file, int line, unsigned mask = 0xffffffffu) {
  detail::warp_wait(mask, "__syncwarp", file, line);
}

}  // namespace magi::simt

// Fibers never run concurrently and are never preempted, so plain read-modify-write is atomic here.
template <class T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __fdividef(float a, float b) { return a / b; }
template <class T>
inline T __ldg(const T* p) { return *p; }

// ------------------------------------------------------------------------------------------------
// fp16 / bf16 storage types with round-to-nearest-even conversions (bit-exact with cuda_fp16.h's
// __float2half_rn / cuda_bf16.h's __float2bfloat16_rn, and with torch's CPU casts).

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace magi::simt {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN stays NaN (quiet), inf
  if (ax >= 0x477ff000u) return sign | 0x7c00u;                                   // >= 65520 rounds to inf
  if (ax < 0x38800000u) {
    // Below the smallest normal half (2^-14): the result is a multiple of 2^-24. Scaling by 2^24 is
    // exact in fp32 and nearbyint rounds half to even, giving the subnormal (or 0x400 = 2^-14) bits.
    return sign | static_cast<uint16_t>(std::nearbyint(bits_f32(ax) * 16777216.0f));
  }
  // Normal: rebias the exponent (127 -> 15) and drop 13 mantissa bits with round-half-even. A carry
  // out of the mantissa correctly bumps the exponent.
  uint32_t h = (ax >> 13) - ((127u - 15u) << 10);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(man) * (1.0f / 16777216.0f);  // subnormal: man * 2^-24, exact
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
  return bits_f32(sign | ((exp + 127u - 15u) << 23) | (man << 13));
}

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);                // RNE; overflow -> inf
}

inline float bf16_bits_to_float(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

}  // namespace magi::simt

inline float __half2float(__half h) { return magi::simt::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{magi::simt::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return magi::simt::bf16_bits_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{magi::simt::float_to_bf16_bits(f)}; }

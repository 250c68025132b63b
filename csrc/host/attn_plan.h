// Block-sparse attention planner (host C++): slices -> per q tile the k tiles to visit, FULL or PARTIAL.
// The plan format and its exact definition are documented in magi_kernels/plan/planner.py; the Python
// planner there is the executable spec and the tests require identical output from both.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

namespace magi::host {

// Allocator for the two large per-entry arrays: resize() leaves ints uninitialised (every slot is
// written exactly once by the planner), and big buffers are 2 MiB aligned with MADV_HUGEPAGE so
// first-touch page faults (the planner's main cost on a 24B 720p window) drop ~500x.
template <class T>
struct PlanAlloc {
  using value_type = T;
  PlanAlloc() = default;
  template <class U>
  PlanAlloc(const PlanAlloc<U>&) {}
  T* allocate(std::size_t n);
  void deallocate(T* p, std::size_t) noexcept { std::free(p); }
  template <class U>
  void construct(U* p) noexcept { ::new (static_cast<void*>(p)) U; }  // default-init: no zero fill
  template <class U, class... A>
  void construct(U* p, A&&... a) { ::new (static_cast<void*>(p)) U(std::forward<A>(a)...); }
  template <class U>
  bool operator==(const PlanAlloc<U>&) const { return true; }
  template <class U>
  bool operator!=(const PlanAlloc<U>&) const { return false; }
};
void* plan_alloc_bytes(std::size_t bytes);
template <class T>
T* PlanAlloc<T>::allocate(std::size_t n) {
  return static_cast<T*>(plan_alloc_bytes(n * sizeof(T)));
}
using BigI32 = std::vector<int32_t, PlanAlloc<int32_t>>;

struct AttnPlanOut {
  // q-major (forward, dQ): entries of q tile m are [q_ptr[m], q_ptr[m+1]), the first q_nfull[m] FULL.
  std::vector<int32_t> q_ptr, q_nfull, q_pptr;
  BigI32 q_kidx;
  // PARTIAL entries, numbered in q-major order: mask slice ids of partial p are
  // mask_slices[p_mptr[p] : p_mptr[p+1]].
  std::vector<int32_t> p_mptr, mask_slices;
  // k-major (dK/dV): same entries grouped by k tile; k_pent maps k-major partials to partial ids.
  std::vector<int32_t> k_ptr, k_nfull, k_pptr, k_pent;
  BigI32 k_qidx;
};

// q_ranges/k_ranges: n x 2 int32 (row-major), types: n int32. Inputs must already be validated
// (0 <= start <= end <= total, types in 0..3); the function checks nothing beyond tile sizes.
void plan_attention(const int32_t* q_ranges, const int32_t* k_ranges, const int32_t* types, int64_t n,
                    int64_t total_q, int64_t total_k, int64_t block_m, int64_t block_n, AttnPlanOut& out);

}  // namespace magi::host

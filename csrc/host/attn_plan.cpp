// Host planner; see attn_plan.h and magi_kernels/plan/planner.py for the plan's definition.
//
// Per slice the visible keys of global row r are [lo(r), hi(r)) with lo, hi each moving 0 or 1 key
// per row (AttnMaskType). So, restricted to one q tile, a slice touches one contiguous run of k tiles
// (consecutive non-empty row intervals overlap or touch), and a single slice covering every row of the
// tile fully covers the k tiles inside [lo(last row), hi(first row)). Only q tiles where several
// slices meet need the exact per-row union to decide FULL; those are rare (tile rows straddling
// a chunk boundary, overlapping q ranges), so the planner is O(slices x tiles they span + entries).
#include "host/attn_plan.h"

#include <algorithm>
#include <stdexcept>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace magi::host {

void* plan_alloc_bytes(std::size_t bytes) {
  constexpr std::size_t kHuge = std::size_t(2) << 20;
  void* p = nullptr;
  if (bytes >= kHuge / 2) {
    const std::size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    if (posix_memalign(&p, kHuge, rounded) != 0) throw std::bad_alloc();
#ifdef __linux__
    madvise(p, rounded, MADV_HUGEPAGE);  // advisory; ignored where THP is off
#endif
    return p;
  }
  p = std::malloc(bytes ? bytes : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
namespace {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

struct Rec {  // one slice restricted to one q tile: non-empty rows [ra, rb)
  int32_t s;
  int64_t qs, qe, ks, ke;
  int32_t t;
  int64_t ra, rb;
  int64_t lo(int64_t r) const { return (t & 2) ? ks + (r - qs) : ks; }
  int64_t hi(int64_t r) const { return (t & 1) ? ke - (qe - 1 - r) : ke; }
};

struct Iv {
  int64_t a, b;
};

// Global rows [f, l] where the slice's row interval is non-empty; false if none.
bool nonempty_rows(int64_t qs, int64_t qe, int64_t ks, int64_t ke, int32_t t, int64_t& f, int64_t& l) {
  const int64_t sq = qe - qs, sk = ke - ks;
  if (sq <= 0 || sk <= 0) return false;
  const int64_t cau = t & 1, inv = (t >> 1) & 1;
  const int64_t l0 = sk - (sq - 1) * cau;  // length of the first row
  const int64_t slope = cau - inv;
  if (slope == 0) {
    if (l0 <= 0) return false;
    f = qs, l = qe - 1;
  } else if (slope > 0) {
    f = qs + std::max<int64_t>(0, 1 - l0), l = qe - 1;
  } else {
    f = qs, l = qs + std::min<int64_t>(sq - 1, l0 - 1);
  }
  return f <= l;
}

void intersect(const std::vector<Iv>& a, const std::vector<Iv>& b, std::vector<Iv>& out) {
  out.clear();
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const int64_t lo = std::max(a[i].a, b[j].a), hi = std::min(a[i].b, b[j].b);
    if (lo < hi) out.push_back({lo, hi});
    if (a[i].b < b[j].b) ++i; else ++j;
  }
}

}  // namespace

void plan_attention(const int32_t* qr, const int32_t* kr, const int32_t* ty, int64_t n, int64_t total_q,
                    int64_t total_k, int64_t bm, int64_t bn, AttnPlanOut& out) {
  if (bm <= 0 || bn <= 0) throw std::invalid_argument("plan_attention: block_m and block_n must be > 0");
  const int64_t mt = cdiv(total_q, bm), nt = cdiv(total_k, bn);

  // Bucket (slice, q tile) records by q tile, CSR, slice ids ascending inside each bucket.
  std::vector<int64_t> fr(n), lr(n);
  std::vector<char> live(n, 0);
  std::vector<int64_t> bucket_ptr(mt + 1, 0);
  for (int64_t s = 0; s < n; ++s) {
    int64_t f, l;
    if (!nonempty_rows(qr[2 * s], qr[2 * s + 1], kr[2 * s], kr[2 * s + 1], ty[s], f, l)) continue;
    live[s] = 1, fr[s] = f, lr[s] = l;
    for (int64_t m = f / bm; m <= l / bm; ++m) bucket_ptr[m + 1]++;
  }
  for (int64_t m = 0; m < mt; ++m) bucket_ptr[m + 1] += bucket_ptr[m];
  std::vector<Rec> recs(bucket_ptr[mt]);
  {
    std::vector<int64_t> cur(bucket_ptr.begin(), bucket_ptr.end() - 1);
    for (int64_t s = 0; s < n; ++s) {
      if (!live[s]) continue;
      for (int64_t m = fr[s] / bm; m <= lr[s] / bm; ++m) {
        recs[cur[m]++] = Rec{static_cast<int32_t>(s), qr[2 * s], qr[2 * s + 1], kr[2 * s], kr[2 * s + 1], ty[s],
                             std::max(fr[s], m * bm), std::min(lr[s] + 1, (m + 1) * bm)};
      }
    }
  }

  // Pass 1, per q tile: FULL k-tile intervals (kept as intervals) and PARTIAL tiles with their
  // slice ids (written straight to the output; they are few). Pass 2 expands into exact-size arrays,
  // so the large arrays are written once, without reallocation.
  out = AttnPlanOut{};
  std::vector<Iv> full_iv;             // all q tiles' FULL intervals
  std::vector<int64_t> full_off(mt + 1, 0);
  std::vector<int32_t> p_kidx;         // k tile of every PARTIAL entry, q-major order
  out.q_pptr.assign(mt + 1, 0);
  out.q_nfull.assign(mt, 0);
  out.p_mptr.push_back(0);

  struct Touch {
    int64_t na, nb;
    int32_t s;
  };
  std::vector<Touch> touched, tsorted;
  std::vector<Iv> full, row_full, tmp, tu;
  std::vector<std::pair<int64_t, int64_t>> iv;
  std::vector<const Rec*> by_row;

  for (int64_t m = 0; m < mt; ++m) {
    const int64_t m0 = m * bm, m1 = (m + 1) * bm;
    const Rec* R = recs.data() + bucket_ptr[m];
    const int64_t nr = bucket_ptr[m + 1] - bucket_ptr[m];
    touched.clear();
    for (int64_t i = 0; i < nr; ++i) {
      const Rec& r = R[i];
      touched.push_back({floordiv(r.lo(r.ra), bn), cdiv(r.hi(r.rb - 1), bn), r.s});
    }
    full.clear();
    if (nr > 0 && m1 <= total_q) {
      if (nr == 1) {
        const Rec& r = R[0];
        if (r.ra == m0 && r.rb == m1) {
          const int64_t a = cdiv(r.lo(m1 - 1), bn), b = r.hi(m0) / bn;
          if (a < b) full.push_back({a, b});
        }
      } else {  // several slices meet here: intersect, over rows, the k tiles inside each row's union
        by_row.clear();
        for (int64_t i = 0; i < nr; ++i) by_row.push_back(&R[i]);
        std::stable_sort(by_row.begin(), by_row.end(), [](const Rec* x, const Rec* y) { return x->ra < y->ra; });
        bool first = true;
        for (int64_t r = m0; r < m1; ++r) {
          iv.clear();
          for (const Rec* p : by_row) {
            if (p->ra > r) break;
            if (r < p->rb) iv.emplace_back(p->lo(r), p->hi(r));
          }
          std::sort(iv.begin(), iv.end());
          row_full.clear();
          int64_t ca = 0, cb = 0;
          bool have = false;
          auto flush = [&]() {
            const int64_t a = cdiv(ca, bn), b = cb / bn;
            if (a < b) row_full.push_back({a, b});
          };
          for (auto& [lo, hi] : iv) {
            if (have && lo <= cb) {
              cb = std::max(cb, hi);
            } else {
              if (have) flush();
              ca = lo, cb = hi, have = true;
            }
          }
          if (have) flush();
          if (first) {
            full = row_full;
            first = false;
          } else {
            intersect(full, row_full, tmp);
            full.swap(tmp);
          }
          if (full.empty()) break;
        }
      }
    }
    tsorted = touched;
    std::sort(tsorted.begin(), tsorted.end(), [](const Touch& x, const Touch& y) {
      return x.na < y.na || (x.na == y.na && x.nb < y.nb);
    });
    tu.clear();
    for (const Touch& t : tsorted) {
      if (!tu.empty() && t.na <= tu.back().b) tu.back().b = std::max(tu.back().b, t.nb);
      else tu.push_back({t.na, t.nb});
    }
    int64_t nfull = 0;
    for (const Iv& f : full) full_iv.push_back(f), nfull += f.b - f.a;
    full_off[m + 1] = static_cast<int64_t>(full_iv.size());
    // PARTIAL = touched minus FULL, ascending, each with the ids of the slices touching it.
    size_t j = 0;
    for (const Iv& t : tu) {
      int64_t k = t.a;
      while (k < t.b) {
        while (j < full.size() && full[j].b <= k) ++j;
        if (j < full.size() && full[j].a <= k) {
          k = full[j].b;
          continue;
        }
        const int64_t stop = (j >= full.size()) ? t.b : std::min(t.b, full[j].a);
        for (; k < stop; ++k) {
          p_kidx.push_back(static_cast<int32_t>(k));
          for (const Touch& x : touched)
            if (x.na <= k && k < x.nb) out.mask_slices.push_back(x.s);
          out.p_mptr.push_back(static_cast<int32_t>(out.mask_slices.size()));
        }
      }
    }
    out.q_nfull[m] = static_cast<int32_t>(nfull);
    out.q_pptr[m + 1] = static_cast<int32_t>(p_kidx.size());
  }

  // Pass 2: q-major expansion, plus per-k-tile counts for the k-major view.
  const int64_t P = static_cast<int64_t>(p_kidx.size());
  int64_t E = P;
  for (int64_t m = 0; m < mt; ++m) E += out.q_nfull[m];
  out.q_ptr.resize(mt + 1);
  out.q_kidx.resize(E);
  out.k_nfull.assign(nt, 0);
  std::vector<int32_t> kdiff(nt + 1, 0), npart(nt, 0);
  int32_t* qk = out.q_kidx.data();
  int64_t e = 0;
  out.q_ptr[0] = 0;
  for (int64_t m = 0; m < mt; ++m) {
    for (int64_t i = full_off[m]; i < full_off[m + 1]; ++i) {
      const Iv f = full_iv[i];
      for (int64_t k = f.a; k < f.b; ++k) qk[e++] = static_cast<int32_t>(k);
      kdiff[f.a]++, kdiff[f.b]--;  // FULL counts per k tile via a difference array
    }
    for (int64_t p = out.q_pptr[m]; p < out.q_pptr[m + 1]; ++p) {
      qk[e++] = p_kidx[p];
      npart[p_kidx[p]]++;
    }
    out.q_ptr[m + 1] = static_cast<int32_t>(e);
  }

  // k-major: FULL entries first, then PARTIAL, each ascending in q tile (pass-order is ascending m).
  int32_t run = 0;
  for (int64_t k = 0; k < nt; ++k) run += kdiff[k], out.k_nfull[k] = run;
  out.k_ptr.assign(nt + 1, 0);
  out.k_pptr.assign(nt + 1, 0);
  for (int64_t k = 0; k < nt; ++k) {
    out.k_ptr[k + 1] = out.k_ptr[k] + out.k_nfull[k] + npart[k];
    out.k_pptr[k + 1] = out.k_pptr[k] + npart[k];
  }
  std::vector<int32_t> cf(nt), cp(nt);
  for (int64_t k = 0; k < nt; ++k) cf[k] = out.k_ptr[k], cp[k] = out.k_pptr[k];
  out.k_qidx.resize(E);
  out.k_pent.resize(P);
  int32_t* kq = out.k_qidx.data();
  for (int64_t m = 0; m < mt; ++m) {
    for (int64_t i = full_off[m]; i < full_off[m + 1]; ++i)
      for (int64_t k = full_iv[i].a; k < full_iv[i].b; ++k) kq[cf[k]++] = static_cast<int32_t>(m);
  }
  for (int64_t m = 0; m < mt; ++m) {
    for (int64_t p = out.q_pptr[m]; p < out.q_pptr[m + 1]; ++p) {
      const int32_t k = p_kidx[p];
      kq[out.k_ptr[k] + out.k_nfull[k] + (cp[k] - out.k_pptr[k])] = static_cast<int32_t>(m);
      out.k_pent[cp[k]++] = static_cast<int32_t>(p);
    }
  }
}

}  // namespace magi::host

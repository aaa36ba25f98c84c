// greedy_core.cuh -- the selection steps of DESIGN.md §4, written once.
//
// Every function here is `__host__ __device__` (TF_HD expands to nothing for a host
// compiler) and templated on the element type of G (float or double). The same text
// is compiled three ways:
//   * by the host C++ compiler for the CPU path (greedy_cpu.cpp, OpenMP over problems),
//   * by nvcc for the CUDA path (greedy_kernels.cuh / greedy_cuda.cu),
//   * by NVRTC at run time for the cupy path (thinet_fast/ops/cupy_backend.py reads
//     this file and greedy_kernels.cuh, so keep it free of includes under NVRTC).
//
// The parallel loops run over r = begin, begin + stride, ... < Cb (the problem's size):
// the host passes (0, 1), a CUDA thread (threadIdx.x, blockDim.x). Each running-sum
// entry r is only ever touched by the thread that owns r, so no synchronisation is
// needed between the update of one step and the scan of the next. The host's greedy
// argmin uses greedy_remove_argmin, a two-pass serial form of the same scan (same
// result, faster on a CPU); greedy_cpu.cpp can also run the CUDA decomposition serially
// (sim_threads) so the tests exercise it without a GPU.
//
// Greedy removal must be bit-for-bit identical to the torch reference
// (_greedy_remove_core_ref): score = g_ii + 2*a_i, E = E + score, a_r = a_r + G[r, i*],
// argmin with ties to the lowest index. `2*a` is exact, so an FMA contraction of the
// score gives the same result as the two separate roundings.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <cmath>
#include <cstddef>
#include <limits>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define TF_HD __host__ __device__
#else
#define TF_HD
#endif

#define TF_INLINE inline

namespace tf {

typedef long long index_t;  // same width as int64_t; NVRTC has no <cstdint>

// ------------------------------------------------------------------ scalars
template <typename T> TF_HD TF_INLINE T inf_value();
template <> TF_HD TF_INLINE float inf_value<float>() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7f800000);
#else
  return std::numeric_limits<float>::infinity();
#endif
}
template <> TF_HD TF_INLINE double inf_value<double>() {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(0x7ff0000000000000LL);
#else
  return std::numeric_limits<double>::infinity();
#endif
}

// Smallest normal double: the ridge used when ridge * mean(diag) is not positive
// (torch.finfo(torch.float64).tiny in the reference).
#define TF_DBL_TINY 2.2250738585072014e-308

template <typename T> TF_HD TF_INLINE bool is_nan(T x) { return x != x; }

// (s, i) beats (bs, bi) for an argmin with ties to the lowest index. NaN counts as the
// smallest value, as in torch.argmin.
template <typename T>
TF_HD TF_INLINE bool argmin_better(T s, index_t i, T bs, index_t bi) {
  const bool sn = is_nan(s), bn = is_nan(bs);
  if (sn != bn) return sn;
  if (sn) return i < bi;
  return s < bs || (s == bs && i < bi);
}

// (s, i) beats (bs, bi) for an argmax with ties to the lowest index (NaN is largest).
template <typename T>
TF_HD TF_INLINE bool argmax_better(T s, index_t i, T bs, index_t bi) {
  const bool sn = is_nan(s), bn = is_nan(bs);
  if (sn != bn) return sn;
  if (sn) return i < bi;
  return s > bs || (s == bs && i < bi);
}

// ------------------------------------------------------------------ batches
// Problem b of a batch: its true size Cb = clamp(sizes[b], 0, C) and step count
// n = min(clamp(counts[b], 0, Cb), nmax). The bindings validate sizes and counts; the
// clamp keeps the kernels in bounds regardless.
TF_HD TF_INLINE void clamp_problem(index_t C, index_t nmax, index_t size, index_t count,
                                   index_t& Cb, index_t& n) {
  Cb = size < 0 ? 0 : (size > C ? C : size);
  n = count < 0 ? 0 : (count > Cb ? Cb : count);
  n = n > nmax ? nmax : n;
}

// The padding of one problem's outputs: idx[j] = -1 and val[j] = fill for the owned
// j in [n, nmax).
template <typename I, typename V>
TF_HD TF_INLINE void pad_outputs(I* idx, V* val, V fill, index_t n, index_t nmax, index_t begin,
                                 index_t stride) {
  for (index_t j = n + begin; j < nmax; j += stride) {
    idx[j] = -1;
    val[j] = fill;
  }
}

// ============================================================= greedy removal
// Per-problem scratch: running sums a[C], the diagonal d[C] (both T) and removed[C]
// flags. Offsets in bytes, each part aligned to 16.
TF_HD TF_INLINE index_t align16(index_t x) { return (x + 15) & ~index_t(15); }
TF_HD TF_INLINE index_t greedy_remove_scratch_bytes(index_t C, index_t itemsize) {
  return align16(C * itemsize) * 2 + align16(C);
}

template <typename T> TF_HD TF_INLINE T greedy_score(T g_ii, T a_i) { return g_ii + T(2) * a_i; }

// Initialise the owned entries of a problem of size Cb inside a batch of width ld.
template <typename T>
TF_HD TF_INLINE void greedy_remove_init(const T* G, index_t ld, index_t Cb, T* a, T* diag,
                                        unsigned char* removed, index_t begin, index_t stride) {
  for (index_t r = begin; r < Cb; r += stride) {
    a[r] = T(0);
    diag[r] = G[r * ld + r];
    removed[r] = 0;
  }
}

// Scan the owned candidates: running argmin of g_rr + 2 a_r over the non-removed ones
// (the per-thread part of the CUDA kernel; a block-wide reduction follows).
template <typename T>
TF_HD TF_INLINE void greedy_remove_scan(const T* diag, const T* a, const unsigned char* removed,
                                        index_t Cb, index_t begin, index_t stride,
                                        T& best_s, index_t& best_i) {
  for (index_t r = begin; r < Cb; r += stride) {
    if (removed[r]) continue;
    const T s = greedy_score(diag[r], a[r]);
    if (argmin_better(s, r, best_s, best_i)) {
      best_s = s;
      best_i = r;
    }
  }
}

// The same argmin for one serial scanner (the host path), in two passes: a min over
// four independent accumulators (no loop-carried compare chain, no unpredictable
// branch on removed[r]), then the first non-removed index reaching it. Same result as
// greedy_remove_scan: lowest index among equal minima, first NaN if there is one, and
// some non-removed index is always returned when one exists.
template <typename T>
TF_HD TF_INLINE void greedy_remove_argmin(const T* diag, const T* a, const unsigned char* removed,
                                          index_t Cb, T& best_s, index_t& best_i) {
  const T inf = inf_value<T>();
  T m0 = inf, m1 = inf, m2 = inf, m3 = inf;
  bool nan = false;
  index_t r = 0;
  for (; r + 4 <= Cb; r += 4) {
    const T s0 = removed[r] ? inf : greedy_score(diag[r], a[r]);
    const T s1 = removed[r + 1] ? inf : greedy_score(diag[r + 1], a[r + 1]);
    const T s2 = removed[r + 2] ? inf : greedy_score(diag[r + 2], a[r + 2]);
    const T s3 = removed[r + 3] ? inf : greedy_score(diag[r + 3], a[r + 3]);
    nan = nan | is_nan(s0) | is_nan(s1) | is_nan(s2) | is_nan(s3);
    m0 = s0 < m0 ? s0 : m0;
    m1 = s1 < m1 ? s1 : m1;
    m2 = s2 < m2 ? s2 : m2;
    m3 = s3 < m3 ? s3 : m3;
  }
  for (; r < Cb; ++r) {
    const T s0 = removed[r] ? inf : greedy_score(diag[r], a[r]);
    nan = nan | is_nan(s0);
    m0 = s0 < m0 ? s0 : m0;
  }
  T m = m0;
  m = m1 < m ? m1 : m;
  m = m2 < m ? m2 : m;
  m = m3 < m ? m3 : m;
  for (r = 0; r < Cb; ++r) {
    if (removed[r]) continue;
    const T s = greedy_score(diag[r], a[r]);
    if (nan ? is_nan(s) : (s == m)) {
      best_s = s;
      best_i = r;
      return;
    }
  }
}

// After choosing i*: a_r = a_r + G[r, i*] for the owned r (col points at G[0, i*],
// col_stride is the distance between rows: ld for G itself, 1 for a transposed copy),
// and mark i* removed if owned.
template <typename T>
TF_HD TF_INLINE void greedy_remove_update(T* a, unsigned char* removed, const T* col,
                                          index_t col_stride, index_t istar, index_t Cb,
                                          index_t begin, index_t stride) {
  if (col_stride == 1) {  // contiguous: lets the host compiler vectorise
    for (index_t r = begin; r < Cb; r += stride) a[r] = a[r] + col[r];
  } else {
    for (index_t r = begin; r < Cb; r += stride) a[r] = a[r] + col[r * col_stride];
  }
  if (istar >= begin && istar < Cb && (istar - begin) % stride == 0) removed[istar] = 1;
}

// ====================================================== forward least squares
// Orthogonal-projection form of the reference's incremental Cholesky (Batch-OMP):
// with L the Cholesky factor of G_SS + lam I (pivot d^2 clamped to >= lam),
//   Q = G[:, S] L^-T  (C x |S|, column-major, columns never change once written),
//   y = L^-1 b_S,      c = b - G[:, S] w_S = b - Q y,      w_S = L^-T y.
// Appending i to S: l = L^-1 G[S, i] = Q[i, :] (G symmetric), d = sqrt(max(g_ii + lam -
// l.l, lam)), y_j = (b_i - l.y) / d, q_j = (G[:, i] - Q l) / d, c -= y_j q_j.
// Row j of L is (Q[i_j, :j], d_j), so L needs no storage of its own. A step costs
// O(C |S|) and the weights need one back substitution at the end.
//
// Per-problem scratch (doubles unless noted): Q[C * nmax], b[C], c[C], denom[C], y[nmax],
// dvec[nmax], chosen[C] (bytes).
TF_HD TF_INLINE index_t keep_ls_scratch_bytes(index_t C, index_t nmax) {
  return align16(8 * (C * nmax + 3 * C + 2 * nmax) + C) + 256;
}

struct KeepLsScratch {
  double* Q;
  double* b;
  double* c;
  double* denom;
  double* y;
  double* dvec;
  unsigned char* chosen;
};

TF_HD TF_INLINE KeepLsScratch keep_ls_scratch(unsigned char* base, index_t C, index_t nmax) {
  KeepLsScratch s;
  double* p = reinterpret_cast<double*>(base);
  s.Q = p;       p += C * nmax;
  s.b = p;       p += C;
  s.c = p;       p += C;
  s.denom = p;   p += C;
  s.y = p;       p += nmax;
  s.dvec = p;    p += nmax;
  s.chosen = reinterpret_cast<unsigned char*>(p);
  return s;
}

// Serial: the ridge lam = ridge * mean(diag of the valid block), or the smallest normal
// double when that is not positive.
template <typename T>
TF_HD TF_INLINE double keep_ls_lambda(const T* G, index_t ld, index_t Cb, double ridge) {
  double sum = 0.0;
  for (index_t r = 0; r < Cb; ++r) sum = sum + double(G[r * ld + r]);
  const double lam = Cb > 0 ? ridge * (sum / double(Cb)) : 0.0;
  return lam > 0.0 ? lam : TF_DBL_TINY;  // also catches NaN
}

// Owned rows: b_r = sum_k G[r, k] (= X^T y with y = X 1), c = b, denom = max(g_rr, lam).
template <typename T>
TF_HD TF_INLINE void keep_ls_init(const T* G, index_t ld, index_t Cb, double lam, KeepLsScratch s,
                                  index_t begin, index_t stride) {
  for (index_t r = begin; r < Cb; r += stride) {
    const T* row = G + r * ld;
    double acc = 0.0;
    for (index_t k = 0; k < Cb; ++k) acc = acc + double(row[k]);
    s.b[r] = acc;
    s.c[r] = acc;
    const double g = double(row[r]);
    s.denom[r] = g < lam ? lam : g;  // clamp_min(lam); NaN stays NaN as in torch
    s.chosen[r] = 0;
  }
}

// Owned candidates: running argmax of c_r^2 / denom_r over the unchosen ones (-1 for a
// chosen one in the reference, i.e. never picked).
TF_HD TF_INLINE void keep_ls_scan(KeepLsScratch s, index_t Cb, index_t begin, index_t stride,
                                  double& best_s, index_t& best_i) {
  for (index_t r = begin; r < Cb; r += stride) {
    if (s.chosen[r]) continue;
    const double cr = s.c[r];
    const double v = cr * cr / s.denom[r];
    if (argmax_better(v, r, best_s, best_i)) {
      best_s = v;
      best_i = r;
    }
  }
}

// Serial: the new Cholesky pivot d_j and y_j for candidate i at step j.
template <typename T>
TF_HD TF_INLINE void keep_ls_pivot(const T* G, index_t ld, index_t Cb, index_t i, index_t j,
                                   double lam, KeepLsScratch s, double& d, double& yj) {
  double ll = 0.0, ly = 0.0;
  for (index_t k = 0; k < j; ++k) {
    const double lk = s.Q[k * Cb + i];
    ll = ll + lk * lk;
    ly = ly + lk * s.y[k];
  }
  const double d2 = (double(G[i * ld + i]) + lam) - ll;
  d = sqrt(d2 > lam ? d2 : lam);
  yj = (s.b[i] - ly) / d;
}

// Serial: append candidate i as step j: keep_ls_pivot, then record y_j, d_j, chosen[i]
// and keep[j] = i. d and yj come back for keep_ls_update.
template <typename T>
TF_HD TF_INLINE void keep_ls_append(const T* G, index_t ld, index_t Cb, index_t i, index_t j,
                                    double lam, KeepLsScratch s, index_t* keep, double& d,
                                    double& yj) {
  keep_ls_pivot(G, ld, Cb, i, j, lam, s, d, yj);
  s.y[j] = yj;
  s.dvec[j] = d;
  s.chosen[i] = 1;
  keep[j] = i;
}

// Owned rows: q_r = (G[r, i] - sum_k Q[r, k] l_k) / d, Q[:, j] = q, c_r -= y_j q_r.
// The column of G is read as col[r * col_stride] (col = G + i, col_stride = ld).
template <typename T>
TF_HD TF_INLINE void keep_ls_update(const T* col, index_t col_stride, index_t Cb, index_t i,
                                    index_t j, double d, double yj, KeepLsScratch s,
                                    index_t begin, index_t stride) {
  double* qj = s.Q + j * Cb;
  for (index_t r = begin; r < Cb; r += stride) qj[r] = double(col[r * col_stride]);
  for (index_t k = 0; k < j; ++k) {
    const double* qk = s.Q + k * Cb;
    const double lk = qk[i];
    for (index_t r = begin; r < Cb; r += stride) qj[r] = qj[r] - qk[r] * lk;
  }
  for (index_t r = begin; r < Cb; r += stride) {
    const double q = qj[r] / d;
    qj[r] = q;
    s.c[r] = s.c[r] - yj * q;
  }
}

// Serial: w = L^-T y with L[m, k] = Q[i_m, k] (m > k) and L[k, k] = d_k.
TF_HD TF_INLINE void keep_ls_backsolve(KeepLsScratch s, index_t Cb, const index_t* keep, index_t n,
                                       double* w) {
  for (index_t k = n - 1; k >= 0; --k) {
    double acc = s.y[k];
    const double* qk = s.Q + k * Cb;
    for (index_t m = k + 1; m < n; ++m) acc = acc - qk[keep[m]] * w[m];
    w[k] = acc / s.dvec[k];
  }
}

}  // namespace tf

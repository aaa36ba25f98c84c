// greedy_cpu.cpp -- batched host implementation of the selection steps (OpenMP over
// problems). The arithmetic is the shared step code of greedy_core.cuh; this file only
// owns the loops over steps and problems and the per-thread scratch.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "greedy_api.h"
#include "greedy_core.cuh"

namespace tf {
namespace {

// Problems sorted by decreasing cost, so the dynamic schedule ends balanced.
std::vector<int64_t> schedule(int64_t B, const int64_t* sizes, const int64_t* counts) {
  std::vector<int64_t> idx(static_cast<size_t>(B));
  std::iota(idx.begin(), idx.end(), int64_t(0));
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t x, int64_t y) {
    return sizes[x] * (counts[x] + 1) > sizes[y] * (counts[y] + 1);
  });
  return idx;
}

int threads_for(int num_threads, int64_t B) {
  int t = num_threads > 0 ? num_threads : omp_max_threads();
  if (B < t) t = static_cast<int>(B);
  return t < 1 ? 1 : t;
}

// Runs one(b, Cb, n, scratch) for every problem b of the batch (Cb, n: clamp_problem),
// OpenMP over problems in schedule order, with one Scratch per thread.
template <typename Scratch, typename F>
void for_each_problem(int64_t B, int64_t C, int64_t nmax, const int64_t* sizes,
                      const int64_t* counts, int num_threads, const F& one) {
  if (B == 0 || nmax == 0) return;
  const std::vector<int64_t> idx = schedule(B, sizes, counts);
  const int nt = threads_for(num_threads, B);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    Scratch scratch;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t q = 0; q < B; ++q) {
      const int64_t b = idx[static_cast<size_t>(q)];
      index_t Cb, n;
      clamp_problem(C, nmax, sizes[b], counts[b], Cb, n);
      one(b, Cb, n, scratch);
    }
  }
  (void)nt;
}

// Per-thread scratch of greedy_remove_one: the running sums etc., and the transposed copy.
template <typename T>
struct RemoveScratch {
  std::vector<unsigned char> bytes;
  std::vector<T> gt;
};

template <typename T>
void greedy_remove_one(const T* Gb, int64_t C, int64_t Cb, int64_t n, int64_t nmax, int64_t* ord,
                       T* err, std::vector<unsigned char>& scratch, std::vector<T>& gt,
                       int sim_threads) {
  pad_outputs(ord, err, inf_value<T>(), n, nmax, 0, 1);
  if (n == 0) return;
  scratch.resize(static_cast<size_t>(greedy_remove_scratch_bytes(C, sizeof(T))) + 16);
  unsigned char* base = scratch.data();
  T* a = reinterpret_cast<T*>(base);
  T* diag = reinterpret_cast<T*>(base + align16(C * (index_t)sizeof(T)));
  unsigned char* removed = base + 2 * align16(C * (index_t)sizeof(T));

  // Column i* of G is read every step. For long runs, a blocked transposed copy makes
  // those reads contiguous (same values, so the result is unchanged).
  const bool transpose = sim_threads <= 0 && n * 4 >= Cb && Cb > 32;
  if (transpose) {
    gt.resize(static_cast<size_t>(Cb * Cb));
    const int64_t BS = 64;
    for (int64_t r0 = 0; r0 < Cb; r0 += BS)
      for (int64_t c0 = 0; c0 < Cb; c0 += BS)
        for (int64_t r = r0; r < std::min(r0 + BS, Cb); ++r)
          for (int64_t c = c0; c < std::min(c0 + BS, Cb); ++c) gt[c * Cb + r] = Gb[r * C + c];
  }

  greedy_remove_init(Gb, C, Cb, a, diag, removed, 0, 1);
  T E = T(0);
  for (int64_t j = 0; j < n; ++j) {
    T s = inf_value<T>();
    index_t i = (index_t)0x7fffffffffffffffLL;
    if (sim_threads > 0) {
      // The CUDA kernel's decomposition, run serially: per-thread strided scans, then
      // the block reduction (argmin_better is a lexicographic min, so any order works).
      for (int t = 0; t < sim_threads; ++t) {
        T ts = inf_value<T>();
        index_t ti = (index_t)0x7fffffffffffffffLL;
        greedy_remove_scan(diag, a, removed, Cb, t, sim_threads, ts, ti);
        if (argmin_better(ts, ti, s, i)) {
          s = ts;
          i = ti;
        }
      }
    } else {
      greedy_remove_argmin(diag, a, removed, Cb, s, i);
    }
    if (sim_threads > 0) {
      for (int t = 0; t < sim_threads; ++t)
        greedy_remove_update(a, removed, Gb + i, C, i, Cb, t, sim_threads);
    } else if (transpose)
      greedy_remove_update(a, removed, gt.data() + i * Cb, 1, i, Cb, 0, 1);
    else
      greedy_remove_update(a, removed, Gb + i, C, i, Cb, 0, 1);
    E = E + s;
    ord[j] = i;
    err[j] = E;
  }
}

template <typename T>
void keep_ls_one(const T* Gb, int64_t C, int64_t Cb, int64_t n, int64_t nmax, double ridge,
                 int64_t* keep, double* w, std::vector<double>& scratch, int sim_threads) {
  pad_outputs(keep, w, 0.0, n, nmax, 0, 1);
  if (n == 0) return;
  scratch.resize(static_cast<size_t>(keep_ls_scratch_bytes(Cb, n) / 8 + 2));
  KeepLsScratch s = keep_ls_scratch(reinterpret_cast<unsigned char*>(scratch.data()), Cb, n);
  const double lam = keep_ls_lambda(Gb, C, Cb, ridge);
  keep_ls_init(Gb, C, Cb, lam, s, 0, 1);
  index_t* kb = reinterpret_cast<index_t*>(keep);
  const int T_ = sim_threads > 0 ? sim_threads : 1;  // > 1: the CUDA decomposition, serially
  for (int64_t j = 0; j < n; ++j) {
    double v = -inf_value<double>();
    index_t i = (index_t)0x7fffffffffffffffLL;
    for (int t = 0; t < T_; ++t) {
      double tv = -inf_value<double>();
      index_t ti = (index_t)0x7fffffffffffffffLL;
      keep_ls_scan(s, Cb, t, T_, tv, ti);
      if (argmax_better(tv, ti, v, i)) {
        v = tv;
        i = ti;
      }
    }
    double d, yj;
    keep_ls_append(Gb, C, Cb, i, j, lam, s, kb, d, yj);
    for (int t = 0; t < T_; ++t) keep_ls_update(Gb + i, C, Cb, i, j, d, yj, s, t, T_);
  }
  keep_ls_backsolve(s, Cb, kb, n, w);
}

}  // namespace

int omp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

template <typename T>
void greedy_remove_host(const T* G, int64_t B, int64_t C, const int64_t* sizes,
                        const int64_t* counts, int64_t nmax, int64_t* order, T* errors,
                        int num_threads, int sim_threads) {
  for_each_problem<RemoveScratch<T>>(
      B, C, nmax, sizes, counts, num_threads,
      [&](int64_t b, int64_t Cb, int64_t n, RemoveScratch<T>& scratch) {
        greedy_remove_one(G + b * C * C, C, Cb, n, nmax, order + b * nmax, errors + b * nmax,
                          scratch.bytes, scratch.gt, sim_threads);
      });
}

template <typename T>
void keep_ls_host(const T* G, int64_t B, int64_t C, const int64_t* sizes, const int64_t* counts,
                  int64_t nmax, double ridge, int64_t* keep, double* weights, int num_threads,
                  int sim_threads) {
  static_assert(sizeof(index_t) == sizeof(int64_t), "int64 layout");
  for_each_problem<std::vector<double>>(
      B, C, nmax, sizes, counts, num_threads,
      [&](int64_t b, int64_t Cb, int64_t n, std::vector<double>& scratch) {
        keep_ls_one(G + b * C * C, C, Cb, n, nmax, ridge, keep + b * nmax, weights + b * nmax,
                    scratch, sim_threads);
      });
}

template void greedy_remove_host<float>(const float*, int64_t, int64_t, const int64_t*,
                                        const int64_t*, int64_t, int64_t*, float*, int, int);
template void greedy_remove_host<double>(const double*, int64_t, int64_t, const int64_t*,
                                         const int64_t*, int64_t, int64_t*, double*, int, int);
template void keep_ls_host<float>(const float*, int64_t, int64_t, const int64_t*,
                                  const int64_t*, int64_t, double, int64_t*, double*, int, int);
template void keep_ls_host<double>(const double*, int64_t, int64_t, const int64_t*,
                                   const int64_t*, int64_t, double, int64_t*, double*, int, int);

}  // namespace tf

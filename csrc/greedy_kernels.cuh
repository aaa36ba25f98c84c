// greedy_kernels.cuh -- CUDA kernels for the batched selection (DESIGN.md §4, §9).
//
// One thread block per problem; problems of different sizes share one launch (G is a
// padded (B, C, C) batch, sizes[b] is the true size of problem b). The step code lives
// in greedy_core.cuh; this file adds the block-wide reductions and the kernel bodies.
//
// Compiled by nvcc (greedy_cuda.cu) and by NVRTC (thinet_fast/ops/cupy_backend.py, which
// inlines greedy_core.cuh in place of the #include below). Keep the kernel signatures in
// sync with cupy_backend.pack_*_args.
#pragma once

#include "greedy_core.cuh"

namespace tf {

#define TF_MAX_WARPS 32

// Warp-wide argmin / argmax of (value, index) with ties to the lowest index, by
// shuffle-down: lane 0 ends with the warp's result.
template <typename T, bool kMax>
__device__ TF_INLINE void warp_arg_reduce(T& v, index_t& idx, unsigned lane) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T ov = __shfl_down_sync(0xffffffffu, v, off);
    const index_t oi = __shfl_down_sync(0xffffffffu, idx, off);
    const bool better = kMax ? argmax_better(ov, oi, v, idx) : argmin_better(ov, oi, v, idx);
    if (lane + off < 32u && better) {
      v = ov;
      idx = oi;
    }
  }
}

// Block-wide argmin / argmax of (value, index) with ties to the lowest index. Every
// thread passes its partial result; every thread gets the block result. Two
// __syncthreads; the shared buffers may be reused right after the call returns.
template <typename T, bool kMax>
__device__ TF_INLINE void block_arg_reduce(T& v, index_t& idx, T* red_v, index_t* red_i) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = threadIdx.x >> 5;
  const unsigned nwarps = (blockDim.x + 31u) >> 5;
  warp_arg_reduce<T, kMax>(v, idx, lane);
  if (lane == 0) {
    red_v[warp] = v;
    red_i[warp] = idx;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? red_v[lane] : v;
    idx = lane < nwarps ? red_i[lane] : idx;
    if (lane >= nwarps) {  // neutral element
      v = kMax ? -inf_value<T>() : inf_value<T>();
      idx = (index_t)0x7fffffffffffffffLL;
    }
    warp_arg_reduce<T, kMax>(v, idx, lane);
    if (lane == 0) {
      red_v[TF_MAX_WARPS] = v;
      red_i[TF_MAX_WARPS] = idx;
    }
  }
  __syncthreads();
  v = red_v[TF_MAX_WARPS];
  idx = red_i[TF_MAX_WARPS];
}

extern __shared__ __align__(16) unsigned char tf_dyn_smem[];

// Greedy removal. blockDim.x must be a multiple of 32 (<= 1024). Scratch: when
// use_smem != 0 the per-problem scratch (greedy_remove_scratch_bytes) lives in dynamic
// shared memory, otherwise at ws + blockIdx.x * ws_stride in global memory.
template <typename T>
__global__ void tf_greedy_remove_kernel(const T* __restrict__ G, long long C,
                                        const long long* __restrict__ sizes,
                                        const long long* __restrict__ counts, long long nmax,
                                        long long* __restrict__ order, T* __restrict__ errors,
                                        unsigned char* ws, long long ws_stride, int use_smem) {
  __shared__ T red_v[TF_MAX_WARPS + 1];
  __shared__ index_t red_i[TF_MAX_WARPS + 1];
  const index_t b = blockIdx.x;
  const T* Gb = G + b * C * C;
  index_t Cb, n;
  clamp_problem(C, nmax, sizes[b], counts[b], Cb, n);
  long long* ord = order + b * nmax;
  T* err = errors + b * nmax;
  pad_outputs(ord, err, inf_value<T>(), n, nmax, threadIdx.x, blockDim.x);
  if (n == 0) return;

  unsigned char* base = use_smem ? tf_dyn_smem : ws + b * ws_stride;
  T* a = reinterpret_cast<T*>(base);
  T* diag = reinterpret_cast<T*>(base + align16(C * (index_t)sizeof(T)));
  unsigned char* removed = base + 2 * align16(C * (index_t)sizeof(T));

  const index_t tid = threadIdx.x, nt = blockDim.x;
  greedy_remove_init(Gb, C, Cb, a, diag, removed, tid, nt);  // owned entries only
  T E = T(0);
  for (index_t j = 0; j < n; ++j) {
    T s = inf_value<T>();
    index_t i = (index_t)0x7fffffffffffffffLL;
    greedy_remove_scan(diag, a, removed, Cb, tid, nt, s, i);
    block_arg_reduce<T, false>(s, i, red_v, red_i);
    greedy_remove_update(a, removed, Gb + i, C, i, Cb, tid, nt);
    E = E + s;
    if (tid == 0) {
      ord[j] = i;
      err[j] = E;
    }
  }
}

// Forward least squares. Scratch at ws + blockIdx.x * ws_stride (keep_ls_scratch_bytes),
// always global: Q is C x nmax doubles per problem.
template <typename T>
__global__ void tf_keep_ls_kernel(const T* __restrict__ G, long long C,
                                  const long long* __restrict__ sizes,
                                  const long long* __restrict__ counts, long long nmax,
                                  double ridge, long long* __restrict__ keep,
                                  double* __restrict__ weights, unsigned char* ws,
                                  long long ws_stride) {
  __shared__ double red_v[TF_MAX_WARPS + 1];
  __shared__ index_t red_i[TF_MAX_WARPS + 1];
  __shared__ double sh_lam, sh_d, sh_y;
  const index_t b = blockIdx.x;
  const T* Gb = G + b * C * C;
  index_t Cb, n;
  clamp_problem(C, nmax, sizes[b], counts[b], Cb, n);
  long long* kb = keep + b * nmax;
  double* wb = weights + b * nmax;
  pad_outputs(kb, wb, 0.0, n, nmax, threadIdx.x, blockDim.x);
  if (n == 0) return;

  KeepLsScratch s = keep_ls_scratch(ws + b * ws_stride, C, nmax);
  const index_t tid = threadIdx.x, nt = blockDim.x;
  if (tid == 0) sh_lam = keep_ls_lambda(Gb, C, Cb, ridge);
  __syncthreads();
  const double lam = sh_lam;
  keep_ls_init(Gb, C, Cb, lam, s, tid, nt);
  __syncthreads();  // b is read across threads by the pivot
  for (index_t j = 0; j < n; ++j) {
    double v = -inf_value<double>();
    index_t i = (index_t)0x7fffffffffffffffLL;
    keep_ls_scan(s, Cb, tid, nt, v, i);
    block_arg_reduce<double, true>(v, i, red_v, red_i);
    if (tid == 0) {
      double d, yj;
      keep_ls_append(Gb, C, Cb, i, j, lam, s, kb, d, yj);
      sh_d = d;
      sh_y = yj;
    }
    __syncthreads();
    keep_ls_update(Gb + i, C, Cb, i, j, sh_d, sh_y, s, tid, nt);
    __syncthreads();  // Q[:, j] and c are read across threads in the next step
  }
  if (tid == 0) keep_ls_backsolve(s, Cb, kb, n, wb);
}

}  // namespace tf

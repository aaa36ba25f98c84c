// greedy_api.h -- host-side entry points of the _C extension (no pybind11, no CUDA
// headers), shared by bindings.cpp, greedy_cpu.cpp and greedy_cuda.cu.
#pragma once

#include <cstdint>
#include <string>

namespace tf {

// ---- CPU (greedy_cpu.cpp). G: (B, C, C) C-contiguous; sizes, counts: (B,);
// outputs (B, nmax), padded by the callee (-1 / +inf, -1 / 0). sim_threads > 0 runs the
// CUDA kernels' decomposition serially (strided per-thread scans + block reduction) to
// test that code on the CPU; 0 is the normal host path.
template <typename T>
void greedy_remove_host(const T* G, int64_t B, int64_t C, const int64_t* sizes,
                        const int64_t* counts, int64_t nmax, int64_t* order, T* errors,
                        int num_threads, int sim_threads = 0);

template <typename T>
void keep_ls_host(const T* G, int64_t B, int64_t C, const int64_t* sizes, const int64_t* counts,
                  int64_t nmax, double ridge, int64_t* keep, double* weights, int num_threads,
                  int sim_threads = 0);

int omp_max_threads();

// ---- CUDA (greedy_cuda.cu; only when built with THINET_FAST_WITH_CUDA). G, order,
// errors, keep, weights are device pointers; sizes and counts are host arrays (copied
// to the device by the launcher). `stream` is a cudaStream_t as an integer (0 = legacy
// default stream). Errors are thrown as std::runtime_error.
template <typename T>
void greedy_remove_cuda(const T* G, int64_t B, int64_t C, const int64_t* sizes,
                        const int64_t* counts, int64_t nmax, int64_t* order, T* errors,
                        std::uintptr_t stream, int64_t max_shared_bytes);

template <typename T>
void keep_ls_cuda(const T* G, int64_t B, int64_t C, const int64_t* sizes, const int64_t* counts,
                  int64_t nmax, double ridge, int64_t* keep, double* weights,
                  std::uintptr_t stream);

// Threads per block used for a batch of width C (multiple of 32, 32..512). The cupy path
// mirrors this in cupy_backend.block_size.
inline int block_size_for(int64_t C) {
  int64_t t = ((C + 31) / 32) * 32;
  if (t < 32) t = 32;
  if (t > 512) t = 512;
  return static_cast<int>(t);
}

}  // namespace tf

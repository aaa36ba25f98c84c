// greedy_cuda.cu -- host launchers for the CUDA kernels of greedy_kernels.cuh.
//
// Every CUDA call and every launch is checked; a failure throws std::runtime_error
// (pybind11 turns it into a Python RuntimeError). Work is queued on the caller's stream;
// the only host-side waits are those of the pageable H2D copy of sizes/counts.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "greedy_api.h"
#include "greedy_kernels.cuh"

namespace tf {
namespace {

[[noreturn]] void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("thinet_fast._C: CUDA error in ") + what + " (" + file +
                           ":" + std::to_string(line) + "): " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

#define TF_CUDA_CHECK(expr)                                   \
  do {                                                        \
    cudaError_t tf_err_ = (expr);                             \
    if (tf_err_ != cudaSuccess) {                             \
      (void)cudaGetLastError(); /* clear a sticky-free error */ \
      throw_cuda(tf_err_, #expr, __FILE__, __LINE__);         \
    }                                                         \
  } while (0)

// Makes the device that owns `ptr` current for the scope (restores the previous one).
class DeviceGuard {
 public:
  explicit DeviceGuard(const void* ptr) {
    TF_CUDA_CHECK(cudaGetDevice(&prev_));
    cudaPointerAttributes attr{};
    TF_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      throw std::invalid_argument(
          "thinet_fast._C: the array is not in CUDA device memory (use the *_host function "
          "for host arrays)");
    }
    if (attr.device != prev_) {
      TF_CUDA_CHECK(cudaSetDevice(attr.device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

// Stream-ordered workspace: [sizes B][counts B] int64, then B slots of `stride` bytes.
class Workspace {
 public:
  Workspace(int64_t B, int64_t stride, cudaStream_t stream) : stream_(stream) {
    head_ = align(2 * B * (int64_t)sizeof(long long), 256);
    const int64_t bytes = head_ + B * stride;
    TF_CUDA_CHECK(cudaMallocAsync(&ptr_, (size_t)bytes, stream_));
  }
  ~Workspace() {
    if (ptr_) (void)cudaFreeAsync(ptr_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  long long* sizes() { return reinterpret_cast<long long*>(ptr_); }
  long long* counts(int64_t B) { return reinterpret_cast<long long*>(ptr_) + B; }
  unsigned char* scratch() { return static_cast<unsigned char*>(ptr_) + head_; }

  static int64_t align(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

 private:
  void* ptr_ = nullptr;
  int64_t head_ = 0;
  cudaStream_t stream_;
};

void upload_meta(Workspace& ws, int64_t B, const int64_t* sizes, const int64_t* counts,
                 cudaStream_t stream) {
  static_assert(sizeof(long long) == sizeof(int64_t), "int64 layout");
  TF_CUDA_CHECK(cudaMemcpyAsync(ws.sizes(), sizes, (size_t)B * sizeof(int64_t),
                                cudaMemcpyHostToDevice, stream));
  TF_CUDA_CHECK(cudaMemcpyAsync(ws.counts(B), counts, (size_t)B * sizeof(int64_t),
                                cudaMemcpyHostToDevice, stream));
}

}  // namespace

template <typename T>
void greedy_remove_cuda(const T* G, int64_t B, int64_t C, const int64_t* sizes,
                        const int64_t* counts, int64_t nmax, int64_t* order, T* errors,
                        std::uintptr_t stream_handle, int64_t max_shared_bytes) {
  if (B == 0 || nmax == 0) return;
  DeviceGuard guard(G);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t scratch = greedy_remove_scratch_bytes(C, sizeof(T));
  auto kernel = &tf_greedy_remove_kernel<T>;

  int64_t limit = max_shared_bytes;
  if (limit < 0) {
    int dev = 0, optin = 0;
    TF_CUDA_CHECK(cudaGetDevice(&dev));
    TF_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cudaFuncAttributes fattr{};
    TF_CUDA_CHECK(cudaFuncGetAttributes(&fattr, kernel));
    limit = (int64_t)optin - (int64_t)fattr.sharedSizeBytes;
  }
  const bool use_smem = scratch <= limit;
  const int64_t smem = use_smem ? scratch : 0;
  if (smem > 48 * 1024) {
    TF_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  Workspace ws(B, use_smem ? 0 : Workspace::align(scratch, 256), stream);
  upload_meta(ws, B, sizes, counts, stream);
  const int threads = block_size_for(C);
  kernel<<<(unsigned)B, threads, (size_t)smem, stream>>>(
      G, (long long)C, ws.sizes(), ws.counts(B), (long long)nmax,
      reinterpret_cast<long long*>(order), errors, ws.scratch(),
      (long long)Workspace::align(scratch, 256), use_smem ? 1 : 0);
  TF_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void keep_ls_cuda(const T* G, int64_t B, int64_t C, const int64_t* sizes, const int64_t* counts,
                  int64_t nmax, double ridge, int64_t* keep, double* weights,
                  std::uintptr_t stream_handle) {
  if (B == 0 || nmax == 0) return;
  DeviceGuard guard(G);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t stride = Workspace::align(keep_ls_scratch_bytes(C, nmax), 256);
  Workspace ws(B, stride, stream);
  upload_meta(ws, B, sizes, counts, stream);
  const int threads = block_size_for(C);
  tf_keep_ls_kernel<T><<<(unsigned)B, threads, 0, stream>>>(
      G, (long long)C, ws.sizes(), ws.counts(B), (long long)nmax, ridge,
      reinterpret_cast<long long*>(keep), weights, ws.scratch(), (long long)stride);
  TF_CUDA_CHECK(cudaGetLastError());
}

template void greedy_remove_cuda<float>(const float*, int64_t, int64_t, const int64_t*,
                                        const int64_t*, int64_t, int64_t*, float*,
                                        std::uintptr_t, int64_t);
template void greedy_remove_cuda<double>(const double*, int64_t, int64_t, const int64_t*,
                                         const int64_t*, int64_t, int64_t*, double*,
                                         std::uintptr_t, int64_t);
template void keep_ls_cuda<float>(const float*, int64_t, int64_t, const int64_t*,
                                  const int64_t*, int64_t, double, int64_t*, double*,
                                  std::uintptr_t);
template void keep_ls_cuda<double>(const double*, int64_t, int64_t, const int64_t*,
                                   const int64_t*, int64_t, double, int64_t*, double*,
                                   std::uintptr_t);

}  // namespace tf

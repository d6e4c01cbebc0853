// Just enough of CUDA to run the kernels of mlp_lopt_cuda.cu on CPU threads, for testing them where
// no GPU is (mlp_lopt_cuda_test.cc; never part of the op libraries). Blocks run one after another;
// each thread of a block is a std::thread, and __syncthreads() is a barrier of the block's threads
// that have not returned. Device memory is host memory.

#ifndef LO_TF_KERNELS_CUDA_EMULATION_H_
#define LO_TF_KERNELS_CUDA_EMULATION_H_

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__

using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim;

namespace lo_tf_emulation {

// A reusable barrier whose participants can leave (a returned CUDA thread no longer waits).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t phase = phase_;
    if (++arrived_ == count_) {
      Advance();
    } else {
      cv_.wait(lock, [&] { return phase_ != phase; });
    }
  }
  void Leave() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--count_ > 0 && arrived_ == count_) Advance();
  }

 private:
  void Advance() {
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int count_, arrived_ = 0;
  int64_t phase_ = 0;
};

inline thread_local Barrier* block_barrier = nullptr;
inline thread_local float* block_shared = nullptr;

// kernel<<<blocks, threads, bytes>>>(args...) as Launch{kernel, blocks, threads, bytes}(args...).
template <typename Kernel>
struct Launch {
  Kernel* kernel;
  int64_t blocks;
  int threads;
  size_t bytes;

  template <typename... Args>
  void operator()(Args... args) const {
    std::vector<float> shared(bytes / sizeof(float) + 1);
    for (int64_t b = 0; b < blocks; ++b) {
      Barrier barrier(threads);
      std::fill(shared.begin(), shared.end(), std::nanf(""));  // no reads of unwritten memory
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          blockIdx.x = static_cast<unsigned>(b);
          threadIdx.x = static_cast<unsigned>(t);
          blockDim.x = static_cast<unsigned>(threads);
          block_barrier = &barrier;
          block_shared = shared.data();
          kernel(args...);
          barrier.Leave();
        });
      }
      for (std::thread& thread : pool) thread.join();
    }
  }
};

}  // namespace lo_tf_emulation

inline void __syncthreads() { lo_tf_emulation::block_barrier->Wait(); }

#define LO_TF_LAUNCH(kernel, blocks, threads, bytes, stream) \
  lo_tf_emulation::Launch<decltype(kernel)>{kernel, blocks, threads, bytes}
#define LO_TF_SHARED_FLOATS(name) float* name = lo_tf_emulation::block_shared

// The runtime API the launchers use.
typedef int cudaError_t;
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlock, cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaMemcpyKind { cudaMemcpyHostToDevice };
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// The shared memory of an H100/H200 (48 KiB by default, 227 KiB opted in).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 227 * 1024 : 48 * 1024;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

#endif  // LO_TF_KERNELS_CUDA_EMULATION_H_

// GPU kernels of the MlpLoptStep and MlpLoptStepGrad ops (registered in mlp_lopt_ops.cc, whose
// library must be loaded first): they launch the CUDA kernels of mlp_lopt_cuda.cu on the op's
// stream. Built into a separate library only where nvcc is found, so that the CPU op never needs
// CUDA.

#if GOOGLE_CUDA

#include <cstring>
#include <vector>

#include "mlp_lopt.h"
#include "mlp_lopt_kernel.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/platform/mutex.h"
#include "xla/stream_executor/stream.h"

namespace lo_tf {
namespace {

template <bool kBackward>
class MlpLoptGpuKernel : public MlpLoptKernelBase {
 public:
  explicit MlpLoptGpuKernel(tf::OpKernelConstruction* ctx) : MlpLoptKernelBase(ctx, kBackward) {}

 protected:
  void Run(tf::OpKernelContext* ctx, Problem* p) override {
    void* stream = ctx->op_device_context()->stream()->platform_specific_handle().stream;
    const int64_t chunk_bytes = chunks_.size() * sizeof(Chunk);
    const int64_t size_bytes = segment_sizes_.size() * sizeof(int64_t);
    {
      // The chunk and tensor-size tables are static: copied to the device once per kernel.
      tf::mutex_lock lock(mu_);
      if (!table_.IsInitialized()) {
        std::vector<char> host(chunk_bytes + size_bytes);
        std::memcpy(host.data(), chunks_.data(), chunk_bytes);
        std::memcpy(host.data() + chunk_bytes, segment_sizes_.data(), size_bytes);
        tf::Tensor table;
        OP_REQUIRES_OK(ctx, ctx->allocate_temp(tf::DT_INT8, tf::TensorShape({int64_t(host.size())}),
                                               &table));
        const char* error = CudaCopyToDevice(stream, table.flat<tf::int8>().data(), host.data(),
                                             static_cast<int64_t>(host.size()));
        OP_REQUIRES(ctx, error == nullptr, tf::errors::Internal("MlpLoptStep copy: ", error));
        table_ = table;
      }
    }
    const char* base = reinterpret_cast<const char*>(table_.flat<tf::int8>().data());
    p->chunks = reinterpret_cast<const Chunk*>(base);
    p->segment_sizes = reinterpret_cast<const int64_t*>(base + chunk_bytes);
    const char* error = kBackward ? CudaBackward(stream, *p) : CudaForward(stream, *p);
    OP_REQUIRES(ctx, error == nullptr,
                tf::errors::Internal(kBackward ? "MlpLoptStepGrad" : "MlpLoptStep",
                                     " CUDA kernel: ", error));
  }

 private:
  tf::mutex mu_;
  tf::Tensor table_;  // Chunk [num_chunks] then int64 segment sizes, in device memory
};

REGISTER_KERNEL_BUILDER(Name("MlpLoptStep").Device(tf::DEVICE_GPU), MlpLoptGpuKernel<false>);
REGISTER_KERNEL_BUILDER(Name("MlpLoptStepGrad").Device(tf::DEVICE_GPU), MlpLoptGpuKernel<true>);

}  // namespace
}  // namespace lo_tf

#endif  // GOOGLE_CUDA

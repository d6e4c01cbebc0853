// The fused learned-optimizer step as TensorFlow ops (paper §4.1, App. C.1, App. F), and their CPU
// kernels: MlpLoptStep computes (new_w, new_m, new_v) exactly as MLPLOpt.reference_core does, and
// MlpLoptStepGrad its vector-Jacobian product for every input but t. The GPU kernels of the same
// ops are registered by a separate library (mlp_lopt_gpu.cc), built only where nvcc is found.

#include <string>

#include "mlp_lopt.h"
#include "mlp_lopt_kernel.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace lo_tf {
namespace {

using ::tensorflow::shape_inference::InferenceContext;

// The MLPLOpt hyperparameters (names as in MLPLOpt), the static weight-tensor sizes, the CPU kernel
// variant and the M·N from which the CPU passes use the thread pool (MlpLoptCpuKernel::Run).
#define LO_TF_MLP_LOPT_ATTRS                                                        \
  Attr("sizes: list(int) >= 1")                                                     \
      .Attr("hidden_size: int >= 1")                                                \
      .Attr("decays: list(float) >= 1")                                             \
      .Attr("time_scales: list(float) >= 1")                                        \
      .Attr("lambda_exp: float")                                                    \
      .Attr("lambda_lin: float")                                                    \
      .Attr("rms_epsilon: float")                                                   \
      .Attr("norm_epsilon: float")                                                  \
      .Attr("use_momentum: bool")                                                   \
      .Attr("use_rms: bool")                                                        \
      .Attr("use_time: bool")                                                       \
      .Attr("max_log_step: float")                                                  \
      .Attr("cpu_isa: {'auto', 'generic', 'avx2', 'avx512'} = 'auto'")              \
      .Attr("pool_min_weights: int >= 0 = 16384")

REGISTER_OP("MlpLoptStep")
    .Input("theta: float")  // [M, P]
    .Input("g: float")      // [M, N]
    .Input("w: float")      // [M, N]
    .Input("t: float")      // [M]
    .Input("m: float")      // [M, N, D or 0]
    .Input("v: float")      // [M, N, D or 0]
    .Output("new_w: float")
    .Output("new_m: float")
    .Output("new_v: float")
    .LO_TF_MLP_LOPT_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(2));
      c->set_output(1, c->input(4));
      c->set_output(2, c->input(5));
      return ::tensorflow::OkStatus();
    });

REGISTER_OP("MlpLoptStepGrad")
    .Input("theta: float")
    .Input("g: float")
    .Input("w: float")
    .Input("t: float")
    .Input("m: float")
    .Input("v: float")
    .Input("d_new_w: float")
    .Input("d_new_m: float")
    .Input("d_new_v: float")
    .Output("d_theta: float")
    .Output("d_g: float")
    .Output("d_w: float")
    .Output("d_m: float")
    .Output("d_v: float")
    .LO_TF_MLP_LOPT_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(2));
      c->set_output(3, c->input(4));
      c->set_output(4, c->input(5));
      return ::tensorflow::OkStatus();
    });

// The name of the CPU instruction-set variant that cpu_isa='auto' runs.
REGISTER_OP("MlpLoptCpuIsa")
    .Output("isa: string")
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape);

// The best compiled variant the running CPU (and OS) supports, or the one `isa` asks for; nullptr
// when that one cannot run here.
const CpuUnits* SelectUnits(const std::string& isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (isa == "avx512" || (isa == "auto" && has_avx512))
    return has_avx512 ? &avx512::Units() : nullptr;
  if (isa == "avx2" || (isa == "auto" && has_avx2)) return has_avx2 ? &avx2::Units() : nullptr;
#else
  if (isa != "auto" && isa != "generic") return nullptr;
#endif
  return &generic::Units();
}

template <bool kBackward>
class MlpLoptCpuKernel : public MlpLoptKernelBase {
 public:
  explicit MlpLoptCpuKernel(tf::OpKernelConstruction* ctx) : MlpLoptKernelBase(ctx, kBackward) {
    std::string isa;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("cpu_isa", &isa));
    units_ = SelectUnits(isa);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pool_min_weights", &pool_min_weights_));
    OP_REQUIRES(ctx, units_ != nullptr,
                tf::errors::InvalidArgument("cpu_isa=", isa, " is not supported by this CPU"));
  }

 protected:
  void Run(tf::OpKernelContext* ctx, Problem* p) override {
    p->chunks = chunks_.data();
    p->segment_sizes = segment_sizes_.data();
    // Below pool_min_weights (M·N) every pass runs on the calling thread: waking the pool's
    // threads three to five times per call costs more than they save on a small network. There
    // the features also stay in cache between the forward's two passes, so the step pass reads
    // them instead of transposing m, v and recomputing them.
    if (p->cfg->m * p->cfg->n < pool_min_weights_) {
      tf::Tensor features;
      if (!kBackward) {
        const int64_t floats = p->cfg->m * p->num_chunks * kChunk * p->cfg->num_weight_features;
        OP_REQUIRES_OK(ctx, ctx->allocate_temp(tf::DT_FLOAT, tf::TensorShape({floats}), &features));
        p->features = features.flat<float>().data();
      }
      RunCpuPasses(*units_, *p, kBackward, [](int64_t total, int64_t, auto fn) { fn(0, total); });
      return;
    }
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    RunCpuPasses(*units_, *p, kBackward, [pool](int64_t total, int64_t cost, auto fn) {
      pool->ParallelFor(total, cost, fn);
    });
  }

 private:
  const CpuUnits* units_ = nullptr;
  int64_t pool_min_weights_ = 0;
};

class MlpLoptCpuIsaKernel : public tf::OpKernel {
 public:
  using tf::OpKernel::OpKernel;
  void Compute(tf::OpKernelContext* ctx) override {
    tf::Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tf::TensorShape({}), &out));
    out->scalar<tf::tstring>()() = SelectUnits("auto")->isa;
  }
};

REGISTER_KERNEL_BUILDER(Name("MlpLoptStep").Device(tf::DEVICE_CPU), MlpLoptCpuKernel<false>);
REGISTER_KERNEL_BUILDER(Name("MlpLoptStepGrad").Device(tf::DEVICE_CPU), MlpLoptCpuKernel<true>);
REGISTER_KERNEL_BUILDER(Name("MlpLoptCpuIsa").Device(tf::DEVICE_CPU), MlpLoptCpuIsaKernel);

}  // namespace
}  // namespace lo_tf

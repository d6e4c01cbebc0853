// TensorFlow side shared by the CPU (mlp_lopt_ops.cc) and GPU (mlp_lopt_gpu.cc) op kernels:
// attribute parsing, input validation and scratch allocation. Each device's kernel class supplies
// Run(context, problem).

#ifndef LO_TF_KERNELS_MLP_LOPT_KERNEL_H_
#define LO_TF_KERNELS_MLP_LOPT_KERNEL_H_

#include <string>
#include <vector>

#include "mlp_lopt.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace lo_tf {

namespace tf = ::tensorflow;

class MlpLoptKernelBase : public tf::OpKernel {
 public:
  // `backward`: the kernel computes MlpLoptStepGrad (9 inputs, 5 outputs) instead of MlpLoptStep.
  MlpLoptKernelBase(tf::OpKernelConstruction* ctx, bool backward)
      : tf::OpKernel(ctx), backward_(backward) {
    Hyperparameters hp;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sizes", &segment_sizes_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("decays", &hp.decays));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("time_scales", &hp.time_scales));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("hidden_size", &hp.hidden_size));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_momentum", &hp.use_momentum));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_rms", &hp.use_rms));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_time", &hp.use_time));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("lambda_exp", &hp.lambda_exp));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("lambda_lin", &hp.lambda_lin));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rms_epsilon", &hp.rms_epsilon));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("norm_epsilon", &hp.norm_epsilon));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_log_step", &hp.max_log_step));
    const std::string error = Plan(hp, segment_sizes_, &config_, &chunks_);
    OP_REQUIRES(ctx, error.empty(), tf::errors::InvalidArgument(error));
  }

  void Compute(tf::OpKernelContext* ctx) override {
    const tf::Tensor& theta = ctx->input(0);
    const tf::Tensor& g = ctx->input(1);
    const tf::Tensor& w = ctx->input(2);
    const tf::Tensor& t = ctx->input(3);
    const tf::Tensor& m = ctx->input(4);
    const tf::Tensor& v = ctx->input(5);
    OP_REQUIRES(ctx, theta.dims() == 2 && theta.dim_size(1) == config_.num_params,
                tf::errors::InvalidArgument("theta must be [M, ", config_.num_params, "], got ",
                                            theta.shape().DebugString()));
    const int64_t num_traj = theta.dim_size(0);
    const tf::TensorShape flat({num_traj, config_.n});
    OP_REQUIRES(ctx, g.shape() == flat && w.shape() == flat,
                tf::errors::InvalidArgument("g and w must be ", flat.DebugString(), ", got ",
                                            g.shape().DebugString(), " and ",
                                            w.shape().DebugString()));
    OP_REQUIRES(ctx, t.shape() == tf::TensorShape({num_traj}),
                tf::errors::InvalidArgument("t must be [", num_traj, "]"));
    const tf::TensorShape m_shape({num_traj, config_.n, config_.depth_m});
    const tf::TensorShape v_shape({num_traj, config_.n, config_.depth_v});
    OP_REQUIRES(ctx, m.shape() == m_shape && v.shape() == v_shape,
                tf::errors::InvalidArgument("m and v must be ", m_shape.DebugString(), " and ",
                                            v_shape.DebugString(), ", got ",
                                            m.shape().DebugString(), " and ",
                                            v.shape().DebugString()));
    Config cfg = config_;
    cfg.m = num_traj;
    Problem p{};
    p.cfg = &cfg;
    p.num_chunks = static_cast<int64_t>(chunks_.size());
    p.num_segments = static_cast<int64_t>(segment_sizes_.size());
    p.theta = theta.flat<float>().data();
    p.g = g.flat<float>().data();
    p.w = w.flat<float>().data();
    p.t = t.flat<float>().data();
    p.m = m.flat<float>().data();
    p.v = v.flat<float>().data();
    const int64_t units = num_traj * p.num_chunks;
    const int64_t nw = cfg.num_weight_features;
    tf::Tensor sum_squares, scale, bias, partials, correction;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tf::DT_DOUBLE, tf::TensorShape({units * nw}),
                                           &sum_squares));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                            tf::DT_FLOAT, tf::TensorShape({num_traj * p.num_segments * nw}), &scale));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tf::DT_FLOAT, tf::TensorShape({num_traj * cfg.hidden}),
                                           &bias));
    p.sum_squares = sum_squares.flat<double>().data();
    p.scale = scale.flat<float>().data();
    p.bias = bias.flat<float>().data();
    if (!backward_) {
      tf::Tensor *new_w, *new_m, *new_v;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, w.shape(), &new_w));
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1, m.shape(), &new_m));
      OP_REQUIRES_OK(ctx, ctx->allocate_output(2, v.shape(), &new_v));
      p.new_w = new_w->flat<float>().data();
      p.new_m = new_m->flat<float>().data();
      p.new_v = new_v->flat<float>().data();
    } else {
      const tf::Tensor& d_new_w = ctx->input(6);
      const tf::Tensor& d_new_m = ctx->input(7);
      const tf::Tensor& d_new_v = ctx->input(8);
      OP_REQUIRES(ctx, d_new_w.shape() == w.shape() && d_new_m.shape() == m.shape() &&
                           d_new_v.shape() == v.shape(),
                  tf::errors::InvalidArgument("upstream gradients must have the outputs' shapes"));
      p.d_new_w = d_new_w.flat<float>().data();
      p.d_new_m = d_new_m.flat<float>().data();
      p.d_new_v = d_new_v.flat<float>().data();
      tf::Tensor* out[5];
      for (int k = 0; k < 5; ++k) {
        const int input = k < 3 ? k : k + 1;  // d_theta, d_g, d_w, d_m, d_v (no gradient for t)
        OP_REQUIRES_OK(ctx, ctx->allocate_output(k, ctx->input(input).shape(), &out[k]));
      }
      p.d_theta = out[0]->flat<float>().data();
      p.d_g = out[1]->flat<float>().data();
      p.d_w = out[2]->flat<float>().data();
      p.d_m = out[3]->flat<float>().data();
      p.d_v = out[4]->flat<float>().data();
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tf::DT_FLOAT,
                                             tf::TensorShape({units * cfg.partial_size()}),
                                             &partials));
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                              tf::DT_FLOAT, tf::TensorShape({num_traj * p.num_segments * nw}),
                              &correction));
      p.partials = partials.flat<float>().data();
      p.correction = correction.flat<float>().data();
    }
    Run(ctx, &p);
  }

 protected:
  // Computes the step (or its gradient) of `p`; p->chunks and p->segment_sizes are still unset.
  virtual void Run(tf::OpKernelContext* ctx, Problem* p) = 0;

  const bool backward_;
  Config config_;  // all but the number of trajectories m
  std::vector<Chunk> chunks_;
  std::vector<int64_t> segment_sizes_;
};

}  // namespace lo_tf

#endif  // LO_TF_KERNELS_MLP_LOPT_KERNEL_H_

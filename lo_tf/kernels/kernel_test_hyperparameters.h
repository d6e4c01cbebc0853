// The hyperparameters the kernel test programs (mlp_lopt_cuda_test.cc, mlp_lopt_cuda_harness.cu)
// run: the paper's MLPLOpt (hidden 32, 5 decays, 9 time scales: F = 31 features, θ of 1,090 floats)
// with λ_exp = 0.3, λ_lin = 0.05 (instead of 1e-3) so that the step is not negligible next to w.
#ifndef LO_TF_KERNELS_KERNEL_TEST_HYPERPARAMETERS_H_
#define LO_TF_KERNELS_KERNEL_TEST_HYPERPARAMETERS_H_

#include "mlp_lopt.h"

namespace lo_tf {

inline Hyperparameters PaperTestHyperparameters() {
  Hyperparameters hp;
  hp.hidden_size = 32;
  hp.decays = {0.5f, 0.9f, 0.99f, 0.999f, 0.9999f};
  hp.time_scales = {3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e5};
  hp.lambda_exp = 0.3f;
  hp.lambda_lin = 0.05f;
  hp.rms_epsilon = 1e-6f;
  hp.norm_epsilon = 1e-5f;
  hp.max_log_step = 10.0f;
  return hp;
}

}  // namespace lo_tf

#endif  // LO_TF_KERNELS_KERNEL_TEST_HYPERPARAMETERS_H_

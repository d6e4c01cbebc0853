// Checks the CUDA kernels of mlp_lopt_cuda.cu, run on CPU threads (cuda_emulation.h), against the
// generic CPU units on random steps and gradients of several configurations. Built and run by
// tests/test_kernels.py:
//   c++ -std=c++17 -O1 -pthread -DLO_TF_ISA=generic mlp_lopt_cpu.cc mlp_lopt_cuda_test.cc
// Prints one line per configuration; exits with status 1 if any result disagrees.

#define LO_TF_CUDA_EMULATION
#include "mlp_lopt_cuda.cu"
#include "kernel_test_hyperparameters.h"

#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

using lo_tf::Chunk;
using lo_tf::Config;
using lo_tf::Hyperparameters;
using lo_tf::Problem;

struct Case {
  std::string name;
  Hyperparameters hp;
  int64_t m;
  std::vector<int64_t> sizes;
};

// The kernel tests' hyperparameters (kernel_test_hyperparameters.h).
Hyperparameters Paper() { return lo_tf::PaperTestHyperparameters(); }

std::vector<Case> Cases() {
  std::vector<Case> cases = {{"paper", Paper(), 2, {12, 1, 600}}};
  Hyperparameters hp = Paper();
  hp.use_momentum = false;
  cases.push_back({"no_momentum", hp, 2, {5, 130}});
  hp = Paper();
  hp.use_rms = false;
  cases.push_back({"no_rms", hp, 2, {5, 130}});
  hp.use_momentum = false;
  cases.push_back({"only_grads", hp, 2, {5, 130}});
  hp = Paper();
  hp.use_time = false;
  cases.push_back({"no_time", hp, 1, {5, 130}});
  hp = Paper();
  hp.hidden_size = 5;
  hp.decays = {0.3f, 0.8f, 0.95f};
  hp.time_scales = {2.0f, 50.0f};
  cases.push_back({"other_hyperparameters", hp, 3, {7, 1, 65}});
  hp = Paper();
  hp.decays = {0.1f, 0.3f, 0.5f, 0.7f, 0.9f, 0.95f, 0.99f};
  hp.hidden_size = 3;
  cases.push_back({"seven_decays", hp, 2, {66, 2}});
  hp = Paper();
  hp.hidden_size = 100;  // the backward kernel opts in to more than 48 KiB of shared memory
  cases.push_back({"wide", hp, 1, {40}});
  hp = Paper();
  hp.lambda_exp = 30.0f;
  cases.push_back({"clipped_log_step", hp, 2, {40, 9}});
  return cases;
}

// The tensors and scratch of one step, and the Problem pointing at them.
struct Step {
  Step(const Config& config, const std::vector<Chunk>& chunk_list,
       const std::vector<int64_t>& sizes, uint32_t seed)
      : c(config), chunks(chunk_list), segment_sizes(sizes) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> uniform(0.0f, 1e-4f);
    const int64_t n = c.m * c.n;
    auto fill = [&](int64_t size, float scale) {
      std::vector<float> x(size);
      for (float& e : x) e = scale * normal(rng);
      return x;
    };
    theta = fill(c.m * c.num_params, 0.3f);
    g = fill(n, 0.01f);
    w = fill(n, 1.0f);
    m = fill(n * c.depth_m, 0.01f);
    v.resize(n * c.depth_v);
    for (float& e : v) e = uniform(rng);
    for (int64_t i = 0; i < c.m; ++i) t.push_back(static_cast<float>(rng() % 500));
    d_new_w = fill(n, 1.0f);
    d_new_m = fill(n * c.depth_m, 1.0f);
    d_new_v = fill(n * c.depth_v, 1.0f);
    new_w.resize(n);
    new_m.resize(n * c.depth_m);
    new_v.resize(n * c.depth_v);
    d_theta.resize(theta.size());
    d_g.resize(n);
    d_w.resize(n);
    d_m.resize(m.size());
    d_v.resize(v.size());
    const int64_t units = c.m * chunks.size(), nw = c.num_weight_features;
    sum_squares.resize(units * nw);
    scale.resize(c.m * sizes.size() * nw);
    bias.resize(c.m * c.hidden);
    partials.resize(units * c.partial_size());
    correction.resize(scale.size());
  }

  Problem Make(bool backward) {
    Problem p{};
    p.cfg = &c;
    p.chunks = chunks.data();
    p.num_chunks = static_cast<int64_t>(chunks.size());
    p.segment_sizes = segment_sizes.data();
    p.num_segments = static_cast<int64_t>(segment_sizes.size());
    p.theta = theta.data();
    p.g = g.data();
    p.w = w.data();
    p.t = t.data();
    p.m = m.data();
    p.v = v.data();
    if (backward) {
      p.d_new_w = d_new_w.data();
      p.d_new_m = d_new_m.data();
      p.d_new_v = d_new_v.data();
      p.d_theta = d_theta.data();
      p.d_g = d_g.data();
      p.d_w = d_w.data();
      p.d_m = d_m.data();
      p.d_v = d_v.data();
    } else {
      p.new_w = new_w.data();
      p.new_m = new_m.data();
      p.new_v = new_v.data();
    }
    p.sum_squares = sum_squares.data();
    p.scale = scale.data();
    p.bias = bias.data();
    p.partials = partials.data();
    p.correction = correction.data();
    return p;
  }

  std::vector<std::vector<float>> Outputs(bool backward) const {
    if (backward) return {d_theta, d_g, d_w, d_m, d_v};
    return {new_w, new_m, new_v};
  }

  Config c;
  std::vector<Chunk> chunks;
  std::vector<int64_t> segment_sizes;
  std::vector<float> theta, g, w, t, m, v, d_new_w, d_new_m, d_new_v, new_w, new_m, new_v,
      d_theta, d_g, d_w, d_m, d_v, scale, bias, partials, correction;
  std::vector<double> sum_squares;
};

// max |a - b| / max(1, max |b|) over the arrays.
double Error(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  double worst = 0.0;
  for (size_t k = 0; k < a.size(); ++k) {
    double diff = 0.0, size = 1.0;
    for (size_t e = 0; e < a[k].size(); ++e) {
      diff = std::max(diff, static_cast<double>(std::fabs(a[k][e] - b[k][e])));
      size = std::max(size, static_cast<double>(std::fabs(b[k][e])));
      if (std::isnan(a[k][e]) != std::isnan(b[k][e])) diff = INFINITY;
    }
    worst = std::max(worst, diff / size);
  }
  return worst;
}

}  // namespace

int main() {
  bool ok = true;
  for (const Case& test : Cases()) {
    Config c;
    std::vector<Chunk> chunks;
    const std::string error = lo_tf::Plan(test.hp, test.sizes, &c, &chunks);
    if (!error.empty()) {
      std::printf("%s: bad case: %s\n", test.name.c_str(), error.c_str());
      return 1;
    }
    c.m = test.m;
    double errors[2];
    for (const bool backward : {false, true}) {
      Step cpu(c, chunks, test.sizes, 17), gpu(c, chunks, test.sizes, 17);
      lo_tf::RunCpuPasses(lo_tf::generic::Units(), cpu.Make(backward), backward,
                          [](int64_t total, int64_t, auto fn) { fn(0, total); });
      const Problem p = gpu.Make(backward);
      const char* failure = backward ? lo_tf::CudaBackward(nullptr, p)
                                     : lo_tf::CudaForward(nullptr, p);
      if (failure) {
        std::printf("%s: CUDA launcher failed: %s\n", test.name.c_str(), failure);
        return 1;
      }
      errors[backward] = Error(gpu.Outputs(backward), cpu.Outputs(backward));
    }
    const bool agree = errors[0] <= 1e-5 && errors[1] <= 1e-4;
    ok = ok && agree;
    std::printf("%s: %s (forward error %.2g, backward error %.2g)\n", test.name.c_str(),
                agree ? "agree" : "DISAGREE", errors[0], errors[1]);
  }
  return ok ? 0 : 1;
}

// The fused learned-optimizer step (paper §4.1, App. C.1, App. F): what the CPU compute units, the
// CUDA kernels and the TensorFlow op kernels share. No TensorFlow or CUDA headers here, so that
// every variant of the CPU units (one per instruction set) and the .cu file compile without them.
//
// Definitions (per trajectory i, per weight tensor s of L elements, per element n; D decays β_k):
//   m'_k = β_k m_k + (1 - β_k) g        v'_k = β_k v_k + (1 - β_k) g²      r_k = rsqrt(v'_k + ε_r)
//   x = [g, w, m'_1..D, v'_1..D, r_1..D, (r·m')_1..D]   (groups absent when switched off)
//   x̂_j = x_j · q_sj,  q_sj = rsqrt(ε_n + mean_{n in s} x_j²)
//   z = W1[:nw]ᵀ x̂ + b1 + W1[nw:]ᵀ τ,  τ_f = tanh(t/η_f - 1)
//   o = W2ᵀ relu(z) + b2,  step = exp(min(λ_exp o_0, max_log_step)) · λ_lin · o_1,  w' = w - step
// θ packs W1 [F, H], b1 [H], W2 [H, 2], b2 [2] row-major, F = nw + (number of time scales if on).

#ifndef LO_TF_KERNELS_MLP_LOPT_H_
#define LO_TF_KERNELS_MLP_LOPT_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#ifdef __CUDACC__
#define LO_TF_HOST_DEVICE __host__ __device__
#else
#define LO_TF_HOST_DEVICE
#endif

namespace lo_tf {

// Bounds of the hyperparameter lists (they live in fixed arrays of Config, which the CUDA kernels
// take by value); the hidden size is unbounded.
constexpr int kMaxDecays = 16;
constexpr int kMaxTimeScales = 64;
constexpr int kMaxWeightFeatures = 2 + 4 * kMaxDecays;
// Elements per work unit: a unit never crosses a weight tensor, so its partial sums belong to one
// tensor; units are fixed by the sizes alone, so the results do not depend on the thread count.
constexpr int kChunk = 512;
// Elements of a CPU block (mlp_lopt_cpu.cc): the granularity of Problem::features.
constexpr int kCpuBlock = 64;

struct Config {
  int64_t m = 0;  // trajectories
  int64_t n = 0;  // weights per trajectory
  int num_decays = 0;
  int depth_m = 0, depth_v = 0;  // last axis of m and v: num_decays, or 0 when the group is off
  int num_weight_features = 0;   // nw
  int num_time_scales = 0;       // time features fed (0 when use_time is off)
  int hidden = 0;
  int num_features = 0;          // F
  int64_t num_params = 0;        // P
  bool use_momentum = true, use_rms = true;
  float decays[kMaxDecays] = {};
  float time_scales[kMaxTimeScales] = {};
  float lambda_exp = 0, lambda_lin = 0, rms_epsilon = 0, norm_epsilon = 0, max_log_step = 0;

  // Offsets into θ.
  LO_TF_HOST_DEVICE int64_t b1_offset() const { return int64_t{num_features} * hidden; }
  LO_TF_HOST_DEVICE int64_t w2_offset() const { return b1_offset() + hidden; }
  LO_TF_HOST_DEVICE int64_t b2_offset() const { return w2_offset() + 2 * int64_t{hidden}; }
  // Floats of one unit's partial backward sums: dW1 (weight rows), Σdz, dW2, db2, A (see below).
  LO_TF_HOST_DEVICE int64_t partial_size() const {
    return int64_t{num_weight_features} * hidden + 3 * int64_t{hidden} + 2 + num_weight_features;
  }
};

// A run of elements [start, start + length) of weight tensor `segment`, within one trajectory.
struct Chunk {
  int64_t start;
  int32_t length;
  int32_t segment;
};

// One call's tensors (flat, row-major as in the op's shapes) and scratch buffers. Work units are
// u = i * num_chunks + c for trajectory i and chunk c.
struct Problem {
  const Config* cfg;
  const Chunk* chunks;
  int64_t num_chunks;
  const int64_t* segment_sizes;  // [num_segments]
  int64_t num_segments;
  // Inputs.
  const float *theta, *g, *w, *t, *m, *v;
  // Upstream gradients of (new_w, new_m, new_v) (backward only).
  const float *d_new_w, *d_new_m, *d_new_v;
  // Forward outputs.
  float *new_w, *new_m, *new_v;
  // Backward outputs.
  float *d_theta, *d_g, *d_w, *d_m, *d_v;
  // Scratch: per-unit sums of x_j² [M·C, nw] (double), per-tensor scales q_sj [M, S, nw], first-layer
  // bias with the time features folded in [M, H], per-unit backward partials [M·C, partial_size],
  // per-tensor normalization-gradient coefficients [M, S, nw].
  double* sum_squares;
  float *scale, *bias, *partials, *correction;
  // Optional (forward, CPU): every block's raw features [M·C, kChunk / kB blocks, nw, kB], written
  // by the statistics pass and read by the step pass instead of recomputing them (null: recompute).
  float* features;
};

// The CPU compute units, compiled once per instruction set (mlp_lopt_cpu.cc). Each `*_units`
// function processes work units [begin, end); each `*_trajectories` function trajectories
// [begin, end). A pass runs over all units before the next starts.
//   forward:  stats_units (writes new_m, new_v when non-null) -> finish_stats_trajectories
//             -> step_units
//   backward: stats_units -> finish_stats_trajectories -> backward_units
//             -> finish_backward_trajectories -> correction_units
struct CpuUnits {
  const char* isa;
  void (*stats_units)(const Problem&, int64_t begin, int64_t end);
  void (*finish_stats_trajectories)(const Problem&, int64_t begin, int64_t end);
  void (*step_units)(const Problem&, int64_t begin, int64_t end);
  void (*backward_units)(const Problem&, int64_t begin, int64_t end);
  void (*finish_backward_trajectories)(const Problem&, int64_t begin, int64_t end);
  void (*correction_units)(const Problem&, int64_t begin, int64_t end);
};

namespace generic { const CpuUnits& Units(); }
#if defined(__x86_64__)
namespace avx2 { const CpuUnits& Units(); }
namespace avx512 { const CpuUnits& Units(); }
#endif

// MLPLOpt's hyperparameters, as the ops' attributes carry them.
struct Hyperparameters {
  int64_t hidden_size = 0;
  std::vector<float> decays, time_scales;
  bool use_momentum = true, use_rms = true, use_time = true;
  float lambda_exp = 0, lambda_lin = 0, rms_epsilon = 0, norm_epsilon = 0, max_log_step = 0;
};

// Fills the Config (all but the number of trajectories) and the work units of a step over weight
// tensors of `sizes` elements; returns what is wrong with the arguments, or "".
inline std::string Plan(const Hyperparameters& hp, const std::vector<int64_t>& sizes, Config* c,
                        std::vector<Chunk>* chunks) {
  if (hp.decays.size() > kMaxDecays) return "at most " + std::to_string(kMaxDecays) + " decays";
  if (hp.time_scales.size() > kMaxTimeScales)
    return "at most " + std::to_string(kMaxTimeScales) + " time scales";
  if (hp.hidden_size < 1) return "hidden_size must be positive";
  *c = Config();
  c->use_momentum = hp.use_momentum;
  c->use_rms = hp.use_rms;
  c->num_decays = static_cast<int>(hp.decays.size());
  std::copy(hp.decays.begin(), hp.decays.end(), c->decays);
  c->num_time_scales = hp.use_time ? static_cast<int>(hp.time_scales.size()) : 0;
  std::copy(hp.time_scales.begin(), hp.time_scales.begin() + c->num_time_scales, c->time_scales);
  c->depth_m = hp.use_momentum ? c->num_decays : 0;
  c->depth_v = hp.use_rms ? c->num_decays : 0;
  c->num_weight_features =
      2 + c->num_decays * (hp.use_momentum + 2 * hp.use_rms + (hp.use_momentum && hp.use_rms));
  c->hidden = static_cast<int>(hp.hidden_size);
  c->num_features = c->num_weight_features + c->num_time_scales;
  c->num_params = int64_t{c->num_features} * c->hidden + 3 * int64_t{c->hidden} + 2;
  c->lambda_exp = hp.lambda_exp;
  c->lambda_lin = hp.lambda_lin;
  c->rms_epsilon = hp.rms_epsilon;
  c->norm_epsilon = hp.norm_epsilon;
  c->max_log_step = hp.max_log_step;
  chunks->clear();
  for (size_t s = 0; s < sizes.size(); ++s) {
    if (sizes[s] < 1) return "sizes must be positive";
    for (int64_t start = 0; start < sizes[s]; start += kChunk)
      chunks->push_back({c->n + start, static_cast<int32_t>(std::min<int64_t>(kChunk, sizes[s] - start)),
                         static_cast<int32_t>(s)});
    c->n += sizes[s];
  }
  return "";
}

// Runs the passes of a step (or of its gradient when `backward`) with the CPU units `u`;
// parallel_for(total, cost_per_unit, fn) calls fn(begin, end) over ranges covering [0, total).
template <typename ParallelFor>
void RunCpuPasses(const CpuUnits& u, const Problem& p, bool backward, ParallelFor parallel_for) {
  const Config& c = *p.cfg;
  const int64_t units = c.m * p.num_chunks;
  // Rough cycles per unit, for the thread pool's sharding.
  const int64_t features = int64_t{kChunk} * 8 * c.num_weight_features;
  const int64_t mlp = int64_t{kChunk} * 2 * c.hidden * (c.num_weight_features + 2) + features;
  const int64_t finish = p.num_chunks * (c.num_weight_features + c.hidden * 4);
  parallel_for(units, features, [&](int64_t b, int64_t e) { u.stats_units(p, b, e); });
  parallel_for(c.m, finish, [&](int64_t b, int64_t e) { u.finish_stats_trajectories(p, b, e); });
  if (!backward) {
    parallel_for(units, mlp, [&](int64_t b, int64_t e) { u.step_units(p, b, e); });
    return;
  }
  parallel_for(units, 3 * mlp, [&](int64_t b, int64_t e) { u.backward_units(p, b, e); });
  parallel_for(c.m, finish * c.num_weight_features * c.hidden,
               [&](int64_t b, int64_t e) { u.finish_backward_trajectories(p, b, e); });
  parallel_for(units, 2 * features, [&](int64_t b, int64_t e) { u.correction_units(p, b, e); });
}

// The CUDA kernels (mlp_lopt_cuda.cu); `stream` is a cudaStream_t. The device buffers of `p` are as
// above, plus `chunks` and `segment_sizes` in device memory. Return a CUDA error string or nullptr.
const char* CudaForward(void* stream, const Problem& p);
const char* CudaBackward(void* stream, const Problem& p);
// Copies `bytes` from host to device on `stream` and waits for it (used once per kernel instance).
const char* CudaCopyToDevice(void* stream, void* device_dst, const void* host_src, int64_t bytes);

}  // namespace lo_tf

#endif  // LO_TF_KERNELS_MLP_LOPT_H_

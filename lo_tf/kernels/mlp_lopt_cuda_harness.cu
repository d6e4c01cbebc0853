// Standalone check of the CUDA kernels of mlp_lopt_cuda.cu, without TensorFlow: runs CudaForward
// and CudaBackward on random weights, gradients and optimizer states of several shapes (paper
// hyperparameters, θ of 1,090 floats), compares every output with the CPU units (mlp_lopt_cpu.cc,
// generic build) run on the same inputs in this process, times both with CUDA events (warm-up,
// then the median of the timed runs), and times a plain device-to-device copy in the same run, the
// memory-bandwidth bound for the bytes the step must read and write. Writes JSON (--json PATH).
//
// One source, two builds (third_party/tf_custom_op/gpu_check.sh runs them; plain command lines, not
// CMake: two compiler calls each, and a fresh GPU machine need not have CMake):
//   cpu.o:    c++ -O3 -std=c++17 -fopenmp-simd -ffp-contract=fast -fno-math-errno
//                 -DLO_TF_ISA=generic -c mlp_lopt_cpu.cc -o cpu.o   (the op's generic CPU flags)
//   GPU:      nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=[sm_90,compute_90]
//                 mlp_lopt_cuda_harness.cu cpu.o -o harness
//             (compiles the real mlp_lopt_cuda.cu, included below, with the op library's nvcc flags;
//             gpu_check.sh picks the -gencode of the GPU that nvidia-smi reports)
//   CPU only: c++ -std=c++17 -O2 -pthread -x c++ mlp_lopt_cuda_harness.cu -x none cpu.o -o harness
//             (no nvcc: __CUDACC__ is undefined, so the CUDA kernels run on emulated threads,
//             cuda_emulation.h, as in mlp_lopt_cuda_test.cc; timings are then host-clock times of
//             the emulation and of memcpy, not GPU numbers, and 10^7 weights is skipped by default)
// tests/test_gpu_harness.py builds and runs the CPU-only build.
//
// Agreement: for each output, max_e |gpu_e - cpu_e| / max_e |cpu_e| (relative to the output's
// largest magnitude; an element-wise relative error is meaningless where new_w or a gradient
// crosses zero). Also compared: the step w - new_w, which the MLP alone determines. In the
// per-element gradients (d_g, d_w, d_m, d_v) an element whose hidden pre-activation z_h lies
// within float rounding of the ReLU kink may take the other branch on the GPU (a jump of one
// hidden unit's contribution); such elements are counted and excused only after checking z_h in
// double from the inputs (AtReluKink). Exit status: 0 all agree, 1 some output disagrees, 2 an
// error, 3 no CUDA device (GPU build).

#ifndef __CUDACC__
#define LO_TF_CUDA_EMULATION
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#ifdef LO_TF_CUDA_EMULATION
#include "mlp_lopt_cuda.cu"
#include "kernel_test_hyperparameters.h"
#else
#include <cuda_runtime.h>

namespace lo_tf_harness {

// While `launch_records` is set, every kernel launch of mlp_lopt_cuda.cu is bracketed by two CUDA
// events (the per-kernel breakdown): LO_TF_LAUNCH below makes a LaunchTimer temporary whose
// constructor records before the launch and whose destructor, at the end of the launch's full
// expression, records after it.
struct LaunchRecord {
  const char* name;
  cudaEvent_t start, stop;
};
std::vector<LaunchRecord>* launch_records = nullptr;

class LaunchTimer {
 public:
  LaunchTimer(const char* name, cudaStream_t stream) : stream_(stream) {
    if (!launch_records) return;
    record_.name = name;
    cudaEventCreate(&record_.start);
    cudaEventCreate(&record_.stop);
    cudaEventRecord(record_.start, stream_);
  }
  ~LaunchTimer() {
    if (!launch_records) return;
    cudaEventRecord(record_.stop, stream_);
    launch_records->push_back(record_);
  }

 private:
  cudaStream_t stream_;
  LaunchRecord record_{};
};

}  // namespace lo_tf_harness

#define LO_TF_LAUNCH(kernel, blocks, threads, bytes, stream) \
  ::lo_tf_harness::LaunchTimer(#kernel, stream), kernel<<<blocks, threads, bytes, stream>>>
#include "mlp_lopt_cuda.cu"
#include "kernel_test_hyperparameters.h"
#endif

namespace lo_tf_harness {
namespace {

using lo_tf::Chunk;
using lo_tf::Config;
using lo_tf::Hyperparameters;
using lo_tf::Problem;

// Tolerances of the agreement (relative to each output's largest magnitude). The step's outputs:
// 1e-5. Its gradient: the CPU tests' 1e-4 (mlp_lopt_cuda_test.cc; test_kernels.py: rtol 2e-4),
// because the gradient of a tensor of one weight is ill-conditioned: the per-tensor normalization
// of a single element, x̂ = x / sqrt(ε_n + x²), has the derivative ε_n / (ε_n + x²)^(3/2), ~1e-11
// for the r features (r ~ 100), the cancellation of its direct and indirect paths, so d_v (which
// takes d_r · r³/2) is float32 rounding noise of both implementations there, ~1e-5 of its
// magnitude (1.6e-5 measured under emulation). Every pass also reports whether all its outputs are
// within the strict 1e-5 (within_strict_tolerance).
constexpr double kForwardTolerance = 1e-5;
constexpr double kBackwardTolerance = 1e-4;
constexpr double kStrictTolerance = 1e-5;
// |z_h| <= kKinkTolerance · (|bias_h| + Σ_j |W1[j,h] x_j q_j|): within rounding of the ReLU kink.
// Float sums of the 23 terms in different orders, and features differing by an ulp or two, move z_h
// by at most ~2e-6 of that magnitude.
constexpr double kKinkTolerance = 1e-5;

#ifdef LO_TF_CUDA_EMULATION
constexpr bool kEmulated = true;
const char* const kMode = "emulated";
#else
constexpr bool kEmulated = false;
const char* const kMode = "gpu";
#endif

[[noreturn]] void Fail(const std::string& message) {
  std::fprintf(stderr, "mlp_lopt_cuda_harness: %s\n", message.c_str());
  std::exit(2);
}

// Milliseconds of fn() on the host clock (the CPU reference).
template <typename Fn>
double HostMs(Fn fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// ---- Device memory and timing: CUDA where built by nvcc, host memory and clock under emulation.

#ifdef LO_TF_CUDA_EMULATION
void* DeviceAlloc(size_t bytes) {
  void* p = std::malloc(bytes ? bytes : 1);
  if (!p) Fail("out of host memory");
  return p;
}
void DeviceFree(void* p) { std::free(p); }
void ToDevice(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
void ToHost(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
void DeviceFill(void* dst, int byte, size_t bytes) { std::memset(dst, byte, bytes); }
void DeviceCopy(void* dst, const void* src, size_t bytes, cudaStream_t) {
  std::memcpy(dst, src, bytes);
}
void Synchronize(cudaStream_t) {}
// Milliseconds of fn() (host clock: the emulated kernels run synchronously).
template <typename Fn>
double TimeMs(cudaStream_t, Fn fn) {
  return HostMs(fn);
}
#else
void CudaCheck(cudaError_t error, const char* what) {
  if (error != cudaSuccess) Fail(std::string(what) + ": " + cudaGetErrorString(error));
}
void* DeviceAlloc(size_t bytes) {
  void* p = nullptr;
  CudaCheck(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc");
  return p;
}
void DeviceFree(void* p) { CudaCheck(cudaFree(p), "cudaFree"); }
void ToDevice(void* dst, const void* src, size_t bytes) {
  CudaCheck(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
}
void ToHost(void* dst, const void* src, size_t bytes) {
  CudaCheck(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}
void DeviceFill(void* dst, int byte, size_t bytes) {
  CudaCheck(cudaMemset(dst, byte, bytes), "cudaMemset");
}
void DeviceCopy(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  CudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream),
            "cudaMemcpyAsync device to device");
}
void Synchronize(cudaStream_t stream) {
  CudaCheck(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}
// Milliseconds between CUDA events recorded on `stream` before and after fn().
template <typename Fn>
double TimeMs(cudaStream_t stream, Fn fn) {
  cudaEvent_t start, stop;
  CudaCheck(cudaEventCreate(&start), "cudaEventCreate");
  CudaCheck(cudaEventCreate(&stop), "cudaEventCreate");
  CudaCheck(cudaEventRecord(start, stream), "cudaEventRecord");
  fn();
  CudaCheck(cudaEventRecord(stop, stream), "cudaEventRecord");
  CudaCheck(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0.0f;
  CudaCheck(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms;
}
#endif

// ---- Small helpers.

// Calls fn(begin, end) on up to `threads` std::threads over ranges covering [0, total).
template <typename Fn>
void ParallelFor(int threads, int64_t total, Fn fn) {
  const int64_t count = std::max<int64_t>(1, std::min<int64_t>(threads, total));
  if (count == 1) {
    fn(int64_t{0}, total);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t k = 0; k < count; ++k)
    pool.emplace_back([&, k] { fn(total * k / count, total * (k + 1) / count); });
  for (std::thread& thread : pool) thread.join();
}

uint64_t Mix(uint64_t x) {  // splitmix64's finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Element i of random stream `stream`: a function of (seed, stream, i) alone, so the inputs do not
// depend on the thread count. Standard normal by Box-Muller, or uniform on [0, 1).
double Uniform(uint64_t seed, uint64_t stream, uint64_t i) {
  return (static_cast<double>(Mix(Mix(seed * 0x100000001B3ull + stream) ^ i) >> 11) + 0.5) /
         9007199254740992.0;
}
float Normal(uint64_t seed, uint64_t stream, uint64_t i) {
  const double u1 = Uniform(seed, 2 * stream, i), u2 = Uniform(seed, 2 * stream + 1, i);
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

double Median(std::vector<double> x) {
  if (x.empty()) return NAN;
  std::sort(x.begin(), x.end());
  const size_t k = x.size() / 2;
  return x.size() % 2 ? x[k] : 0.5 * (x[k - 1] + x[k]);
}

// JSON values.
std::string Num(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.6g", x);
  return buf;
}
std::string Int(int64_t x) { return std::to_string(x); }
std::string Bool(bool x) { return x ? "true" : "false"; }
std::string Str(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}
// {"k": v, ...} from (key, already-encoded value) pairs.
std::string Object(const std::vector<std::pair<std::string, std::string>>& fields) {
  std::string out = "{";
  for (size_t k = 0; k < fields.size(); ++k)
    out += (k ? ", " : "") + Str(fields[k].first) + ": " + fields[k].second;
  return out + "}";
}
std::string List(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t k = 0; k < items.size(); ++k) out += (k ? ", " : "") + items[k];
  return out + "]";
}

// ---- The step's tensors.

// The kernel tests' hyperparameters (kernel_test_hyperparameters.h).
Hyperparameters Paper() { return lo_tf::PaperTestHyperparameters(); }

enum ArrayId {
  kTheta, kG, kW, kT, kM, kV, kUpW, kUpM, kUpV,  // inputs (Up: upstream gradients of the outputs)
  kNewW, kNewM, kNewV,                           // forward outputs
  kDTheta, kDG, kDW, kDM, kDV,                   // backward outputs
  kScale, kBias, kPartials, kCorrection,         // scratch
  kNumArrays
};
const char* const kNames[kNumArrays] = {
    "theta", "g", "w", "t", "m", "v", "d_new_w", "d_new_m", "d_new_v", "new_w", "new_m", "new_v",
    "d_theta", "d_g", "d_w", "d_m", "d_v", "scale", "bias", "partials", "correction"};
constexpr int kNumInputs = kNewW;
const std::vector<int> kForwardOutputs = {kNewW, kNewM, kNewV};
const std::vector<int> kBackwardOutputs = {kDTheta, kDG, kDW, kDM, kDV};

// One shape: its weight tensors' sizes, work units and the sizes of every array.
struct Shape {
  std::vector<int64_t> sizes;
  Config c;
  std::vector<Chunk> chunks;
  int64_t weights = 0;  // per trajectory
  int64_t array_size[kNumArrays];
  int64_t sum_squares_size = 0;

  Shape(const std::vector<int64_t>& tensor_sizes, int64_t trajectories) : sizes(tensor_sizes) {
    const std::string error = lo_tf::Plan(Paper(), sizes, &c, &chunks);
    if (!error.empty()) Fail("bad shape: " + error);
    c.m = trajectories;
    weights = c.n;
    const int64_t n = c.m * c.n, units = c.m * static_cast<int64_t>(chunks.size());
    const int64_t per_tensor = c.m * static_cast<int64_t>(sizes.size()) * c.num_weight_features;
    const int64_t sizes_of[kNumArrays] = {
        c.m * c.num_params, n, n, c.m, n * c.depth_m, n * c.depth_v, n, n * c.depth_m,
        n * c.depth_v, n, n * c.depth_m, n * c.depth_v, c.m * c.num_params, n, n, n * c.depth_m,
        n * c.depth_v, per_tensor, c.m * c.hidden, units * c.partial_size(), per_tensor};
    std::copy(sizes_of, sizes_of + kNumArrays, array_size);
    sum_squares_size = units * c.num_weight_features;
  }

  // Elements of one weight of each array kind (for bytes per weight).
  int DepthOf(int a) const {
    switch (a) {
      case kM: case kUpM: case kNewM: case kDM: return c.depth_m;
      case kV: case kUpV: case kNewV: case kDV: return c.depth_v;
      default: return 1;
    }
  }
  // Bytes per weight that a pass must read and write at least: its per-weight inputs once and
  // its outputs once (θ, t and the scratch are per trajectory, negligible).
  int64_t BytesPerWeight(bool backward) const {
    const std::vector<int> forward = {kG, kW, kM, kV, kNewW, kNewM, kNewV};
    const std::vector<int> gradient = {kG, kW, kM, kV, kUpW, kUpM, kUpV, kDG, kDW, kDM, kDV};
    int64_t floats = 0;
    for (const int a : backward ? gradient : forward) floats += DepthOf(a);
    return 4 * floats;
  }
  // Bytes per weight that the kernels of mlp_lopt_cuda.cu move if nothing stays in cache: the
  // forward's StatsKernel reads g, w, m, v and writes m', v', StepKernel reads g, w, m, v and writes
  // new_w; the gradient's StatsKernel reads g, w, m, v, BackwardKernel reads them and the upstream
  // gradients and writes d_g, d_w, d_m, d_v, CorrectionKernel reads g, w, m, v and d_g .. d_v and
  // writes d_g .. d_v.
  int64_t KernelBytesPerWeight(bool backward) const {
    const int64_t state = 2 + c.depth_m + c.depth_v, up = 1 + c.depth_m + c.depth_v;
    const int64_t floats = backward ? state + (state + up + state) + (state + 2 * state)
                                    : (state + c.depth_m + c.depth_v) + (state + 1);
    return 4 * floats;
  }
  // Floating-point operations per weight of the dense layers as the kernels compute them (an FMA
  // is 2): forward z_h = bias_h + Σ_j W1[j,h] (x_j q_j) (3 per (j, h)), relu and o = W2ᵀ relu(z)
  // (5 per h). The gradient evaluates z twice (6 per (j, h)), o (5 per h), dz (3 per h), dx̂ = W1 dz
  // (2 per (j, h)), the dW1 sums (2 per (j, h)) and Σdz, dW2 (5 per h). Features and elementwise
  // work (~100 per weight) are left out.
  int64_t FlopsPerWeight(bool backward) const {
    const int64_t nw = c.num_weight_features, h = c.hidden;
    return backward ? h * (10 * nw + 13) : h * (3 * nw + 5);
  }
};

// Host (or, under emulation, stand-in device) arrays of one step.
struct Arrays {
  std::vector<float> a[kNumArrays];
  std::vector<double> sum_squares;
};

// Random inputs: θ ~ 0.3 N(0, 1), g ~ 0.01 N, w ~ N, m ~ 0.01 N, v ~ U(0, 1e-4), t integer in
// [0, 500), upstream gradients ~ N (as mlp_lopt_cuda_test.cc); outputs and scratch NaN, so an
// element a kernel never writes cannot agree.
void FillInputs(const Shape& s, uint64_t seed, int threads, Arrays* h) {
  for (int a = 0; a < kNumArrays; ++a) h->a[a].assign(s.array_size[a], NAN);
  h->sum_squares.assign(s.sum_squares_size, NAN);
  const float scales[kNumInputs] = {0.3f, 0.01f, 1.0f, 0.0f, 0.01f, 0.0f, 1.0f, 1.0f, 1.0f};
  for (int a = 0; a < kNumInputs; ++a) {
    float* x = h->a[a].data();
    ParallelFor(threads, s.array_size[a], [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (a == kT)
          x[i] = static_cast<float>(std::floor(500.0 * Uniform(seed, 100 + a, i)));
        else if (a == kV)
          x[i] = static_cast<float>(1e-4 * Uniform(seed, 100 + a, i));
        else
          x[i] = scales[a] * Normal(seed, a, i);
      }
    });
  }
}

// The Problem of a step (or of its gradient) over arrays `a`, tables `chunks`, `segment_sizes`
// (host or device pointers alike).
Problem MakeProblem(const Shape& s, float* const* a, double* sum_squares, const Chunk* chunks,
                    const int64_t* segment_sizes, bool backward) {
  Problem p{};
  p.cfg = &s.c;
  p.chunks = chunks;
  p.num_chunks = static_cast<int64_t>(s.chunks.size());
  p.segment_sizes = segment_sizes;
  p.num_segments = static_cast<int64_t>(s.sizes.size());
  p.theta = a[kTheta];
  p.g = a[kG];
  p.w = a[kW];
  p.t = a[kT];
  p.m = a[kM];
  p.v = a[kV];
  if (backward) {
    p.d_new_w = a[kUpW];
    p.d_new_m = a[kUpM];
    p.d_new_v = a[kUpV];
    p.d_theta = a[kDTheta];
    p.d_g = a[kDG];
    p.d_w = a[kDW];
    p.d_m = a[kDM];
    p.d_v = a[kDV];
  } else {  // new_m, new_v non-null only here: the CPU stats pass writes them when they are set
    p.new_w = a[kNewW];
    p.new_m = a[kNewM];
    p.new_v = a[kNewV];
  }
  p.sum_squares = sum_squares;
  p.scale = a[kScale];
  p.bias = a[kBias];
  p.partials = a[kPartials];
  p.correction = a[kCorrection];
  return p;
}

// The hidden pre-activations z_h of element e (flat index i·N + n) in double, by the definitions of
// mlp_lopt.h from the inputs and the CPU run's per-tensor scales q and folded first-layer bias;
// size_h = |bias_h| + Σ_j |W1[j,h] x_j q_j|, the magnitude that rounding errors scale with.
void HiddenInDouble(const Shape& s, const Arrays& cpu, int64_t e, std::vector<double>* z,
                    std::vector<double>* size) {
  const Config& c = s.c;
  const int64_t i = e / c.n, n = e % c.n;
  int64_t seg = 0, start = 0;
  while (n >= start + s.sizes[seg]) start += s.sizes[seg++];
  const int nw = c.num_weight_features, d = c.num_decays;
  std::vector<double> x(nw);
  const double g = cpu.a[kG][e];
  x[0] = g;
  x[1] = cpu.a[kW][e];
  const int row_m = 2, row_v = 2 + d * c.use_momentum, row_r = row_v + d, row_rm = row_r + d;
  for (int k = 0; k < d; ++k) {
    const double beta = c.decays[k];
    double m = 0;
    if (c.use_momentum) x[row_m + k] = m = beta * cpu.a[kM][e * c.depth_m + k] + (1 - beta) * g;
    if (c.use_rms) {
      const double v = beta * cpu.a[kV][e * c.depth_v + k] + (1 - beta) * g * g;
      const double r = 1.0 / std::sqrt(v + c.rms_epsilon);
      x[row_v + k] = v;
      x[row_r + k] = r;
      if (c.use_momentum) x[row_rm + k] = r * m;
    }
  }
  const float* theta = cpu.a[kTheta].data() + i * c.num_params;
  const float* q = cpu.a[kScale].data() + (i * static_cast<int64_t>(s.sizes.size()) + seg) * nw;
  const float* bias = cpu.a[kBias].data() + i * c.hidden;
  z->assign(c.hidden, 0.0);
  size->assign(c.hidden, 0.0);
  for (int h = 0; h < c.hidden; ++h) {
    double zh = bias[h], sh = std::fabs(bias[h]);
    for (int j = 0; j < nw; ++j) {
      const double term = double{theta[j * c.hidden + h]} * x[j] * q[j];
      zh += term;
      sh += std::fabs(term);
    }
    (*z)[h] = zh;
    (*size)[h] = sh;
  }
}

// Whether some hidden pre-activation of element e is within rounding of the ReLU kink (see
// kKinkTolerance), where the GPU and the CPU may take different branches.
bool AtReluKink(const Shape& s, const Arrays& cpu, int64_t e) {
  std::vector<double> z, size;
  HiddenInDouble(s, cpu, e, &z, &size);
  for (size_t h = 0; h < z.size(); ++h)
    if (std::fabs(z[h]) <= kKinkTolerance * size[h]) return true;
  return false;
}

// The step of element e in double from HiddenInDouble: checks that model (which decides the kink
// excuses) against the CPU kernel's step.
double StepInDouble(const Shape& s, const Arrays& cpu, int64_t e) {
  const Config& c = s.c;
  std::vector<double> z, size;
  HiddenInDouble(s, cpu, e, &z, &size);
  const float* theta = cpu.a[kTheta].data() + (e / c.n) * c.num_params;
  double o0 = theta[c.b2_offset()], o1 = theta[c.b2_offset() + 1];
  for (int h = 0; h < c.hidden; ++h) {
    const double a = std::max(z[h], 0.0);
    o0 += theta[c.w2_offset() + 2 * h] * a;
    o1 += theta[c.w2_offset() + 2 * h + 1] * a;
  }
  return std::exp(std::min(double{c.lambda_exp} * o0, double{c.max_log_step})) * c.lambda_lin * o1;
}

// Largest kink-model allowed error of StepInDouble against the CPU step (relative to its largest
// magnitude; float rounding of the CPU gives ~1e-6): beyond it the kink excuses are not trusted.
constexpr double kKinkModelTolerance = 1e-4;
constexpr int64_t kKinkModelSamples = 1000;

// Agreement of one output (see the top of the file).
struct Agreement {
  std::string name;
  double max_rel_error = 0, max_rel_error_off_kinks = 0, scale = 0;
  int64_t size = 0, outliers = 0, kink_outliers = 0;
  bool agree = false;

  std::string Json() const {
    return Object({{"max_rel_error", Num(max_rel_error)},
                   {"max_rel_error_off_kinks", Num(max_rel_error_off_kinks)},
                   {"scale", Num(scale)}, {"size", Int(size)}, {"outliers", Int(outliers)},
                   {"kink_outliers", Int(kink_outliers)}, {"agree", Bool(agree)}});
  }
};

// `gpu` against `cpu` (outputs of `array`, `depth` floats per weight); `inject`: adds 3e-4 of the
// output's magnitude to one GPU element, to check that the comparison sees it; `kinks`: whether an
// outlier at a ReLU kink is excused (the per-element gradients).
Agreement Compare(const std::string& name, const std::vector<float>& gpu,
                  const std::vector<float>& cpu, int depth, double tolerance, bool inject,
                  bool kinks, const Shape& s, const Arrays& cpu_arrays) {
  Agreement r;
  r.name = name;
  r.size = static_cast<int64_t>(cpu.size());
  bool finite = gpu.size() == cpu.size();
  for (size_t e = 0; e < cpu.size(); ++e) {
    finite = finite && std::isfinite(cpu[e]);
    r.scale = std::max(r.scale, static_cast<double>(std::fabs(cpu[e])));
  }
  const double scale = r.scale > 0 ? r.scale : 1.0;
  const size_t injected = cpu.size() / 2;
  for (size_t e = 0; finite && e < cpu.size(); ++e) {
    const double a = gpu[e] + (inject && e == injected ? 3e-4 * scale : 0.0);
    const double err = std::isfinite(a) ? std::fabs(a - cpu[e]) / scale : INFINITY;
    r.max_rel_error = std::max(r.max_rel_error, err);
    if (err <= tolerance) {
      r.max_rel_error_off_kinks = std::max(r.max_rel_error_off_kinks, err);
      continue;
    }
    ++r.outliers;
    if (kinks && AtReluKink(s, cpu_arrays, static_cast<int64_t>(e) / depth)) {
      ++r.kink_outliers;
    } else {
      r.max_rel_error_off_kinks = std::max(r.max_rel_error_off_kinks, err);
    }
  }
  if (!finite) r.max_rel_error = r.max_rel_error_off_kinks = INFINITY;
  r.agree = r.max_rel_error_off_kinks <= tolerance;
  return r;
}

struct Options {
  std::string json_path;
  std::vector<std::vector<int64_t>> shapes;
  bool shapes_given = false;
  int64_t trajectories = 1;
  int runs = 25, warmup = 3, breakdown_runs = 10;
  int64_t copy_mib = kEmulated ? 64 : 1024;
  int threads = std::max(1u, std::thread::hardware_concurrency());
  uint64_t seed = 20;
  bool inject_error = false;
  std::string note;  // copied into the JSON (gpu_check.sh says how it built and ran the harness)
};

// The issue's shapes: 1, 31, 1,000 weights in one tensor, the paper's 3-layer CNN (19,722 weights in
// 8 tensors, lo_tf.tasks.problems.ConvNet) and 10^7 weights in one tensor.
const char* const kDefaultShapes = "1,31,1000,864+32+9216+32+9216+32+320+10,10000000";
// Under emulation one std::thread per CUDA thread per block: 10^7 weights would take hours.
constexpr int64_t kEmulationSkipAbove = 1000000;

std::vector<std::vector<int64_t>> ParseShapes(const std::string& spec) {
  std::vector<std::vector<int64_t>> shapes(1);
  std::string number;
  for (size_t k = 0; k <= spec.size(); ++k) {
    const char ch = k < spec.size() ? spec[k] : ',';
    if (ch == ',' || ch == '+') {
      char* end = nullptr;
      const long long value = std::strtoll(number.c_str(), &end, 10);
      if (number.empty() || *end || value < 1) Fail("bad --shapes: " + spec);
      shapes.back().push_back(value);
      number.clear();
      if (ch == ',' && k < spec.size()) shapes.emplace_back();
    } else {
      number += ch;
    }
  }
  return shapes;
}

Options ParseOptions(int argc, char** argv) {
  Options o;
  for (int k = 1; k < argc; ++k) {
    const std::string arg = argv[k];
    auto value = [&]() -> std::string {
      if (k + 1 >= argc) Fail("missing value of " + arg);
      return argv[++k];
    };
    auto integer = [&](int64_t lo) {
      const std::string v = value();
      char* end = nullptr;
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end || x < lo) Fail("bad value of " + arg + ": " + v);
      return static_cast<int64_t>(x);
    };
    if (arg == "--json") o.json_path = value();
    else if (arg == "--shapes") o.shapes = ParseShapes(value()), o.shapes_given = true;
    else if (arg == "--trajectories") o.trajectories = integer(1);
    else if (arg == "--runs") o.runs = static_cast<int>(integer(1));
    else if (arg == "--warmup") o.warmup = static_cast<int>(integer(0));
    else if (arg == "--breakdown-runs") o.breakdown_runs = static_cast<int>(integer(0));
    else if (arg == "--copy-mib") o.copy_mib = integer(1);
    else if (arg == "--threads") o.threads = static_cast<int>(integer(1));
    else if (arg == "--seed") o.seed = static_cast<uint64_t>(integer(0));
    else if (arg == "--inject-error") o.inject_error = true;
    else if (arg == "--note") o.note = value();
    else
      Fail("unknown argument " + arg +
           " (--json PATH --shapes 1,31,a+b+c --trajectories M --runs R --warmup W"
           " --breakdown-runs B --copy-mib N --threads T --seed S --inject-error --note TEXT)");
  }
  if (!o.shapes_given) o.shapes = ParseShapes(kDefaultShapes);
  return o;
}

// Median time of a plain device-to-device copy of `mib` MiB and its bandwidth, counting the bytes
// read and written (2 x the size), as the step's bytes per weight count both.
std::string MeasureCopy(const Options& o, cudaStream_t stream, double* gb_per_s) {
  const size_t bytes = static_cast<size_t>(o.copy_mib) << 20;
  void* src = DeviceAlloc(bytes);
  void* dst = DeviceAlloc(bytes);
  DeviceFill(src, 0, bytes);
  DeviceFill(dst, 0, bytes);
  for (int k = 0; k < o.warmup; ++k) DeviceCopy(dst, src, bytes, stream);
  Synchronize(stream);
  std::vector<double> ms;
  for (int k = 0; k < o.runs; ++k)
    ms.push_back(TimeMs(stream, [&] { DeviceCopy(dst, src, bytes, stream); }));
  DeviceFree(src);
  DeviceFree(dst);
  const double median = Median(ms);
  *gb_per_s = 2.0 * bytes / (median * 1e6);
  std::printf("copy: %lld MiB device to device, median %.4g ms of %d: %.4g GB/s (read + write)\n",
              static_cast<long long>(o.copy_mib), median, o.runs, *gb_per_s);
  return Object({{"kind", Str(kEmulated ? "host memcpy (emulation, not a GPU number)"
                                        : "cudaMemcpyAsync device to device")},
                 {"bytes", Int(static_cast<int64_t>(bytes))}, {"runs", Int(o.runs)},
                 {"median_ms", Num(median)}, {"min_ms", Num(*std::min_element(ms.begin(), ms.end()))},
                 {"gb_per_s", Num(*gb_per_s)}});
}

// Runs, checks and times one shape; returns its JSON and sets *ok to whether everything agreed.
std::string RunShape(const Options& o, const Shape& s, cudaStream_t stream, double copy_gb_per_s,
                     bool* ok) {
  const int64_t total = s.c.m * s.weights;
  Arrays cpu;
  FillInputs(s, o.seed + static_cast<uint64_t>(total), o.threads, &cpu);

  // Device copies: inputs uploaded, outputs and scratch NaN (0xFF bytes).
  float* dev[kNumArrays];
  for (int a = 0; a < kNumArrays; ++a) {
    const size_t bytes = s.array_size[a] * sizeof(float);
    dev[a] = static_cast<float*>(DeviceAlloc(bytes));
    if (a < kNumInputs) ToDevice(dev[a], cpu.a[a].data(), bytes);
    else DeviceFill(dev[a], 0xFF, bytes);
  }
  double* dev_sum_squares = static_cast<double*>(DeviceAlloc(s.sum_squares_size * sizeof(double)));
  DeviceFill(dev_sum_squares, 0xFF, s.sum_squares_size * sizeof(double));
  const size_t chunk_bytes = s.chunks.size() * sizeof(Chunk);
  const size_t size_bytes = s.sizes.size() * sizeof(int64_t);
  Chunk* dev_chunks = static_cast<Chunk*>(DeviceAlloc(chunk_bytes));
  int64_t* dev_sizes = static_cast<int64_t*>(DeviceAlloc(size_bytes));
  ToDevice(dev_chunks, s.chunks.data(), chunk_bytes);
  ToDevice(dev_sizes, s.sizes.data(), size_bytes);

  float* host_ptrs[kNumArrays];
  for (int a = 0; a < kNumArrays; ++a) host_ptrs[a] = cpu.a[a].data();
  std::string passes;
  bool all_agree = true, kink_model_ok = false;
  for (const bool backward : {false, true}) {
    const char* pass = backward ? "backward" : "forward";
    // The CPU units (generic build), the reference.
    const Problem cpu_p = MakeProblem(s, host_ptrs, cpu.sum_squares.data(), s.chunks.data(),
                                      s.sizes.data(), backward);
    const double cpu_ms = HostMs([&] {
      lo_tf::RunCpuPasses(lo_tf::generic::Units(), cpu_p, backward,
                          [&](int64_t n, int64_t, auto fn) { ParallelFor(o.threads, n, fn); });
    });
    // The CUDA kernels, once for the comparison.
    const Problem gpu_p = MakeProblem(s, dev, dev_sum_squares, dev_chunks, dev_sizes, backward);
    auto launch = [&] {
      const char* error = backward ? lo_tf::CudaBackward(stream, gpu_p)
                                   : lo_tf::CudaForward(stream, gpu_p);
      if (error) Fail(std::string(pass) + " CUDA kernel: " + error);
    };
    launch();
    Synchronize(stream);
    const std::vector<int>& outputs = backward ? kBackwardOutputs : kForwardOutputs;
    std::vector<std::vector<float>> first(kNumArrays);
    for (const int a : outputs) {
      first[a].resize(s.array_size[a]);
      ToHost(first[a].data(), dev[a], first[a].size() * sizeof(float));
    }
    const double tolerance = backward ? kBackwardTolerance : kForwardTolerance;
    std::vector<Agreement> agreements;
    for (const int a : outputs)
      agreements.push_back(Compare(kNames[a], first[a], cpu.a[a], s.DepthOf(a), tolerance,
                                   o.inject_error, backward && a != kDTheta, s, cpu));
    double kink_model_error = NAN;
    if (!backward) {  // the step w - new_w, which the MLP alone determines
      std::vector<float> gpu_step(total), cpu_step(total);
      for (int64_t e = 0; e < total; ++e) {
        gpu_step[e] = cpu.a[kW][e] - first[kNewW][e];
        cpu_step[e] = cpu.a[kW][e] - cpu.a[kNewW][e];
      }
      agreements.push_back(Compare("step", gpu_step, cpu_step, 1, tolerance, o.inject_error,
                                   false, s, cpu));
      // The double-precision model of the kink check, on elements spread over the shape.
      const double scale = std::max(agreements.back().scale, 1e-30);
      kink_model_error = 0.0;
      for (int64_t k = 0; k < std::min(total, kKinkModelSamples); ++k) {
        const int64_t e = k * total / std::min(total, kKinkModelSamples);
        kink_model_error = std::max(kink_model_error,
                                    std::fabs(StepInDouble(s, cpu, e) - cpu_step[e]) / scale);
      }
      kink_model_ok = kink_model_error <= kKinkModelTolerance;
    }
    bool agree = backward ? kink_model_ok : true, strict = true;
    double worst = 0.0;
    std::vector<std::pair<std::string, std::string>> agreement_json;
    std::string summary;
    for (const Agreement& r : agreements) {
      agree = agree && r.agree;
      strict = strict && r.max_rel_error_off_kinks <= kStrictTolerance;
      worst = std::max(worst, r.max_rel_error_off_kinks);
      agreement_json.push_back({r.name, r.Json()});
      char buf[96];
      std::snprintf(buf, sizeof buf, " %s %.2g", r.name.c_str(), r.max_rel_error);
      summary += buf;
      if (r.kink_outliers) summary += " (" + std::to_string(r.kink_outliers) + " at ReLU kinks)";
    }

    // Timing: warm-up, then each run between two events; the median.
    for (int k = 0; k < o.warmup; ++k) launch();
    Synchronize(stream);
    std::vector<double> ms;
    for (int k = 0; k < o.runs; ++k) ms.push_back(TimeMs(stream, launch));
    // Bitwise repeatable: the timed runs rewrote every output.
    bool repeatable = true;
    std::vector<float> again;
    for (const int a : outputs) {
      again.resize(s.array_size[a]);
      ToHost(again.data(), dev[a], again.size() * sizeof(float));
      repeatable = repeatable && std::memcmp(again.data(), first[a].data(),
                                             again.size() * sizeof(float)) == 0;
    }
    // Per-kernel breakdown (GPU only): medians over runs of each launch's own events.
    std::vector<std::pair<std::string, std::string>> breakdown;
#ifndef LO_TF_CUDA_EMULATION
    if (o.breakdown_runs > 0) {
      std::vector<LaunchRecord> records;
      launch_records = &records;
      for (int k = 0; k < o.breakdown_runs; ++k) launch();
      launch_records = nullptr;
      Synchronize(stream);
      std::map<std::string, std::vector<double>> by_kernel;
      std::vector<std::string> order;
      for (const LaunchRecord& r : records) {
        float t = 0.0f;
        CudaCheck(cudaEventElapsedTime(&t, r.start, r.stop), "cudaEventElapsedTime");
        if (!by_kernel.count(r.name)) order.push_back(r.name);
        by_kernel[r.name].push_back(t);
        cudaEventDestroy(r.start);
        cudaEventDestroy(r.stop);
      }
      for (const std::string& name : order) breakdown.push_back({name, Num(Median(by_kernel[name]))});
    }
#endif
    const double median = Median(ms);
    const int64_t bytes = s.BytesPerWeight(backward);
    const double gb_per_s = bytes * static_cast<double>(total) / (median * 1e6);
    const double fraction = gb_per_s / copy_gb_per_s;
    const double bound_ms = bytes * static_cast<double>(total) / (copy_gb_per_s * 1e6);
    const double flops = static_cast<double>(s.FlopsPerWeight(backward)) * total;
    all_agree = all_agree && agree && repeatable;
    std::printf("  %-8s max rel error%s: %s%s%s | median %.4g ms of %d: %.4g weights/s, %.4g GB/s"
                " (%lld B/weight), %.3g of copy bandwidth (bound %.3g ms), %.4g GFLOP/s;"
                " CPU reference %.4g ms\n",
                pass, summary.c_str(), agree ? "agree" : "DISAGREE",
                strict ? "" : " (above the strict 1e-5)",
                repeatable ? "" : ", NOT bitwise repeatable", median, o.runs,
                total / (median * 1e-3), gb_per_s, static_cast<long long>(bytes), fraction,
                bound_ms, flops / (median * 1e6), cpu_ms);
    std::string breakdown_line;
    for (const auto& kv : breakdown) breakdown_line += " " + kv.first + " " + kv.second + " ms";
    if (!breakdown_line.empty()) std::printf("           kernels:%s\n", breakdown_line.c_str());
    passes += std::string(passes.empty() ? "" : ", ") + Str(pass) + ": " +
              Object({{"agree", Bool(agree)},
                      {"tolerance", Num(tolerance)},
                      {"max_rel_error", Num(worst)},
                      {"within_strict_tolerance", Bool(strict)},
                      {"strict_tolerance", Num(kStrictTolerance)},
                      {"outputs", Object(agreement_json)},
                      {"bitwise_repeatable", Bool(repeatable)},
                      {"runs", Int(o.runs)},
                      {"warmup", Int(o.warmup)},
                      {"median_ms", Num(median)},
                      {"min_ms", Num(*std::min_element(ms.begin(), ms.end()))},
                      {"weights_per_s", Num(total / (median * 1e-3))},
                      {"bytes_per_weight", Int(bytes)},
                      {"kernel_bytes_per_weight", Int(s.KernelBytesPerWeight(backward))},
                      {"gb_per_s", Num(gb_per_s)},
                      {"fraction_of_copy_bandwidth", Num(fraction)},
                      {"copy_bound_ms", Num(bound_ms)},
                      {"flops_per_weight", Int(s.FlopsPerWeight(backward))},
                      {"gflop_per_s", Num(flops / (median * 1e6))},
                      {"kernel_median_ms", Object(breakdown)},
                      {backward ? "kink_model_ok" : "kink_model_step_error",
                       backward ? Bool(kink_model_ok) : Num(kink_model_error)},
                      {"cpu_reference_ms", Num(cpu_ms)}});
  }

  for (int a = 0; a < kNumArrays; ++a) DeviceFree(dev[a]);
  DeviceFree(dev_sum_squares);
  DeviceFree(dev_chunks);
  DeviceFree(dev_sizes);
  *ok = all_agree;
  std::vector<std::string> sizes;
  for (const int64_t n : s.sizes) sizes.push_back(Int(n));
  return "{" + std::string("\"weights\": ") + Int(s.weights) + ", \"trajectories\": " +
         Int(s.c.m) + ", \"tensor_sizes\": " + List(sizes) + ", \"work_units\": " +
         Int(s.c.m * static_cast<int64_t>(s.chunks.size())) + ", \"agree\": " + Bool(all_agree) +
         ", " + passes + "}";
}

std::string DeviceJson() {
#ifdef LO_TF_CUDA_EMULATION
  return Object({{"name", Str("CPU threads (cuda_emulation.h), no GPU")}});
#else
  int device = 0, sms = 0, clock_khz = 0, mem_khz = 0, bus_bits = 0, driver = 0, runtime = 0;
  cudaDeviceProp prop;
  CudaCheck(cudaGetDevice(&device), "cudaGetDevice");
  CudaCheck(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device);
  cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, device);
  cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device);
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  // FP32 lanes per SM: 64 on compute capability 7.x and 8.0, 128 on 8.6 and later (9.0 included).
  const int lanes = prop.major < 8 || (prop.major == 8 && prop.minor == 0) ? 64 : 128;
  std::printf("device: %s (compute %d.%d, %d SMs, %.0f MHz), driver %d, runtime %d\n", prop.name,
              prop.major, prop.minor, sms, clock_khz / 1e3, driver, runtime);
  return Object({{"name", Str(prop.name)},
                 {"compute_capability", Str(std::to_string(prop.major) + "." +
                                            std::to_string(prop.minor))},
                 {"sms", Int(sms)}, {"clock_mhz", Num(clock_khz / 1e3)},
                 {"memory_clock_mhz", Num(mem_khz / 1e3)}, {"memory_bus_bits", Int(bus_bits)},
                 {"dram_gb_per_s_nominal", Num(2.0 * mem_khz * 1e3 * bus_bits / 8 / 1e9)},
                 {"fp32_tflop_per_s_nominal", Num(2.0 * sms * lanes * clock_khz * 1e3 / 1e12)},
                 {"global_memory_gib", Num(prop.totalGlobalMem / 1073741824.0)},
                 {"driver_version", Int(driver)}, {"runtime_version", Int(runtime)}});
#endif
}

int Main(int argc, char** argv) {
  const Options o = ParseOptions(argc, argv);
#ifndef LO_TF_CUDA_EMULATION
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    std::printf("no CUDA device: %s\n",
                error != cudaSuccess ? cudaGetErrorString(error) : "cudaGetDeviceCount is 0");
    return 3;
  }
  cudaStream_t stream;
  CudaCheck(cudaStreamCreate(&stream), "cudaStreamCreate");
#else
  cudaStream_t stream = nullptr;
#endif
  std::printf("mlp_lopt_cuda_harness (%s): CUDA kernels of mlp_lopt_cuda.cu %s against the generic "
              "CPU units, %d CPU threads\n", kMode,
              kEmulated ? "on emulated threads" : "on the GPU", o.threads);
  const std::string device = DeviceJson();
  double copy_gb_per_s = 0.0;
  const std::string copy = MeasureCopy(o, stream, &copy_gb_per_s);
  const Shape paper({1}, 1);
  const Config& c = paper.c;
  const std::string config = Object(
      {{"hidden_size", Int(c.hidden)}, {"num_decays", Int(c.num_decays)},
       {"num_time_scales", Int(c.num_time_scales)},
       {"num_weight_features", Int(c.num_weight_features)},
       {"num_features", Int(c.num_features)}, {"theta_floats", Int(c.num_params)},
       {"lambda_exp", Num(c.lambda_exp)}, {"lambda_lin", Num(c.lambda_lin)},
       {"inputs", Str("theta 0.3 N(0,1), g 0.01 N, w N, m 0.01 N, v U(0, 1e-4), t in [0, 500), "
                      "upstream gradients N")}});
  bool ok = true;
  std::vector<std::string> shapes, skipped;
  // Written after every shape (complete: false until the last), so that a run cut short by a
  // timeout still leaves the shapes it finished.
  auto write = [&](bool complete) {
    if (o.json_path.empty()) return;
    const std::string json = Object(
        {{"mode", Str(kMode)},
         {"timing", Str(kEmulated ? "host clock of the emulated kernels (not GPU numbers)"
                                  : "CUDA events around each call, median of the timed runs")},
         {"cpu_reference", Str("generic CPU units of mlp_lopt_cpu.cc (the op's flags), " +
                               std::to_string(o.threads) + " threads")},
         {"error_measure", Str("max |gpu - cpu| / max |cpu| per output; per-element gradient "
                               "outliers at ReLU kinks excused (kink_outliers)")},
         {"note", Str(o.note)}, {"inject_error", Bool(o.inject_error)},
         {"device", device}, {"config", config}, {"copy", copy}, {"shapes", List(shapes)},
         {"skipped", List(skipped)}, {"complete", Bool(complete)}, {"ok", Bool(ok && complete)}});
    const std::string tmp = o.json_path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "w");
    if (!f || std::fprintf(f, "%s\n", json.c_str()) < 0 || std::fclose(f) != 0 ||
        std::rename(tmp.c_str(), o.json_path.c_str()) != 0)
      Fail("cannot write " + o.json_path);
  };
  write(false);
  for (const std::vector<int64_t>& sizes : o.shapes) {
    const Shape s(sizes, o.trajectories);
    if (kEmulated && !o.shapes_given && s.weights > kEmulationSkipAbove) {
      std::printf("%lld weights: skipped under emulation (one std::thread per CUDA thread)\n",
                  static_cast<long long>(s.weights));
      skipped.push_back(Object({{"weights", Int(s.weights)},
                                {"reason", Str("emulated threads: one std::thread per CUDA thread "
                                               "of every block, hours for this shape")}}));
      continue;
    }
    std::printf("%lld weights in %zu tensor(s), %lld trajectory(ies), %zu work units:\n",
                static_cast<long long>(s.weights), s.sizes.size(),
                static_cast<long long>(s.c.m), s.chunks.size() * static_cast<size_t>(s.c.m));
    std::fflush(stdout);
    bool shape_ok = false;
    shapes.push_back(RunShape(o, s, stream, copy_gb_per_s, &shape_ok));
    ok = ok && shape_ok;
    write(false);
    std::fflush(stdout);
  }
  write(true);
  if (!o.json_path.empty()) std::printf("wrote %s\n", o.json_path.c_str());
  std::printf("%s\n", ok ? "ok: every output agrees" : "DISAGREE: see above");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace lo_tf_harness

int main(int argc, char** argv) { return lo_tf_harness::Main(argc, argv); }

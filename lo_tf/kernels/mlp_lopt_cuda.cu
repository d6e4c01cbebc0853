// CUDA kernels of the fused learned-optimizer step (definitions in mlp_lopt.h), free of TensorFlow
// headers: mlp_lopt_gpu.cc launches them on the op's stream with TensorFlow-allocated buffers.
//
// The passes are those of the CPU units (mlp_lopt_cpu.cc), one CUDA block per work unit (a chunk of
// at most kChunk elements of one tensor of one trajectory), one thread per element of a tile of
// blockDim.x elements. A thread keeps its element's features in a column of shared memory (row
// stride blockDim.x + 1, so that columns and rows are read without bank conflicts); sums over a unit
// are taken in a fixed order by the thread owning each sum, so results are deterministic.
//
// With LO_TF_CUDA_EMULATION defined this file compiles as plain C++ whose kernels run on CPU threads
// (cuda_emulation.h), so that mlp_lopt_cuda_test.cc can check them where no GPU is;
// mlp_lopt_cuda_harness.cu runs them on a GPU against the CPU units and times them.

#ifdef LO_TF_CUDA_EMULATION
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#ifndef LO_TF_LAUNCH  // mlp_lopt_cuda_harness.cu brings its own, which also times each launch
#define LO_TF_LAUNCH(kernel, blocks, threads, bytes, stream) \
  kernel<<<blocks, threads, bytes, stream>>>
#endif
#define LO_TF_SHARED_FLOATS(name) extern __shared__ float name[]
#endif

#include <algorithm>

#include "mlp_lopt.h"

namespace lo_tf {
namespace {

constexpr int kSmallBlockThreads = 256;

struct Rows {
  int m, v, r, rm;
};

__device__ Rows RowsOf(const Config& c) {
  const int d = c.num_decays;
  Rows rows;
  rows.m = c.use_momentum ? 2 : -1;
  rows.v = c.use_rms ? 2 + d * c.use_momentum : -1;
  rows.r = c.use_rms ? rows.v + d : -1;
  rows.rm = c.use_rms && c.use_momentum ? rows.r + d : -1;
  return rows;
}

// The raw features of element e (flat index i·N + n) into the column x (row stride s); writes the
// new accumulators when `write_state`.
__device__ void LoadFeatures(const Config& c, const Rows& rows, const Problem& p, int64_t e,
                             bool write_state, float* x, int s) {
  const float g = p.g[e];
  x[0] = g;
  x[s] = p.w[e];
  for (int k = 0; k < c.num_decays; ++k) {
    const float beta = c.decays[k], one_minus = 1.0f - beta;
    if (rows.m >= 0) {
      const float m = beta * p.m[e * c.depth_m + k] + one_minus * g;
      x[(rows.m + k) * s] = m;
      if (write_state) p.new_m[e * c.depth_m + k] = m;
    }
    if (rows.v >= 0) {
      const float v = beta * p.v[e * c.depth_v + k] + one_minus * (g * g);
      const float r = 1.0f / sqrtf(v + c.rms_epsilon);
      x[(rows.v + k) * s] = v;
      x[(rows.r + k) * s] = r;
      if (rows.rm >= 0) x[(rows.rm + k) * s] = r * x[(rows.m + k) * s];
      if (write_state) p.new_v[e * c.depth_v + k] = v;
    }
  }
}

// z_h = bias_h + Σ_j W1[j, h] x_j q_j for the column x.
__device__ float Hidden(const Config& c, const float* theta, const float* bias, const float* q,
                        const float* x, int s, int h) {
  float z = bias[h];
  for (int j = 0; j < c.num_weight_features; ++j) z += theta[j * c.hidden + h] * (x[j * s] * q[j]);
  return z;
}

// Gradients of (g, w, m, v) of element e from the raw-feature gradients dx (column, stride s), with
// the direct paths of the upstream gradients and written (`upstream`) or added (not `upstream`).
__device__ void Chain(const Config& c, const Rows& rows, const Problem& p, int64_t e,
                      bool upstream, const float* x, const float* dx, int s) {
  const float g = x[0];
  float dg = dx[0];
  const float dw = dx[s] + (upstream ? p.d_new_w[e] : 0.0f);
  for (int k = 0; k < c.num_decays; ++k) {
    const float beta = c.decays[k], one_minus = 1.0f - beta;
    float dm = 0.0f;
    if (rows.m >= 0) dm = dx[(rows.m + k) * s] + (upstream ? p.d_new_m[e * c.depth_m + k] : 0.0f);
    if (rows.v >= 0) {
      const float r = x[(rows.r + k) * s];
      float dr = dx[(rows.r + k) * s];
      if (rows.rm >= 0) {
        dr += dx[(rows.rm + k) * s] * x[(rows.m + k) * s];
        dm += dx[(rows.rm + k) * s] * r;
      }
      const float dv = dx[(rows.v + k) * s] +
                       (upstream ? p.d_new_v[e * c.depth_v + k] : 0.0f) + dr * (-0.5f * r * r * r);
      dg += 2.0f * g * (one_minus * dv);
      float& out = p.d_v[e * c.depth_v + k];
      out = upstream ? beta * dv : out + beta * dv;
    }
    if (rows.m >= 0) {
      dg += one_minus * dm;
      float& out = p.d_m[e * c.depth_m + k];
      out = upstream ? beta * dm : out + beta * dm;
    }
  }
  p.d_g[e] = upstream ? dg : p.d_g[e] + dg;
  p.d_w[e] = upstream ? dw : p.d_w[e] + dw;
}

__global__ void StatsKernel(Config c, Problem p, bool write_state) {
  LO_TF_SHARED_FLOATS(smem);
  const int t = threadIdx.x, s = blockDim.x + 1, nw = c.num_weight_features;
  const int64_t u = blockIdx.x, i = u / p.num_chunks;
  const Chunk chunk = p.chunks[u % p.num_chunks];
  const Rows rows = RowsOf(c);
  for (int j = t; j < nw; j += blockDim.x) p.sum_squares[u * nw + j] = 0.0;
  for (int b0 = 0; b0 < chunk.length; b0 += blockDim.x) {
    const int valid = min(static_cast<int>(blockDim.x), chunk.length - b0);
    if (t < valid) LoadFeatures(c, rows, p, i * c.n + chunk.start + b0 + t, write_state, smem + t, s);
    __syncthreads();
    for (int j = t; j < nw; j += blockDim.x) {
      float sum = 0.0f;
      for (int b = 0; b < valid; ++b) sum += smem[j * s + b] * smem[j * s + b];
      p.sum_squares[u * nw + j] += sum;
    }
    __syncthreads();
  }
}

// Per trajectory (one block each): the per-tensor scales and the bias with the time features.
__global__ void FinishStatsKernel(Config c, Problem p) {
  const int64_t i = blockIdx.x;
  const int nw = c.num_weight_features;
  for (int64_t q = threadIdx.x; q < p.num_segments * nw; q += blockDim.x) {
    const int64_t seg = q / nw;
    const int j = q % nw;
    double sum = 0.0;
    for (int64_t ch = 0; ch < p.num_chunks; ++ch)
      if (p.chunks[ch].segment == seg) sum += p.sum_squares[(i * p.num_chunks + ch) * nw + j];
    const float mean = static_cast<float>(sum / p.segment_sizes[seg]);
    p.scale[(i * p.num_segments + seg) * nw + j] = 1.0f / sqrtf(c.norm_epsilon + mean);
  }
  const float* theta = p.theta + i * c.num_params;
  for (int h = threadIdx.x; h < c.hidden; h += blockDim.x) {
    float folded = 0.0f;
    for (int f = 0; f < c.num_time_scales; ++f)
      folded += tanhf(p.t[i] / c.time_scales[f] - 1.0f) * theta[(nw + f) * c.hidden + h];
    p.bias[i * c.hidden + h] = theta[c.b1_offset() + h] + folded;
  }
}

__global__ void StepKernel(Config c, Problem p) {
  LO_TF_SHARED_FLOATS(smem);
  const int t = threadIdx.x, s = blockDim.x + 1;
  const int64_t u = blockIdx.x, i = u / p.num_chunks;
  const Chunk chunk = p.chunks[u % p.num_chunks];
  const Rows rows = RowsOf(c);
  const float* theta = p.theta + i * c.num_params;
  const float* q = p.scale + (i * p.num_segments + chunk.segment) * c.num_weight_features;
  const float* bias = p.bias + i * c.hidden;
  const float* w2 = theta + c.w2_offset();
  for (int b0 = 0; b0 < chunk.length; b0 += blockDim.x) {
    if (t >= chunk.length - b0) break;
    const int64_t e = i * c.n + chunk.start + b0 + t;
    float* x = smem + t;
    LoadFeatures(c, rows, p, e, false, x, s);
    float o0 = theta[c.b2_offset()], o1 = theta[c.b2_offset() + 1];
    for (int h = 0; h < c.hidden; ++h) {
      const float a = fmaxf(Hidden(c, theta, bias, q, x, s, h), 0.0f);
      o0 += w2[2 * h] * a;
      o1 += w2[2 * h + 1] * a;
    }
    p.new_w[e] = p.w[e] - expf(fminf(c.lambda_exp * o0, c.max_log_step)) * c.lambda_lin * o1;
  }
}

// Shared floats of BackwardKernel per row stride s: raw features x and dx̂ [nw][s], relu(z) and dz
// [H][s], do [2][s].
__host__ __device__ int64_t BackwardRows(const Config& c) {
  return 2 * int64_t{c.num_weight_features} + 2 * int64_t{c.hidden} + 2;
}

// Backward through the MLP and the normalization's direct path, and the unit's partial sums (layout
// of CpuUnits::backward_units: dW1 weight rows, Σdz, dW2, db2, A).
__global__ void BackwardKernel(Config c, Problem p) {
  LO_TF_SHARED_FLOATS(smem);
  const int t = threadIdx.x, s = blockDim.x + 1, nw = c.num_weight_features, hs = c.hidden;
  const int64_t u = blockIdx.x, i = u / p.num_chunks;
  const Chunk chunk = p.chunks[u % p.num_chunks];
  const Rows rows = RowsOf(c);
  const float* theta = p.theta + i * c.num_params;
  const float* q = p.scale + (i * p.num_segments + chunk.segment) * nw;
  const float* bias = p.bias + i * hs;
  const float* w2 = theta + c.w2_offset();
  float* xs = smem;
  float* dxn = xs + nw * s;
  float* act = dxn + nw * s;
  float* dzs = act + hs * s;
  float* dos = dzs + hs * s;
  const int64_t q_size = c.partial_size();
  float* partial = p.partials + u * q_size;
  float* d_w1 = partial;
  float* sums = d_w1 + nw * hs;  // Σdz [H], dW2 [H, 2], db2 [2], A [nw]
  for (int64_t k = t; k < q_size; k += blockDim.x) partial[k] = 0.0f;
  for (int b0 = 0; b0 < chunk.length; b0 += blockDim.x) {
    const int valid = min(static_cast<int>(blockDim.x), chunk.length - b0);
    const int64_t e = i * c.n + chunk.start + b0 + t;
    float* x = xs + t;
    if (t < valid) {
      LoadFeatures(c, rows, p, e, false, x, s);
      float o0 = theta[c.b2_offset()], o1 = theta[c.b2_offset() + 1];
      for (int h = 0; h < hs; ++h) {
        const float a = fmaxf(Hidden(c, theta, bias, q, x, s, h), 0.0f);
        o0 += w2[2 * h] * a;
        o1 += w2[2 * h + 1] * a;
      }
      const float scaled = c.lambda_exp * o0;
      const float ex = expf(fminf(scaled, c.max_log_step)) * c.lambda_lin;
      const float d_step = -p.d_new_w[e];
      const float do1 = d_step * ex;
      const float do0 = scaled <= c.max_log_step ? d_step * ex * o1 * c.lambda_exp : 0.0f;
      dos[t] = do0;
      dos[s + t] = do1;
      for (int h = 0; h < hs; ++h) {
        const float z = Hidden(c, theta, bias, q, x, s, h);
        act[h * s + t] = fmaxf(z, 0.0f);
        dzs[h * s + t] = z > 0.0f ? w2[2 * h] * do0 + w2[2 * h + 1] * do1 : 0.0f;
      }
      for (int j = 0; j < nw; ++j) {
        float d = 0.0f;
        for (int h = 0; h < hs; ++h) d += theta[j * hs + h] * dzs[h * s + t];
        dxn[j * s + t] = d;
      }
    }
    __syncthreads();
    // Sums over the tile's elements, each owned by one thread.
    for (int k = t; k < nw * hs; k += blockDim.x) {
      const int j = k / hs, h = k % hs;
      float sum = 0.0f;
      for (int b = 0; b < valid; ++b) sum += xs[j * s + b] * dzs[h * s + b];
      d_w1[k] += sum * q[j];
    }
    for (int k = t; k < 3 * hs + 2 + nw; k += blockDim.x) {
      float sum = 0.0f;
      if (k < hs) {
        for (int b = 0; b < valid; ++b) sum += dzs[k * s + b];
      } else if (k < 3 * hs) {
        const int h = (k - hs) / 2, o = (k - hs) % 2;
        for (int b = 0; b < valid; ++b) sum += act[h * s + b] * dos[o * s + b];
      } else if (k < 3 * hs + 2) {
        for (int b = 0; b < valid; ++b) sum += dos[(k - 3 * hs) * s + b];
      } else {
        const int j = k - 3 * hs - 2;
        for (int b = 0; b < valid; ++b) sum += dxn[j * s + b] * xs[j * s + b];
      }
      sums[k] += sum;
    }
    __syncthreads();
    if (t < valid) {
      for (int j = 0; j < nw; ++j) dxn[j * s + t] *= q[j];  // direct path dx = q dx̂
      Chain(c, rows, p, e, true, x, dxn + t, s);
    }
    __syncthreads();
  }
}

// Per trajectory: d_theta from the units' partial sums, and the normalization-gradient coefficients.
__global__ void FinishBackwardKernel(Config c, Problem p) {
  const int64_t i = blockIdx.x;
  const int nw = c.num_weight_features, hs = c.hidden;
  const int64_t q_size = c.partial_size();
  const int64_t w1_weight = int64_t{nw} * hs;
  float* d_theta = p.d_theta + i * c.num_params;
  for (int64_t k = threadIdx.x; k < q_size - nw; k += blockDim.x) {
    double sum = 0.0;
    for (int64_t ch = 0; ch < p.num_chunks; ++ch)
      sum += p.partials[(i * p.num_chunks + ch) * q_size + k];
    if (k < w1_weight) {
      d_theta[k] = static_cast<float>(sum);
      continue;
    }
    d_theta[c.b1_offset() + (k - w1_weight)] = static_cast<float>(sum);
    if (k < w1_weight + hs) {
      const int h = k - w1_weight;
      for (int f = 0; f < c.num_time_scales; ++f)
        d_theta[(nw + f) * hs + h] =
            static_cast<float>(tanhf(p.t[i] / c.time_scales[f] - 1.0f) * sum);
    }
  }
  for (int64_t k = threadIdx.x; k < p.num_segments * nw; k += blockDim.x) {
    const int64_t seg = k / nw;
    const int j = k % nw;
    double a = 0.0;
    for (int64_t ch = 0; ch < p.num_chunks; ++ch)
      if (p.chunks[ch].segment == seg) a += p.partials[(i * p.num_chunks + ch) * q_size + q_size - nw + j];
    const int64_t idx = (i * p.num_segments + seg) * nw + j;
    const double qs = p.scale[idx];
    p.correction[idx] = static_cast<float>(-qs * qs * qs / p.segment_sizes[seg] * a);
  }
}

__global__ void CorrectionKernel(Config c, Problem p) {
  LO_TF_SHARED_FLOATS(smem);
  const int t = threadIdx.x, s = blockDim.x + 1, nw = c.num_weight_features;
  const int64_t u = blockIdx.x, i = u / p.num_chunks;
  const Chunk chunk = p.chunks[u % p.num_chunks];
  const Rows rows = RowsOf(c);
  const float* corr = p.correction + (i * p.num_segments + chunk.segment) * nw;
  for (int b0 = 0; b0 < chunk.length; b0 += blockDim.x) {
    if (t >= chunk.length - b0) break;
    const int64_t e = i * c.n + chunk.start + b0 + t;
    float* x = smem + t;
    float* dx = smem + nw * s + t;
    LoadFeatures(c, rows, p, e, false, x, s);
    for (int j = 0; j < nw; ++j) dx[j * s] = corr[j] * x[j * s];
    Chain(c, rows, p, e, false, x, dx, s);
  }
}

const char* Check() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// Threads per block of a per-element kernel needing `rows` shared floats per stride, and its
// dynamic shared memory bytes; 0 threads when even a warp does not fit. `opt_in`: the kernel may
// use more than the default 48 KiB (see cudaFuncAttributeMaxDynamicSharedMemorySize).
int ThreadsFor(int64_t rows, bool opt_in, size_t* bytes) {
  int device, limit;
  const cudaDeviceAttr attr =
      opt_in ? cudaDevAttrMaxSharedMemoryPerBlockOptin : cudaDevAttrMaxSharedMemoryPerBlock;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&limit, attr, device) != cudaSuccess)
    return 0;
  for (int threads = 128; threads >= 32; threads /= 2) {
    *bytes = static_cast<size_t>(rows) * (threads + 1) * sizeof(float);
    if (*bytes <= static_cast<size_t>(limit)) return threads;
  }
  return 0;
}

}  // namespace

const char* CudaForward(void* stream, const Problem& p) {
  const Config& c = *p.cfg;
  const int64_t units = c.m * p.num_chunks;
  if (units == 0) return nullptr;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  size_t bytes;
  const int threads = ThreadsFor(c.num_weight_features, false, &bytes);
  if (!threads) return "the features do not fit in shared memory";
  LO_TF_LAUNCH(StatsKernel, units, threads, bytes, st)(c, p, true);
  LO_TF_LAUNCH(FinishStatsKernel, c.m, kSmallBlockThreads, 0, st)(c, p);
  LO_TF_LAUNCH(StepKernel, units, threads, bytes, st)(c, p);
  return Check();
}

const char* CudaBackward(void* stream, const Problem& p) {
  const Config& c = *p.cfg;
  const int64_t units = c.m * p.num_chunks;
  if (units == 0) return nullptr;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  size_t stats_bytes, backward_bytes, correction_bytes;
  const int stats_threads = ThreadsFor(c.num_weight_features, false, &stats_bytes);
  const int backward_threads = ThreadsFor(BackwardRows(c), true, &backward_bytes);
  const int correction_threads = ThreadsFor(2 * c.num_weight_features, false, &correction_bytes);
  if (!stats_threads || !backward_threads || !correction_threads)
    return "hidden_size too large for the shared memory of the CUDA backward kernel";
  if (backward_bytes > 48 * 1024 &&
      cudaFuncSetAttribute(BackwardKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(backward_bytes)) != cudaSuccess)
    return Check();
  LO_TF_LAUNCH(StatsKernel, units, stats_threads, stats_bytes, st)(c, p, false);
  LO_TF_LAUNCH(FinishStatsKernel, c.m, kSmallBlockThreads, 0, st)(c, p);
  LO_TF_LAUNCH(BackwardKernel, units, backward_threads, backward_bytes, st)(c, p);
  LO_TF_LAUNCH(FinishBackwardKernel, c.m, kSmallBlockThreads, 0, st)(c, p);
  LO_TF_LAUNCH(CorrectionKernel, units, correction_threads, correction_bytes, st)(c, p);
  return Check();
}

const char* CudaCopyToDevice(void* stream, void* device_dst, const void* host_src, int64_t bytes) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, st) != cudaSuccess ||
      cudaStreamSynchronize(st) != cudaSuccess)
    return Check();
  return nullptr;
}

}  // namespace lo_tf

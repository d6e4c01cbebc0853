// CPU compute units of the fused learned-optimizer step (definitions in mlp_lopt.h).
//
// This file is compiled once per instruction set, with LO_TF_ISA naming the namespace (generic,
// avx2, avx512) and the matching -m flags; mlp_lopt_ops.cc picks the variant the running CPU
// supports. Elements are processed kB at a time in feature-major (structure of arrays) block
// buffers, so the [N, F] feature matrix is never materialized: the elementwise loops over a block's
// lanes are left to the compiler's vectorizer, the dense layers are register tiles of the portable
// GCC/Clang vector type `Vec` (as wide as the variant's instruction set).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "mlp_lopt.h"

#ifndef LO_TF_ISA
#error "compile with -DLO_TF_ISA=<namespace>"
#endif
#define LO_TF_STRINGIFY2(x) #x
#define LO_TF_STRINGIFY(x) LO_TF_STRINGIFY2(x)

namespace lo_tf {
namespace LO_TF_ISA {
namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
typedef float Vec __attribute__((vector_size(kVecBytes)));
constexpr int kL = kVecBytes / sizeof(float);  // lanes of a Vec
constexpr int kB = kCpuBlock;                   // lanes of a block
constexpr int kBV = kB / kL;                    // Vecs of a block row
constexpr int kTileV = 4;                       // Vecs of a dense-layer register tile
static_assert(kBV % kTileV == 0, "a block row is whole tiles");

Vec LoadV(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
void StoreV(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
Vec Splat(float x) { return Vec{} + x; }
typedef int32_t Mask __attribute__((vector_size(kVecBytes)));
// Lanes of `v` where `mask` is set, else 0.
Vec Select(Mask mask, Vec v) { return reinterpret_cast<Vec>(reinterpret_cast<Mask>(v) & mask); }
Vec Relu(Vec z) { return Select(z > Splat(0.0f), z); }

// 1/sqrt(x) for x > 0 as TensorFlow's CPU rsqrt computes it on x86 (Eigen's prsqrt): the
// instruction set's estimate refined by one Newton step (relative error ~1e-7), cheaper than a
// sqrt and a divide.
Vec InvSqrt(Vec x) {
#if defined(__AVX512F__)
  const Vec y = _mm512_rsqrt14_ps(x);
#elif defined(__AVX__)
  const Vec y = _mm256_rsqrt_ps(x);
#elif defined(__SSE__)
  const Vec y = _mm_rsqrt_ps(x);
#else
  Vec y;
  for (int l = 0; l < kL; ++l) y[l] = 1.0f / std::sqrt(x[l]);
  return y;
#endif
  return y * (Splat(1.5f) - Splat(0.5f) * x * y * y);
}
float HorizontalSum(Vec v) {
  float s = 0.0f;
  for (int l = 0; l < kL; ++l) s += v[l];
  return s;
}

// First row of each feature group in a block's feature buffer (-1 when off).
struct Rows {
  explicit Rows(const Config& c) {
    const int d = c.num_decays;
    m = c.use_momentum ? 2 : -1;
    v = c.use_rms ? 2 + d * c.use_momentum : -1;
    r = c.use_rms ? v + d : -1;
    rm = c.use_rms && c.use_momentum ? r + d : -1;
  }
  int m, v, r, rm;
};

// Per-thread block buffers, each [rows][kB].
struct Block {
  explicit Block(const Config& c)
      : rows(c), g(kB), w(kB), m(kB * c.depth_m), v(kB * c.depth_v), up_w(kB),
        up_m(kB * c.depth_m), up_v(kB * c.depth_v), x(kB * c.num_weight_features),
        xn(x.size()), dx(x.size()), z(kB * c.hidden), dz(z.size()), o0(kB), o1(kB),
        do0(kB), do1(kB), dg(kB), dw(kB), dm(m.size()), dv(v.size()) {}
  Rows rows;
  std::vector<float> g, w, m, v, up_w, up_m, up_v, x, xn, dx, z, dz, o0, o1, do0, do1, dg, dw,
      dm, dv;
};

// Calls fn(depth) with d as a compile-time constant where it is small (the paper's 5 among them),
// which turns the strided copies between the op's element-major m, v and the blocks into
// straight-line code.
template <typename Fn>
void WithDepth(int d, Fn fn) {
  switch (d) {
    case 1: fn(std::integral_constant<int, 1>()); return;
    case 2: fn(std::integral_constant<int, 2>()); return;
    case 3: fn(std::integral_constant<int, 3>()); return;
    case 4: fn(std::integral_constant<int, 4>()); return;
    case 5: fn(std::integral_constant<int, 5>()); return;
    case 6: fn(std::integral_constant<int, 6>()); return;
    default: fn(d);
  }
}

// [nb, d] element-major -> [d][kB], zero-padded lanes.
void LoadTransposed(const float* src, int d, int nb, float* dst) {
  WithDepth(d, [&](auto depth) {
    for (int b = 0; b < nb; ++b)
      for (int k = 0; k < depth; ++k) dst[k * kB + b] = src[b * depth + k];
  });
  for (int k = 0; k < d; ++k) std::fill(dst + k * kB + nb, dst + (k + 1) * kB, 0.0f);
}

void LoadPadded(const float* src, int nb, float* dst) {
  std::copy(src, src + nb, dst);
  std::fill(dst + nb, dst + kB, 0.0f);
}

// [d][kB] -> [nb, d]; adds to dst when `accumulate`.
void StoreTransposed(const float* src, int d, int nb, bool accumulate, float* dst) {
  WithDepth(d, [&](auto depth) {
    for (int b = 0; b < nb; ++b)
      for (int k = 0; k < depth; ++k) {
        const float value = src[k * kB + b];
        dst[b * depth + k] = accumulate ? dst[b * depth + k] + value : value;
      }
  });
}

void StorePadded(const float* src, int nb, bool accumulate, float* dst) {
  for (int b = 0; b < nb; ++b) dst[b] = accumulate ? dst[b] + src[b] : src[b];
}

// Loads elements [n0, n0 + nb) of trajectory i (and the upstream gradients when `upstream`).
void Load(const Problem& p, int64_t i, int64_t n0, int nb, bool upstream, Block* blk) {
  const Config& c = *p.cfg;
  const int64_t e = i * c.n + n0;
  LoadPadded(p.g + e, nb, blk->g.data());
  LoadPadded(p.w + e, nb, blk->w.data());
  LoadTransposed(p.m + e * c.depth_m, c.depth_m, nb, blk->m.data());
  LoadTransposed(p.v + e * c.depth_v, c.depth_v, nb, blk->v.data());
  if (upstream) {
    LoadPadded(p.d_new_w + e, nb, blk->up_w.data());
    LoadTransposed(p.d_new_m + e * c.depth_m, c.depth_m, nb, blk->up_m.data());
    LoadTransposed(p.d_new_v + e * c.depth_v, c.depth_v, nb, blk->up_v.data());
  }
}

// The raw features x of a loaded block; the new accumulators m', v' are its rows.
void Features(const Config& c, Block* blk) {
  const Rows& rows = blk->rows;
  float* x = blk->x.data();
  const float* g = blk->g.data();
  std::copy(g, g + kB, x);
  std::copy(blk->w.begin(), blk->w.end(), x + kB);
  for (int k = 0; k < c.num_decays; ++k) {
    const float beta = c.decays[k], one_minus = 1.0f - beta;
    if (rows.m >= 0) {
      float* mk = x + (rows.m + k) * kB;
      const float* m0 = blk->m.data() + k * kB;
      for (int b = 0; b < kB; ++b) mk[b] = beta * m0[b] + one_minus * g[b];
    }
    if (rows.v >= 0) {
      float* vk = x + (rows.v + k) * kB;
      float* rk = x + (rows.r + k) * kB;
      const float* v0 = blk->v.data() + k * kB;
      for (int b = 0; b < kB; ++b) vk[b] = beta * v0[b] + one_minus * (g[b] * g[b]);
      for (int v = 0; v < kBV; ++v)
        StoreV(rk + v * kL, InvSqrt(LoadV(vk + v * kL) + Splat(c.rms_epsilon)));
      if (rows.rm >= 0) {
        float* rmk = x + (rows.rm + k) * kB;
        const float* mk = x + (rows.m + k) * kB;
        for (int b = 0; b < kB; ++b) rmk[b] = rk[b] * mk[b];
      }
    }
  }
}

// out[r][b] = init[r] + Σ_k W[r·rs + k·ks] in[k][b] for rows r0 .. r0 + kRT, one register tile of
// kRT rows by kTileV Vecs at a time. Wide tiles of few rows need few broadcasts of W per FMA (3 x 4
// was fastest on AVX2 and SSE2 alike).
template <int kRT>
void DenseRows(const float* W, int64_t rs, int64_t ks, int num_in, const float* in,
               const float* init, int r0, float* out) {
  for (int b0 = 0; b0 < kB; b0 += kTileV * kL) {
    Vec acc[kRT][kTileV];
    for (int rr = 0; rr < kRT; ++rr)
      for (int vv = 0; vv < kTileV; ++vv) acc[rr][vv] = Splat(init[r0 + rr]);
    for (int k = 0; k < num_in; ++k) {
      Vec x[kTileV];
      for (int vv = 0; vv < kTileV; ++vv) x[vv] = LoadV(in + k * kB + b0 + vv * kL);
      for (int rr = 0; rr < kRT; ++rr) {
        const Vec wv = Splat(W[(r0 + rr) * rs + k * ks]);
        for (int vv = 0; vv < kTileV; ++vv) acc[rr][vv] += wv * x[vv];
      }
    }
    for (int rr = 0; rr < kRT; ++rr)
      for (int vv = 0; vv < kTileV; ++vv) StoreV(out + (r0 + rr) * kB + b0 + vv * kL, acc[rr][vv]);
  }
}

void Dense(const float* W, int64_t rs, int64_t ks, int num_out, int num_in, const float* in,
           const float* init, float* out) {
  int r = 0;
  for (; r + 3 <= num_out; r += 3) DenseRows<3>(W, rs, ks, num_in, in, init, r, out);
  for (; r < num_out; ++r) DenseRows<1>(W, rs, ks, num_in, in, init, r, out);
}

// Normalized features, hidden pre-activations z and the two outputs of a block of raw features x.
void Mlp(const Config& c, const float* theta, const float* scale, const float* bias,
         const float* x, Block* blk) {
  const int nw = c.num_weight_features, h_size = c.hidden;
  for (int j = 0; j < nw; ++j) {
    const float q = scale[j];
    const float* xj = x + j * kB;
    float* xnj = blk->xn.data() + j * kB;
    for (int b = 0; b < kB; ++b) xnj[b] = xj[b] * q;
  }
  // z[h] = bias[h] + Σ_j W1[j, h] x̂[j]
  Dense(theta, 1, h_size, h_size, nw, blk->xn.data(), bias, blk->z.data());
  // o = b2 + Σ_h W2[h] relu(z[h]), kOutV Vecs of lanes at a time for independent FMA chains.
  constexpr int kOutV = 4;
  static_assert(kBV % kOutV == 0, "a block row is whole output tiles");
  const float* w2 = theta + c.w2_offset();
  const float* b2 = theta + c.b2_offset();
  for (int bv = 0; bv < kBV; bv += kOutV) {
    Vec o0[kOutV], o1[kOutV];
    for (int vv = 0; vv < kOutV; ++vv) {
      o0[vv] = Splat(b2[0]);
      o1[vv] = Splat(b2[1]);
    }
    for (int h = 0; h < h_size; ++h) {
      const Vec w0 = Splat(w2[2 * h]), w1 = Splat(w2[2 * h + 1]);
      for (int vv = 0; vv < kOutV; ++vv) {
        const Vec a = Relu(LoadV(blk->z.data() + h * kB + (bv + vv) * kL));
        o0[vv] += w0 * a;
        o1[vv] += w1 * a;
      }
    }
    for (int vv = 0; vv < kOutV; ++vv) {
      StoreV(blk->o0.data() + (bv + vv) * kL, o0[vv]);
      StoreV(blk->o1.data() + (bv + vv) * kL, o1[vv]);
    }
  }
}

// Gradients of the inputs (g, w, m, v) from the gradients dx of the raw features, plus, when
// `upstream`, the direct paths of the upstream gradients of new_w, m' and v'.
void Chain(const Config& c, bool upstream, Block* blk) {
  const Rows& rows = blk->rows;
  const float* x = blk->x.data();
  const float* dx = blk->dx.data();
  const float* g = blk->g.data();
  float* dg = blk->dg.data();
  float* dw = blk->dw.data();
  for (int b = 0; b < kB; ++b) {
    dg[b] = dx[b];
    dw[b] = dx[kB + b] + (upstream ? blk->up_w[b] : 0.0f);
  }
  for (int k = 0; k < c.num_decays; ++k) {
    const float beta = c.decays[k], one_minus = 1.0f - beta;
    float* dmk = rows.m >= 0 ? blk->dm.data() + k * kB : nullptr;
    float* dvk = rows.v >= 0 ? blk->dv.data() + k * kB : nullptr;
    if (dmk) {  // dm' first (its own feature + upstream), then the r·m' feature below
      const float* dxm = dx + (rows.m + k) * kB;
      const float* up = blk->up_m.data() + k * kB;
      for (int b = 0; b < kB; ++b) dmk[b] = dxm[b] + (upstream ? up[b] : 0.0f);
    }
    if (dvk) {
      const float* dxv = dx + (rows.v + k) * kB;
      const float* dxr = dx + (rows.r + k) * kB;
      const float* rk = x + (rows.r + k) * kB;
      const float* up = blk->up_v.data() + k * kB;
      if (dmk) {
        const float* dxrm = dx + (rows.rm + k) * kB;
        const float* mk = x + (rows.m + k) * kB;
        for (int b = 0; b < kB; ++b) {
          const float dr = dxr[b] + dxrm[b] * mk[b];
          dvk[b] = dxv[b] + (upstream ? up[b] : 0.0f) + dr * (-0.5f * rk[b] * rk[b] * rk[b]);
          dmk[b] += dxrm[b] * rk[b];
        }
      } else {
        for (int b = 0; b < kB; ++b)
          dvk[b] = dxv[b] + (upstream ? up[b] : 0.0f) + dxr[b] * (-0.5f * rk[b] * rk[b] * rk[b]);
      }
      for (int b = 0; b < kB; ++b) {
        dg[b] += 2.0f * g[b] * (one_minus * dvk[b]);
        dvk[b] *= beta;
      }
    }
    if (dmk) {
      for (int b = 0; b < kB; ++b) {
        dg[b] += one_minus * dmk[b];
        dmk[b] *= beta;
      }
    }
  }
}

void StoreInputGradients(const Problem& p, int64_t i, int64_t n0, int nb, bool accumulate,
                         const Block& blk) {
  const Config& c = *p.cfg;
  const int64_t e = i * c.n + n0;
  StorePadded(blk.dg.data(), nb, accumulate, p.d_g + e);
  StorePadded(blk.dw.data(), nb, accumulate, p.d_w + e);
  StoreTransposed(blk.dm.data(), c.depth_m, nb, accumulate, p.d_m + e * c.depth_m);
  StoreTransposed(blk.dv.data(), c.depth_v, nb, accumulate, p.d_v + e * c.depth_v);
}

// Calls fn(i, chunk, n0, nb) for every block of work unit u.
template <typename Fn>
void ForUnitBlocks(const Problem& p, int64_t u, Fn fn) {
  const int64_t i = u / p.num_chunks;
  const Chunk& chunk = p.chunks[u % p.num_chunks];
  const int64_t end = chunk.start + chunk.length;
  for (int64_t n0 = chunk.start; n0 < end; n0 += kB)
    fn(i, chunk, n0, static_cast<int>(std::min<int64_t>(kB, end - n0)));
}

// The block of unit u starting at element n0 in Problem::features.
float* CachedFeatures(const Problem& p, int64_t u, const Chunk& chunk, int64_t n0) {
  const int64_t block = u * (kChunk / kB) + (n0 - chunk.start) / kB;
  return p.features + block * p.cfg->num_weight_features * kB;
}

void StatsUnits(const Problem& p, int64_t begin, int64_t end) {
  const Config& c = *p.cfg;
  const int nw = c.num_weight_features;
  Block blk(c);
  for (int64_t u = begin; u < end; ++u) {
    double* sums = p.sum_squares + u * nw;
    std::fill_n(sums, nw, 0.0);
    ForUnitBlocks(p, u, [&](int64_t i, const Chunk& chunk, int64_t n0, int nb) {
      Load(p, i, n0, nb, false, &blk);
      Features(c, &blk);
      if (p.features)
        std::copy(blk.x.begin(), blk.x.end(), CachedFeatures(p, u, chunk, n0));
      for (int j = 0; j < nw; ++j) {
        const float* xj = blk.x.data() + j * kB;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int b = 0; b < nb; ++b) s += xj[b] * xj[b];
        sums[j] += s;
      }
      // Only the forward pass writes the new accumulators (a group that is off has no buffer).
      const int64_t e = i * c.n + n0;
      if (p.new_m && blk.rows.m >= 0)
        StoreTransposed(blk.x.data() + blk.rows.m * kB, c.depth_m, nb, false,
                        p.new_m + e * c.depth_m);
      if (p.new_v && blk.rows.v >= 0)
        StoreTransposed(blk.x.data() + blk.rows.v * kB, c.depth_v, nb, false,
                        p.new_v + e * c.depth_v);
    });
  }
}

void FinishStatsTrajectories(const Problem& p, int64_t begin, int64_t end) {
  const Config& c = *p.cfg;
  const int nw = c.num_weight_features, h_size = c.hidden;
  std::vector<double> sums(p.num_segments * nw);
  for (int64_t i = begin; i < end; ++i) {
    std::fill(sums.begin(), sums.end(), 0.0);
    for (int64_t ch = 0; ch < p.num_chunks; ++ch)
      for (int j = 0; j < nw; ++j)
        sums[p.chunks[ch].segment * nw + j] += p.sum_squares[(i * p.num_chunks + ch) * nw + j];
    for (int64_t s = 0; s < p.num_segments; ++s)
      for (int j = 0; j < nw; ++j) {
        const float mean = static_cast<float>(sums[s * nw + j] / p.segment_sizes[s]);
        p.scale[(i * p.num_segments + s) * nw + j] = 1.0f / std::sqrt(c.norm_epsilon + mean);
      }
    // The time features are the same for every weight of a trajectory: fold them into the bias.
    const float* theta = p.theta + i * c.num_params;
    float* bias = p.bias + i * h_size;
    for (int h = 0; h < h_size; ++h) {
      float folded = 0.0f;
      for (int f = 0; f < c.num_time_scales; ++f)
        folded += std::tanh(p.t[i] / c.time_scales[f] - 1.0f) * theta[(nw + f) * h_size + h];
      bias[h] = theta[c.b1_offset() + h] + folded;
    }
  }
}

void StepUnits(const Problem& p, int64_t begin, int64_t end) {
  const Config& c = *p.cfg;
  Block blk(c);
  for (int64_t u = begin; u < end; ++u) {
    ForUnitBlocks(p, u, [&](int64_t i, const Chunk& chunk, int64_t n0, int nb) {
      const float* x = blk.x.data();
      if (p.features) {
        x = CachedFeatures(p, u, chunk, n0);
      } else {
        Load(p, i, n0, nb, false, &blk);
        Features(c, &blk);
      }
      Mlp(c, p.theta + i * c.num_params,
          p.scale + (i * p.num_segments + chunk.segment) * c.num_weight_features,
          p.bias + i * c.hidden, x, &blk);
      const float* w = p.w + i * c.n + n0;
      float* new_w = p.new_w + i * c.n + n0;
      for (int b = 0; b < nb; ++b) {
        const float log_scale = std::min(c.lambda_exp * blk.o0[b], c.max_log_step);
        new_w[b] = w[b] - std::exp(log_scale) * c.lambda_lin * blk.o1[b];
      }
    });
  }
}

// acc[j·h_size + h] += Σ_v x[j][v] y[h][v] over a block's Vecs, for a kJT x kHT tile of (j, h).
template <int kJT, int kHT>
void OuterTile(const float* x, const float* y, int j0, int h0, int h_size, Vec* acc) {
  Vec t[kJT][kHT];
  for (int jj = 0; jj < kJT; ++jj)
    for (int hh = 0; hh < kHT; ++hh) t[jj][hh] = acc[(j0 + jj) * h_size + h0 + hh];
  for (int v = 0; v < kBV; ++v) {
    Vec xv[kJT], yv[kHT];
    for (int jj = 0; jj < kJT; ++jj) xv[jj] = LoadV(x + (j0 + jj) * kB + v * kL);
    for (int hh = 0; hh < kHT; ++hh) yv[hh] = LoadV(y + (h0 + hh) * kB + v * kL);
    for (int jj = 0; jj < kJT; ++jj)
      for (int hh = 0; hh < kHT; ++hh) t[jj][hh] += xv[jj] * yv[hh];
  }
  for (int jj = 0; jj < kJT; ++jj)
    for (int hh = 0; hh < kHT; ++hh) acc[(j0 + jj) * h_size + h0 + hh] = t[jj][hh];
}

// acc[j·h_size + h] += x[j] · y[h] (lane-wise partial sums) for all j < nj, h < h_size.
void Outer(const float* x, const float* y, int nj, int h_size, Vec* acc) {
  int j = 0;
  for (; j + 2 <= nj; j += 2) {
    int h = 0;
    for (; h + 4 <= h_size; h += 4) OuterTile<2, 4>(x, y, j, h, h_size, acc);
    for (; h < h_size; ++h) OuterTile<2, 1>(x, y, j, h, h_size, acc);
  }
  for (; j < nj; ++j)
    for (int h = 0; h < h_size; ++h) OuterTile<1, 1>(x, y, j, h, h_size, acc);
}

// Backward through the MLP and the normalization's direct path, and the unit's partial sums:
// dW1 rows of the weight features, Σdz (the bias and time-feature rows), dW2, db2 and
// A_j = Σ dx̂_j x_j (for the normalization's indirect path, see FinishBackwardTrajectories). The
// sums are kept lane-wise in Vecs over the unit's blocks and reduced across lanes at its end.
void BackwardUnits(const Problem& p, int64_t begin, int64_t end) {
  const Config& c = *p.cfg;
  const int nw = c.num_weight_features, h_size = c.hidden;
  const int64_t q_size = c.partial_size();
  const std::vector<float> zeros(nw, 0.0f);
  std::vector<Vec> acc(q_size);
  Vec* acc_w1 = acc.data();
  Vec* acc_dz = acc_w1 + nw * h_size;
  Vec* acc_w2 = acc_dz + h_size;
  Vec* acc_b2 = acc_w2 + 2 * h_size;
  Vec* acc_a = acc_b2 + 2;
  Block blk(c);
  for (int64_t u = begin; u < end; ++u) {
    std::fill(acc.begin(), acc.end(), Vec{});
    ForUnitBlocks(p, u, [&](int64_t i, const Chunk& chunk, int64_t n0, int nb) {
      const float* theta = p.theta + i * c.num_params;
      const float* scale = p.scale + (i * p.num_segments + chunk.segment) * nw;
      Load(p, i, n0, nb, true, &blk);
      Features(c, &blk);
      Mlp(c, theta, scale, p.bias + i * h_size, blk.x.data(), &blk);
      // d step = -d new_w; padded lanes have zero upstream gradients and so contribute nothing.
      for (int b = 0; b < kB; ++b) {
        const float scaled = c.lambda_exp * blk.o0[b];
        const float e = std::exp(std::min(scaled, c.max_log_step)) * c.lambda_lin;
        const float d_step = -blk.up_w[b];
        blk.do1[b] = d_step * e;
        blk.do0[b] = scaled <= c.max_log_step ? d_step * e * blk.o1[b] * c.lambda_exp : 0.0f;
      }
      const float* w2 = theta + c.w2_offset();
      for (int v = 0; v < kBV; ++v) {
        const Vec do0 = LoadV(blk.do0.data() + v * kL), do1 = LoadV(blk.do1.data() + v * kL);
        acc_b2[0] += do0;
        acc_b2[1] += do1;
        for (int h = 0; h < h_size; ++h) {
          const Vec z = LoadV(blk.z.data() + h * kB + v * kL);
          const Vec a = Relu(z);
          acc_w2[2 * h] += a * do0;
          acc_w2[2 * h + 1] += a * do1;
          const Vec dz = Select(z > Splat(0.0f), Splat(w2[2 * h]) * do0 + Splat(w2[2 * h + 1]) * do1);
          acc_dz[h] += dz;
          StoreV(blk.dz.data() + h * kB + v * kL, dz);
        }
      }
      Outer(blk.xn.data(), blk.dz.data(), nw, h_size, acc_w1);
      // dx̂[j] = Σ_h W1[j, h] dz[h], into dx, then the direct path dx = q dx̂.
      Dense(theta, h_size, 1, nw, h_size, blk.dz.data(), zeros.data(), blk.dx.data());
      for (int j = 0; j < nw; ++j) {
        float* dxj = blk.dx.data() + j * kB;
        const float* xj = blk.x.data() + j * kB;
        const Vec q = Splat(scale[j]);
        for (int v = 0; v < kBV; ++v) {
          const Vec dxn = LoadV(dxj + v * kL);
          acc_a[j] += dxn * LoadV(xj + v * kL);
          StoreV(dxj + v * kL, dxn * q);
        }
      }
      Chain(c, true, &blk);
      StoreInputGradients(p, i, n0, nb, false, blk);
    });
    float* partial = p.partials + u * q_size;
    for (int64_t q = 0; q < q_size; ++q) partial[q] = HorizontalSum(acc[q]);
  }
}

void FinishBackwardTrajectories(const Problem& p, int64_t begin, int64_t end) {
  const Config& c = *p.cfg;
  const int nw = c.num_weight_features, h_size = c.hidden;
  const int64_t q_size = c.partial_size();
  const int64_t a_offset = q_size - nw;
  std::vector<double> sums(q_size);
  std::vector<double> a(p.num_segments * nw);
  for (int64_t i = begin; i < end; ++i) {
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(a.begin(), a.end(), 0.0);
    for (int64_t ch = 0; ch < p.num_chunks; ++ch) {
      const float* part = p.partials + (i * p.num_chunks + ch) * q_size;
      for (int64_t q = 0; q < a_offset; ++q) sums[q] += part[q];
      for (int j = 0; j < nw; ++j) a[p.chunks[ch].segment * nw + j] += part[a_offset + j];
    }
    float* d_theta = p.d_theta + i * c.num_params;
    const int64_t w1_weight = int64_t{nw} * h_size;
    for (int64_t q = 0; q < w1_weight; ++q) d_theta[q] = static_cast<float>(sums[q]);
    const double* sum_dz = sums.data() + w1_weight;
    for (int f = 0; f < c.num_time_scales; ++f) {
      const double tau = std::tanh(p.t[i] / c.time_scales[f] - 1.0f);
      for (int h = 0; h < h_size; ++h)
        d_theta[(nw + f) * h_size + h] = static_cast<float>(tau * sum_dz[h]);
    }
    for (int64_t q = 0; q < 3 * h_size + 2; ++q)
      d_theta[c.b1_offset() + q] = static_cast<float>(sum_dz[q]);
    // x̂ = x q with q = (ε_n + Σx²/L)^-1/2: dx = q dx̂ + x · (-q³/L) Σ_s dx̂ x.
    for (int64_t s = 0; s < p.num_segments; ++s)
      for (int j = 0; j < nw; ++j) {
        const int64_t k = (i * p.num_segments + s) * nw + j;
        const double q = p.scale[k];
        p.correction[k] = static_cast<float>(-q * q * q / p.segment_sizes[s] * a[s * nw + j]);
      }
  }
}

// Adds the normalization's indirect path, dx_j = correction_sj x_j, to the input gradients.
void CorrectionUnits(const Problem& p, int64_t begin, int64_t end) {
  const Config& c = *p.cfg;
  const int nw = c.num_weight_features;
  Block blk(c);
  for (int64_t u = begin; u < end; ++u) {
    ForUnitBlocks(p, u, [&](int64_t i, const Chunk& chunk, int64_t n0, int nb) {
      const float* corr = p.correction + (i * p.num_segments + chunk.segment) * nw;
      Load(p, i, n0, nb, false, &blk);
      Features(c, &blk);
      for (int j = 0; j < nw; ++j) {
        const float* xj = blk.x.data() + j * kB;
        float* dxj = blk.dx.data() + j * kB;
        for (int b = 0; b < kB; ++b) dxj[b] = corr[j] * xj[b];
      }
      Chain(c, false, &blk);
      StoreInputGradients(p, i, n0, nb, true, blk);
    });
  }
}

}  // namespace

const CpuUnits& Units() {
  static const CpuUnits units = {LO_TF_STRINGIFY(LO_TF_ISA), StatsUnits, FinishStatsTrajectories,
                                 StepUnits, BackwardUnits, FinishBackwardTrajectories,
                                 CorrectionUnits};
  return units;
}

}  // namespace LO_TF_ISA
}  // namespace lo_tf

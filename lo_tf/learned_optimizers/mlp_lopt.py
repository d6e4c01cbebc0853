"""The per-weight MLP learned optimizer of the paper (§4.1, App. C.1).

Every inner weight is fed to the same small MLP (31 features -> 32 ReLU units -> 2 outputs). Its
features per weight (App. C.1):

* the gradient g and the weight value w (2);
* momenta m_k, EMAs of g at decays β_k in [0.5, 0.9, 0.99, 0.999, 0.9999] (5);
* rms_k, the root of the EMA of g² at the same decays (5);
* r_k = 1 / (rms_k + ε) and r_k · m_k (5 + 5);
* the iteration t as tanh(t/η - 1) at 9 timescales η log-spaced over [3, 300k] (9).

All non-time features are divided by their root-mean-square over the elements of the weight tensor
they belong to (per tensor). The two outputs o1, o2 give the step exp(λ_exp·o1)·λ_lin·o2 with
λ_exp = λ_lin = 1e-3, subtracted from the weight.

The implementation works on all inner weights at once, flattened into one vector of N elements,
so a step costs two [N, F] x [F, 32] and [N, 32] x [32, 2] matrix products plus elementwise work
whatever the number of weight tensors (App. F). Ablation switches (§4.5, Fig. 7) remove feature
groups: `use_rms=False` (No RMS), `use_momentum=False` (No Mom), both (Only Grads),
`use_time=False` (No Time).
"""

import math

import gin
import numpy as np
import tensorflow as tf

from lo_tf.optimizers.base import Optimizer

# Second-moment normalization divides by sqrt(mean(f^2) + _NORM_EPS): zero feature columns (zero
# biases at init) stay finite in value and in first and second derivatives.
_NORM_EPS = 1e-12
# Largest exponent passed to exp(): the step multiplier never exceeds e^10 and never overflows.
_MAX_LOG_STEP = 10.0


@gin.configurable
class MLPLOpt:
  """The learned optimizer family: `optimizer(theta)` gives the inner optimizer for θ.

  Args:
    hidden_size: hidden ReLU units (paper: 32).
    decays: EMA decays of the momentum and rms features (paper: [0.5, 0.9, 0.99, 0.999, 0.9999]).
    num_time_scales: number of tanh(t/η - 1) features, η log-spaced over `time_scale_range`.
    time_scale_range: (lowest, highest) timescale η in inner steps (paper: (3, 300k)).
    lambda_exp: temperature of the log step size output o1 (paper: 1e-3).
    lambda_lin: temperature of the direction output o2 (paper: 1e-3).
    epsilon: ε in r = 1/(rms + ε); also keeps rms = sqrt(v + ε²) differentiable at v = 0.
    use_momentum: feed m_k (and r_k·m_k when use_rms).
    use_rms: feed rms_k and r_k (and r_k·m_k when use_momentum).
    use_time: feed the 9 iteration features.
    jit_compile: compile the per-weight update with XLA (same results, fewer kernels).
  """

  def __init__(self, hidden_size=32, decays=(0.5, 0.9, 0.99, 0.999, 0.9999),
               num_time_scales=9, time_scale_range=(3.0, 3e5), lambda_exp=1e-3,
               lambda_lin=1e-3, epsilon=1e-8, use_momentum=True, use_rms=True, use_time=True,
               jit_compile=True):
    self.hidden_size = int(hidden_size)
    self.decays = tuple(float(d) for d in decays)
    self.time_scales = tuple(np.logspace(np.log10(time_scale_range[0]),
                                         np.log10(time_scale_range[1]), num_time_scales))
    self.lambda_exp, self.lambda_lin, self.epsilon = lambda_exp, lambda_lin, epsilon
    self.use_momentum, self.use_rms, self.use_time = use_momentum, use_rms, use_time
    # XLA fuses the ~40 elementwise ops of a step into a few kernels (App. F's overhead).
    self._step = tf.function(self.step, jit_compile=True) if jit_compile else self.step

  @property
  def num_weight_features(self):
    """Normalized per-weight features: g, w, and the momentum / rms groups switched on."""
    k = len(self.decays)
    return 2 + k * (self.use_momentum + 2 * self.use_rms + (self.use_momentum and self.use_rms))

  @property
  def num_features(self):
    """All MLP inputs (paper: 31)."""
    return self.num_weight_features + (len(self.time_scales) if self.use_time else 0)

  def _shapes(self):
    f, h = self.num_features, self.hidden_size
    return [(f, h), (h,), (h, 2), (2,)]

  @property
  def num_meta_params(self):
    """Size of θ (paper's setup: 31·32 + 32 + 32·2 + 2 = 1,090)."""
    return sum(math.prod(s) for s in self._shapes())

  def init_theta(self, seed):
    """Initial θ, float32 [num_meta_params]: Glorot-uniform weights, zero biases.

    Args:
      seed: int32/int64 [2] stateless seed.
    """
    parts = []
    for i, shape in enumerate(self._shapes()):
      if len(shape) == 1:
        parts.append(tf.zeros(shape))
      else:
        limit = math.sqrt(6.0 / sum(shape))
        parts.append(tf.random.stateless_uniform(
            shape, tf.random.experimental.stateless_fold_in(seed, i), -limit, limit))
    return tf.concat([tf.reshape(p, [-1]) for p in parts], 0)

  def unpack(self, theta):
    """Splits flat θ [num_meta_params] into (W1 [F, H], b1 [H], W2 [H, 2], b2 [2])."""
    sizes = [math.prod(s) for s in self._shapes()]
    return [tf.reshape(p, s) for p, s in zip(tf.split(theta, sizes), self._shapes())]

  def step(self, theta, grads, params, t, m, v):
    """One learned-optimizer step on every inner weight tensor (App. C.1).

    Features are normalized per weight tensor by their root-mean-square over its elements; the
    scale is folded into the first-layer weights of that tensor, which costs one [n, F] x [F, 32]
    product per tensor and no per-element rescaling.

    Args:
      theta: float32 [num_meta_params].
      grads, params: lists of float32 tensors of matching shapes (the inner gradients, weights).
      t: float32 scalar, steps taken so far.
      m, v: lists of float32 [n_i, len(decays)] gradient and squared-gradient EMAs of each tensor
        ([n_i, 0] when unused).

    Returns:
      (new params list, t + 1, new m list, new v list).
    """
    t = t + 1.0
    decays = tf.constant(self.decays)
    w1, b1, w2, b2 = self.unpack(theta)
    nw = self.num_weight_features
    bias = b1
    if self.use_time:
      # Time features are the same for every weight: fold them into the bias once.
      tau = tf.tanh(t / tf.constant(self.time_scales, tf.float32) - 1.0)
      bias += tf.linalg.matvec(w1[nw:], tau, transpose_a=True)
    new_params, new_m, new_v = [], [], []
    for g, p, mi, vi in zip(grads, params, m, v):
      g, w = tf.reshape(g, [-1, 1]), tf.reshape(p, [-1, 1])
      features = [g, w]
      if self.use_momentum:
        mi = decays * mi + (1 - decays) * g
        features.append(mi)
      if self.use_rms:
        vi = decays * vi + (1 - decays) * tf.square(g)
        rms = tf.sqrt(vi + self.epsilon**2)
        r = 1.0 / (rms + self.epsilon)
        features += [rms, r]
        if self.use_momentum:
          features.append(r * mi)
      x = tf.concat(features, 1)  # [n_i, num_weight_features]
      scale = tf.math.rsqrt(tf.reduce_mean(tf.square(x), 0) + _NORM_EPS)
      hidden = tf.nn.relu(tf.matmul(x, scale[:, None] * w1[:nw]) + bias)
      out = tf.matmul(hidden, w2) + b2
      log_scale = tf.minimum(self.lambda_exp * out[:, 0], _MAX_LOG_STEP)
      step = tf.exp(log_scale) * self.lambda_lin * out[:, 1]
      new_params.append(p - tf.reshape(step, p.shape))
      new_m.append(mi)
      new_v.append(vi)
    return new_params, t, new_m, new_v

  def optimizer(self, theta):
    """The inner optimizer defined by θ (float32 [num_meta_params]); see `LearnedOptimizer`."""
    return LearnedOptimizer(self, theta)


class LearnedOptimizer(Optimizer):
  """The inner optimizer u(·; θ) for one θ: an ordinary `Optimizer` (init/update).

  State: (t float32 scalar, m, v) where m and v are lists with one float32 [n_i, 5] tensor per
  inner weight tensor (n_i its element count): the gradient and squared-gradient EMAs at the 5
  decays ([n_i, 0] when switched off).
  """

  def __init__(self, family, theta):
    self.family = family
    self.theta = theta

  def init(self, params):
    k = len(self.family.decays)
    zeros = lambda on: [tf.zeros([math.prod(p.shape), k if on else 0]) for p in params]
    return (tf.constant(0.0), zeros(self.family.use_momentum), zeros(self.family.use_rms))

  def update(self, grads, state, params):
    new_params, t, m, v = self.family._step(self.theta, grads, params, *state)
    return new_params, (t, m, v)

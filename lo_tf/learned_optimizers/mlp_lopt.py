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

from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.errors import check_number
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
    check_int('MLPLOpt', 'hidden_size', hidden_size)
    check_int('MLPLOpt', 'num_time_scales', num_time_scales)
    for name, value in (('lambda_exp', lambda_exp), ('lambda_lin', lambda_lin),
                        ('epsilon', epsilon)):
      check_number('MLPLOpt', name, value, 0.0, low_open=True)
    if not isinstance(decays, (tuple, list)) or not decays:
      raise UserError(f'MLPLOpt.decays={decays!r} must be a non-empty tuple of numbers in (0, 1)')
    for d in decays:
      check_number('MLPLOpt', 'decays', d, 0.0, 1.0, low_open=True, high_open=True)
    if (not isinstance(time_scale_range, (tuple, list)) or len(time_scale_range) != 2 or
        not 0 < time_scale_range[0] <= time_scale_range[1]):
      raise UserError(f'MLPLOpt.time_scale_range={time_scale_range!r} must be (low, high) with '
                      '0 < low <= high')
    self._config = dict(hidden_size=hidden_size, decays=list(decays),
                        num_time_scales=num_time_scales, time_scale_range=list(time_scale_range),
                        lambda_exp=lambda_exp, lambda_lin=lambda_lin, epsilon=epsilon,
                        use_momentum=use_momentum, use_rms=use_rms, use_time=use_time)
    self.hidden_size = int(hidden_size)
    self.decays = tuple(float(d) for d in decays)
    self.time_scales = tuple(np.logspace(np.log10(time_scale_range[0]),
                                         np.log10(time_scale_range[1]), num_time_scales))
    self.lambda_exp, self.lambda_lin, self.epsilon = lambda_exp, lambda_lin, epsilon
    self.use_momentum, self.use_rms, self.use_time = use_momentum, use_rms, use_time
    # XLA fuses the ~40 elementwise ops of a step into a few kernels (App. F's overhead).
    self._step = tf.function(self.step, jit_compile=True) if jit_compile else self.step

  def config(self):
    """JSON-able constructor arguments (without `jit_compile`): `MLPLOpt(**config())` rebuilds it."""
    return dict(self._config)

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
    """One learned-optimizer step on all N inner weights, flattened (App. C.1).

    Args:
      theta: float32 [num_meta_params].
      grads, params: lists of float32 tensors of matching shapes (N elements in all).
      t: float32 scalar, steps taken so far.
      m, v: float32 [N, len(decays)] gradient and squared-gradient EMAs ([N, 0] when unused), the
        weight tensors' elements concatenated in order.

    Returns:
      (new params list, t + 1, new m, new v).
    """
    shapes = [p.shape for p in params]
    sizes = [math.prod(s) for s in shapes]
    flat = lambda xs: tf.concat([tf.reshape(x, [-1]) for x in xs], 0)
    g, w = flat(grads), flat(params)
    t = t + 1.0
    decays = tf.constant(self.decays)
    g, w = g[:, None], w[:, None]
    features = [g, w]
    if self.use_momentum:
      m = decays * m + (1 - decays) * g
      features.append(m)
    if self.use_rms:
      v = decays * v + (1 - decays) * tf.square(g)
      rms = tf.sqrt(v + self.epsilon**2)
      r = 1.0 / (rms + self.epsilon)
      features += [rms, r]
      if self.use_momentum:
        features.append(r * m)
    x = tf.concat(features, 1)  # [N, num_weight_features]
    # Per-tensor second moments by two small matrix products with the [N, num_tensors] one-hot
    # membership matrix: few, dense, differentiable ops instead of one set per tensor.
    members = tf.constant(np.repeat(np.eye(len(sizes), dtype=np.float32), sizes, axis=0))
    inv_counts = tf.constant(1.0 / np.asarray(sizes, np.float32))[:, None]
    second_moment = tf.matmul(members, tf.square(x), transpose_a=True) * inv_counts
    x = x * tf.matmul(members, tf.math.rsqrt(second_moment + _NORM_EPS))
    w1, b1, w2, b2 = self.unpack(theta)
    nw = self.num_weight_features
    bias = b1
    if self.use_time:
      # Time features are the same for every weight: fold them into the bias once.
      tau = tf.tanh(t / tf.constant(self.time_scales, tf.float32) - 1.0)
      bias += tf.linalg.matvec(w1[nw:], tau, transpose_a=True)
    out = tf.matmul(tf.nn.relu(tf.matmul(x, w1[:nw]) + bias), w2) + b2
    log_scale = tf.minimum(self.lambda_exp * out[:, 0], _MAX_LOG_STEP)
    step = tf.exp(log_scale) * self.lambda_lin * out[:, 1]
    new = tf.split(w[:, 0] - step, sizes)
    return [tf.reshape(p, s) for p, s in zip(new, shapes)], t, m, v

  def optimizer(self, theta, compiled=True):
    """The inner optimizer u(·; θ) for θ (float32 [num_meta_params]); see `LearnedOptimizer`.

    Args:
      theta: float32 [num_meta_params].
      compiled: use the XLA-compiled step when the family has one; pass False inside a graph
        that is XLA-compiled as a whole.
    """
    return LearnedOptimizer(self, theta, self._step if compiled else self.step)


class LearnedOptimizer(Optimizer):
  """The inner optimizer u(·; θ) for one θ: an ordinary `Optimizer` (init/update).

  State: (t float32 scalar, m float32 [N, 5], v float32 [N, 5]) for N inner weights in all (the
  weight tensors flattened and concatenated): the gradient and squared-gradient EMAs at the 5
  decays ([N, 0] when switched off).
  """

  def __init__(self, family, theta, step_fn):
    self.family = family
    self.theta = theta
    self._step_fn = step_fn

  def init(self, params):
    n, k = sum(math.prod(p.shape) for p in params), len(self.family.decays)
    return (tf.constant(0.0), tf.zeros([n, k if self.family.use_momentum else 0]),
            tf.zeros([n, k if self.family.use_rms else 0]))

  def update(self, grads, state, params):
    new_params, t, m, v = self._step_fn(self.theta, grads, params, *state)
    return new_params, (t, m, v)

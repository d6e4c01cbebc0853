"""The per-weight MLP learned optimizer of the paper (§4.1, App. C.1).

Every inner weight is fed to the same small MLP (31 features -> 32 ReLU units -> 2 outputs). Its
features per weight, in this order (App. C.1; where the paper leaves a detail open, the authors'
released code, google-research `task_specific_learned_opt/fast_rolling_mlp.py`, fixes it):

* the gradient g and the weight value w (2);
* momenta m_k, EMAs of g at the decays β_k = [0.5, 0.9, 0.99, 0.999, 0.9999] (5);
* v_k, the EMAs of g² at the same decays (5);
* r_k = rsqrt(v_k + ε_r), Adam's inverse root mean square (ε_r = 1e-6 as in the authors' code, so
  r_k ≤ 1000 even for a weight whose gradient is always zero), and r_k · m_k (5 + 5);
* the inner step t (steps taken so far) as tanh(t/η - 1) at 9 timescales η from 3 to 300k (the
  authors' list 3, 10, 30, 100, 300, 1k, 3k, 10k, 300k).

All non-time features are divided by their root mean square over the elements of the weight tensor
they belong to, rsqrt(ε_n + mean(f²)) with ε_n = 1e-5 (per tensor: "normalized by the second moment
with regard to other elements in the batch dimension"). The two outputs o1, o2 give the step
exp(λ_exp·o1)·λ_lin·o2 with λ_exp = λ_lin = 1e-3, subtracted from the weight.

One *core* function computes a step for M independent trajectories at once (M θ's, M copies of the
inner weights flattened to N elements each): the per-weight MLP is then two batched matrix products
whatever the number of weight tensors (App. F). It has three implementations, all giving the same
numbers to float tolerance and all differentiable with respect to every input (the second-order
term of g_rp reaches the inner gradient through `g`):

* ``reference``: plain TensorFlow ops (runs inside any graph, XLA-compiled ones included);
* ``xla``: the reference core as one XLA-compiled function (fewer kernels for plain inner training);
* ``custom_op``: the fused C++/CUDA kernel of `lo_tf.kernels` with its fused gradient kernel.

``auto`` takes ``custom_op`` when the kernel library is built, else ``xla``.

Ablation switches (§4.5, Fig. 7) remove feature groups: `use_rms=False` (No RMS), `use_momentum=False`
(No Mom), both (Only Grads), `use_time=False` (No Time).
"""

import collections
import math

import gin
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.errors import check_number
from lo_tf.kernels import ops
from lo_tf.learned_optimizers.base import LearnedOptimizerFamily
from lo_tf.optimizers.base import Optimizer

# Largest exponent passed to exp(): the step multiplier never exceeds e^10 and never overflows.
MAX_LOG_STEP = 10.0
AUTHORS_TIME_SCALES = (3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e5)
IMPLEMENTATIONS = ('auto', 'custom_op', 'xla', 'reference')

MLPLOptState = collections.namedtuple('MLPLOptState', ['t', 'm', 'v'])
MLPLOptState.__doc__ = """State of the learned optimizer for one trajectory (or M, batched).

Fields:
  t: float32 scalar ([M] batched), inner steps taken so far.
  m: float32 [N, D] ([M, N, D]) gradient EMAs at the D decays ([N, 0] when use_momentum=False).
  v: float32 [N, D] ([M, N, D]) squared-gradient EMAs ([N, 0] when use_rms=False).
N is the number of inner weights of all tensors, flattened and concatenated in order.
"""


@gin.configurable
class MLPLOpt(LearnedOptimizerFamily):
  """The learned optimizer family: `optimizer(theta)` gives the inner optimizer u(·; θ).

  Args:
    hidden_size: hidden ReLU units (paper: 32).
    decays: EMA decays of the momentum and second-moment features (paper: 0.5 ... 0.9999).
    time_scales: timescales η of the tanh(t/η - 1) features (authors' code: 3 ... 300k).
    lambda_exp: temperature of the log step size output o1 (paper: 1e-3).
    lambda_lin: temperature of the direction output o2 (paper: 1e-3).
    rms_epsilon: ε_r in r = rsqrt(v + ε_r) (authors' code: 1e-6; 1e-16 gives the unbounded
      1/(rms + 1e-8) of earlier lo_tf versions).
    norm_epsilon: ε_n of the per-tensor normalization (authors' code: 1e-5).
    use_momentum: feed m_k (and r_k·m_k when use_rms).
    use_rms: feed v_k and r_k (and r_k·m_k when use_momentum).
    use_time: feed the iteration features.
    implementation: 'auto', 'custom_op', 'xla' or 'reference' (see the module docstring). It changes
      speed only, so it is not part of `config()`.
    cpu_isa: the fused op's CPU kernel: 'auto' (the best this CPU has), 'generic', 'avx2' or
      'avx512'. The kernels round differently, and outer-training is chaotic, so the same run on
      another kernel gives another θ; forcing one lets a machine with AVX-512 reproduce what one
      without it gets (issue 25). Not part of `config()`: a θ trained on one kernel loads and runs
      on any other. Ignored by the 'xla' and 'reference' implementations.

  Raises:
    UserError: for values out of range, implementation='custom_op' when the kernel library is
      not built, or a cpu_isa this CPU (or the build) lacks.
  """

  def __init__(self, hidden_size=32, decays=(0.5, 0.9, 0.99, 0.999, 0.9999),
               time_scales=AUTHORS_TIME_SCALES, lambda_exp=1e-3, lambda_lin=1e-3,
               rms_epsilon=1e-6, norm_epsilon=1e-5, use_momentum=True, use_rms=True,
               use_time=True, implementation='auto', cpu_isa='auto'):
    check_int('MLPLOpt', 'hidden_size', hidden_size)
    for name, value in (('lambda_exp', lambda_exp), ('lambda_lin', lambda_lin),
                        ('rms_epsilon', rms_epsilon), ('norm_epsilon', norm_epsilon)):
      check_number('MLPLOpt', name, value, 0.0, low_open=True)
    for name, values in (('decays', decays), ('time_scales', time_scales)):
      if not isinstance(values, (tuple, list)) or not values:
        raise UserError(f'MLPLOpt.{name}={values!r} must be a non-empty tuple of numbers')
    for d in decays:
      check_number('MLPLOpt', 'decays', d, 0.0, 1.0, low_open=True, high_open=True)
    for s in time_scales:
      check_number('MLPLOpt', 'time_scales', s, 0.0, low_open=True)
    for name, value in (('use_momentum', use_momentum), ('use_rms', use_rms),
                        ('use_time', use_time)):
      if not isinstance(value, bool):
        raise UserError(f'MLPLOpt.{name}={value!r} must be True or False')
    if implementation not in IMPLEMENTATIONS:
      raise UserError(f'MLPLOpt.implementation={implementation!r}; use one of {IMPLEMENTATIONS}')
    self.hidden_size = int(hidden_size)
    self.decays = tuple(float(d) for d in decays)
    self.time_scales = tuple(float(s) for s in time_scales)
    self.lambda_exp, self.lambda_lin = float(lambda_exp), float(lambda_lin)
    self.rms_epsilon, self.norm_epsilon = float(rms_epsilon), float(norm_epsilon)
    self.use_momentum, self.use_rms, self.use_time = use_momentum, use_rms, use_time
    self.implementation = _resolve_implementation(implementation)
    self.cpu_isa = ops.check_cpu_isa(cpu_isa) if self.implementation == 'custom_op' else cpu_isa
    self._xla_core = tf.function(self.reference_core, jit_compile=True)

  def config(self):
    """JSON-able constructor arguments (no `implementation`): `MLPLOpt(**config())` rebuilds it."""
    return dict(hidden_size=self.hidden_size, decays=list(self.decays),
                time_scales=list(self.time_scales), lambda_exp=self.lambda_exp,
                lambda_lin=self.lambda_lin, rms_epsilon=self.rms_epsilon,
                norm_epsilon=self.norm_epsilon, use_momentum=self.use_momentum,
                use_rms=self.use_rms, use_time=self.use_time)

  @property
  def kernel_path(self):
    """Which numerical path the step runs, e.g. 'custom_op (cpu avx2)' or 'xla' (run metadata)."""
    if self.implementation != 'custom_op':
      return self.implementation
    return f'custom_op (cpu {ops.cpu_isa() if self.cpu_isa == "auto" else self.cpu_isa})'

  @property
  def depth(self):
    """D, the number of EMA decays (the last axis of m and v)."""
    return len(self.decays)

  @property
  def num_weight_features(self):
    """Normalized per-weight features: g, w, and the momentum / second-moment groups switched on."""
    d = self.depth
    return 2 + d * (self.use_momentum + 2 * self.use_rms + (self.use_momentum and self.use_rms))

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

  def hand_designed_theta(self, step_size, seed, decay=0.9, residual_scale=0.1):
    """θ whose step is `step_size` times the normalized Adam-like direction, plus a small residual.

    Two hidden units compute relu(±x), x the per-tensor-normalized feature r_k·m_k = m_k /
    sqrt(v_k + ε_r) at decay β_k = `decay`, and o2 = (step_size / λ_lin)·(relu(x) - relu(-x)), o1 =
    0: the step is step_size·x, Adam's direction (β1 = β2 = `decay`, no bias correction) at an RMS
    of `step_size` per tensor. The other hidden units keep `init_theta`'s weights and feed the
    outputs through `residual_scale` times their initial output weights, so every entry of θ has an
    outer gradient from the start. The paper leaves θ's initialization open (§4.1); starting from a
    tuned hand-designed step spends no outer steps on growing the step size from ~λ_lin.

    Args:
      step_size: float > 0, the step's RMS per tensor (a learning rate).
      seed: int32/int64 [2] stateless seed of the residual weights (as `init_theta`).
      decay: one of `decays`.
      residual_scale: factor on the other hidden units' output weights.

    Returns:
      float32 [num_meta_params].

    Raises:
      UserError: without the momentum and second-moment features, or for a decay not in `decays`.
    """
    if not (self.use_momentum and self.use_rms):
      raise UserError('a hand-designed θ needs the r·m features: MLPLOpt.use_momentum and use_rms '
                      'must both be True (or start from the Glorot initialization)')
    if decay not in self.decays:
      raise UserError(f'decay={decay!r} is not one of MLPLOpt.decays {self.decays}')
    check_number('MLPLOpt', 'step_size', step_size, 0.0, low_open=True)
    feature = 2 + 3 * self.depth + self.decays.index(decay)  # [g, w, m, v, r, r·m]
    w1, b1, w2, b2 = [p[0] for p in self.unpack(self.init_theta(seed)[None])]
    unit = tf.one_hot(feature, self.num_features)
    w1 = tf.concat([tf.stack([unit, -unit], 1), w1[:, 2:]], 1)
    b1 = tf.concat([tf.zeros([2]), b1[2:]], 0)
    gain = step_size / self.lambda_lin
    w2 = tf.concat([tf.constant([[0.0, gain], [0.0, -gain]]), residual_scale * w2[2:]], 0)
    return tf.concat([tf.reshape(p, [-1]) for p in (w1, b1, w2, tf.zeros_like(b2))], 0)

  def unpack(self, theta):
    """Splits θ [M, num_meta_params] into W1 [M, F, H], b1 [M, H], W2 [M, H, 2], b2 [M, 2]."""
    sizes = [math.prod(s) for s in self._shapes()]
    return [tf.reshape(p, [-1, *s]) for p, s in zip(tf.split(theta, sizes, axis=-1),
                                                    self._shapes())]

  def init_state(self, num_weights, batch_shape=()):
    """Zero `MLPLOptState` for `num_weights` inner weights and an optional leading batch shape."""
    batch = list(batch_shape)
    return MLPLOptState(
        t=tf.zeros(batch), m=tf.zeros(batch + [num_weights, self.depth * self.use_momentum]),
        v=tf.zeros(batch + [num_weights, self.depth * self.use_rms]))

  def core(self, theta, g, w, t, m, v, sizes):
    """One learned-optimizer step of M trajectories, each over N flattened inner weights.

    Args:
      theta: float32 [M, num_meta_params], one θ per trajectory.
      g, w: float32 [M, N] gradients and weights, the inner weight tensors flattened and
        concatenated in order.
      t: float32 [M] inner steps taken so far.
      m, v: float32 [M, N, D] EMAs of g and g² (depth 0 when the group is switched off).
      sizes: tuple of Python ints, the element counts of the weight tensors (sum N); features are
        normalized within each.

    Returns:
      (new w [M, N], new m, new v).
    """
    if self.implementation == 'custom_op':
      return ops.mlp_lopt_step(self, theta, g, w, t, m, v, sizes, cpu_isa=self.cpu_isa)
    if self.implementation == 'xla':
      return self._xla_core(theta, g, w, t, m, v, tuple(sizes))
    return self.reference_core(theta, g, w, t, m, v, tuple(sizes))

  def reference_core(self, theta, g, w, t, m, v, sizes):
    """`core` in plain TensorFlow ops: the definition the other implementations are tested against."""
    decays = tf.constant(self.decays, g.dtype)
    g3 = g[..., None]
    features = [g3, w[..., None]]
    if self.use_momentum:
      m = decays * m + (1.0 - decays) * g3
      features.append(m)
    if self.use_rms:
      v = decays * v + (1.0 - decays) * tf.square(g3)
      r = tf.math.rsqrt(v + self.rms_epsilon)
      features += [v, r]
      if self.use_momentum:
        features.append(r * m)
    x = tf.concat(features, -1)  # [M, N, num_weight_features]
    parts = tf.split(x, list(sizes), axis=1)
    x = tf.concat([p * tf.math.rsqrt(self.norm_epsilon +
                                     tf.reduce_mean(tf.square(p), axis=1, keepdims=True))
                   for p in parts], axis=1)
    w1, b1, w2, b2 = self.unpack(theta)
    nw = self.num_weight_features
    bias = b1
    if self.use_time:
      # The time features are the same for every weight of a trajectory: fold them into the bias.
      tau = tf.tanh(t[:, None] / tf.constant(self.time_scales, t.dtype) - 1.0)  # [M, num_time_scales]
      bias += tf.einsum('mf,mfh->mh', tau, w1[:, nw:])
    hidden = tf.nn.relu(tf.matmul(x, w1[:, :nw]) + bias[:, None, :])
    out = tf.matmul(hidden, w2) + b2[:, None, :]
    log_scale = tf.minimum(self.lambda_exp * out[..., 0], MAX_LOG_STEP)
    step = tf.exp(log_scale) * self.lambda_lin * out[..., 1]
    return w - step, m, v

  def optimizer(self, theta):
    """The inner optimizer u(·; θ) for θ float32 [num_meta_params] (a `BoundMLPLOpt`)."""
    return BoundMLPLOpt(self, theta)

  def batched_optimizer(self, thetas):
    """u(·; θ_m) for M θ's at once, float32 [M, num_meta_params]: params carry a leading M axis."""
    return BoundMLPLOpt(self, thetas, batched=True)


class BoundMLPLOpt(Optimizer):
  """`MLPLOpt` bound to one θ (or M, batched): the inner optimizer u(·; θ), an ordinary `Optimizer`.

  State: `MLPLOptState`. With `batched=True`, params, grads and state leaves carry a leading axis
  of M trajectories and θ is [M, num_meta_params].
  """

  def __init__(self, family, theta, batched=False):
    self.family = family
    self.theta = theta
    self.batched = batched

  def init(self, params):
    if self.batched:
      batch = params[0].shape[:1]
      return self.family.init_state(sum(math.prod(p.shape[1:]) for p in params), batch)
    return self.family.init_state(sum(math.prod(p.shape) for p in params))

  def update(self, grads, state, params):
    lead = 1 if self.batched else 0
    sizes = [math.prod(p.shape[lead:]) for p in params]
    live = [i for i, n in enumerate(sizes) if n]  # a zero-size tensor has nothing to update
    if not live:
      return list(params), MLPLOptState(state.t + 1.0, state.m, state.v)
    flat = lambda xs: tf.concat([tf.reshape(xs[i], [-1, sizes[i]]) for i in live], 1)
    g, w = flat(grads), flat(params)
    theta, t, m, v = self.theta, state.t, state.m, state.v
    if not self.batched:
      theta, t, m, v = theta[None], t[None], m[None], v[None]
    new_w, m, v = self.family.core(theta, g, w, t, m, v, tuple(sizes[i] for i in live))
    if not self.batched:
      new_w, m, v = new_w[0], m[0], v[0]
    pieces = tf.split(new_w, [sizes[i] for i in live], axis=-1)
    new_params = list(params)
    for i, x in zip(live, pieces):
      new_params[i] = tf.reshape(x, params[i].shape)
    return new_params, MLPLOptState(state.t + 1.0, m, v)


def _resolve_implementation(implementation):
  """'auto' -> 'custom_op' when the kernel library loads, else 'xla' (warned once)."""
  if implementation in ('auto', 'custom_op'):
    if ops.available():
      return 'custom_op'
    if implementation == 'custom_op':
      raise UserError(f'MLPLOpt.implementation=custom_op but the kernel library is not built '
                      f'({ops.load_error()}); reinstall with `pip install -e .` where a C++ '
                      "compiler is found, or use implementation='xla'")
    ops.warn_fallback()
    return 'xla'
  return implementation

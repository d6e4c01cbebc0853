"""Gradient estimators of the variational outer objective (paper §3, eq. 1; App. B).

With θ̃ = θ + e, e ~ N(0, σ²I), the smoothed objective is 𝓛(θ) = E[L(θ̃)]. For one antithetic
pair (θ + e, θ - e) whose unrolls start from the same inner state and see the same minibatches:

  g_rp = ∇θ ½(L⁺ + L⁻)                (reparameterization: backprop through the unrolls)
  g_es = ½(L⁺ - L⁻) · e / σ²          (evolution strategies: the log-derivative trick)

`GradientEstimator.estimate` (the worker side of Algorithm 1) computes one such pair for every
slot in one graph execution and returns them per sample (`EstimatorOutput`), so outputs of any
batches of slots concatenate exactly. `GradientEstimator.merge` (called by the learner) forms each
estimator's per-element empirical mean and variance over the finite samples and combines them by
inverse-variance weighting (eq. 1), or keeps one of them (the 'rp' and 'es' modes of Fig. 7):

  g_merged = (g_rp σ_rp⁻² + g_es σ_es⁻²) / (σ_rp⁻² + σ_es⁻²),

each variance plus `variance_epsilon` (1e-8 in the authors' `es_grad_inv_var.py`). As in the paper,
the same samples serve for the means and the variances.
"""

import collections

import gin
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.errors import check_number
from lo_tf.outer_trainers.curriculum import Curriculum
from lo_tf.outer_trainers.truncated_step import TruncatedStep
from lo_tf.outer_trainers.truncated_step import select
from lo_tf.outer_trainers.truncated_step import tile_state

MODES = ('merged', 'rp', 'es')

EstimatorOutput = collections.namedtuple(
    'EstimatorOutput', ['g_rp', 'g_es', 'loss_pos', 'loss_neg', 'finite', 'lengths',
                        'train_loss', 'reset'])
EstimatorOutput.__doc__ = """One antithetic sample per slot, for eq. 1 (a batch of S samples).

Fields:
  g_rp, g_es: float32 [S, P] the two estimates of ∇𝓛(θ) (g_rp is zeros for the ES-only ablation).
  loss_pos, loss_neg: float32 [S] the truncation outer losses L⁺, L⁻.
  finite: bool [S], False drops the sample (non-finite losses, gradients or end state).
  lengths: int32 [S] k, the inner steps each trajectory of the pair ran.
  train_loss: float32 [S] mean inner train loss over the + trajectory's truncation.
  reset: bool [S] slots that started a new task before this truncation.
"""


def concat_outputs(outputs):
  """Concatenates `EstimatorOutput`s of several batches of slots into one batch."""
  return EstimatorOutput(*[tf.concat(list(field), 0) for field in zip(*outputs)])


def merge(output, mode='merged', variance_epsilon=1e-8):
  """Combines a batch of samples into one outer-gradient estimate (eq. 1).

  Args:
    output: `EstimatorOutput` of S samples.
    mode: 'merged' (eq. 1), 'rp' or 'es' (the Fig. 7 ablations; `GradientEstimator` checks it).
    variance_epsilon: added to each per-element variance.

  Returns:
    (gradient float32 [P] (zeros when no sample is finite), dict of float32 scalars: num_used,
    var_rp and var_es (means over elements of the per-element variances), rp_weight (mean share of
    g_rp in the merged gradient)).
  """
  used = tf.cast(output.finite, tf.float32)[:, None]
  n = tf.reduce_sum(used)

  def mean_var(samples):
    samples = tf.where(used > 0, samples, 0.0)  # a dropped sample may hold NaN
    mean = tf.reduce_sum(samples, 0) / tf.maximum(n, 1.0)
    # Unbiased variance; one sample has no spread to estimate, so it reads as 0.
    var = tf.reduce_sum(used * tf.square(samples - mean), 0) / tf.maximum(n - 1.0, 1.0)
    return mean, var + variance_epsilon

  mean_rp, var_rp = mean_var(output.g_rp)
  mean_es, var_es = mean_var(output.g_es)
  if mode == 'merged':
    # w_rp = σ_rp⁻² / (σ_rp⁻² + σ_es⁻²) = σ_es² / (σ_rp² + σ_es²); equal weights if both are 0.
    total = var_rp + var_es
    w_rp = tf.where(total > 0, var_es / tf.where(total > 0, total, 1.0), 0.5)
  else:
    w_rp = tf.fill(tf.shape(mean_rp), {'rp': 1.0, 'es': 0.0}[mode])
  grad = w_rp * mean_rp + (1.0 - w_rp) * mean_es
  stats = {'num_used': n, 'var_rp': tf.reduce_mean(var_rp), 'var_es': tf.reduce_mean(var_es),
           'rp_weight': tf.reduce_mean(w_rp)}
  return tf.where(n > 0, grad, tf.zeros_like(grad)), stats


@gin.configurable(denylist=['truncated_step', 'curriculum'])
class GradientEstimator:
  """Antithetic rp/es samples of every slot's next truncation, and their merge (§3, App. B).

  `estimate(θ, state, outer_step, seed) -> (EstimatorOutput, next state)` runs as one traced graph:
  slots that reached T (or whose last sample was non-finite) start a new task with fresh weights;
  each slot draws its truncation length k from the curriculum (its first truncation on a task
  takes a uniform fraction of k, so slots fall out of phase and one outer update sees every
  phase of inner training); 2S trajectories (θ + e_s and θ - e_s for each slot s) unroll k_s
  steps from the slot's state on the same minibatches; the + trajectory's end state becomes the
  slot's state (Algorithm 1: "assign the current inner-parameter w from one of the two
  sequences"). A slot whose sample is not finite asks for a new task. `merge(output)` combines
  a batch of such samples into one outer gradient by eq. 1 (`merge`, with this estimator's mode).

  Args:
    truncated_step: `lo_tf.outer_trainers.truncated_step.TruncatedStep`.
    curriculum: `lo_tf.outer_trainers.curriculum.Curriculum`.
    sigma: standard deviation of e (paper text: σ² = 0.01; the authors' code: σ = 0.01).
    mode: 'merged' (eq. 1), 'rp' or 'es' (the Fig. 7 ablations); 'es' skips the backward pass.
    variance_epsilon: added to each variance of eq. 1 (the authors' code: 1e-8).

  Raises:
    UserError: for a non-positive sigma, an unknown mode or a negative variance_epsilon.
  """

  def __init__(self, truncated_step, curriculum, sigma=0.1, mode='merged', variance_epsilon=1e-8):
    if mode not in MODES:
      raise UserError(f'GradientEstimator.mode={mode!r}; use one of {MODES}')
    self.step = truncated_step
    self.curriculum = curriculum
    self.sigma = check_number('GradientEstimator', 'sigma', sigma, 0.0, low_open=True)
    self.mode = mode
    self.variance_epsilon = check_number('GradientEstimator', 'variance_epsilon',
                                         variance_epsilon, 0.0)
    self.estimate = tf.function(self._estimate)

  @classmethod
  def for_experiment(cls, experiment, family):
    """The gin-configured estimator of `experiment`'s outer-train tasks for `family`: its
    `TruncatedStep` over the experiment's T and batch size, and the gin-configured `Curriculum`."""
    trainer = experiment.trainer
    step = TruncatedStep(experiment.tasks, experiment.problem, family, trainer.num_steps,
                         trainer.batch_size)
    return cls(step, Curriculum())

  def init_slot_state(self, num_slots):
    """Initial `SlotState` of `num_slots` slots (each starts a task at the first estimate)."""
    return self.step.init_slot_state(num_slots)

  def merge(self, output):
    """The outer gradient of a batch of samples by this estimator's mode (see `merge`)."""
    return merge(output, self.mode, self.variance_epsilon)

  def _estimate(self, theta, state, outer_step, seed):
    """One sample per slot (see the class docstring).

    Args:
      theta: float32 [P] (a tensor or variable).
      state: `SlotState` of S slots.
      outer_step: int64 scalar, the curriculum position.
      seed: int64 [2]; the whole sample is a pure function of (θ, state, outer_step, seed).

    Returns:
      (`EstimatorOutput` of S samples, next `SlotState`).
    """
    fold = lambda i: tf.random.experimental.stateless_fold_in(seed, i)
    state, reset = self.step.reset(state, fold(0))
    s = state.inner_step.shape[0]
    k = self.curriculum.sample_lengths(outer_step, tf.random.stateless_uniform([s], fold(1)))
    # First truncation on a task: a uniform fraction of k, which desynchronizes the slots.
    first = tf.cast(tf.math.ceil(tf.cast(k, tf.float32) * tf.random.stateless_uniform(
        [s], fold(2))), tf.int32)
    k = tf.where(reset, tf.maximum(first, 1), k)
    k = tf.minimum(k, self.step.num_inner_steps - state.inner_step)
    theta = tf.convert_to_tensor(theta)
    noise = self.sigma * tf.random.stateless_normal([s, theta.shape[0]], fold(3))
    pairs = tile_state(state, 2)
    lengths = tf.tile(k, [2])
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      thetas = tf.concat([theta + noise, theta - noise], 0)
      tape.watch(thetas)
      losses, end, train_loss = self.step.unroll(thetas, pairs, lengths, fold(4), pairs=2)
      loss_pos, loss_neg = losses[:s], losses[s:]
      objective = 0.5 * tf.reduce_sum(loss_pos + loss_neg)
    if self.mode == 'es':
      g_rp = tf.zeros_like(noise)
    else:
      d = tape.gradient(objective, thetas)
      g_rp = d[:s] + d[s:]  # ∂/∂θ of ½(L⁺ + L⁻) through θ + e and θ - e
    g_es = (0.5 * (loss_pos - loss_neg) / self.sigma**2)[:, None] * noise
    end_pos = tf.nest.map_structure(lambda x: x[:s], end)
    finite = tf.reduce_all(tf.stack(
        [tf.math.is_finite(loss_pos), tf.math.is_finite(loss_neg),
         tf.reduce_all(tf.math.is_finite(g_rp), 1), tf.reduce_all(tf.math.is_finite(g_es), 1)] +
        [tf.reduce_all(tf.math.is_finite(tf.reshape(x, [s, -1])), 1)
         for x in tf.nest.flatten((end_pos.params, end_pos.opt_state))
         if x.dtype.is_floating]), 0)
    failed = state._replace(task_seed=-tf.ones_like(state.task_seed))
    next_state = select(finite, end_pos, failed)
    out = EstimatorOutput(g_rp=g_rp, g_es=g_es, loss_pos=loss_pos, loss_neg=loss_neg,
                          finite=finite, lengths=k, train_loss=train_loss[:s], reset=reset)
    return out, next_state

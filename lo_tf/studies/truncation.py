"""Figure 4a-c: the bias of truncated backprop, outer-learning Adam's learning rate (paper §2.4).

θ = [log lr] of Adam (`LearnedLearningRate`, exp(θ0) = 1e-3) on the configured inner problem
(gin/studies/fig4_truncation.gin: a two-hidden-layer MLP on 10-way MNIST). The outer loss of a
learning rate is L_train of the whole inner training: the mean minibatch train loss over T inner
steps (`InnerTrainer`), averaged over `num_inits` (task, initialization) pairs.

* Grid search: that outer loss over a log-spaced grid of learning rates; its argmin is the optimum
  (the paper: 0.004 on its MNIST network with T = 10k).
* Fig. 4a: for each truncation length k, one inner training run of `total_inner_steps` steps
  (restarting from a fresh initialization every T steps) is cut into truncations of k steps; after
  each truncation the plain truncated-backprop gradient dL_k/dθ (`TruncatedStep.unroll`, M = 1, no
  smoothing noise) takes one Adam step on θ (`OuterLearner`), and inner training goes on from
  where the truncation ended with the new θ. Every line costs the same inner steps; short
  truncations take many outer steps. The learned rate and the whole-training outer loss at θ are
  recorded along the way.
* Fig. 4b,c: with θ fixed at θ0, the gradient of each k-step truncation of one inner training
  (k = `bias_truncation`, 500 in the paper) against the inner step it starts at, and its
  cumulative sum: early truncations ask for a larger rate (negative), late ones for a smaller one;
  where the sum crosses zero the truncated gradient's sign flips.
"""

import math

import gin
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.errors import check_number
from lo_tf.experiment import build_experiment
from lo_tf.learned_optimizers.hyperparameters import LearnedLearningRate
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.outer_trainers import estimators
from lo_tf.outer_trainers.estimators import EstimatorOutput
from lo_tf.outer_trainers.learner import OuterLearner
from lo_tf.outer_trainers.truncated_step import TruncatedStep
from lo_tf.studies import base
from lo_tf.tasks.distribution import OUTER_TRAIN


class TruncatedLearningRate:
  """Truncated unrolls of one worker whose optimizer is Adam at lr = exp(θ) (θ float32 [1]).

  Args:
    experiment: `lo_tf.experiment.Experiment` (its trainer's num_steps is T, batch_size the
      minibatch).
    initial_learning_rate: exp(θ0).
  """

  def __init__(self, experiment, initial_learning_rate):
    self.family = LearnedLearningRate('adam', initial_learning_rate)
    trainer = experiment.trainer
    self.step = TruncatedStep(experiment.tasks, experiment.problem, self.family,
                              trainer.num_steps, trainer.batch_size)
    self.num_steps = trainer.num_steps
    self.reset = tf.function(self.step.reset)
    self.gradient = tf.function(self._gradient)

  def start(self, seed):
    """A worker on a new task with fresh weights (the task and weights follow `seed`)."""
    state, _ = self.reset(self.step.init_slot_state(1), tf.constant([seed, 0], tf.int64))
    return state

  def _gradient(self, theta, state, length, seed):
    """(truncation outer loss L, dL/dθ float32 [1], end state) of `length` steps from `state`."""
    with tf.GradientTape() as tape:
      tape.watch(theta)
      losses, end, _ = self.step.unroll(theta[None], state, length[None], seed)
      loss = losses[0]
    return loss, tape.gradient(loss, theta), end

  def truncations(self, theta, state, k, count, seed):
    """Yields (inner step t at the start, L, dL/dθ, end state) of `count` k-step truncations.

    The worker restarts on a new task with fresh weights whenever it reaches T (its next
    truncation then starts at t = 0); a truncation never runs past T.
    """
    for j in range(count):
      if int(state.inner_step[0]) >= self.num_steps:
        state = self.start(seed * 100003 + j)
      t = int(state.inner_step[0])
      length = tf.constant(min(k, self.num_steps - t), tf.int32)
      loss, grad, state = self.gradient(tf.convert_to_tensor(theta()), state, length,
                                        tf.constant([seed, j + 1], tf.int64))
      yield t, float(loss), float(grad[0]), state


def _rp_merge(output):
  """eq. 1's merge restricted to g_rp (the mean of the samples' exact truncation gradients)."""
  return estimators.merge(output, 'rp')


@gin.configurable
class TruncationStudy(base.Study):
  """Fig. 4a-c (see the module docstring).

  Args:
    truncation_lengths: the k's of Fig. 4a (inner steps per truncation).
    total_inner_steps: inner steps of outer-training per line (None: T, one inner training).
    initial_learning_rate: exp(θ0) (paper: 1e-3).
    outer_learning_rate: Adam's learning rate on θ = log lr.
    outer_beta_1: Adam's β1 on θ.
    grid: the learning rates of the grid search (None: 13 values log-spaced over [1e-4, 1e-1]).
    num_inits: (task, initialization) pairs the outer loss of a learning rate averages over.
    num_loss_evaluations: points per line at which Fig. 4a evaluates the whole-training outer loss.
    bias_truncation: k of Fig. 4b,c (paper: 500).
    seed: seeds the inner training runs of Fig. 4a-c.

  Raises:
    UserError: for out-of-range settings.
  """

  name = 'fig4_truncation'
  schema = {'num_inner_steps': int, 'total_inner_steps': int, 'initial_learning_rate': float,
            'grid': {'learning_rates': [float], 'outer_loss': [float], 'best_learning_rate': float,
                     'best_is_inside': bool},
            'truncations': [{'length': int, 'outer_steps': [int], 'learning_rate': [float],
                             'truncation_loss': [float], 'eval_outer_steps': [int],
                             'eval_outer_loss': [float], 'final_learning_rate': float}],
            'bias': {'length': int, 'inner_step': [int], 'gradient': [float],
                     'cumulative': [float], 'sign_flip_step': int},
            'summary': dict}

  def __init__(self, truncation_lengths=(10, 50, 250), total_inner_steps=None,
               initial_learning_rate=1e-3, outer_learning_rate=0.01, outer_beta_1=0.5, grid=None,
               num_inits=2, num_loss_evaluations=6, bias_truncation=500, seed=0):
    if not truncation_lengths:
      raise UserError('TruncationStudy.truncation_lengths is empty; give at least one k')
    self.lengths = [check_int('TruncationStudy', 'truncation_lengths', k)
                    for k in truncation_lengths]
    self.total = (None if total_inner_steps is None else
                  check_int('TruncationStudy', 'total_inner_steps', total_inner_steps))
    self.lr0 = check_number('TruncationStudy', 'initial_learning_rate', initial_learning_rate,
                            0.0, low_open=True)
    self.outer_lr = check_number('TruncationStudy', 'outer_learning_rate', outer_learning_rate,
                                 0.0, low_open=True)
    self.beta_1 = check_number('TruncationStudy', 'outer_beta_1', outer_beta_1, 0.0, 1.0,
                               high_open=True)
    grid = np.logspace(-4, -1, 13) if grid is None else grid
    self.grid = sorted(check_number('TruncationStudy', 'grid', g, 0.0, low_open=True)
                       for g in grid)
    if len(self.grid) < 3:
      raise UserError('TruncationStudy.grid needs at least 3 learning rates')
    self.num_inits = check_int('TruncationStudy', 'num_inits', num_inits)
    self.num_evals = check_int('TruncationStudy', 'num_loss_evaluations', num_loss_evaluations)
    self.bias_k = check_int('TruncationStudy', 'bias_truncation', bias_truncation)
    self.seed = check_int('TruncationStudy', 'seed', seed, minimum=0)
    self.experiment = build_experiment()
    self.T = self.experiment.trainer.num_steps
    if self.bias_k > self.T:
      raise UserError(f'TruncationStudy.bias_truncation={bias_truncation} exceeds T={self.T} '
                      '(InnerTrainer.num_steps); lower it or raise T')
    self.engine = TruncatedLearningRate(self.experiment, self.lr0)

  def outer_loss(self, learning_rate):
    """L_train of whole inner trainings at `learning_rate`: mean train loss over T, over inits.

    A diverged run counts as inf.
    """
    values = []
    for i in range(self.num_inits):
      task = self.experiment.tasks.sample_task(OUTER_TRAIN, i)
      curves = self.experiment.trainer.train(Adam, float(learning_rate), task, seed=i)
      values.append(math.inf if curves.diverged else float(np.mean(curves.train_loss)))
    return float(np.mean(values))

  def _key(self, **extra):
    return dict(extra, fingerprint=self.experiment.fingerprint(), T=self.T,
                num_inits=self.num_inits)

  def compute(self, output_dir, options, parts):
    del output_dir, options
    total = self.total or self.T
    bar = base.progress(len(self.grid) + len(self.lengths) + 1, 'fig4 parts')
    grid_losses = []
    for lr in self.grid:
      grid_losses.append(parts.get('grid', self._key(lr=lr),
                                   lambda lr=lr: {'loss': self.outer_loss(lr)})['loss'])
      bar.update(1)
    losses = base.floats(grid_losses)
    best = int(np.nanargmin(np.where(np.isfinite(losses), losses, np.nan)))
    lines = []
    for k in self.lengths:
      lines.append(parts.get('truncation', self._key(k=k, total=total, lr0=self.lr0,
                                                     outer_lr=self.outer_lr, beta_1=self.beta_1,
                                                     evals=self.num_evals, seed=self.seed),
                             lambda k=k: self._outer_train(k, total)))
      bar.update(1)
    bias = parts.get('bias', self._key(k=self.bias_k, lr0=self.lr0, seed=self.seed), self._bias)
    bar.update(1)
    bar.close()
    summary = {'grid_best_learning_rate': self.grid[best],
               'grid_best_is_inside': 0 < best < len(self.grid) - 1,
               'final_learning_rate': {str(line['length']): line['final_learning_rate']
                                       for line in lines},
               'bias_sign_flip_step': bias['sign_flip_step']}
    results = {'num_inner_steps': self.T, 'total_inner_steps': total,
               'initial_learning_rate': self.lr0,
               'grid': {'learning_rates': self.grid, 'outer_loss': grid_losses,
                        'best_learning_rate': self.grid[best],
                        'best_is_inside': summary['grid_best_is_inside']},
               'truncations': lines, 'bias': bias, 'summary': summary}
    return results, {self.name: self._figure(results)}

  def _outer_train(self, k, total):
    """One Fig. 4a line: outer-trains θ with k-step truncations over `total` inner steps."""
    # The truncation's exact gradient is its g_rp: the 'rp' merge of one sample is that gradient.
    learner = OuterLearner(self.engine.family.init_theta(None), _rp_merge,
                           outer_learning_rate=self.outer_lr, beta_1=self.beta_1, clip_value=None)
    count = math.ceil(total / k)
    at = set(np.unique(np.round(np.geomspace(1, count, self.num_evals)).astype(int)).tolist())
    record = {'length': k, 'outer_steps': [], 'learning_rate': [], 'truncation_loss': [],
              'eval_outer_steps': [0], 'eval_outer_loss': [self.outer_loss(self.lr0)]}
    state = self.engine.start(self.seed)
    truncations = self.engine.truncations(lambda: learner.theta, state, k, count, self.seed)
    for j, (_, loss, grad, _) in enumerate(truncations, start=1):
      learner.apply(_one_sample(grad, loss))
      lr = float(np.exp(learner.theta.numpy()[0]))
      record['outer_steps'].append(j)
      record['learning_rate'].append(lr)
      record['truncation_loss'].append(loss)
      if j in at:
        record['eval_outer_steps'].append(j)
        record['eval_outer_loss'].append(self.outer_loss(lr))
    record['final_learning_rate'] = record['learning_rate'][-1]
    return record

  def _bias(self):
    """Fig. 4b,c: per-truncation gradients at θ0 over one inner training, and their sum."""
    theta = self.engine.family.init_theta(None)
    count = math.ceil(self.T / self.bias_k)
    steps, grads = [], []
    state = self.engine.start(self.seed)
    for t, _, grad, _ in self.engine.truncations(lambda: theta, state, self.bias_k, count,
                                                 self.seed):
      steps.append(t)
      grads.append(grad)
    cumulative = np.cumsum(grads)
    # The first truncation after which the running sum is positive (the rate would decrease).
    flips = np.flatnonzero(cumulative > 0)
    flip = int(steps[flips[0]] + self.bias_k) if flips.size else -1
    return {'length': self.bias_k, 'inner_step': steps, 'gradient': grads,
            'cumulative': cumulative.tolist(), 'sign_flip_step': flip}

  def _figure(self, r):
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(r['truncations'])))
    best = r['grid']['best_learning_rate']
    ax = axes[0, 0]
    for line, color in zip(r['truncations'], colors):
      ax.plot([0] + line['outer_steps'], [self.lr0] + line['learning_rate'], color=color,
              label=f'{line["length"]}-step truncations')
    ax.axhline(self.lr0, color='k', ls='--', lw=0.8, label=f'initial {self.lr0:g}')
    ax.axhline(best, color='tab:red', ls=':', lw=1.2, label=f'grid optimum {best:.2g}')
    ax.set(xscale='symlog', yscale='log', xlabel='outer step', ylabel='learned learning rate',
           title='(a) learned Adam learning rate')
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for line, color in zip(r['truncations'], colors):
      ax.plot(line['eval_outer_steps'], line['eval_outer_loss'], marker='o', color=color,
              label=f'{line["length"]}-step truncations')
    ax.axhline(min(v for v in r['grid']['outer_loss'] if v is not None), color='tab:red',
               ls=':', lw=1.2, label='grid optimum')
    ax.set(xscale='symlog', xlabel='outer step', ylabel=f'outer loss (mean train loss over T = '
           f'{self.T})', title='(a) outer loss of the learned rate')
    ax.legend(fontsize=8)
    ax = axes[0, 2]
    ax.plot(r['grid']['learning_rates'], r['grid']['outer_loss'], marker='o', color='k')
    ax.axvline(best, color='tab:red', ls=':', lw=1.2, label=f'optimum {best:.2g}')
    ax.axvline(self.lr0, color='k', ls='--', lw=0.8, label=f'initial {self.lr0:g}')
    ax.set(xscale='log', yscale='log', xlabel='Adam learning rate', ylabel='outer loss',
           title='grid search')
    ax.legend(fontsize=8)
    bias = r['bias']
    ax = axes[1, 0]
    ax.plot(bias['inner_step'], bias['gradient'], marker='.', color='tab:blue')
    ax.axhline(0, color='k', lw=0.8)
    ax.set(xlabel='inner step at the start of the truncation', ylabel='dL/dθ, θ = log lr',
           title=f'(b) per-truncation outer-gradient ({bias["length"]}-step truncations)')
    ax.set_yscale('symlog', linthresh=max(1e-4, float(np.nanmin(np.abs(bias['gradient'])))))
    ax = axes[1, 1]
    ax.plot(bias['inner_step'], bias['cumulative'], marker='.', color='tab:purple')
    ax.axhline(0, color='k', lw=0.8)
    if bias['sign_flip_step'] >= 0:
      ax.axvline(bias['sign_flip_step'] - bias['length'], color='tab:red', ls=':',
                 label='sum turns positive')
      ax.legend(fontsize=8)
    ax.set(xlabel='inner step at the start of the truncation', ylabel='cumulative dL/dθ',
           title='(c) cumulative outer-gradient')
    ax.set_yscale('symlog', linthresh=max(1e-4, float(np.nanmin(np.abs(bias['cumulative'])))))
    ax = axes[1, 2]
    for line, color in zip(r['truncations'], colors):
      ax.plot(line['outer_steps'], line['truncation_loss'], color=color, lw=0.7,
              label=f'{line["length"]}-step truncations')
    ax.set(xscale='symlog', yscale='log', xlabel='outer step', ylabel='truncation L_train',
           title='outer loss of each truncation')
    ax.legend(fontsize=8)
    for ax in axes.flat:
      ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _one_sample(grad, loss):
  """An `EstimatorOutput` holding one finite sample whose g_rp is `grad` (θ of size 1)."""
  g = tf.constant([[grad]], tf.float32)
  value = tf.constant([loss], tf.float32)
  return EstimatorOutput(g_rp=g, g_es=tf.zeros_like(g), loss_pos=value, loss_neg=value,
                         finite=tf.constant([True]), lengths=tf.constant([0]),
                         train_loss=value, reset=tf.constant([False]))

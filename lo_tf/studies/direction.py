"""Is the outer-gradient estimate a descent direction of the whole-training meta-loss? (§3, Fig. 5)

Fig. 5 compares the estimators' variances; this study asks the question a recipe turns on: does a
step along the estimate lower the outer objective over all T inner steps, the objective that
outer-training is meant to improve? At a θ (a learned optimizer's, or the config's θ0 as bin/train
would start from it) and at each curriculum position in `outer_steps`:

1. `num_batches` batches of S antithetic samples are drawn as outer-training draws them (the slots'
   inner states carried from batch to batch, each batch's truncation lengths from the curriculum).
2. For each mode (merged, rp, es) the estimate g from all samples, the cosine between the
   estimates of the first and the second half of the batches (near 0: the estimate is noise at this
   sample count), and the rp/es variances and rp weight of eq. 1.
3. The meta-loss (the outer objective, mean over T of the train or valid loss, averaged over
   `num_tasks` fixed outer-train tasks, one init each; common random numbers for every point) at
   θ and at θ - a·sign(g) for each a in `step_sizes`: a·sign(g) is the first step outer Adam
   takes at learning rate a. A negative change means g points downhill.

Every task is an outer-train task: the study can inform a recipe's choices without looking at
outer-valid or outer-test classes.
"""

import gin
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.errors import check_number
from lo_tf.experiment import build_experiment
from lo_tf.outer_trainers.curriculum import Curriculum
from lo_tf.outer_trainers.estimators import MODES
from lo_tf.outer_trainers.estimators import GradientEstimator
from lo_tf.outer_trainers.estimators import concat_outputs
from lo_tf.outer_trainers.estimators import merge
from lo_tf.outer_trainers.meta_eval import SEED_OFFSET
from lo_tf.outer_trainers.theta_init import ThetaInit
from lo_tf.outer_trainers.truncated_step import TruncatedStep
from lo_tf.studies import base
from lo_tf.tasks.distribution import OUTER_TRAIN

# Outer-train task seeds of the line search: past the meta-evaluation's and ThetaInit's.
TASK_SEED_OFFSET = SEED_OFFSET + 100


def cosine(a, b):
  """Cosine of two float vectors (0 when either is zero)."""
  norm = float(np.linalg.norm(a) * np.linalg.norm(b))
  return float(np.dot(a, b) / norm) if norm > 0 else 0.0


@gin.configurable
class EstimatorDirectionStudy(base.Study):
  """The descent check of the module docstring.

  Args:
    outer_steps: curriculum positions the samples are drawn at (the truncation lengths follow).
    num_batches: batches of `num_slots` samples per position (an even number: split in halves).
    num_slots: S, samples per batch.
    num_tasks: outer-train tasks of the line search.
    step_sizes: the a of θ - a·sign(g).
    seed: seeds the samples.

  Raises:
    UserError: for bad sizes.
  """

  name = 'estimator_direction'
  accepts = ('checkpoint',)
  schema = {'theta': str, 'objective': str, 'loss_at_theta': float,
            'positions': [{'outer_step': int, 'num_samples': int, 'mean_length': float,
                           'var_rp': float, 'var_es': float, 'rp_weight': float,
                           'cos_rp_es': float,
                           'modes': [{'mode': str, 'split_half_cosine': float,
                                      'step_sizes': [float], 'loss': [float],
                                      'change': [float], 'tasks_better': [float]}]}]}

  def __init__(self, outer_steps=(0,), num_batches=8, num_slots=8, num_tasks=8,
               step_sizes=(3e-3, 1e-2, 3e-2), seed=7):
    if not isinstance(outer_steps, (tuple, list)) or not outer_steps:
      raise UserError(f'EstimatorDirectionStudy.outer_steps={outer_steps!r}; give a non-empty '
                      'tuple of curriculum positions, e.g. (0, 100)')
    self.outer_steps = tuple(check_int('EstimatorDirectionStudy', 'outer_steps', s, minimum=0)
                             for s in outer_steps)
    self.num_batches = check_int('EstimatorDirectionStudy', 'num_batches', num_batches, minimum=2)
    if self.num_batches % 2:
      raise UserError(f'EstimatorDirectionStudy.num_batches={num_batches} is odd; give an even '
                      'number (the split-half cosine compares two halves)')
    self.num_slots = check_int('EstimatorDirectionStudy', 'num_slots', num_slots)
    self.num_tasks = check_int('EstimatorDirectionStudy', 'num_tasks', num_tasks)
    if not isinstance(step_sizes, (tuple, list)) or not step_sizes:
      raise UserError(f'EstimatorDirectionStudy.step_sizes={step_sizes!r}; give a non-empty tuple '
                      'of step sizes, e.g. (3e-3, 1e-2, 3e-2)')
    # a·sign(g) moves every element of θ (O(1)) by a; outer Adam's first step moves it by its
    # learning rate (3e-4 to 3e-3): a step beyond 1 measures nothing about the direction.
    self.step_sizes = tuple(check_number('EstimatorDirectionStudy', 'step_sizes', a, 0.0, 1.0,
                                         low_open=True) for a in step_sizes)
    self.seed = check_int('EstimatorDirectionStudy', 'seed', seed, minimum=0)

  def compute(self, output_dir, options, parts):
    del output_dir
    experiment = build_experiment()
    label, family, theta = base.load_theta(options.checkpoint)
    step = TruncatedStep(experiment.tasks, experiment.problem, family,
                         experiment.trainer.num_steps, experiment.trainer.batch_size)
    if not options.checkpoint:  # θ0 as bin/train starts from it
      theta, record = ThetaInit()(experiment, family, step.objective, 0)
      label = f'θ0 of the config ({record})'
    theta = np.asarray(theta, np.float32)
    # 'merged' computes both g_rp and g_es; each mode's estimate is merged from them below.
    estimator = GradientEstimator(step, Curriculum(), mode='merged')
    tasks = [experiment.tasks.sample_task(OUTER_TRAIN, TASK_SEED_OFFSET + i)
             for i in range(self.num_tasks)]

    def task_losses(point):
      losses = []
      for i, task in enumerate(tasks):
        curves = experiment.trainer.train(family, tf.constant(point), task, seed=i)
        curve = curves.train_loss if step.objective == 'train' else curves.valid_loss
        losses.append(np.inf if curves.diverged else float(np.mean(curve)))
      return losses

    key = {'theta': io_utils.array_digest(theta), 'tasks': self.num_tasks,
           'config': gin.config_str()}
    at_theta = parts.get('loss_at_theta', key, lambda: {'losses': task_losses(theta)})['losses']
    positions = []
    bar = base.progress(len(self.outer_steps), 'estimator direction positions')
    for outer_step in self.outer_steps:
      part_key = dict(key, outer_step=outer_step, batches=self.num_batches, slots=self.num_slots,
                      step_sizes=list(self.step_sizes), seed=self.seed)
      positions.append(parts.get('position', part_key, lambda s=outer_step: self._position(
          estimator, theta, s, task_losses, at_theta)))
      bar.update(1)
    bar.close()
    results = {'theta': label, 'objective': step.objective,
               'loss_at_theta': float(np.mean(at_theta)), 'positions': positions}
    return results, {'estimator_direction': self._figure(results)}

  def _position(self, estimator, theta, outer_step, task_losses, at_theta):
    """The numbers of one curriculum position (see the module docstring)."""
    state = estimator.init_slot_state(self.num_slots)
    outputs = []
    for b in range(self.num_batches):
      out, state = estimator.estimate(theta, state, tf.constant(outer_step, tf.int64),
                                      tf.constant([self.seed, b], tf.int64))
      outputs.append(out)
    everything = concat_outputs(outputs)
    half = self.num_batches // 2
    halves = concat_outputs(outputs[:half]), concat_outputs(outputs[half:])
    estimate = {m: merge(everything, m)[0].numpy() for m in MODES}
    stats = {k: float(v) for k, v in merge(everything, 'merged')[1].items()}
    modes = []
    for mode in MODES:
      first, second = (merge(h, mode)[0].numpy() for h in halves)
      losses, better = [], []
      for a in self.step_sizes:
        moved = task_losses(theta - a * np.sign(estimate[mode]).astype(np.float32))
        losses.append(float(np.mean(moved)))
        better.append(float(np.mean(np.array(moved) < np.array(at_theta))))
      modes.append({'mode': mode, 'split_half_cosine': cosine(first, second),
                    'step_sizes': list(self.step_sizes), 'loss': losses,
                    'change': [l - float(np.mean(at_theta)) for l in losses],
                    'tasks_better': better})
    return {'outer_step': outer_step, 'num_samples': int(stats['num_used']),
            'mean_length': float(np.mean(everything.lengths.numpy())),
            'var_rp': stats['var_rp'], 'var_es': stats['var_es'],
            'rp_weight': stats['rp_weight'], 'cos_rp_es': cosine(estimate['rp'], estimate['es']),
            'modes': modes}

  @staticmethod
  def _figure(results):
    positions = results['positions']
    fig, axes = plt.subplots(1, len(positions), figsize=(4.2 * len(positions), 3.6), sharey=True,
                             squeeze=False)
    for ax, p in zip(axes[0], positions):
      for m in p['modes']:
        ax.plot(m['step_sizes'], m['change'], 'o-',
                label=f"{m['mode']} (split-half cos {m['split_half_cosine']:.2f})")
      ax.axhline(0.0, color='k', lw=0.8)
      ax.set_xscale('log')
      ax.set_xlabel('a (θ - a·sign(g))')
      ax.set_title(f"outer step {p['outer_step']}: mean k {p['mean_length']:.0f}, "
                   f"{p['num_samples']} samples", fontsize=9)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"change of the meta-loss (L_{results['objective']}, full T)")
    fig.suptitle(f"Does a step along the estimate lower the meta-loss? {results['theta']}"[:120],
                 fontsize=9)
    fig.tight_layout()
    return fig

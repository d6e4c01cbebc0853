"""θ at outer step 0: Glorot, a hand-designed step tuned on outer-train tasks (paper §4.1), or the
θ of an earlier run (a warm start).

Neither the paper nor the authors' code fixes θ's initialization. With λ_lin = 1e-3 a Glorot θ
takes steps of ~1e-3 of an output unit, so the first hundred outer steps of a CNN recipe only grow
the step size (the meta-loss at outer step 0 is chance). `ThetaInit(kind='tuned_adam')` starts
instead from `MLPLOpt.hand_designed_theta`: the normalized Adam-like direction at the step size that
is best by the outer objective on fixed outer-train tasks, out of a grid — seconds of inner
training instead of outer steps. The choice never looks at outer-valid or outer-test tasks.
"""

import os

import gin
import numpy as np
import tensorflow as tf
from absl import logging

from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.io_utils import array_digest
from lo_tf.learned_optimizers import pretrained
from lo_tf.outer_trainers.meta_eval import SEED_OFFSET
from lo_tf.outer_trainers.run_checkpoints import BEST
from lo_tf.tasks.distribution import OUTER_TRAIN

KINDS = ('glorot', 'tuned_adam', 'checkpoint')


@gin.configurable
class ThetaInit:
  """Chooses θ0 for a learned optimizer family.

  Args:
    kind: 'glorot' (`family.init_theta`), 'tuned_adam' (`family.hand_designed_theta` at the best
      of `step_sizes`) or 'checkpoint' (the θ of `checkpoint`).
    step_sizes: the grid of step sizes tried by 'tuned_adam'.
    num_tasks: outer-train tasks (seeds SEED_OFFSET + i, the meta-evaluation's) each step size is
      scored on, one initialization each.
    decay: the EMA decay of the Adam-like direction (one of `MLPLOpt.decays`).
    checkpoint: for kind='checkpoint': the name of a shipped optimizer (looked up first), a
      train_dir written by bin/train (its best θ, train_dir/best, where that holds a checkpoint,
      else its newest checkpoint) or a checkpoint path (train_dir/ckpt-N); a relative path is
      read from the working directory. Only the `MLPLOpt` configuration must match the run's (the
      objective and the inner problem may differ). A resumed run restores θ from its own
      checkpoint and does not read the source again.

  Raises:
    UserError: for an unknown kind, an empty grid, a family without `hand_designed_theta`, or
      kind='checkpoint' without a checkpoint, with one that does not load, or with one of another
      learned-optimizer configuration than the run's.
  """

  def __init__(self, kind='glorot', step_sizes=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
               num_tasks=5, decay=0.9, checkpoint=None):
    if kind not in KINDS:
      raise UserError(f'ThetaInit.kind={kind!r}; use one of {KINDS}')
    if (kind == 'checkpoint') != (checkpoint is not None) or not (
        checkpoint is None or (isinstance(checkpoint, str) and checkpoint)):
      raise UserError(f'ThetaInit.checkpoint={checkpoint!r} with kind={kind!r}: kind="checkpoint" '
                      'needs a checkpoint, a non-empty string (a shipped name, a train_dir or '
                      'train_dir/ckpt-N), and the other kinds take none')
    self.checkpoint = checkpoint
    if not step_sizes:
      raise UserError('ThetaInit.step_sizes is empty; give at least one step size')
    self.kind, self.decay = kind, float(decay)
    self.step_sizes = tuple(float(s) for s in step_sizes)
    self.num_tasks = check_int('ThetaInit', 'num_tasks', num_tasks)

  def __call__(self, experiment, family, objective, seed):
    """θ0 float32 [P] and a JSON-able record of how it was chosen.

    A 'checkpoint' record holds the source's `wall_seconds` (its outer-training time, None where
    the source does not record it), which `OuterTrainer` takes as the new run's starting time.

    Args:
      experiment: `lo_tf.experiment.Experiment`.
      family: the learned optimizer family.
      objective: 'train' or 'valid': the score is the mean minibatch train loss over T steps, or
        the mean inner-valid loss over the evaluation points, averaged over the tasks.
      seed: the run's seed (the residual weights' seed, as for Glorot).
    """
    stateless = tf.constant([seed, 0])
    if self.kind == 'checkpoint':
      return self._from_checkpoint(family, objective)
    if self.kind == 'glorot':
      return family.init_theta(stateless), {'kind': 'glorot'}
    if not hasattr(family, 'hand_designed_theta'):
      raise UserError(f'ThetaInit.kind=tuned_adam needs a family with hand_designed_theta; '
                      f'{type(family).__name__} has none: use kind="glorot"')
    tasks = [experiment.tasks.sample_task(OUTER_TRAIN, SEED_OFFSET + i)
             for i in range(self.num_tasks)]
    scores = []
    for step_size in self.step_sizes:
      theta = family.hand_designed_theta(step_size, stateless, decay=self.decay)
      losses = []
      for i, task in enumerate(tasks):
        curves = experiment.trainer.train(family, theta, task, seed=i)
        curve = curves.train_loss if objective == 'train' else curves.valid_loss
        losses.append(np.inf if curves.diverged else float(np.mean(curve)))
      scores.append(float(np.mean(losses)))
      logging.info('θ init: step size %.3g scores %.4f on %d outer-train tasks', step_size,
                   scores[-1], len(tasks))
    best = int(np.argmin(scores))
    if not np.isfinite(scores[best]):
      raise UserError('every step size of ThetaInit.step_sizes diverged on outer-train tasks; '
                      'give smaller ones')
    record = {'kind': self.kind, 'decay': self.decay, 'objective': objective,
              'step_sizes': list(self.step_sizes), 'scores': scores,
              'chosen_step_size': self.step_sizes[best], 'num_tasks': self.num_tasks}
    return family.hand_designed_theta(self.step_sizes[best], stateless, decay=self.decay), record

  def _from_checkpoint(self, family, objective):
    spec = self.checkpoint
    best = os.path.join(spec, BEST)
    # best/ exists from a run's start on; it holds a θ once the first meta-evaluation saved one.
    source = (spec if spec in pretrained.shipped_names() or
              not os.path.exists(os.path.join(best, 'checkpoint')) else best)
    try:
      _, lopt, theta, meta = pretrained.load(source)
    except UserError as e:
      hint = f' (or pass {spec}/ckpt-N)' if source == best else ''
      raise UserError(f'ThetaInit.checkpoint={spec!r} does not load: {e}; pass another '
                      f'ThetaInit.checkpoint{hint}') from None
    theirs, ours = lopt.config(), family.config()
    if theirs != ours:
      differ = [f'{k} {theirs.get(k)!r} vs {ours.get(k)!r}' for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)]
      raise UserError(f'ThetaInit.checkpoint={spec!r} is a learned optimizer of another '
                      f'configuration than this run\'s ({", ".join(differ[:3])}); warm-start from '
                      'a run of the same MLPLOpt configuration')
    seconds = meta.get('wall_seconds')
    if not (isinstance(seconds, (int, float)) and np.isfinite(seconds) and seconds >= 0):
      logging.warning('ThetaInit.checkpoint=%r records no usable outer-training time (%r): the '
                      'run counts only its own', spec, seconds)
      seconds = None
    record = {'kind': self.kind, 'source': spec, 'checkpoint': meta.get('checkpoint', source),
              'source_objective': meta.get('objective'), 'objective': objective,
              'source_outer_steps': meta.get('outer_steps'),
              'wall_seconds': None if seconds is None else float(seconds),
              'theta_digest': array_digest(theta.numpy())}
    return theta, record

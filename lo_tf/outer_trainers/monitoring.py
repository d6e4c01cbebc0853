"""What an outer-training run reports while it runs (paper App. B): summaries, stalls, sanity.

`Summaries` writes TensorBoard scalars; `Stall` counts consecutive outer steps in which θ did not
move measurably and stops the run with an error naming the likely cause; `check_sane` refuses
absurd outer learning rates and σ up front and warns about odd ones.
"""

import math
import time

import numpy as np
import tensorflow as tf
from absl import logging

from lo_tf.errors import UserError

# Sane ranges (warned about outside) and absurd ones (refused): the paper's outer learning rates
# are 3e-3 and 3e-4 (App. C.3), its σ 0.01 to 0.1.
OUTER_LEARNING_RATE_SANE, OUTER_LEARNING_RATE_LIMITS = (1e-5, 3e-2), (1e-8, 1.0)
SIGMA_SANE, SIGMA_LIMITS = (1e-3, 1.0), (1e-6, 100.0)
# θ "moves measurably" in a step when ||Δθ|| exceeds this fraction of max(||θ||, 1).
MIN_RELATIVE_CHANGE = 1e-10
# A θ with an element beyond this has blown up (θ's initialization is O(1)).
THETA_BLOWN = 1e6


def check_sane(learning_rate, sigma):
  """Refuses an absurd outer learning rate or σ and warns about one outside the sane range.

  Raises:
    UserError: naming the binding, for a value outside the limits.
  """
  for name, value, sane, limits in (
      ('OuterLearner.outer_learning_rate', learning_rate, OUTER_LEARNING_RATE_SANE,
       OUTER_LEARNING_RATE_LIMITS),
      ('GradientEstimator.sigma', sigma, SIGMA_SANE, SIGMA_LIMITS)):
    if not limits[0] <= value <= limits[1]:
      raise UserError(f'{name}={value:g} is absurd: the sane range is {sane[0]:g} to '
                      f'{sane[1]:g}, and values outside {limits[0]:g} to {limits[1]:g} are '
                      'refused; fix the gin binding')
    if not sane[0] <= value <= sane[1]:
      logging.warning('%s=%g is outside the sane range %g to %g', name, value, *sane)


class Summaries:
  """TensorBoard scalars in train_dir/summaries (tf.summary).

  Args:
    directory: the summaries directory.
    start_step: the first outer step this run writes. A `SessionLog.START` event at that step
      makes TensorBoard drop what an earlier, killed run wrote for steps >= start_step, so a
      resumed run's replayed steps show once.
  """

  def __init__(self, directory, start_step):
    self.writer = tf.summary.create_file_writer(directory)
    # tf.summary writes only Summary events; a SessionLog goes in through ImportEvent.
    event = tf.compat.v1.Event(step=start_step, wall_time=time.time(),
                               session_log=tf.compat.v1.SessionLog(
                                   status=tf.compat.v1.SessionLog.START))
    tf.raw_ops.ImportEvent(writer=self.writer._resource,  # pylint: disable=protected-access
                           event=event.SerializeToString())

  def write(self, step, scalars, prefix=''):
    with self.writer.as_default(step=step):
      for key, value in scalars.items():
        value = float(value)
        if math.isfinite(value):
          tf.summary.scalar(prefix + key, value)

  def flush(self):
    self.writer.flush()


class Stall:
  """Counts consecutive outer steps in which θ did not move measurably; raises after too many.

  Kinds of stalled step: 'no sample' (no finite sample), 'rejected' (the update would have made θ
  non-finite), 'zero gradient' and 'tiny' (θ changed by less than `MIN_RELATIVE_CHANGE`).
  """

  def __init__(self, trainer):
    self.trainer = trainer
    self.steps = []  # (step, kind, relative change) of the current streak

  def update(self, step, stats, before, after):
    change = float(np.linalg.norm(after.astype(np.float64) - before)) / max(
        float(np.linalg.norm(before.astype(np.float64))), 1.0)
    if stats['num_used'] == 0:
      kind = 'no sample'
    elif not stats['applied']:
      kind = 'rejected'
    elif stats['grad_norm'] == 0:
      kind = 'zero gradient'
    elif change <= MIN_RELATIVE_CHANGE:
      kind = 'tiny'
    else:
      self.steps = []
      return
    self.steps.append((step, kind, change))
    if len(self.steps) >= self.trainer.max_unusable_steps:
      self.trainer.summaries.flush()
      raise UserError(self._message(step))

  def _message(self, step):
    t = self.trainer
    n, kinds = len(self.steps), {kind for _, kind, _ in self.steps}
    lr = f'OuterLearner.outer_learning_rate={float(t.learner.optimizer.learning_rate):g}'
    sigma = f'GradientEstimator.sigma={t.estimator.sigma:g}'
    lr_range = '{:g} to {:g}'.format(*OUTER_LEARNING_RATE_SANE)
    sigma_range = '{:g} to {:g}'.format(*SIGMA_SANE)
    size = float(np.max(np.abs(t.theta.numpy())))
    if kinds & {'no sample', 'rejected'}:
      what = 'no usable update (every sample non-finite, or a non-finite step rejected)'
      if size > THETA_BLOWN:
        cause = f'θ blew up (max |θ| {size:.1e}): {lr} is probably too large (sane: {lr_range})'
        # θ after step b-1 made step b's samples unusable: a checkpoint from step b-2 or earlier
        # is the last whose θ is known to be good.
        good = self._last_checkpoint(self.steps[0][0] - 2)
        where = (f'the last good checkpoint is {good}' if good else
                 'no kept checkpoint predates the blow-up')
      elif 'rejected' in kinds:
        cause = f'the update would make θ non-finite: {lr} is probably too large (sane: {lr_range})'
        good = self._last_checkpoint(step)
        where = f'the last checkpoint is {good}' if good else 'no checkpoint was kept'
      else:
        cause = (f'θ is moderate (max |θ| {size:.2g}), the perturbations are not: {sigma} is '
                 f'probably too large (sane: {sigma_range})')
        good = self._last_checkpoint(step)
        where = f'the last checkpoint is {good}' if good else 'no checkpoint was kept'
    else:
      if kinds == {'zero gradient'}:
        what, cause = 'a zero merged gradient', f'{sigma} is probably too large (sane: {sigma_range})'
      else:
        biggest = max(change for *_, change in self.steps)
        what = f'θ moving by at most {biggest:.1e} of its norm'
        cause = f'{lr} is probably too small (sane: {lr_range})'
      good = self._last_checkpoint(step)
      where = f'the last checkpoint is {good}' if good else 'no checkpoint was kept'
    return (f'{n} consecutive outer steps with {what}, up to step {step}: {cause}; {where}; '
            'start a fresh --train_dir with a saner value')

  def _last_checkpoint(self, step):
    kept = [p for p in (self.trainer.checkpoints.manager.checkpoints
                        if self.trainer.checkpoints.manager else [])
            if int(p.rsplit('-', 1)[1]) <= step]
    return kept[-1] if kept else None

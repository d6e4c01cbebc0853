"""The central outer update of θ (paper App. B, Algorithm 1, learner side; App. C.3).

`OuterLearner` holds the meta-parameters θ and the outer optimizer (Adam with β1 = 0.5, App. C.3).
`apply(output)` merges a batch of estimator samples (eq. 1, by the estimator's `merge`), clips the merged gradient by value
(±0.1 in the authors' `es_grad_inv_var.py`) and takes one Adam step — unless that step would make θ
or Adam's slots non-finite, in which case nothing changes and the step counts as rejected: a
non-finite θ never exists, so none is ever checkpointed.

Beyond the paper (issue 25), both off by default: `average_decay` keeps an exponential moving
average of the outer iterates, θ̄ ← d·θ̄ + (1 − d)·θ after every applied step (Polyak–Ruppert
averaging; it cancels the random walk that a noisy outer gradient drives θ through, so the
meta-evaluation and best/ see θ̄ instead of the last noisy iterate), and `decay_steps` anneals
the outer learning rate by a cosine to `final_lr_fraction` of its value over that many steps.
"""

import gin
import keras
import tensorflow as tf

from lo_tf.errors import check_int
from lo_tf.errors import check_number

DEFAULT_OUTER_LEARNING_RATE = {'train': 3e-3, 'valid': 3e-4}  # App. C.3


# The arguments `OuterTrainer` passes; a gin binding of one would be silently overridden.
@gin.configurable(denylist=['initial_theta', 'merge', 'objective'])
class OuterLearner:
  """θ and its outer optimizer; applies merged outer gradients (Algorithm 1, eq. 1).

  Args:
    initial_theta: float32 [P], θ at outer step 0.
    merge: `EstimatorOutput` -> (gradient float32 [P], stats dict), e.g. `GradientEstimator.merge`.
    objective: 'train' or 'valid' (as `TruncatedStep` checked it); picks the default learning rate
      (App. C.3).
    outer_learning_rate: Adam's learning rate (None: 3e-3 for L_train, 3e-4 for L_valid).
    beta_1: Adam β1 (paper: 0.5).
    beta_2: Adam β2 (Keras' and the authors' 0.999). A smaller one forgets the large outer
      gradients of the first steps sooner, so a later, flatter stretch is not crossed in
      steps shrunk by them (issue 25).
    clip_value: the merged gradient is clipped to [-clip_value, clip_value] elementwise before
      Adam (authors' code: 0.1; None: no clipping).
    average_decay: d of the moving average θ̄ of the outer iterates (None: no average; then
      `evaluated_theta` is θ itself). 0.95 averages over ~20 outer steps.
    decay_steps: applied outer steps over which the learning rate falls by a cosine to
      `final_lr_fraction` of `outer_learning_rate`, then stays there (None: constant).
    final_lr_fraction: see `decay_steps`.

  Raises:
    UserError: for out-of-range settings.
  """

  def __init__(self, initial_theta, merge, objective='train', outer_learning_rate=None, beta_1=0.5,
               beta_2=0.999, clip_value=0.1, average_decay=None, decay_steps=None, final_lr_fraction=0.1):
    if outer_learning_rate is not None:
      # Its range is refused (and warned about) by `monitoring.check_sane`, with the sane range.
      check_number('OuterLearner', 'outer_learning_rate', outer_learning_rate)
    if clip_value is not None:
      check_number('OuterLearner', 'clip_value', clip_value, 0.0, low_open=True)
    check_number('OuterLearner', 'beta_1', beta_1, 0.0, 1.0, high_open=True)
    check_number('OuterLearner', 'beta_2', beta_2, 0.0, 1.0, low_open=True, high_open=True)
    if average_decay is not None:
      check_number('OuterLearner', 'average_decay', average_decay, 0.0, 1.0, high_open=True)
    if decay_steps is not None:
      check_int('OuterLearner', 'decay_steps', decay_steps)
    check_number('OuterLearner', 'final_lr_fraction', final_lr_fraction, 0.0, 1.0)
    self.merge, self.clip_value = merge, clip_value
    self.learning_rate = float(DEFAULT_OUTER_LEARNING_RATE[objective]
                               if outer_learning_rate is None else outer_learning_rate)
    self.theta = tf.Variable(initial_theta, name='theta')
    self.average_decay = average_decay
    self.theta_average = (None if average_decay is None else
                          tf.Variable(initial_theta, name='theta_average'))
    rate = self.learning_rate
    if decay_steps is not None:
      rate = keras.optimizers.schedules.CosineDecay(self.learning_rate, decay_steps,
                                                    alpha=final_lr_fraction)
    self.optimizer = keras.optimizers.Adam(learning_rate=rate, beta_1=beta_1, beta_2=beta_2)
    self.optimizer.build([self.theta])
    self.apply = tf.function(self._apply)

  @property
  def evaluated_theta(self):
    """The θ that the meta-evaluation scores and best/ keeps: θ̄ where averaging is on, else θ."""
    return self.theta if self.theta_average is None else self.theta_average

  def reset_average(self):
    """θ̄ ← θ (after θ0 is set: the average starts at the first iterate)."""
    if self.theta_average is not None:
      self.theta_average.assign(self.theta)

  def variables(self):
    """θ, θ̄ where kept, and every slot of the outer optimizer (what a checkpoint must hold)."""
    average = [] if self.theta_average is None else [self.theta_average]
    return [self.theta] + average + list(self.optimizer.variables)

  def trackables(self):
    """{name: trackable} for `tf.train.Checkpoint`."""
    average = {} if self.theta_average is None else {'theta_average': self.theta_average}
    return {'theta': self.theta, 'outer_optimizer': self.optimizer, **average}

  def _apply(self, output):
    """Merges `output` (an `EstimatorOutput`) by eq. 1 and takes one outer step.

    Returns:
      dict of float32 scalars: the merge's statistics (`estimators.merge`), grad_norm (of the
      clipped merged gradient), applied (1 if θ changed, 0 if no sample was finite or the step was rejected).
    """
    grad, stats = self.merge(output)
    if self.clip_value is not None:
      grad = tf.clip_by_value(grad, -self.clip_value, self.clip_value)
    before = [tf.identity(v) for v in self.variables()]
    usable = tf.logical_and(stats['num_used'] > 0, tf.reduce_all(tf.math.is_finite(grad)))

    def step():
      self.optimizer.apply_gradients([(grad, self.theta)])
      if self.theta_average is not None:
        d = self.average_decay
        self.theta_average.assign(d * self.theta_average + (1.0 - d) * self.theta)
      finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in self.variables()
                             if tf.as_dtype(v.dtype).is_floating])
      # A step that overflows θ or a slot is undone, so θ is finite at every checkpoint.
      with tf.control_dependencies([tf.cond(finite, tf.no_op, lambda: tf.group(
          [v.assign(b) for v, b in zip(self.variables(), before)]))]):
        return tf.cast(finite, tf.float32)

    applied = tf.cond(usable, step, lambda: tf.constant(0.0))
    return dict(stats, grad_norm=tf.norm(grad), applied=applied)

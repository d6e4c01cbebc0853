"""The central outer update of θ (paper App. B, Algorithm 1, learner side; App. C.3).

`OuterLearner` holds the meta-parameters θ and the outer optimizer (Adam with β1 = 0.5, App. C.3).
`apply(output)` merges a batch of estimator samples (eq. 1, by the estimator's `merge`), clips the merged gradient by value
(±0.1 in the authors' `es_grad_inv_var.py`) and takes one Adam step — unless that step would make θ
or Adam's slots non-finite, in which case nothing changes and the step counts as rejected: a
non-finite θ never exists, so none is ever checkpointed.
"""

import gin
import keras
import tensorflow as tf

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
    clip_value: the merged gradient is clipped to [-clip_value, clip_value] elementwise before
      Adam (authors' code: 0.1; None: no clipping).

  Raises:
    UserError: for out-of-range settings.
  """

  def __init__(self, initial_theta, merge, objective='train', outer_learning_rate=None, beta_1=0.5,
               clip_value=0.1):
    if outer_learning_rate is not None:
      # Its range is refused (and warned about) by `monitoring.check_sane`, with the sane range.
      check_number('OuterLearner', 'outer_learning_rate', outer_learning_rate)
    if clip_value is not None:
      check_number('OuterLearner', 'clip_value', clip_value, 0.0, low_open=True)
    check_number('OuterLearner', 'beta_1', beta_1, 0.0, 1.0, high_open=True)
    self.merge, self.clip_value = merge, clip_value
    self.learning_rate = float(DEFAULT_OUTER_LEARNING_RATE[objective]
                               if outer_learning_rate is None else outer_learning_rate)
    self.theta = tf.Variable(initial_theta, name='theta')
    self.optimizer = keras.optimizers.Adam(learning_rate=self.learning_rate, beta_1=beta_1)
    self.optimizer.build([self.theta])
    self.apply = tf.function(self._apply)

  def variables(self):
    """θ and every slot of the outer optimizer (what a checkpoint must hold)."""
    return [self.theta] + list(self.optimizer.variables)

  def trackables(self):
    """{name: trackable} for `tf.train.Checkpoint`."""
    return {'theta': self.theta, 'outer_optimizer': self.optimizer}

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
      finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in self.variables()
                             if tf.as_dtype(v.dtype).is_floating])
      # A step that overflows θ or a slot is undone, so θ is finite at every checkpoint.
      with tf.control_dependencies([tf.cond(finite, tf.no_op, lambda: tf.group(
          [v.assign(b) for v, b in zip(self.variables(), before)]))]):
        return tf.cast(finite, tf.float32)

    applied = tf.cond(usable, step, lambda: tf.constant(0.0))
    return dict(stats, grad_norm=tf.norm(grad), applied=applied)

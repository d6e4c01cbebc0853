"""A hand-designed optimizer whose log learning rate is the meta-parameter θ (paper §2.3-§2.4).

The simplest learned optimizer: θ = [log lr] of SGD or Adam. Paper §2.4 (Fig. 4) outer-trains
Adam's learning rate with truncated unrolls to expose truncation bias; App. A differentiates an
unrolled SGD learning rate. It is a `LearnedOptimizerFamily` like `MLPLOpt`: `family(θ)` is an
optimizer and `batched_optimizer(θs [M, 1])` one for M trajectories at once, so the outer-training
engine trains it unchanged.
"""

import math

import gin
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.errors import check_number
from lo_tf.learned_optimizers.base import LearnedOptimizerFamily
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.optimizers.hand_designed import SGDMomentum

_BASES = {'adam': Adam, 'sgd': lambda lr: SGDMomentum(lr, momentum=0.0)}


@gin.configurable
class LearnedLearningRate(LearnedOptimizerFamily):
  """θ = [log learning rate] of a hand-designed optimizer.

  Args:
    base: 'adam' or 'sgd' (plain SGD, no momentum).
    initial_learning_rate: exp(θ) at initialization (Fig. 4: 1e-3).

  Raises:
    UserError: for an unknown base or a non-positive initial rate.
  """

  num_meta_params = 1

  def __init__(self, base='adam', initial_learning_rate=1e-3):
    if base not in _BASES:
      raise UserError(f'LearnedLearningRate.base={base!r}; use one of {sorted(_BASES)}')
    check_number('LearnedLearningRate', 'initial_learning_rate', initial_learning_rate, 0.0,
                 low_open=True)
    self.base, self.initial_learning_rate = base, float(initial_learning_rate)

  def config(self):
    """{'base', 'initial_learning_rate'}: `LearnedLearningRate(**config())` rebuilds it."""
    return {'base': self.base, 'initial_learning_rate': self.initial_learning_rate}

  def init_theta(self, seed):
    """θ0 = [log initial_learning_rate] (float32 [1]; the seed is unused: θ0 is deterministic)."""
    del seed
    return tf.constant([math.log(self.initial_learning_rate)], tf.float32)

  def optimizer(self, theta):
    """The base optimizer at learning rate exp(θ[0]) (θ float32 [1])."""
    return _BASES[self.base](tf.exp(theta[0]))

  def batched_optimizer(self, thetas):
    """The base optimizer with one learning rate exp(θ_m) per trajectory (θs float32 [M, 1])."""
    return _BASES[self.base](tf.exp(thetas[:, 0]))

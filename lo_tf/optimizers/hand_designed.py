"""Hand-designed baselines of the paper (§4.4): SGD+Momentum, RMSProp and Adam.

Each follows the update of its `tf.keras.optimizers` namesake exactly (tests check agreement over
several steps), but as a pure function of tensors so it runs inside `tf.while_loop` graphs. The
learning rate may be a Python float or a float32 scalar tensor: a tensor lets one traced graph serve
a whole learning-rate grid. It may also be a float32 vector [M] for M independent trajectories
whose parameters carry a leading axis of M (the batched unrolls of outer-training, e.g. a learned
learning rate, Fig. 4).
"""

import gin
import numpy as np
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.optimizers.base import Optimizer


def learning_rate_grid(num=11, low=1e-4, high=10.0):
  """The §4.4 grid: `num` learning rates log-spaced from `low` to `high` (float64 [num])."""
  return np.logspace(np.log10(low), np.log10(high), num)


def _per_param(x, p):
  """Broadcasts a scalar, or a per-trajectory vector [M], against a parameter [M, ...]."""
  x = tf.convert_to_tensor(x, p.dtype)
  return x if x.shape.rank == 0 else tf.reshape(x, [-1] + [1] * (p.shape.rank - 1))


@gin.configurable
class SGDMomentum(Optimizer):
  """SGD with (heavy-ball) momentum, as `tf.keras.optimizers.SGD(lr, momentum)`.

  v <- momentum * v - lr * g;  w <- w + v.
  """

  def __init__(self, learning_rate, momentum=0.9):
    self.learning_rate, self.momentum = learning_rate, momentum

  def init(self, params):
    return [tf.zeros_like(p) for p in params]

  def update(self, grads, state, params):
    v = [self.momentum * v - _per_param(self.learning_rate, g) * g for v, g in zip(state, grads)]
    return [p + vi for p, vi in zip(params, v)], v


@gin.configurable
class RMSProp(Optimizer):
  """RMSProp (Tieleman & Hinton, 2012), as `tf.keras.optimizers.RMSprop(lr, rho, epsilon=eps)`.

  s <- rho * s + (1 - rho) * g^2;  w <- w - lr * g / sqrt(s + eps).
  """

  def __init__(self, learning_rate, rho=0.9, epsilon=1e-7):
    self.learning_rate, self.rho, self.epsilon = learning_rate, rho, epsilon

  def init(self, params):
    return [tf.zeros_like(p) for p in params]

  def update(self, grads, state, params):
    s = [self.rho * s + (1 - self.rho) * tf.square(g) for s, g in zip(state, grads)]
    new = [p - _per_param(self.learning_rate, g) * g / tf.sqrt(si + self.epsilon)
           for p, g, si in zip(params, grads, s)]
    return new, s


@gin.configurable
class Adam(Optimizer):
  """Adam (Kingma & Ba, 2014), as `tf.keras.optimizers.Adam(lr, beta_1, beta_2, epsilon)`.

  State: (step count t float32, shaped like the learning rate; first moments m, second moments v).
  """

  def __init__(self, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    self.learning_rate, self.beta_1, self.beta_2, self.epsilon = (
        learning_rate, beta_1, beta_2, epsilon)

  def init(self, params):
    t = tf.zeros_like(tf.convert_to_tensor(self.learning_rate, tf.float32))
    return (t, [tf.zeros_like(p) for p in params], [tf.zeros_like(p) for p in params])

  def update(self, grads, state, params):
    t, m, v = state
    t = t + 1.0
    m = [mi + (g - mi) * (1 - self.beta_1) for mi, g in zip(m, grads)]
    v = [vi + (tf.square(g) - vi) * (1 - self.beta_2) for vi, g in zip(v, grads)]
    alpha = self.learning_rate * tf.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)
    new = [p - _per_param(alpha, p) * mi / (tf.sqrt(vi) + self.epsilon)
           for p, mi, vi in zip(params, m, v)]
    return new, (t, m, v)


BASELINES = {'adam': Adam, 'rmsprop': RMSProp, 'sgdm': SGDMomentum}


def make_baseline(name, learning_rate):
  """The hand-designed optimizer `name` ('adam', 'rmsprop' or 'sgdm') at `learning_rate`.

  Raises:
    UserError: for an unknown name.
  """
  if name not in BASELINES:
    raise UserError(f'unknown optimizer {name!r}; choose one of {sorted(BASELINES)}')
  return BASELINES[name](learning_rate)

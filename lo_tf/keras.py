"""The learned optimizer as a Keras optimizer: train any Keras model with u(·; θ) (paper §4.1).

`LearnedOptimizer` subclasses `keras.optimizers.Optimizer` (Keras 3, TensorFlow backend), so it
works wherever a Keras optimizer does: `model.compile(optimizer=...)` + `model.fit` with
`jit_compile` on or off, `tf.distribute` strategies, `model.save` / `keras.models.load_model` and
`tf.train.Checkpoint`.

Every Keras variable is one weight tensor of `MLPLOpt.optimizer(θ)`: its step is `MLPLOpt.core`
with M = 1 trajectory and sizes = (n,), so the per-tensor feature normalization of App. C.1 sees
exactly the elements of that variable, and a model trained with this optimizer follows the same
trajectory as the lo_tf inner-training loop (`lo_tf.inner_training`) given the same gradients.

This module is `lo_tf.keras`; it and every other lo_tf module import the Keras package absolutely
(`import keras`), so the name never shadows it.
"""

import math

import keras
import numpy as np
import tensorflow as tf
# The one place TensorFlow records whether ops being built go into an XLA cluster: a
# tf.function(jit_compile=True) enters an XLA control-flow context while it traces.
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

from lo_tf.errors import UserError
from lo_tf.learned_optimizers import pretrained
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt


def in_xla_context():
  """Whether ops created now are compiled by XLA (inside a `tf.function(jit_compile=True)`)."""
  return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _unit_learning_rate():
  # Keras' base class requires a learning rate; given as a callable it adds no variable.
  return 1.0


@keras.saving.register_keras_serializable(package='lo_tf')
class LearnedOptimizer(keras.optimizers.Optimizer):
  """The learned per-weight MLP optimizer u(·; θ) (paper §4.1, App. C.1) as a Keras optimizer.

  Build it from exactly one of

  * `checkpoint`: a shipped name (`lo_tf.learned_optimizers.pretrained.shipped_names()`), a
    train_dir written by bin/train (its latest checkpoint) or a checkpoint path (train_dir/ckpt-N);
  * `theta` and `lopt`: θ, float32 [lopt.num_meta_params] (tensor, array or list), and the
    `MLPLOpt` it belongs to (or that family's `config()` dict).

  Slots, created by `build(var_list)` for every variable of n elements: `momentum` and
  `second_moment`, float32 [n, D], the EMAs m, v of g and g² at the D decays of the family (a group
  switched off by `use_momentum=False` / `use_rms=False` has no slot). The inner step t of the
  time features is `iterations` (updates applied so far), so checkpoints that restore the slots
  and `iterations` continue the trajectory exactly.

  Keras options:

  * `clipnorm`, `clipvalue`, `global_clipnorm`, `loss_scale_factor`, `use_ema`,
    `ema_momentum`, `ema_overwrite_frequency` and `gradient_accumulation_steps` work as for any
    Keras optimizer: the learned optimizer then sees the clipped, unscaled or accumulated
    gradients, and t counts accumulated updates.
  * There is no learning rate: the MLP outputs the size of every step, exp(λ_exp·o1)·λ_lin·o2.
    `learning_rate=` and `weight_decay=` (Keras scales decoupled decay by the learning rate) are
    rejected; so is setting `opt.learning_rate`, which LearningRateScheduler and
    ReduceLROnPlateau do. Reading `opt.learning_rate` gives the constant 1.0 (the learned step is
    applied as is) so callbacks that log it keep working.

  `model.save` stores θ and the family's configuration in the model's config, and the slots and
  `iterations` with the other optimizer variables; `import lo_tf.keras` before
  `keras.models.load_model` so that Keras finds this class. `tf.train.Checkpoint` restores the
  slots even before the optimizer is built (they take their values when `build` creates them).

  The step runs `MLPLOpt.core` with the family's implementation (the fused custom op when it is
  built, else the XLA-compiled core) except inside an XLA-compiled train step
  (`jit_compile=True`), where a custom op cannot run and a nested XLA function gains nothing: there
  the plain-TensorFlow reference core is compiled into the step (see `core_implementation`).

  Args:
    checkpoint: str, see above.
    theta: θ, see above.
    lopt: `MLPLOpt` or its config dict, with `theta` only.
    name, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
      loss_scale_factor, gradient_accumulation_steps: as for `keras.optimizers.Optimizer`.

  Raises:
    UserError: neither or both of `checkpoint` and `theta`; an unknown name, missing, corrupt or
      incompatible checkpoint; θ of the wrong shape or non-finite; `learning_rate` or
      `weight_decay` given; Keras not running on the TensorFlow backend.
  """

  def __init__(self, checkpoint=None, theta=None, lopt=None, name=None, **kwargs):
    if keras.backend.backend() != 'tensorflow':
      raise UserError(f'lo_tf.keras.LearnedOptimizer needs the TensorFlow backend of Keras, not '
                      f'{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow')
    for arg, why in (('learning_rate', 'the learned MLP outputs the size of every step'),
                     ('weight_decay', 'Keras scales decoupled weight decay by a learning rate, '
                      'which it has not; add kernel_regularizer= to the layers instead')):
      if arg in kwargs:
        raise UserError(f'LearnedOptimizer takes no {arg}={kwargs[arg]!r}: {why}; remove it')
    if (checkpoint is None) == (theta is None):
      raise UserError('LearnedOptimizer needs exactly one of checkpoint= (a shipped name '
                      f'{pretrained.shipped_names()}, a train_dir or a checkpoint path) and '
                      'theta= with lopt=')
    if checkpoint is not None:
      if lopt is not None:
        raise UserError('LearnedOptimizer: a checkpoint carries its MLPLOpt configuration; '
                        'pass lopt= only with theta=')
      _, family, theta, _ = pretrained.load(checkpoint)
    else:
      if lopt is None:
        raise UserError('LearnedOptimizer(theta=...) needs lopt=, the MLPLOpt (or its config '
                        'dict) that θ belongs to')
      config = lopt.config() if isinstance(lopt, MLPLOpt) else lopt
      if not isinstance(config, dict):
        raise UserError(f'LearnedOptimizer: lopt={lopt!r} must be an MLPLOpt or its config dict')
      family, theta = pretrained.from_config(config, theta, 'LearnedOptimizer')
      if isinstance(lopt, MLPLOpt):
        family = lopt  # keeps the caller's implementation choice
    super().__init__(learning_rate=_unit_learning_rate, name=name, **kwargs)
    self._lopt = family
    self._theta = theta

  @property
  def lopt(self):
    """The `MLPLOpt` family of θ."""
    return self._lopt

  @property
  def theta(self):
    """θ, float32 [lopt.num_meta_params] (a constant)."""
    return self._theta

  @property
  def learning_rate(self):
    """Always 1.0: the learned step is applied as is (see the class docstring)."""
    return 1.0

  @learning_rate.setter
  def learning_rate(self, value):
    raise UserError(f'LearnedOptimizer has no learning rate to set to {value!r}: the learned MLP '
                    'outputs the size of every step; remove the learning-rate callback or '
                    'schedule')

  def build(self, var_list):
    """Creates the momentum and second-moment slots, float32 [n, D] per variable of n elements."""
    if self.built:
      return
    super().build(var_list)
    self._momenta, self._second_moments = [], []
    for var in var_list:
      self._momenta.append(self._add_slot(var, 'momentum') if self._lopt.use_momentum else None)
      self._second_moments.append(self._add_slot(var, 'second_moment') if self._lopt.use_rms
                                  else None)

  def _add_slot(self, var, name):
    # Like Keras' add_variable_from_reference (which only makes slots of the variable's shape):
    # colocated with the variable, so tf.distribute places one copy beside each of its copies.
    reference = var.value if isinstance(var, keras.Variable) else var
    path = getattr(var, 'path', var.name).replace('/', '_').replace(':', '_')
    with self._distribution_strategy.extended.colocate_vars_with(reference):
      return self.add_variable(shape=(math.prod(var.shape), self._lopt.depth), dtype='float32',
                               name=f'{path}_{name}')

  def core_implementation(self):
    """The `MLPLOpt` implementation a step built now uses.

    Returns:
      'reference' inside an XLA-compiled function (there it is compiled into the train step),
      else the family's `implementation` ('custom_op', 'xla' or 'reference').
    """
    return 'reference' if in_xla_context() else self._lopt.implementation

  def update_step(self, gradient, variable, learning_rate):
    """One learned step of `variable` (any shape and float dtype; computed in float32)."""
    del learning_rate  # always 1.0: the step size is learned
    i = self._get_variable_index(variable)
    n = math.prod(variable.shape)
    if n == 0:  # nothing to update (the fused op takes positive sizes only)
      return
    g = tf.reshape(tf.cast(tf.convert_to_tensor(gradient), tf.float32), [1, n])
    w = tf.reshape(tf.cast(variable, tf.float32), [1, n])
    t = tf.reshape(tf.cast(self.iterations, tf.float32), [1])
    empty = tf.zeros([1, n, 0])
    m_slot, v_slot = self._momenta[i], self._second_moments[i]
    m = empty if m_slot is None else m_slot[None]
    v = empty if v_slot is None else v_slot[None]
    core = (self._lopt.reference_core if self.core_implementation() == 'reference'
            else self._lopt.core)
    new_w, new_m, new_v = core(self._theta[None], g, w, t, m, v, (n,))
    self.assign(variable, tf.reshape(new_w, variable.shape))
    if m_slot is not None:
      self.assign(m_slot, new_m[0])
    if v_slot is not None:
      self.assign(v_slot, new_v[0])

  def get_config(self):
    """JSON-able config holding θ and the family's config: `from_config` needs no files."""
    config = super().get_config()
    for key in ('learning_rate', 'weight_decay'):
      del config[key]
    config.update(theta=np.asarray(self._theta, np.float32).tolist(), lopt=self._lopt.config())
    return config

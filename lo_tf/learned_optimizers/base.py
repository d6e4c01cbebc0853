"""The learned-optimizer family interface (paper §2.1): a map from meta-parameters θ to optimizers.

A family turns θ into an inner optimizer (`family(theta)`, an `lo_tf.optimizers.base.Optimizer`),
and M θ's into one optimizer of M trajectories at once (`batched_optimizer`), which is how the
outer-gradient estimator unrolls every antithetic sample of an outer step in one graph. `MLPLOpt`
(§4.1) and `LearnedLearningRate` (§2.4, Fig. 4) are the families lo_tf ships.
"""

import abc


class LearnedOptimizerFamily(abc.ABC):
  """θ -> inner optimizer. Subclasses set `num_meta_params` and implement the methods below."""

  num_meta_params = None  # P, the size of θ (a class attribute or a property)

  @abc.abstractmethod
  def init_theta(self, seed):
    """θ at outer step 0, float32 [num_meta_params], from an int32/int64 [2] stateless seed."""

  @abc.abstractmethod
  def config(self):
    """JSON-able constructor arguments: `type(self)(**config())` rebuilds the family."""

  @abc.abstractmethod
  def optimizer(self, theta):
    """The inner optimizer u(·; θ) for θ float32 [num_meta_params]."""

  @abc.abstractmethod
  def batched_optimizer(self, thetas):
    """u(·; θ_m) for M θ's at once (float32 [M, num_meta_params]); params carry a leading M axis."""

  def __call__(self, theta):
    # `family(theta)` is `family.optimizer(theta)`, so a learned family serves wherever a
    # hand-designed one (learning rate -> optimizer) does.
    return self.optimizer(theta)

"""The optimizer interface shared by hand-designed and learned optimizers.

As in optax, an optimizer is a pair of pure functions over plain structures of tensors:

* ``state = opt.init(params)``
* ``new_params, new_state = opt.update(grads, state, params)``

`params` and `grads` are lists of float32 tensors of matching shapes; `state` is any nest of tensors
whose structure and shapes do not change across steps (so it can be a `tf.while_loop` loop
variable). A learned optimizer is a map from meta-parameters θ to such an optimizer
(`lo_tf.learned_optimizers`), so the inner-training loop never knows which kind it runs.
"""


class Optimizer:
  """Functional optimizer: `init(params) -> state`, `update(grads, state, params)`."""

  def init(self, params):
    """Returns the optimizer state for the list of float32 tensors `params`."""
    raise NotImplementedError

  def update(self, grads, state, params):
    """One step. Returns (new_params: list like params, new_state: same nest as state)."""
    raise NotImplementedError

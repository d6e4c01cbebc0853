"""In-graph inner training: T steps of any optimizer on one task inside one `tf.while_loop`.

The whole inner-training run (minibatch sampling, the inner gradient, the optimizer update, periodic
evaluation) is one `tf.function`, so nothing leaves TensorFlow between steps (App. F). Optimizers
enter through a *family*: a callable mapping a tensor of optimizer parameters to an `Optimizer`
(the learning rate for a hand-designed optimizer, θ for a learned one, §2.1), so one traced graph
serves every learning rate of a grid or every θ of outer-training.
"""

import dataclasses

import gin
import numpy as np
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.errors import check_int


def batch_indices(seed, step, batch_size, num_examples):
  """int32 [batch_size] minibatch indices for inner step `step`, a pure function of the seed."""
  return tf.random.stateless_uniform([batch_size], tf.random.experimental.stateless_fold_in(
      seed, step), 0, num_examples, dtype=tf.int32)


def inner_step(loss_fn, optimizer, params, opt_state, *batch):
  """One inner-training step w ← u(w, ∇ℓ; θ) (paper Fig. 2), the one step every loop runs.

  Inner training (`InnerTrainer`), the speed benchmark and the differentiated truncated unrolls of
  outer-training all call this, so they train identically.

  Args:
    loss_fn: (params, *batch) -> loss; a scalar, or a vector [M] of independent trajectories'
      losses (their sum is differentiated: each trajectory's gradient is its own).
    optimizer: an `lo_tf.optimizers.base.Optimizer` (hand-designed, or learned at some θ).
    params: list of float32 tensors, the inner weights.
    opt_state: the optimizer's state nest.
    *batch: the minibatch tensors passed to loss_fn.

  Returns:
    (loss as returned by loss_fn, new params, new optimizer state).
  """
  with tf.GradientTape() as tape:
    tape.watch(params)
    loss = loss_fn(params, *batch)
    total = tf.reduce_sum(loss)
  grads = tape.gradient(total, params)
  new_params, new_state = optimizer.update(grads, opt_state, params)
  return loss, new_params, new_state


def train_steps(loss_fn, optimizer, params, num_steps, minibatch):
  """`num_steps` inner steps from `params` in one `tf.while_loop` (call it inside a tf.function).

  The plain loop of the benchmarks: no evaluation, no timing inside the graph.

  Args:
    loss_fn: (params, *batch) -> float32 scalar loss.
    optimizer: an `lo_tf.optimizers.base.Optimizer`.
    params: list of float32 tensors, the initial inner weights.
    num_steps: int or int32 scalar tensor.
    minibatch: i (int32 scalar) -> the batch tuple of step i.

  Returns:
    The last step's loss (float32 scalar).
  """
  def body(i, params, state, _):
    loss, params, state = inner_step(loss_fn, optimizer, params, state, *minibatch(i))
    return i + 1, params, state, loss

  return tf.while_loop(lambda i, *_: i < num_steps, body,
                       (tf.constant(0), params, optimizer.init(params), tf.constant(0.0)),
                       parallel_iterations=1)[-1]


@dataclasses.dataclass
class InnerCurves:
  """Curves of one inner-training run (numpy arrays).

  Attributes:
    train_loss: float32 [T] minibatch train loss at each step (NaN after a divergence).
    seconds: float64 [T] cumulative wall-clock seconds of training (evaluation excluded) after
      each step.
    eval_steps: int32 [E] inner steps at which evaluation ran (0, m, 2m, ..., T).
    eval_seconds: float64 [E] training seconds spent by those steps.
    valid_loss, valid_acc: float32 [E] on the whole inner-valid set.
    train_eval_loss, train_eval_acc: float32 [E] on (up to `eval_max_examples` of) inner-train.
    steps_completed: steps run, the diverging step included (T when no divergence, or when the
      last step diverged).
    diverged: True if the loss became non-finite.
  """
  train_loss: np.ndarray
  seconds: np.ndarray
  eval_steps: np.ndarray
  eval_seconds: np.ndarray
  valid_loss: np.ndarray
  valid_acc: np.ndarray
  train_eval_loss: np.ndarray
  train_eval_acc: np.ndarray
  steps_completed: int
  diverged: bool


# The problem is built for the task distribution by `build_experiment`.
@gin.configurable(denylist=['problem'])
class InnerTrainer:
  """Runs inner training of a `Problem` on tasks with an optimizer family (paper §2.1, App. F).

  Args:
    problem: the `lo_tf.tasks.problems.Problem` to train.
    num_steps: T, the inner-training length in steps.
    batch_size: minibatch size.
    eval_every: m; valid loss/accuracy are evaluated every m steps (and at step 0).
    eval_max_examples: at most this many inner-train examples are used for the train-set
      evaluation curves (the first ones; None: all).

  Raises:
    UserError: for sizes that are not positive integers.
  """

  def __init__(self, problem, num_steps=1000, batch_size=128, eval_every=50,
               eval_max_examples=2000):
    self.problem = problem
    self.num_steps = check_int('InnerTrainer', 'num_steps', num_steps)
    self.batch_size = check_int('InnerTrainer', 'batch_size', batch_size)
    self.eval_every = check_int('InnerTrainer', 'eval_every', eval_every)
    if self.eval_every > self.num_steps:
      raise UserError(f'InnerTrainer.eval_every={eval_every} exceeds num_steps={num_steps}: the '
                      'valid curve would hold step 0 only; lower eval_every')
    self.eval_max_examples = (None if eval_max_examples is None else
                              check_int('InnerTrainer', 'eval_max_examples', eval_max_examples))
    self._compiled = {}

  def _build(self, family):
    problem, num_steps, batch_size, every = (self.problem, self.num_steps, self.batch_size,
                                             self.eval_every)
    num_evals = num_steps // every + 1
    cap = self.eval_max_examples

    @tf.function
    def run(opt_params, x_train, y_train, x_valid, y_valid, seed):
      opt = family(opt_params)
      params = problem.init(tf.random.experimental.stateless_fold_in(seed, -1))
      state = opt.init(params)
      x_tr_eval, y_tr_eval = (x_train, y_train) if cap is None else (x_train[:cap], y_train[:cap])
      n_train = tf.shape(x_train)[0]
      batch_seed = tf.random.experimental.stateless_fold_in(seed, -2)

      def evaluate(params):
        return (problem.loss_and_accuracy(params, x_valid, y_valid) +
                problem.loss_and_accuracy(params, x_tr_eval, y_tr_eval))

      evals = tf.TensorArray(tf.float32, size=num_evals, element_shape=[4])
      evals = evals.write(0, tf.stack(evaluate(params)))
      losses = tf.TensorArray(tf.float32, size=num_steps, element_shape=[])
      secs = tf.TensorArray(tf.float64, size=num_steps, element_shape=[])

      def body(i, params, state, elapsed, diverged, losses, secs, evals):
        with tf.control_dependencies([i]):
          start = tf.timestamp()
        idx = batch_indices(batch_seed, i, batch_size, n_train)
        loss, new_params, new_state = inner_step(problem.loss, opt, params, state,
                                                 tf.gather(x_train, idx), tf.gather(y_train, idx))
        with tf.control_dependencies(tf.nest.flatten(new_params)):
          elapsed = elapsed + (tf.timestamp() - start)
        # Non-finite weights after the update count too (a blow-up in the last step).
        diverged = tf.logical_not(tf.math.is_finite(
            loss + tf.add_n([tf.reduce_sum(p) for p in new_params]) * 0.0))
        losses = losses.write(i, loss)
        secs = secs.write(i, elapsed)
        evals = tf.cond(
            tf.logical_and((i + 1) % every == 0, tf.logical_not(diverged)),
            lambda: evals.write((i + 1) // every, tf.stack(evaluate(new_params))),
            lambda: evals)
        return i + 1, new_params, new_state, elapsed, diverged, losses, secs, evals

      i, _, _, _, diverged, losses, secs, evals = tf.while_loop(
          lambda i, *rest: tf.logical_and(i < num_steps, tf.logical_not(rest[3])),
          body, (tf.constant(0), params, state, tf.constant(0.0, tf.float64), tf.constant(False),
                 losses, secs, evals),
          parallel_iterations=1)
      return i, diverged, losses.stack(), secs.stack(), evals.stack()

    return run

  def train(self, family, opt_params, task, seed):
    """Inner-trains a freshly initialized network on `task` for T steps.

    Args:
      family: callable mapping `opt_params` to an `Optimizer` (e.g. `Adam`, or
        `MLPLOpt().optimizer`). One graph is traced per family and reused.
      opt_params: float32 tensor, the family's argument (a learning rate scalar, or θ).
      task: a `lo_tf.tasks.distribution.Task`.
      seed: int, seeds the initialization and the minibatch sequence.

    Returns:
      `InnerCurves`. Runs whose loss becomes non-finite stop early with `diverged=True`.
    """
    if family not in self._compiled:
      self._compiled[family] = self._build(family)
    steps, diverged, losses, secs, evals = self._compiled[family](
        tf.convert_to_tensor(opt_params, tf.float32), *task.data,
        tf.constant([int(seed), 0], tf.int64))
    steps, diverged = int(steps), bool(diverged)
    losses, secs, evals = losses.numpy(), secs.numpy(), evals.numpy()
    # Entries never written (after divergence) read as zeros: mark them missing.
    losses[steps:] = np.nan
    secs[steps:] = np.nan
    eval_steps = np.arange(evals.shape[0], dtype=np.int32) * self.eval_every
    evals[eval_steps > steps] = np.nan
    if diverged:
      evals[eval_steps >= steps] = np.nan
    eval_seconds = np.concatenate([[0.0], secs])[np.minimum(eval_steps, len(secs))]
    return InnerCurves(train_loss=losses, seconds=secs, eval_steps=eval_steps,
                       eval_seconds=eval_seconds, valid_loss=evals[:, 0], valid_acc=evals[:, 1],
                       train_eval_loss=evals[:, 2], train_eval_acc=evals[:, 3],
                       steps_completed=steps, diverged=diverged)

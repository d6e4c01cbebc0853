"""Slots, truncated unrolls and the antithetic estimator (paper §2.2, §3, App. A, App. B)."""

import numpy as np
import pytest
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.learned_optimizers.hyperparameters import LearnedLearningRate
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.outer_trainers.curriculum import Curriculum
from lo_tf.outer_trainers.estimators import GradientEstimator
from lo_tf.outer_trainers.truncated_step import TruncatedStep
from lo_tf.outer_trainers.truncated_step import tile_state
from lo_tf.tasks.distribution import OUTER_TRAIN
from lo_tf.tasks.distribution import TaskDistribution
from lo_tf.tasks.problems import MLP
from lo_tf.tasks.problems import Problem


@pytest.fixture(scope='module')
def tasks():
  return TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5)


@pytest.fixture(scope='module')
def mlp(tasks):
  return MLP(tasks.image_shape, 3, hidden=(5,))


class Quadratic(Problem):
  """ℓ(w) = ½ Σ a_i w_i², deterministic (the data is ignored), as in App. A."""

  def __init__(self, a):
    super().__init__((8, 8, 1), 3)
    self.a = tf.constant(a, tf.float32)

  def param_shapes(self):
    return [((int(self.a.shape[0]),), 1, 1)]

  def batched_loss(self, params, x, y, clip=None):
    return 0.5 * tf.reduce_sum(self.a * tf.square(params[0]), axis=-1)


def _started(step, slots, seed=0):
  """A SlotState whose slots all hold a task (reset from the initial state)."""
  state, _ = step.reset(step.init_slot_state(slots), tf.constant([seed, 0], tf.int64))
  return state


def test_one_step_unrolled_gradient_of_a_learning_rate_is_minus_g1_dot_g0(tasks):
  """App. A: for w1 = w0 - lr g0 and L = ℓ(w1), dL/dlr = -<g1, g0> (θ = log lr: times lr)."""
  a, w0, lr = np.array([1.0, 3.0, 0.5]), np.array([1.0, -2.0, 4.0]), 0.1
  family = LearnedLearningRate('sgd', initial_learning_rate=lr)
  step = TruncatedStep(tasks, Quadratic(a), family, num_inner_steps=10, batch_size=2)
  state = _started(step, 1)._replace(params=[tf.constant([w0], tf.float32)])
  theta = family.init_theta(None)[None]
  with tf.GradientTape() as tape:
    tape.watch(theta)
    loss = step.unroll(theta, state, tf.constant([1]), tf.constant([0, 0], tf.int64))[0]
  g0 = a * w0
  g1 = a * (w0 - lr * g0)
  np.testing.assert_allclose(float(loss[0]), 0.5 * np.sum(a * (w0 - lr * g0)**2), rtol=1e-6)
  np.testing.assert_allclose(tape.gradient(loss, theta).numpy(), [[-lr * np.dot(g1, g0)]],
                             rtol=1e-5)


def test_rp_gradient_matches_finite_differences_of_the_unrolled_loss(tasks, mlp):
  # Large temperatures make L depend strongly on θ, so float32 differences are accurate; a small
  # step keeps the central difference off the ReLU kinks of the inner net and the optimizer MLP.
  lopt = MLPLOpt(lambda_exp=0.1, lambda_lin=0.1, hidden_size=8, implementation='reference')
  step = TruncatedStep(tasks, mlp, lopt, num_inner_steps=20, batch_size=8, objective='train')
  state = _started(step, 1)
  theta = lopt.init_theta(tf.constant([5, 6]))
  loss = lambda th: step.unroll(th[None], state, tf.constant([4]),
                                tf.constant([3, 4], tf.int64))[0][0]
  with tf.GradientTape() as tape:
    tape.watch(theta)
    value = loss(theta)
  grad = tape.gradient(value, theta).numpy()
  rng = np.random.default_rng(0)
  for _ in range(3):
    d = rng.normal(size=grad.shape).astype(np.float32)
    d /= np.linalg.norm(d)
    eps = 1e-3
    fd = (float(loss(theta + eps * d)) - float(loss(theta - eps * d))) / (2 * eps)
    np.testing.assert_allclose(np.dot(grad, d), fd, rtol=0.02, atol=1e-4)


def test_masked_lengths_and_copies_sharing_batches(tasks, mlp):
  lopt = MLPLOpt(lambda_lin=0.1, implementation='reference')
  step = TruncatedStep(tasks, mlp, lopt, num_inner_steps=20, batch_size=8)
  state = tile_state(_started(step, 1), 2)  # one slot, two copies
  theta = tf.tile(lopt.init_theta(tf.constant([1, 2]))[None], [2, 1])
  seed = tf.constant([5, 5], tf.int64)
  loss, end, _ = step.unroll(theta, state, tf.constant([3, 5]), seed, pairs=2)
  loss2, end2, _ = step.unroll(theta, state, tf.constant([3, 3]), seed, pairs=2)
  # Copy 0 runs 3 steps in both calls: the longer copy beside it changes nothing.
  assert float(loss[0]) == float(loss2[0])
  np.testing.assert_allclose(float(loss2[0]), float(loss2[1]), rtol=1e-6)
  for a, b, c in zip(end.params, end2.params, state.params):
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    # Same θ and batches; batched kernels may round the two copies' products differently.
    np.testing.assert_allclose(b[0].numpy(), b[1].numpy(), rtol=1e-5, atol=1e-7)
    assert not np.array_equal(a[1].numpy(), b[1].numpy()) or a.shape[-1] == 0
  np.testing.assert_array_equal(end.inner_step.numpy(), state.inner_step.numpy() + [3, 5])
  zero_loss, zero_end, _ = step.unroll(theta, state, tf.constant([0, 2]), seed, pairs=2)
  assert float(zero_loss[0]) == 0.0
  for a, c in zip(zero_end.params, state.params):
    np.testing.assert_array_equal(a[0].numpy(), c[0].numpy())


def test_valid_objective_differs_and_bad_settings(tasks, mlp):
  lopt = MLPLOpt(lambda_lin=0.1, implementation='reference')
  theta = lopt.init_theta(tf.constant([5, 6]))[None]
  losses = {}
  for objective in ('train', 'valid'):
    step = TruncatedStep(tasks, mlp, lopt, 20, 8, objective=objective)
    losses[objective] = float(step.unroll(theta, _started(step, 1), tf.constant([5]),
                                          tf.constant([7, 8], tf.int64))[0][0])
  assert losses['train'] != losses['valid']
  with pytest.raises(UserError):
    TruncatedStep(tasks, mlp, lopt, 20, 8, objective='test')
  with pytest.raises(UserError, match='meta_loss_batches=0'):
    TruncatedStep(tasks, mlp, lopt, 20, 8, objective='valid', meta_loss_batches=0)


def test_reset_starts_new_tasks_in_the_graph_only_where_due(tasks, mlp):
  lopt = MLPLOpt(implementation='reference')
  step = TruncatedStep(tasks, mlp, lopt, num_inner_steps=20, batch_size=8)
  state = _started(step, 3)
  seeds = state.task_seed.numpy()
  assert np.all(seeds >= 0) and len(set(seeds)) == 3
  for s in range(3):  # each slot's task and weights are the host-side task of its seed
    task = tasks.sample_task(OUTER_TRAIN, int(seeds[s]))
    np.testing.assert_array_equal(tasks.images(state.train_idx[s]).numpy(), task.x_train.numpy())
    init = mlp.init(tf.constant([seeds[s], 1], tf.int64))
    np.testing.assert_array_equal(state.params[0][s].numpy(), init[0].numpy())
  state = state._replace(inner_step=tf.constant([20, 7, 0]))
  again, reset = step.reset(state, tf.constant([1, 1], tf.int64))
  np.testing.assert_array_equal(reset.numpy(), [True, False, False])
  assert again.task_seed.numpy()[0] != seeds[0]
  np.testing.assert_array_equal(again.task_seed.numpy()[1:], seeds[1:])
  np.testing.assert_array_equal(again.inner_step.numpy(), [0, 7, 0])


def _reference_sample(step, lopt, theta, state, s, k, noise, seed, sigma):
  """One slot's antithetic sample, one trajectory at a time with the unbatched optimizer."""
  fold = lambda i: tf.random.experimental.stateless_fold_in(seed, i)
  slots = state.inner_step.shape[0]
  losses, grads = [], []
  for sign in (1.0, -1.0):
    th = tf.constant(theta + sign * noise[s])
    with tf.GradientTape() as tape:
      tape.watch(th)
      opt = lopt.optimizer(th)
      params = [p[s] for p in state.params]
      opt_state = tf.nest.map_structure(lambda x: x[s], state.opt_state)
      total = 0.0
      for i in range(k):
        x, y = step.minibatches(state.train_idx, fold(2 * i), step.tasks.n_train, 1)
        with tf.GradientTape() as inner:
          inner.watch(params)
          loss = step.problem.loss(params, x[0, s], y[0, s])
        params, opt_state = opt.update(inner.gradient(loss, params), opt_state, params)
        x, y = step.minibatches(state.train_idx, fold(2 * i + 1), step.tasks.n_train, 1)
        total += tf.minimum(step.problem.loss(params, x[0, s], y[0, s]), 10.0)
      loss = total / k
    losses.append(float(loss))
    grads.append(tape.gradient(loss, th).numpy())
  assert slots  # batches are drawn for all slots at once, as the batched unroll does
  g_rp = 0.5 * (grads[0] + grads[1])
  g_es = 0.5 * (losses[0] - losses[1]) * noise[s] / sigma**2
  return losses, g_rp, g_es


def test_batched_estimator_equals_one_sample_at_a_time_reference(tasks, mlp):
  lopt = MLPLOpt(lambda_exp=0.1, lambda_lin=0.1, hidden_size=8, implementation='reference')
  step = TruncatedStep(tasks, mlp, lopt, num_inner_steps=40, batch_size=8, objective='train',
                       meta_loss_batches=1)
  sigma = 0.1
  estimator = GradientEstimator(step, Curriculum(4, 4, 1, 0.0), sigma=sigma)
  state = _started(step, 2)._replace(inner_step=tf.constant([3, 5]))  # no reset: full k = 4
  theta = lopt.init_theta(tf.constant([5, 6]))
  seed = tf.constant([4, 2], tf.int64)
  out, next_state = estimator.estimate(theta, state, tf.constant(0, tf.int64), seed)
  again, _ = estimator.estimate(theta, state, tf.constant(0, tf.int64), seed)
  np.testing.assert_array_equal(out.g_rp.numpy(), again.g_rp.numpy())  # deterministic
  fold = lambda i: tf.random.experimental.stateless_fold_in(seed, i)
  noise = sigma * tf.random.stateless_normal([2, theta.shape[0]], fold(3)).numpy()
  np.testing.assert_array_equal(out.lengths.numpy(), [4, 4])
  for s in range(2):
    losses, g_rp, g_es = _reference_sample(step, lopt, theta.numpy(), state, s, 4, noise,
                                           fold(4), sigma)
    np.testing.assert_allclose([out.loss_pos[s], out.loss_neg[s]], losses, rtol=1e-5)
    np.testing.assert_allclose(out.g_rp[s].numpy(), g_rp, rtol=1e-3,
                               atol=1e-4 * np.abs(g_rp).max())
    np.testing.assert_allclose(out.g_es[s].numpy(), g_es, rtol=1e-3,
                               atol=1e-4 * np.abs(g_es).max())
  np.testing.assert_array_equal(next_state.inner_step.numpy(), [7, 9])


def test_first_truncations_on_a_task_desynchronize_workers(tasks, mlp):
  lopt = MLPLOpt(implementation='reference')
  step = TruncatedStep(tasks, mlp, lopt, num_inner_steps=100, batch_size=4)
  estimator = GradientEstimator(step, Curriculum(30, 30, 1, 0.0), mode='es')
  out, state = estimator.estimate(lopt.init_theta(tf.constant([0, 0])),
                                  estimator.init_slot_state(6), tf.constant(0, tf.int64),
                                  tf.constant([0, 0], tf.int64))
  lengths = out.lengths.numpy()
  assert out.reset.numpy().all() and np.all((lengths >= 1) & (lengths <= 30))
  assert len(set(lengths)) > 3  # out of phase
  np.testing.assert_array_equal(state.inner_step.numpy(), lengths)
  assert np.all(out.g_rp.numpy() == 0)  # the ES-only ablation runs no backward pass


def test_a_non_finite_worker_is_dropped_and_asks_for_a_new_task(tasks, mlp):
  lopt = MLPLOpt(implementation='reference')
  step = TruncatedStep(tasks, mlp, lopt, num_inner_steps=100, batch_size=4)
  estimator = GradientEstimator(step, Curriculum(3, 3, 1, 0.0))
  state = _started(step, 2)._replace(inner_step=tf.constant([10, 10]))
  poisoned = [tf.tensor_scatter_nd_update(p, [[0]], [tf.fill(p.shape[1:], np.nan)])
              for p in state.params]
  out, next_state = estimator.estimate(lopt.init_theta(tf.constant([0, 0])),
                                       state._replace(params=poisoned), tf.constant(0, tf.int64),
                                       tf.constant([0, 0], tf.int64))
  np.testing.assert_array_equal(out.finite.numpy(), [False, True])
  assert int(next_state.task_seed[0]) == -1 and int(next_state.task_seed[1]) >= 0
  assert int(next_state.inner_step[1]) == 13

"""Truncated unrolls and the antithetic sample (paper §2.2, §3, App. A, App. B)."""

import numpy as np
import pytest
import tensorflow as tf

from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.optimizers.hand_designed import SGDMomentum
from lo_tf.outer_trainers.truncated import TruncatedStep
from lo_tf.tasks.problems import MLP
from lo_tf.tasks.problems import Problem


def _data(seed=0, n=24, shape=(4, 4, 1), k=3):
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.uniform(size=(n,) + shape), tf.float32)
  y = tf.constant(rng.integers(0, k, size=n), tf.int32)
  return x, y, x[:8], y[:8]


def _args(theta, params, opt_state, data, length, t0=0):
  return (theta, params, opt_state, *data, tf.constant(t0), tf.constant(length),
          tf.constant([1, 2], tf.int64))


class Quadratic(Problem):
  """ℓ(w) = ½ Σ a_i w_i², deterministic (the data is ignored), as in App. A."""

  def __init__(self, a):
    super().__init__((1,), 2)
    self.a = tf.constant(a, tf.float32)

  def param_shapes(self):
    return [((int(self.a.shape[0]),), 1, 1)]

  def loss(self, params, x, y):
    return 0.5 * tf.reduce_sum(self.a * tf.square(params[0]))


def test_one_step_unrolled_gradient_of_a_learning_rate_is_minus_g1_dot_g0():
  """App. A: for w1 = w0 - θ g0 and L = ℓ(w1), dL/dθ = -<g1, g0>."""
  a, w0, lr = np.array([1.0, 3.0, 0.5]), np.array([1.0, -2.0, 4.0]), 0.1
  step = TruncatedStep(Quadratic(a), lambda th: SGDMomentum(th[0], momentum=0.0), batch_size=1)
  theta = tf.constant([lr])
  params = [tf.constant(w0, tf.float32)]
  with tf.GradientTape() as tape:
    tape.watch(theta)
    loss = step.unroll(theta, params, [tf.zeros(3)], _data(), 0, tf.constant(1),
                       tf.constant([0, 0], tf.int64))[0]
  g0 = a * w0
  g1 = a * (w0 - lr * g0)
  np.testing.assert_allclose(float(loss), 0.5 * np.sum(a * (w0 - lr * g0)**2), rtol=1e-6)
  np.testing.assert_allclose(tape.gradient(loss, theta).numpy(), [-np.dot(g1, g0)], rtol=1e-5)


def test_rp_gradient_matches_finite_differences_of_the_unrolled_loss():
  # Large temperatures make L depend strongly on θ, so float32 differences are accurate.
  lopt = MLPLOpt(lambda_exp=0.1, lambda_lin=0.1, hidden_size=8)
  problem = MLP((4, 4, 1), 3, hidden=(5,))
  family = lambda th: lopt.optimizer(th)
  step = TruncatedStep(problem, family, batch_size=8, objective='train')
  theta = lopt.init_theta(tf.constant([5, 6]))
  params = problem.init(tf.constant([0, 1]))
  state = family(theta).init(params)
  data = _data()
  loss = lambda th: step.unroll(th, params, state, data, 0, tf.constant(4),
                                tf.constant([3, 4], tf.int64))[0]
  with tf.GradientTape() as tape:
    tape.watch(theta)
    value = loss(theta)
  grad = tape.gradient(value, theta).numpy()
  rng = np.random.default_rng(0)
  for _ in range(3):
    d = rng.normal(size=grad.shape).astype(np.float32)
    d /= np.linalg.norm(d)
    eps = 3e-3
    fd = (float(loss(theta + eps * d)) - float(loss(theta - eps * d))) / (2 * eps)
    np.testing.assert_allclose(np.dot(grad, d), fd, rtol=0.03, atol=1e-4)


def test_valid_objective_differs_and_is_differentiable():
  lopt = MLPLOpt(lambda_lin=0.1)
  problem = MLP((4, 4, 1), 3, hidden=(5,))
  family = lambda th: lopt.optimizer(th)
  theta = lopt.init_theta(tf.constant([5, 6]))
  params = problem.init(tf.constant([0, 1]))
  state = family(theta).init(params)
  out = {}
  for objective in ('train', 'valid'):
    step = TruncatedStep(problem, family, batch_size=8, objective=objective)
    out[objective] = step.sample(*_args(theta, params, state, _data(), 5), tf.constant([7, 8],
                                                                                      tf.int64))
    assert np.all(np.isfinite(out[objective]['g_rp'].numpy()))
  assert float(out['train']['loss_pos']) != float(out['valid']['loss_pos'])
  with pytest.raises(ValueError):
    TruncatedStep(problem, family, batch_size=8, objective='test')


@pytest.fixture(scope='module')
def lopt_setup():
  lopt = MLPLOpt()
  problem = MLP((4, 4, 1), 3, hidden=(5,))
  family = lambda th: lopt.optimizer(th)
  theta = lopt.init_theta(tf.constant([5, 6]))
  params = problem.init(tf.constant([0, 1]))
  return lopt, problem, family, theta, params, family(theta).init(params)


def test_antithetic_pair_shares_start_and_batches(lopt_setup):
  """With a perturbation below float32 resolution both trajectories coincide exactly."""
  _, problem, family, theta, params, state = lopt_setup
  theta = theta + 0.01  # no zero entries: θ ± 1e-12·n rounds back to θ
  step = TruncatedStep(problem, family, batch_size=8, sigma=1e-12)
  out = step.sample(*_args(theta, params, state, _data(), 6), tf.constant([1, 1], tf.int64))
  assert float(out['loss_pos']) == float(out['loss_neg'])
  assert np.all(out['g_es'].numpy() == 0)


def test_sample_is_deterministic_and_antithetic(lopt_setup):
  _, problem, family, theta, params, state = lopt_setup
  step = TruncatedStep(problem, family, batch_size=8, sigma=0.1)
  a = step.sample(*_args(theta, params, state, _data(), 6), tf.constant([1, 1], tf.int64))
  b = step.sample(*_args(theta, params, state, _data(), 6), tf.constant([1, 1], tf.int64))
  for key in ('loss_pos', 'loss_neg', 'g_rp', 'g_es'):
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
  noise = 0.1 * tf.random.stateless_normal(theta.shape, [1, 1])
  data = _data()
  seed = tf.constant([1, 2], tf.int64)
  l_pos = step.unroll(theta + noise, params, state, data, tf.constant(0), tf.constant(6), seed)[0]
  l_neg = step.unroll(theta - noise, params, state, data, tf.constant(0), tf.constant(6), seed)[0]
  np.testing.assert_allclose(float(a['loss_pos']), float(l_pos), rtol=1e-6)
  np.testing.assert_allclose(float(a['loss_neg']), float(l_neg), rtol=1e-6)
  np.testing.assert_allclose(a['g_es'].numpy(),
                             0.5 * (float(l_pos) - float(l_neg)) * noise.numpy() / 0.01,
                             rtol=1e-4, atol=1e-7)
  assert int(a['state'][1][0]) == 6  # the + trajectory's learned-optimizer step count

"""The per-weight MLP learned optimizer (paper §4.1, App. C.1)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt


def test_paper_sizes():
  lopt = MLPLOpt()
  assert lopt.num_features == 31  # 2 + 5*4 + 9
  assert lopt.num_meta_params == 31 * 32 + 32 + 32 * 2 + 2 == 1090
  assert lopt.init_theta(tf.constant([0, 0])).shape == (1090,)


@pytest.mark.parametrize('kwargs,features', [
    (dict(use_rms=False), 2 + 5 + 9),
    (dict(use_momentum=False), 2 + 10 + 9),
    (dict(use_rms=False, use_momentum=False), 2 + 9),
    (dict(use_time=False), 22),
])
def test_ablation_feature_counts(kwargs, features):
  lopt = MLPLOpt(**kwargs)
  assert lopt.num_features == features
  assert lopt.num_meta_params == features * 32 + 32 + 66
  params = [tf.ones([3, 2]), tf.ones([2])]
  opt = lopt.optimizer(lopt.init_theta(tf.constant([1, 2])))
  new, _ = opt.update([tf.ones([3, 2]), tf.ones([2])], opt.init(params), params)
  assert [p.shape for p in new] == [(3, 2), (2,)]


def _theta(lopt, w1=None, b1=None, w2=None, b2=None):
  f, h = lopt.num_features, lopt.hidden_size
  parts = [np.zeros((f, h)) if w1 is None else w1, np.zeros(h) if b1 is None else b1,
           np.zeros((h, 2)) if w2 is None else w2, np.zeros(2) if b2 is None else b2]
  return tf.constant(np.concatenate([np.ravel(p) for p in parts]), tf.float32)


def _feature_probe(lopt, j):
  """θ whose step is λ_lin times normalized feature j: o1 = 0, o2 = relu(x_j) - relu(-x_j)."""
  w1 = np.zeros((lopt.num_features, lopt.hidden_size))
  w1[j, 0], w1[j, 1] = 1.0, -1.0
  w2 = np.zeros((lopt.hidden_size, 2))
  w2[0, 1], w2[1, 1] = 1.0, -1.0
  return _theta(lopt, w1=w1, w2=w2)


def _one_step(lopt, theta, grads, params, compiled=True):
  opt = lopt.optimizer(theta, compiled=compiled)
  return opt.update(grads, opt.init(params), params)


@pytest.mark.parametrize('compiled', [True, False])
def test_features_normalized_by_second_moment_per_tensor(compiled):
  lopt = MLPLOpt()
  rng = np.random.default_rng(0)
  grads = [tf.constant(rng.normal(size=(4, 3)) * 1e-3, tf.float32),
           tf.constant(rng.normal(size=(5,)) * 10.0, tf.float32)]
  params = [tf.constant(rng.normal(size=(4, 3)), tf.float32),
            tf.constant(rng.normal(size=(5,)) * 3, tf.float32)]
  for j, raw in ((0, grads), (1, params), (2, grads)):  # gradient, weight, momentum at β=0.5
    new, _ = _one_step(lopt, _feature_probe(lopt, j), grads, params, compiled)
    for p, n, x in zip(params, new, raw):
      x = x.numpy()
      expected = 1e-3 * x / np.sqrt(np.mean(x**2) + 1e-12)  # per tensor, scale-free
      np.testing.assert_allclose((p - n).numpy(), expected, rtol=2e-4, atol=1e-9)


def test_step_formula_exp_times_linear():
  lopt = MLPLOpt()
  b2 = np.array([700.0, -3.0])  # o1 = 700, o2 = -3 for every weight (W1, W2 = 0)
  params = [tf.constant([[0.5, -1.0]]), tf.constant([2.0])]
  grads = [tf.constant([[1.0, 0.0]]), tf.constant([0.0])]
  new, _ = _one_step(lopt, _theta(lopt, b2=b2), grads, params)
  step = math.exp(1e-3 * 700.0) * 1e-3 * -3.0
  np.testing.assert_allclose(new[0].numpy(), [[0.5 - step, -1.0 - step]], rtol=1e-6)
  np.testing.assert_allclose(new[1].numpy(), [2.0 - step], rtol=1e-6)


def test_exp_output_cannot_overflow():
  lopt = MLPLOpt()
  params, grads = [tf.constant([1.0, 2.0])], [tf.constant([1.0, -1.0])]
  new, _ = _one_step(lopt, _theta(lopt, b2=np.array([1e30, 1.0])), grads, params)
  assert np.all(np.isfinite(new[0].numpy()))


def test_accumulators_and_time():
  lopt = MLPLOpt()
  params = [tf.zeros([2])]
  opt = lopt.optimizer(lopt.init_theta(tf.constant([0, 0])))
  state = opt.init(params)
  g1, g2 = np.array([1.0, -2.0]), np.array([3.0, 0.5])
  _, state = opt.update([tf.constant(g1, tf.float32)], state, params)
  _, (t, m, v) = opt.update([tf.constant(g2, tf.float32)], state, params)
  b = np.array(lopt.decays)
  np.testing.assert_allclose(m.numpy(), b * (1 - b) * g1[:, None] + (1 - b) * g2[:, None],
                             rtol=1e-3)  # float32 1 - 0.9999
  np.testing.assert_allclose(v.numpy(), b * (1 - b) * g1[:, None]**2 + (1 - b) * g2[:, None]**2,
                             rtol=1e-3)  # float32 1 - 0.9999
  assert float(t) == 2.0


def test_first_step_finite_first_and_second_derivatives():
  """Zero accumulators, zero biases and exactly-zero gradients at the first step (App. C.1)."""
  lopt = MLPLOpt()
  theta = lopt.init_theta(tf.constant([3, 4]))
  x = tf.constant([[1.0, 0.0], [0.5, 0.0]])  # second input column is zero: zero gradients

  def loss_after_step(theta):
    params = [tf.constant([[0.3], [0.0]]), tf.zeros([1])]
    with tf.GradientTape() as tape:
      tape.watch(params)
      loss = tf.reduce_sum(tf.square(tf.nn.relu(x @ params[0] + params[1])))
    grads = tape.gradient(loss, params)
    new, _ = _one_step(lopt, theta, grads, params, compiled=False)
    return tf.reduce_sum(tf.square(tf.nn.relu(x @ new[0] + new[1])))

  v = tf.random.stateless_normal([lopt.num_meta_params], [0, 1])
  with tf.GradientTape() as outer:
    outer.watch(theta)
    with tf.GradientTape() as inner:
      inner.watch(theta)
      loss = loss_after_step(theta)
    grad = inner.gradient(loss, theta)
    gv = tf.reduce_sum(grad * v)
  hvp = outer.gradient(gv, theta)  # second derivative along v
  assert np.all(np.isfinite(grad.numpy())) and np.any(grad.numpy() != 0)
  assert np.all(np.isfinite(hvp.numpy()))

"""The per-weight MLP learned optimizer (paper §4.1, App. C.1) and its implementations."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.kernels import ops
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt

IMPLS = ['reference', 'xla'] + (['custom_op'] if ops.available() else [])


def test_paper_sizes():
  lopt = MLPLOpt()
  assert lopt.num_features == 31  # 2 + 5*4 + 9
  assert lopt.num_meta_params == 31 * 32 + 32 + 32 * 2 + 2 == 1090
  assert lopt.init_theta(tf.constant([0, 0])).shape == (1090,)
  assert lopt.time_scales == (3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e5)  # authors' utils_arch.py


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


def test_bad_settings_are_one_line_errors():
  with pytest.raises(UserError, match='implementation'):
    MLPLOpt(implementation='cuda')
  with pytest.raises(UserError, match='decays'):
    MLPLOpt(decays=(0.5, 1.0))
  with pytest.raises(UserError, match='use_rms'):
    MLPLOpt(use_rms='no')


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


def _one_step(lopt, theta, grads, params):
  opt = lopt.optimizer(theta)
  return opt.update(grads, opt.init(params), params)


@pytest.mark.parametrize('impl', IMPLS)
def test_each_feature_normalized_by_its_second_moment_per_tensor(impl):
  """Feature order g, w, m(5), v(5), r(5), r·m(5) at the first step from zero accumulators."""
  lopt = MLPLOpt(lambda_lin=1.0, implementation=impl)  # steps of O(1): no float32 cancellation
  rng = np.random.default_rng(0)
  g = [rng.normal(size=(4, 3)) * 1e-3, rng.normal(size=(5,)) * 10.0]
  w = [rng.normal(size=(4, 3)), rng.normal(size=(5,)) * 3]
  grads = [tf.constant(x, tf.float32) for x in g]
  params = [tf.constant(x, tf.float32) for x in w]
  b = np.array(lopt.decays, np.float32).astype(np.float64)  # 1 - float32(0.9999) as computed
  for j in range(lopt.num_weight_features):
    new, _ = _one_step(lopt, _feature_probe(lopt, j), grads, params)
    for p, n, gi, wi in zip(params, new, g, w):
      gi = gi.reshape(-1, 1)
      m, v = (1 - b) * gi, (1 - b) * gi**2
      r = 1 / np.sqrt(v + 1e-6)
      raw = np.concatenate([gi, wi.reshape(-1, 1), m, v, r, r * m], 1)[:, j]
      expected = raw / np.sqrt(np.mean(raw**2) + 1e-5)
      np.testing.assert_allclose((p - n).numpy().ravel(), expected, rtol=1e-4, atol=1e-5,
                                 err_msg=f'feature {j}')


def test_inverse_rms_feature_bounded_for_dead_weights():
  """A weight whose gradient is always 0 (a dead ReLU unit) gets r = rsqrt(0 + 1e-6) = 1000."""
  lopt = MLPLOpt(use_momentum=False)
  j = 2 + lopt.depth  # first r_k feature
  params, grads = [tf.zeros([3])], [tf.constant([0.0, 0.0, 1e-3])]
  new, _ = _one_step(lopt, _feature_probe(lopt, j), grads, params)
  r = np.array([1000.0, 1000.0, 1 / math.sqrt(0.5e-6 + 1e-6)])
  np.testing.assert_allclose(-new[0].numpy(), 1e-3 * r / np.sqrt(np.mean(r**2) + 1e-5), rtol=1e-4)


def test_time_features_follow_the_tanh_embedding():
  lopt = MLPLOpt()
  nw = lopt.num_weight_features
  params, grads = [tf.zeros([2])], [tf.ones([2])]
  opt = lopt.optimizer(None)
  for j, eta in enumerate(lopt.time_scales):
    w1 = np.zeros((lopt.num_features, lopt.hidden_size))
    w1[nw + j, 0], w1[nw + j, 1] = 1.0, -1.0
    w2 = np.zeros((lopt.hidden_size, 2))
    w2[0, 1], w2[1, 1] = 1.0, -1.0
    opt.theta = _theta(lopt, w1=w1, w2=w2)
    state = opt.init(params)._replace(t=tf.constant(7.0))
    new, state = opt.update(grads, state, params)
    np.testing.assert_allclose(-new[0].numpy(), 1e-3 * math.tanh(7.0 / eta - 1), rtol=1e-5)
    assert float(state.t) == 8.0


@pytest.mark.parametrize('impl', IMPLS)
def test_step_formula_exp_times_linear(impl):
  lopt = MLPLOpt(implementation=impl)
  b2 = np.array([700.0, -3.0])  # o1 = 700, o2 = -3 for every weight (W1, W2 = 0)
  params = [tf.constant([[0.5, -1.0]]), tf.constant([2.0])]
  grads = [tf.constant([[1.0, 0.0]]), tf.constant([0.0])]
  new, _ = _one_step(lopt, _theta(lopt, b2=b2), grads, params)
  step = math.exp(1e-3 * 700.0) * 1e-3 * -3.0
  np.testing.assert_allclose(new[0].numpy(), [[0.5 - step, -1.0 - step]], rtol=1e-6)
  np.testing.assert_allclose(new[1].numpy(), [2.0 - step], rtol=1e-6)


@pytest.mark.parametrize('impl', IMPLS)
def test_exp_output_cannot_overflow(impl):
  lopt = MLPLOpt(implementation=impl)
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
  _, state = opt.update([tf.constant(g2, tf.float32)], state, params)
  b = np.array(lopt.decays)
  np.testing.assert_allclose(state.m.numpy(), b * (1 - b) * g1[:, None] + (1 - b) * g2[:, None],
                             rtol=1e-3)  # float32 1 - 0.9999
  np.testing.assert_allclose(state.v.numpy(),
                             b * (1 - b) * g1[:, None]**2 + (1 - b) * g2[:, None]**2, rtol=1e-3)
  assert float(state.t) == 2.0


def _random_core_inputs(lopt, m_count, sizes, seed):
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  f = lambda *s: tf.constant(rng.normal(size=s), tf.float32)
  theta = tf.stack([lopt.init_theta(tf.constant([seed, i])) for i in range(m_count)])
  theta += 0.1 * f(*theta.shape)  # non-zero biases
  return (theta, f(m_count, n) * 0.01, f(m_count, n), tf.constant([0.0, 41.0][:m_count]),
          0.01 * f(m_count, n, lopt.depth),
          tf.constant(rng.uniform(0, 1e-4, size=(m_count, n, lopt.depth)), tf.float32))


@pytest.mark.parametrize('impl', IMPLS)
def test_implementations_agree_with_reference_in_values_and_gradients(impl):
  lopt = MLPLOpt(lambda_exp=0.3, lambda_lin=0.05, implementation=impl)
  sizes = (12, 5, 30)
  inputs = _random_core_inputs(lopt, 2, sizes, seed=3)
  cots = [tf.random.stateless_normal(s, [9, i]) for i, s in
          enumerate([(2, 47), (2, 47, 5), (2, 47, 5)])]

  def run(core):
    with tf.GradientTape() as tape:
      tape.watch(inputs)
      outs = core(*inputs, sizes)
      scalar = tf.add_n([tf.reduce_sum(o * c) for o, c in zip(outs, cots)])
    grads = tape.gradient(scalar, [inputs[i] for i in (0, 1, 2, 4, 5)])
    return [o.numpy() for o in outs], [g.numpy() for g in grads]

  ref_out, ref_grad = run(lopt.reference_core)
  out, grad = run(lopt.core)
  for a, b in zip(out, ref_out):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name, a, b in zip(('theta', 'g', 'w', 'm', 'v'), grad, ref_grad):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * np.abs(b).max(), err_msg=name)


def test_reference_gradient_matches_finite_differences():
  lopt = MLPLOpt(lambda_exp=0.3, lambda_lin=0.05, hidden_size=8, implementation='reference')
  sizes = (6, 4)
  theta, g, w, t, m, v = _random_core_inputs(lopt, 1, sizes, seed=5)
  theta, g, w, m, v = [tf.cast(x, tf.float64) for x in (theta, g, w, m, v)]
  lopt_core = lambda th, gg: tf.reduce_sum(tf.sin(lopt.reference_core(
      th, gg, w, tf.cast(t, tf.float64), m, v, sizes)[0] * 7.0))
  with tf.GradientTape() as tape:
    tape.watch([theta, g])
    value = lopt_core(theta, g)
  d_theta, d_g = tape.gradient(value, [theta, g])
  for x, dx, fn in ((theta, d_theta, lambda e: lopt_core(theta + e, g)),
                    (g, d_g, lambda e: lopt_core(theta, g + e))):
    direction = tf.random.stateless_normal(x.shape, [1, 2], dtype=tf.float64)
    h = 1e-6
    numeric = (fn(h * direction) - fn(-h * direction)) / (2 * h)
    np.testing.assert_allclose(float(tf.reduce_sum(dx * direction)), float(numeric), rtol=1e-5)


def test_batched_optimizer_equals_one_trajectory_at_a_time():
  lopt = MLPLOpt(lambda_exp=0.3, lambda_lin=0.05)
  thetas = tf.stack([lopt.init_theta(tf.constant([0, i])) for i in range(3)]) + 0.05
  shapes = [(3, 3, 1, 4), (4,), (4, 2)]
  params = [tf.random.stateless_normal((3,) + s, [1, i]) for i, s in enumerate(shapes)]
  grads = [tf.random.stateless_normal((3,) + s, [2, i]) for i, s in enumerate(shapes)]
  batched = lopt.batched_optimizer(thetas)
  state = batched.init(params)
  for _ in range(2):
    new_b, state_b = batched.update(grads, state, params)
    state = state_b
  for i in range(3):
    opt = lopt.optimizer(thetas[i])
    s = opt.init([p[i] for p in params])
    for _ in range(2):
      new, s = opt.update([g[i] for g in grads], s, [p[i] for p in params])
    for a, b in zip(new, new_b):
      np.testing.assert_allclose(a.numpy(), b[i].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.m.numpy(), state_b.m[i].numpy(), rtol=1e-6)


def test_first_step_finite_first_and_second_derivatives():
  """Zero accumulators, zero biases and exactly-zero gradients at the first step (App. C.1)."""
  lopt = MLPLOpt(implementation='reference')
  theta = lopt.init_theta(tf.constant([3, 4]))
  x = tf.constant([[1.0, 0.0], [0.5, 0.0]])  # second input column is zero: zero gradients

  def loss_after_step(theta):
    params = [tf.constant([[0.3], [0.0]]), tf.zeros([1])]
    with tf.GradientTape() as tape:
      tape.watch(params)
      loss = tf.reduce_sum(tf.square(tf.nn.relu(x @ params[0] + params[1])))
    grads = tape.gradient(loss, params)
    new, _ = _one_step(lopt, theta, grads, params)
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


def test_hand_designed_theta_steps_by_the_normalized_adam_direction():
  lopt = MLPLOpt(implementation='reference')
  theta = lopt.hand_designed_theta(2e-3, tf.constant([0, 0]), decay=0.5, residual_scale=0.0)
  assert theta.shape == (lopt.num_meta_params,)
  rng = np.random.default_rng(0)
  params = [tf.constant(rng.normal(size=(3, 4)), tf.float32), tf.constant(rng.normal(size=5),
                                                                            tf.float32)]
  grads = [tf.constant(rng.normal(size=(3, 4)), tf.float32), tf.constant(rng.normal(size=5) * 1e-3,
                                                                           tf.float32)]
  new, _ = _one_step(lopt, theta, grads, params)
  for p, g, n in zip(params, grads, new):
    g = g.numpy().astype(np.float64)
    m, v = 0.5 * g, 0.5 * g**2  # one EMA step from zero at decay 0.5
    rm = m / np.sqrt(v + lopt.rms_epsilon)
    x = rm / np.sqrt(lopt.norm_epsilon + np.mean(rm**2))
    np.testing.assert_allclose(p.numpy() - n.numpy(), 2e-3 * x, rtol=1e-4, atol=1e-9)
  # The residual units only perturb the step (scale 0.1 of their Glorot output weights).
  noisy = lopt.hand_designed_theta(2e-3, tf.constant([0, 0]), decay=0.5)
  steps = [p - n for p, n in zip(params, _one_step(lopt, noisy, grads, params)[0])]
  exact = [p - n for p, n in zip(params, new)]
  for s, e in zip(steps, exact):
    assert 0 < np.max(np.abs(s - e)) < 0.2 * np.max(np.abs(e))


def test_hand_designed_theta_needs_its_features():
  with pytest.raises(UserError, match='use_momentum and use_rms'):
    MLPLOpt(use_rms=False).hand_designed_theta(1e-3, tf.constant([0, 0]))
  with pytest.raises(UserError, match='not one of MLPLOpt.decays'):
    MLPLOpt().hand_designed_theta(1e-3, tf.constant([0, 0]), decay=0.7)

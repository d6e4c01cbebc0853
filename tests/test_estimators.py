"""The RP/ES estimators and their merge (paper §3, eq. 1) and the curriculum (§4.3)."""

import numpy as np
import pytest
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.outer_trainers import estimators
from lo_tf.outer_trainers.curriculum import Curriculum


def _output(g_rp, g_es, finite=None):
  g_rp, g_es = np.asarray(g_rp, np.float32), np.asarray(g_es, np.float32)
  s = g_rp.shape[0]
  finite = np.ones(s, bool) if finite is None else np.asarray(finite)
  zeros = tf.zeros([s])
  return estimators.EstimatorOutput(
      g_rp=tf.constant(g_rp), g_es=tf.constant(g_es), loss_pos=zeros, loss_neg=zeros,
      finite=tf.constant(finite), lengths=tf.zeros([s], tf.int32), train_loss=zeros,
      reset=tf.zeros([s], tf.bool))


def _merge(g_rp, g_es, finite=None, mode='merged', variance_epsilon=0.0):
  grad, stats = estimators.merge(_output(g_rp, g_es, finite), mode, variance_epsilon)
  return grad.numpy().astype(np.float64), {k: float(v) for k, v in stats.items()}


def test_eq1_inverse_variance_weighting_on_known_variances():
  rng = np.random.default_rng(0)
  s, p = 4000, 3
  mu_rp, mu_es = np.array([1.0, -2.0, 0.5]), np.array([1.2, -1.0, 0.0])
  sd_rp, sd_es = np.array([0.1, 2.0, 1.0]), np.array([1.0, 0.2, 1.0])
  g_rp = (mu_rp + sd_rp * rng.normal(size=(s, p))).astype(np.float32).astype(np.float64)
  g_es = (mu_es + sd_es * rng.normal(size=(s, p))).astype(np.float32).astype(np.float64)
  grad, stats = _merge(g_rp, g_es)
  # Exact eq. 1 on these samples (float32 arithmetic in TF)...
  v_rp, v_es = g_rp.var(0, ddof=1), g_es.var(0, ddof=1)
  expected = (g_rp.mean(0) / v_rp + g_es.mean(0) / v_es) / (1 / v_rp + 1 / v_es)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
  # ...and close to the weighting the true variances give.
  w = sd_es**2 / (sd_rp**2 + sd_es**2)
  np.testing.assert_allclose(grad, w * mu_rp + (1 - w) * mu_es, atol=0.05)
  assert stats['num_used'] == s
  np.testing.assert_allclose(stats['rp_weight'], w.mean(), atol=0.01)
  np.testing.assert_allclose(stats['var_rp'], (sd_rp**2).mean(), rtol=0.05)


def test_variance_epsilon_of_the_authors_code():
  """With both variances 0 the +1e-8 makes the weights equal, not 0/0."""
  grad, stats = _merge([[1.0], [1.0]], [[3.0], [3.0]], variance_epsilon=1e-8)
  np.testing.assert_allclose(grad, [2.0], rtol=1e-6)
  assert stats['rp_weight'] == pytest.approx(0.5)


def test_single_estimator_ablations_and_dropping():
  g_rp = np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, 0.0]])
  g_es = np.array([[5.0, 6.0], [7.0, 9.0], [0.0, np.inf]])
  finite = np.array([True, True, False])
  np.testing.assert_allclose(_merge(g_rp, g_es, finite, 'rp')[0], [2.0, 3.0])
  np.testing.assert_allclose(_merge(g_rp, g_es, finite, 'es')[0], [6.0, 7.5])
  grad, stats = _merge(g_rp, g_es, finite, 'merged')
  assert np.all(np.isfinite(grad)) and stats['num_used'] == 2
  # Element 0: both variances 2 -> equal weights; element 1: var_rp 2, var_es 4.5.
  np.testing.assert_allclose(grad, [0.5 * 2 + 0.5 * 6, (4.5 * 3 + 2 * 7.5) / 6.5], rtol=1e-6)


def test_no_finite_sample_gives_a_zero_gradient():
  grad, stats = _merge(np.full((2, 3), np.nan), np.zeros((2, 3)), [False, False])
  assert np.all(grad == 0) and stats['num_used'] == 0


def test_one_sample_has_no_variance_estimate_and_averages():
  grad, _ = _merge([[1.0]], [[3.0]])
  np.testing.assert_allclose(grad, [2.0])


def test_outputs_of_worker_batches_concatenate_exactly():
  rng = np.random.default_rng(2)
  g_rp, g_es = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  whole = _output(g_rp, g_es)
  parts = estimators.concat_outputs([_output(g_rp[:2], g_es[:2]), _output(g_rp[2:], g_es[2:])])
  np.testing.assert_array_equal(estimators.merge(whole)[0].numpy(),
                                estimators.merge(parts)[0].numpy())


def test_unknown_mode_is_refused_by_the_estimator_that_owns_it():
  with pytest.raises(UserError, match='GradientEstimator.mode'):
    estimators.GradientEstimator(None, None, mode='nope')


def _base_length(c, outer_step):
  """The un-jittered k (float) of curriculum `c` at `outer_step`: the reference in Python."""
  frac = min(max(outer_step, 0) / c.num_outer_steps, 1.0)
  return c.start + frac * (c.end - c.start)


def _sample_length(c, outer_step, u):
  """The jittered k (int >= 1) for a uniform draw u in [0, 1)."""
  factor = 1.0 - c.jitter + 2.0 * c.jitter * float(u)
  return max(1, int(round(_base_length(c, outer_step) * factor)))


def test_curriculum_is_linear_and_jitter_bounded():
  c = Curriculum(start=50, end=10000, num_outer_steps=5000, jitter=0.2)
  assert _base_length(c, 0) == 50 and _base_length(c, 5000) == 10000
  assert _base_length(c, 2500) == pytest.approx(5025) and _base_length(c, 10**6) == 10000
  assert _sample_length(c, 2500, 0.0) == round(5025 * 0.8)
  assert _sample_length(c, 2500, 0.5) == 5025
  assert _sample_length(c, 2500, 0.999999) == round(5025 * 1.2 * 0.999999 + 5025 * 0.8 * 1e-6)
  rng = np.random.default_rng(0)
  for step in (0, 1000, 4000):
    ks = [_sample_length(c, step, u) for u in rng.uniform(size=500)]
    base = _base_length(c, step)
    assert min(ks) >= round(0.8 * base) and max(ks) <= round(1.2 * base)
    assert max(ks) - min(ks) > 0.3 * base  # the jitter is really used
  assert max(ks) <= round(c.end * (1 + c.jitter))


def test_fixed_length_curriculum_and_bad_settings():
  c = Curriculum(start=100, end=100, jitter=0.0)
  assert {_sample_length(c, s, u) for s in (0, 9999) for u in (0.0, 0.7)} == {100}
  assert _sample_length(Curriculum(start=1, end=1, jitter=0.2), 0, 0.0) == 1
  with pytest.raises(UserError):
    Curriculum(start=0)
  with pytest.raises(UserError):
    Curriculum(jitter=1.5)


def test_tensorflow_lengths_match_the_python_curriculum():
  c = Curriculum(start=50, end=10000, num_outer_steps=5000, jitter=0.2)
  u = np.linspace(0, 0.999, 7)
  for step in (0, 777, 5000, 9000):
    tf_k = c.sample_lengths(tf.constant(step, tf.int64), tf.constant(u, tf.float32)).numpy()
    py_k = [_sample_length(c, step, x) for x in u]
    np.testing.assert_allclose(tf_k, py_k, atol=1)  # float32 vs float64 rounding at .5

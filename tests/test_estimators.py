"""The RP/ES estimators and their merge (paper §3, eq. 1) and the curriculum (§4.3)."""

import numpy as np
import pytest

from lo_tf.errors import UserError
from lo_tf.outer_trainers import estimators
from lo_tf.outer_trainers.curriculum import Curriculum


def test_eq1_inverse_variance_weighting_on_known_variances():
  rng = np.random.default_rng(0)
  s, p = 4000, 3
  mu_rp, mu_es = np.array([1.0, -2.0, 0.5]), np.array([1.2, -1.0, 0.0])
  sd_rp, sd_es = np.array([0.1, 2.0, 1.0]), np.array([1.0, 0.2, 1.0])
  g_rp = mu_rp + sd_rp * rng.normal(size=(s, p))
  g_es = mu_es + sd_es * rng.normal(size=(s, p))
  grad, stats = estimators.combine(g_rp, g_es, np.ones(s, bool))
  # Exact eq. 1 on these samples...
  v_rp, v_es = g_rp.var(0, ddof=1), g_es.var(0, ddof=1)
  expected = (g_rp.mean(0) / v_rp + g_es.mean(0) / v_es) / (1 / v_rp + 1 / v_es)
  np.testing.assert_allclose(grad, expected, rtol=1e-10)
  # ...and close to the weighting the true variances give.
  w = sd_es**2 / (sd_rp**2 + sd_es**2)
  np.testing.assert_allclose(grad, w * mu_rp + (1 - w) * mu_es, atol=0.05)
  assert stats['num_used'] == s
  np.testing.assert_allclose(stats['rp_weight'], w.mean(), atol=0.01)
  np.testing.assert_allclose(stats['var_rp'], (sd_rp**2).mean(), rtol=0.05)


def test_single_estimator_ablations_and_dropping():
  g_rp = np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, 0.0]])
  g_es = np.array([[5.0, 6.0], [7.0, 9.0], [0.0, np.inf]])
  finite = np.array([True, True, False])
  np.testing.assert_allclose(estimators.combine(g_rp, g_es, finite, 'rp')[0], [2.0, 3.0])
  np.testing.assert_allclose(estimators.combine(g_rp, g_es, finite, 'es')[0], [6.0, 7.5])
  grad, stats = estimators.combine(g_rp, g_es, finite, 'merged')
  assert np.all(np.isfinite(grad)) and stats['num_used'] == 2
  # Element 0: both variances 2 -> equal weights; element 1: var_rp 2, var_es 4.5.
  np.testing.assert_allclose(grad, [0.5 * 2 + 0.5 * 6, (4.5 * 3 + 2 * 7.5) / 6.5])


def test_no_finite_sample_gives_no_gradient():
  grad, stats = estimators.combine(np.full((2, 3), np.nan), np.zeros((2, 3)),
                                   np.array([False, False]))
  assert grad is None and stats['num_used'] == 0


def test_one_sample_has_no_variance_estimate_and_averages():
  grad, _ = estimators.combine(np.array([[1.0]]), np.array([[3.0]]), np.array([True]))
  np.testing.assert_allclose(grad, [2.0])


def test_unknown_estimator():
  with pytest.raises(ValueError, match='unknown estimator'):
    estimators.combine(np.zeros((1, 1)), np.zeros((1, 1)), np.array([True]), 'nope')


def test_antithetic_es_is_unbiased_for_a_quadratic():
  """For L(θ) = |θ - c|², E[½(L(θ+e) - L(θ-e)) e/σ²] = ∇𝓛(θ) = 2(θ - c) exactly."""
  rng = np.random.default_rng(1)
  theta, c, sigma, n = np.array([0.3, -1.0, 2.0]), np.array([1.0, 1.0, -1.0]), 0.1, 20000
  loss = lambda th: np.sum((th - c)**2, axis=-1)
  e = sigma * rng.normal(size=(n, 3))
  samples = estimators.es_gradient(loss(theta + e), loss(theta - e), e.T, sigma).T
  mean, sem = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(n)
  assert np.all(np.abs(mean - 2 * (theta - c)) < 4 * sem), (mean, 2 * (theta - c), sem)
  # Antithetic symmetry: swapping e for -e leaves every sample unchanged.
  swapped = estimators.es_gradient(loss(theta - e), loss(theta + e), -e.T, sigma).T
  np.testing.assert_allclose(swapped, samples)


def test_curriculum_is_linear_and_jitter_bounded():
  c = Curriculum(start=50, end=10000, num_outer_steps=5000, jitter=0.2)
  assert c.base_length(0) == 50 and c.base_length(5000) == 10000
  assert c.base_length(2500) == pytest.approx(5025) and c.base_length(10**6) == 10000
  assert c.sample_length(2500, 0.0) == round(5025 * 0.8)
  assert c.sample_length(2500, 0.5) == 5025
  assert c.sample_length(2500, 0.999999) == round(5025 * 1.2 * 0.999999 + 5025 * 0.8 * 1e-6)
  rng = np.random.default_rng(0)
  for step in (0, 1000, 4000):
    ks = [c.sample_length(step, u) for u in rng.uniform(size=500)]
    base = c.base_length(step)
    assert min(ks) >= round(0.8 * base) and max(ks) <= round(1.2 * base)
    assert max(ks) - min(ks) > 0.3 * base  # the jitter is really used
  assert max(ks) < c.max_length()


def test_fixed_length_curriculum_and_bad_settings():
  c = Curriculum(start=100, end=100, jitter=0.0)
  assert {c.sample_length(s, u) for s in (0, 9999) for u in (0.0, 0.7)} == {100}
  assert Curriculum(start=1, end=1, jitter=0.2).sample_length(0, 0.0) == 1
  with pytest.raises(UserError):
    Curriculum(start=0)
  with pytest.raises(UserError):
    Curriculum(jitter=1.5)

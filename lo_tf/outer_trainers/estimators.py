"""Gradient estimators of the variational outer objective (paper §3, eq. 1).

With θ̃ = θ + e, e ~ N(0, σ²I), the smoothed objective is 𝓛(θ) = E[L(θ̃)]. For one antithetic
pair (θ + e, θ - e) whose unrolls start from the same inner state and see the same batches:

  g_rp = ∇θ ½(L⁺ + L⁻)                (reparameterization: backprop through the unrolls)
  g_es = ½(L⁺ - L⁻) · e / σ²          (evolution strategies: the log-derivative trick)

Over a batch of S such samples, each estimator's per-element empirical mean and variance are formed
and merged by inverse-variance weighting (eq. 1):

  g_merged = (g_rp σ_rp⁻² + g_es σ_es⁻²) / (σ_rp⁻² + σ_es⁻²).

As in the paper, the same samples serve for the means and the variances.
"""

import numpy as np

ESTIMATORS = ('merged', 'rp', 'es')


def es_gradient(loss_pos, loss_neg, noise, sigma):
  """One antithetic ES sample ½(L⁺ - L⁻)·e/σ² (float arrays like `noise`)."""
  return 0.5 * (loss_pos - loss_neg) * noise / sigma**2


def _mean_var(samples):
  n = samples.shape[0]
  mean = samples.mean(0)
  # Unbiased variance; a single sample has no spread to estimate, so it reads as 0.
  var = ((samples - mean)**2).sum(0) / max(n - 1, 1)
  return mean, var


def combine(g_rp, g_es, finite, estimator='merged'):
  """Combines per-sample estimates into one outer gradient (eq. 1).

  Args:
    g_rp: float64 [S, P] reparameterization samples.
    g_es: float64 [S, P] ES samples.
    finite: bool [S]; False drops the sample (non-finite losses or gradients).
    estimator: 'merged' (eq. 1), 'rp' or 'es' (the Fig. 7 ablations).

  Returns:
    (gradient float64 [P] or None when no sample is finite, stats dict with 'num_used',
    'var_rp' and 'var_es' (mean over elements of the per-element variances), 'rp_weight'
    (mean share of g_rp in the merged gradient)).

  Raises:
    ValueError: for an unknown estimator.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f'unknown estimator {estimator!r}; choose one of {ESTIMATORS}')
  finite = np.asarray(finite, bool)
  stats = {'num_used': int(finite.sum())}
  if not finite.any():
    return None, stats
  mean_rp, var_rp = _mean_var(np.asarray(g_rp, np.float64)[finite])
  mean_es, var_es = _mean_var(np.asarray(g_es, np.float64)[finite])
  total = var_rp + var_es
  # w_rp = σ_rp⁻² / (σ_rp⁻² + σ_es⁻²) = σ_es² / (σ_rp² + σ_es²): finite even when a variance is 0.
  w_rp = np.where(total > 0, var_es / np.where(total > 0, total, 1.0), 0.5)
  if estimator == 'rp':
    w_rp = np.ones_like(w_rp)
  elif estimator == 'es':
    w_rp = np.zeros_like(w_rp)
  stats.update(var_rp=float(var_rp.mean()), var_es=float(var_es.mean()),
               rp_weight=float(w_rp.mean()))
  return w_rp * mean_rp + (1 - w_rp) * mean_es, stats

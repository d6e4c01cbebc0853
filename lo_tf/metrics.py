"""The §4.4 measures: curves summarized over initializations, tuning targets, the comparison.

For each compared measure the curve and the rule differ:

* ``train``: the smoothed minibatch train loss; tuned by its final-window value, compared by the
  lowest value reached;
* ``valid``: the inner-valid loss, tuned and compared by the lowest value reached (early stopping);
* ``valid_final``: the inner-valid loss at the end of inner training, step T (Fig. 1c's "final test
  loss"), tuned and compared by that value.

Curves over initializations are summarized by their median (the lines of Fig. 1a,b); measures are
read off the median curves (`Summary`), and `compare` and `summarize_tasks` give the learned
optimizer's improvements, speedups and win rates against the per-task best baseline.
"""

import dataclasses

import numpy as np

BASELINE_NAMES = ('adam', 'rmsprop', 'sgdm')
METRICS = ('train', 'valid', 'valid_final')


def smoothed_train_loss(train_loss, window):
  """Trailing moving average (float64 [T]) of a minibatch loss curve over `window` steps."""
  x = np.asarray(train_loss, np.float64)
  c = np.cumsum(np.concatenate([[0.0], np.nan_to_num(x, nan=np.inf)]))
  idx = np.arange(1, len(x) + 1)
  lo = np.maximum(0, idx - window)
  with np.errstate(invalid='ignore'):  # inf - inf after a divergence: NaN, masked below
    out = (c[idx] - c[lo]) / (idx - lo)
  out[~np.isfinite(x)] = np.nan
  return out


@dataclasses.dataclass
class Summary:
  """Metrics of one optimizer on one task, from median-over-inits curves.

  `train` is the smoothed minibatch train loss per step; `valid` the inner-valid loss per eval.
  """
  train: np.ndarray
  seconds: np.ndarray
  valid: np.ndarray
  eval_steps: np.ndarray
  eval_seconds: np.ndarray
  diverged: bool
  band: dict  # metric -> (25th, 75th percentile curves over inits)

  def _curve(self, metric):
    """(losses, steps, seconds) of the curve `metric` is read from."""
    if metric == 'train':
      return self.train, np.arange(1, len(self.train) + 1), self.seconds
    return self.valid, self.eval_steps, self.eval_seconds

  def final(self, metric):
    """Final-window train loss, or final valid loss (inf if diverged)."""
    v = self._curve(metric)[0][-1]
    return float(v) if np.isfinite(v) else float('inf')

  def best(self, metric):
    """The compared value: lowest train or valid loss reached, or the final valid loss (inf if
    none is finite)."""
    if metric == 'valid_final':
      return self.final(metric)
    v = self._curve(metric)[0]
    return float(np.nanmin(v)) if np.isfinite(v).any() else float('inf')

  def time_to(self, metric, target):
    """(steps, seconds) to first reach loss <= target, or (None, None) if never reached."""
    v, steps, secs = self._curve(metric)
    hit = np.flatnonzero(np.nan_to_num(v, nan=np.inf) <= target)
    if hit.size == 0:
      return None, None
    return int(steps[hit[0]]), float(secs[hit[0]])

  def selection_score(self, metric):
    """The §4.4 tuning target: final-window train loss, best valid loss, or final valid loss."""
    return self.final(metric) if metric in ('train', 'valid_final') else self.best(metric)


def summarize(curves_list, window):
  """Median over initializations of a list of `InnerCurves` -> `Summary`."""
  stack = lambda f: np.stack([f(c) for c in curves_list])
  train = stack(lambda c: smoothed_train_loss(c.train_loss, window))
  valid = stack(lambda c: c.valid_loss)
  # Percentiles propagate NaN (diverged inits), which is the honest reading of a failed run.
  pct = lambda x, q: np.percentile(x, q, axis=0)
  return Summary(train=np.median(train, 0), seconds=np.median(stack(lambda c: c.seconds), 0),
                 valid=np.median(valid, 0), eval_steps=curves_list[0].eval_steps,
                 eval_seconds=np.median(stack(lambda c: c.eval_seconds), 0),
                 diverged=any(c.diverged for c in curves_list),
                 band={'train': (pct(train, 25), pct(train, 75)),
                       'valid': (pct(valid, 25), pct(valid, 75))})


def select_best(summaries, metric):
  """Index of the best of `summaries` by the §4.4 tuning target for `metric` (ties: first).

  Diverged or never-finite runs score inf and so are never chosen over a finite one.
  """
  scores = [s.selection_score(metric) for s in summaries]
  return int(np.argmin(scores))


def compare(baseline, learned, metric):
  """Learned optimizer vs the best baseline on one task (Fig. 1c, §4.4).

  Args:
    baseline, learned: `Summary` of each.
    metric: one of METRICS.

  Returns:
    dict: improvement (baseline's compared value - the learned optimizer's, `Summary.best`;
    positive = learned better), speedup_steps and speedup_wallclock (steps and seconds the baseline
    needs to reach its compared value, divided by the learned optimizer's steps and seconds to reach
    that loss; 0 when the learned optimizer never reaches it).
  """
  target = baseline.best(metric)
  b_steps, b_secs = baseline.time_to(metric, target)
  l_steps, l_secs = learned.time_to(metric, target)
  reached = l_steps is not None and b_steps is not None
  return {'improvement': target - learned.best(metric),
          'speedup_steps': b_steps / max(l_steps, 1) if reached else 0.0,
          'speedup_wallclock': b_secs / max(l_secs, 1e-9) if reached else 0.0}


def summarize_tasks(records, with_learned):
  """The `summary` block of results.json from per-task records.

  Args:
    records: per-task dicts with 'best_baseline_<metric>' and, with a learned optimizer,
      'improvement_<metric>', 'speedup_steps_<metric>', 'speedup_wallclock_<metric>'.
    with_learned: whether a learned optimizer was evaluated.

  Returns:
    dict with num_tasks, best_baseline_counts_<metric> and, with a learned optimizer,
    win_rate_<metric> (fraction of tasks with positive improvement), median_improvement_<metric>
    and median speedup_steps_/speedup_wallclock_<metric> over tasks.
  """
  summary = {'num_tasks': len(records)}
  for metric in METRICS:
    names = [r[f'best_baseline_{metric}']['name'] for r in records]
    summary[f'best_baseline_counts_{metric}'] = {n: names.count(n) for n in BASELINE_NAMES}
  if with_learned:
    for metric in METRICS:
      imp = np.array([r[f'improvement_{metric}'] for r in records])
      summary[f'win_rate_{metric}'] = float(np.mean(imp > 0))
      summary[f'median_improvement_{metric}'] = float(np.median(imp))
      for kind in ('steps', 'wallclock'):
        key = f'speedup_{kind}_{metric}'
        summary[key] = float(np.median([r[key] for r in records]))
  return summary

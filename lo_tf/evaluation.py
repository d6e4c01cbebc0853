"""Evaluation on held-out classes against tuned baselines (paper §4.4, Fig. 1, App. D, App. E).

For each outer-test task, Adam, RMSProp and SGD+Momentum are tuned over the 11-value learning-rate
grid of §4.4 on the first initialization; the rate chosen per optimizer and per measure
(`lo_tf.metrics.METRICS`) then runs on every initialization. The per-task best baseline is the best
of the three. A learned optimizer, when given,
runs untuned on the same tasks and initializations. Every inner-training run is cached on disk by
(task seed, optimizer, rate, init seed, experiment fingerprint), so re-runs do not repeat it.

Curves over initializations are summarized by their median and compared by `lo_tf.metrics`.
"""

import dataclasses
import hashlib
import io
import os
import time

import numpy as np
from absl import logging

from lo_tf import io_utils
from lo_tf import plotting
from lo_tf.errors import check_int
from lo_tf.inner_training import InnerCurves
from lo_tf.io_utils import array_digest
from lo_tf.metrics import BASELINE_NAMES
from lo_tf.metrics import METRICS
from lo_tf.metrics import compare
from lo_tf.metrics import select_best
from lo_tf.metrics import summarize
from lo_tf.metrics import summarize_tasks
from lo_tf.optimizers.hand_designed import BASELINES
from lo_tf.optimizers.hand_designed import learning_rate_grid
from lo_tf.tasks.distribution import OUTER_TEST


def _task_digest(task):
  """Hash of a task's pixels and labels: cached runs follow the data, not its spec string."""
  h = hashlib.sha1()
  for x in task.data:
    h.update(np.ascontiguousarray(x.numpy()).tobytes())
  return f't{task.seed}_{h.hexdigest()[:12]}'


class CurveCache:
  """On-disk cache of `InnerCurves`, one .npz per run, written atomically.

  Args:
    directory: where the .npz files go.
    num_steps, num_evals: the lengths T and E that an entry's per-step and per-evaluation arrays
      must have (None: not checked). An entry of other lengths is recomputed, never trusted.
  """

  def __init__(self, directory, num_steps=None, num_evals=None):
    self.directory = io_utils.ensure_writable_dir(directory)
    self.num_steps, self.num_evals = num_steps, num_evals
    self.hits = self.misses = 0

  def _fits(self, fields):
    """Whether the arrays of a cache entry have the shapes this cache expects."""
    lengths = {'train_loss': self.num_steps, 'seconds': self.num_steps}
    for name in ('eval_steps', 'eval_seconds', 'valid_loss', 'valid_acc', 'train_eval_loss',
                 'train_eval_acc'):
      lengths[name] = self.num_evals
    if any(np.ndim(fields[name]) != 1 or (n is not None and len(fields[name]) != n)
           for name, n in lengths.items()):
      return False
    return all(np.ndim(fields[name]) == 0 for name in ('steps_completed', 'diverged'))

  def _path(self, key):
    return os.path.join(self.directory, key + '.npz')

  def get(self, key):
    path = self._path(key)
    if not os.path.exists(path):
      self.misses += 1
      return None
    try:
      with np.load(path) as z:
        fields = {f.name: z[f.name] for f in dataclasses.fields(InnerCurves)}
    except Exception:  # pylint: disable=broad-except
      self.misses += 1  # a corrupt cache entry (of any kind) is recomputed, not trusted
      return None
    if not self._fits(fields):  # well-formed, but not a run of this length: recomputed too
      self.misses += 1
      return None
    self.hits += 1
    fields['steps_completed'] = int(fields['steps_completed'])
    fields['diverged'] = bool(fields['diverged'])
    return InnerCurves(**fields)

  def put(self, key, curves):
    buf = io.BytesIO()
    np.savez(buf, **dataclasses.asdict(curves))
    io_utils.atomic_write_bytes(self._path(key), buf.getvalue())


class Evaluator:
  """Runs the §4.4 comparison on outer-test tasks of an `Experiment`.

  Args:
    experiment: `lo_tf.experiment.Experiment`.
    output_dir: where results.json, plots and the run cache go.
    num_tasks: number of tasks (task seeds first_task .. first_task + num_tasks - 1).
    num_inits: initializations per task (init seeds 0..num_inits-1; paper: 5).
    learned: optional (name, family, theta) of a learned optimizer; None evaluates baselines only.
    grid: learning rates of the baseline grid (default: the §4.4 grid of 11 values).
    first_task: the first task seed.
    split: OUTER_TEST (held-out classes, the default: for reported numbers only), OUTER_VALID
      (held-out classes that every choice is made on) or OUTER_TRAIN (App. D shows both: winning
      on outer-train but not outer-test points at generalization, losing on both at
      outer-training).
    plot_tasks: Fig. 1a,b is drawn for this many tasks (the first ones).
    provenance: JSON-able facts about the learned optimizer recorded in results.json (which
      checkpoint or shipped name, θ's hash).
    cache_dir: the run cache (default output_dir/cache); evaluations that share one (the
      checkpoints of a learning curve) run each baseline once.

  Raises:
    UserError: for non-positive counts, a negative first task or a split the experiment's task
      distribution does not have.
  """

  def __init__(self, experiment, output_dir, num_tasks=20, num_inits=5, learned=None, grid=None,
               first_task=0, split=OUTER_TEST, plot_tasks=1, provenance=None, cache_dir=None):
    check_int('Evaluator', 'num_tasks', num_tasks)
    check_int('Evaluator', 'num_inits', num_inits)
    check_int('Evaluator', 'first_task', first_task, minimum=0)
    check_int('Evaluator', 'plot_tasks', plot_tasks, minimum=0)
    experiment.tasks.classes(split)  # UserError for a split the distribution lacks
    self.first_task, self.split, self.plot_tasks = first_task, split, plot_tasks
    self.provenance = provenance
    self.exp = experiment
    self.output_dir = io_utils.ensure_writable_dir(output_dir)
    trainer = experiment.trainer
    self.cache = CurveCache(cache_dir or os.path.join(output_dir, 'cache'),
                            num_steps=trainer.num_steps,
                            num_evals=trainer.num_steps // trainer.eval_every + 1)
    self.num_tasks, self.num_inits = num_tasks, num_inits
    self.learned = learned
    self.grid = learning_rate_grid() if grid is None else np.asarray(grid)
    self.window = max(1, experiment.trainer.eval_every)
    self._fingerprint = experiment.fingerprint()
    self._runs_done = 0

  def _run(self, name, family, opt_params, task, init, rate_label):
    key = f'{self._fingerprint}-{_task_digest(task)}-{name}-{rate_label}-i{init}'
    curves = self.cache.get(key)
    if curves is None:
      curves = self.exp.trainer.train(family, opt_params, task, init)
      self.cache.put(key, curves)
    self._runs_done += 1
    return curves

  def _evaluate_task(self, task):
    record = {'task_seed': task.seed, 'classes': task.classes.tolist(),
              'class_names': list(task.class_names), 'optimizers': {}}
    chosen = {}  # metric -> (score, name, lr)
    for name in BASELINE_NAMES:
      family = BASELINES[name]
      tuning = [summarize([self._run(name, family, lr, task, 0, f'{lr:.3g}')], self.window)
                for lr in self.grid]
      entry = {'grid': [dict(self._describe(s), learning_rate=float(lr))
                        for lr, s in zip(self.grid, tuning)]}
      for metric in METRICS:
        lr = float(self.grid[select_best(tuning, metric)])
        entry[f'best_lr_{metric}'] = lr
        runs = [self._run(name, family, lr, task, i, f'{lr:.3g}') for i in range(self.num_inits)]
        s = summarize(runs, self.window)
        entry[f'at_best_lr_{metric}'] = self._describe(s)
        record['optimizers'][f'{name}@{metric}'] = s
        score = s.selection_score(metric)
        if metric not in chosen or score < chosen[metric][0]:
          chosen[metric] = (score, name, lr)
      record[name] = entry
    for metric in METRICS:
      _, name, lr = chosen[metric]
      record[f'best_baseline_{metric}'] = {'name': name, 'learning_rate': lr}
    if self.learned is not None:
      lname, family, theta = self.learned
      label = array_digest(theta)
      runs = [self._run(lname, family, theta, task, i, label) for i in range(self.num_inits)]
      s = summarize(runs, self.window)
      record['optimizers'][lname] = s
      record[lname] = self._describe(s)
      for metric in METRICS:
        base = record['optimizers'][f'{record[f"best_baseline_{metric}"]["name"]}@{metric}']
        for key, value in compare(base, s, metric).items():
          record[f'{key}_{metric}'] = value
    return record

  @staticmethod
  def _describe(s):
    return {'final_train': s.final('train'), 'best_train': s.best('train'),
            'final_valid': s.final('valid'), 'best_valid': s.best('valid'),
            'steps': int(np.isfinite(s.train).sum()),
            'seconds': float(np.nanmax(s.seconds)) if np.isfinite(s.seconds).any() else 0.0,
            'diverged': s.diverged}

  def run(self):
    """Evaluates every task; writes results.json and the Fig. 1 plots into output_dir.

    Returns:
      The results dict ({'summary': ..., 'tasks': [...]}) also written to results.json.
    """
    start = time.time()
    records = []
    for k in range(self.num_tasks):
      task = self.exp.tasks.sample_task(self.split, self.first_task + k)
      records.append(self._evaluate_task(task))
      done = k + 1
      elapsed = time.time() - start
      logging.info('task %d/%d done: %d runs (%d cached), %.1fs elapsed, ETA %.0fs', done,
                   self.num_tasks, self._runs_done, self.cache.hits, elapsed,
                   elapsed / done * (self.num_tasks - done))
    summaries = [r.pop('optimizers') for r in records]
    results = {'summary': self._summary(records, time.time() - start), 'tasks': records,
               'config': {'fingerprint': self._fingerprint, 'num_inits': self.num_inits,
                          'learned_optimizer': self.learned[0] if self.learned else None,
                          'learned_optimizer_provenance': self.provenance,
                          'split': self.split, 'first_task': self.first_task,
                          'grid': self.grid.tolist(),
                          'num_steps': self.exp.trainer.num_steps,
                          'train_source': self.exp.tasks.train_spec,
                          'test_source': self.exp.tasks.test_spec or self.exp.tasks.train_spec}}
    plots = plotting.figure1(summaries, records, self.learned[0] if self.learned else None,
                             self.output_dir, self.plot_tasks)
    results['plots'] = plots
    io_utils.atomic_write_json(os.path.join(self.output_dir, 'results.json'), results)
    return results

  def _summary(self, records, wall_seconds):
    return dict(summarize_tasks(records, self.learned is not None), num_inits=self.num_inits,
                wall_seconds=wall_seconds, runs=self._runs_done, cached_runs=self.cache.hits)

"""Figure 1 of the paper as PNGs: learning curves on a held-out task and the improvement histogram.

* ``fig1ab_curves.png`` (Fig. 1a,b): train and test (inner-valid) loss of the first outer-test task
  vs steps and vs seconds, median over initializations with the 25/75 percentile band, each
  optimizer at its rate tuned for that metric, dashed lines at the best loss each achieved.
* ``fig1c_improvement.png`` (Fig. 1c): distribution over tasks of the learned optimizer's loss
  improvement over the best tuned baseline (positive: learned is better).
"""

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from lo_tf import io_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_COLORS = {'adam': 'tab:blue', 'rmsprop': 'tab:green', 'sgdm': 'tab:orange'}


_ROWS = (('train', 'train loss (smoothed minibatch)', 'tuned for the final train loss'),
         ('valid', 'test loss (inner-valid)', 'tuned for the lowest test loss'),
         ('valid_final', 'test loss (inner-valid)', 'tuned for the final test loss'))


def _figure1ab(summaries, record, learned_name, path):
  """Fig. 1a,b for one task: one row per metric, against steps and against seconds."""
  fig, axes = plt.subplots(len(_ROWS), 2, figsize=(11, 11))
  for row, (metric, ylabel, tuned) in enumerate(_ROWS):
    labels = [f'{n}@{metric}' for n in _COLORS] + ([learned_name] if learned_name else [])
    for col, xaxis in enumerate(('steps', 'seconds')):
      ax = axes[row, col]
      for label in labels:
        s = summaries[label]
        name = label.split('@')[0]
        color = _COLORS.get(name, 'tab:red')
        if metric == 'train':
          y = s.train
          x = np.arange(1, len(y) + 1) if xaxis == 'steps' else s.seconds
        else:
          y = s.valid
          x = s.eval_steps if xaxis == 'steps' else s.eval_seconds
        lr = record.get(name, {}).get(f'best_lr_{metric}')
        text = f'{name} (lr {lr:.3g})' if lr is not None else name
        ax.plot(x, y, color=color, label=text, lw=2 if name == learned_name else 1.2)
        lo, hi = s.band['train' if metric == 'train' else 'valid']
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        best = s.best(metric)
        if np.isfinite(best):
          ax.axhline(best, color=color, ls='--', lw=0.8)
      ax.set_xlabel('inner steps' if xaxis == 'steps' else 'wall-clock seconds (training only)')
      ax.set_ylabel(ylabel)
      ax.set_title(f'baselines {tuned}', fontsize=9)
      ax.set_yscale('log')
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  names = record['class_names']
  shown = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
  fig.suptitle(f'Task {record["task_seed"]} ({len(names)} classes: {shown})\nmedian and 25/75 '
               'percentiles over inits; dashed: the value compared', fontsize=10)
  fig.tight_layout()
  io_utils.atomic_savefig(fig, path)
  plt.close(fig)


def figure1(summaries, records, learned_name, output_dir, plot_tasks=1):
  """Writes the Fig. 1 PNGs; returns {name: path} of what was written.

  Args:
    summaries: per task, {optimizer label: `lo_tf.metrics.Summary`} (labels 'adam@train', ...).
    records: per-task result records (for improvements and chosen rates).
    learned_name: label of the learned optimizer in `summaries`, or None.
    output_dir: destination directory.
    plot_tasks: Fig. 1a,b for this many tasks: `fig1ab_curves.png` for the first,
      `fig1ab_task<seed>.png` for the others.
  """
  paths = {}
  for i in range(min(plot_tasks, len(records))):
    key = 'fig1ab_curves' if i == 0 else f'fig1ab_task{records[i]["task_seed"]}'
    paths[key] = os.path.join(output_dir, key + '.png')
    _figure1ab(summaries[i], records[i], learned_name, paths[key])
  if learned_name:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    metrics = [m for m, _, _ in _ROWS]
    imps = {m: np.array([r[f'improvement_{m}'] for r in records], float) for m in metrics}
    finite = np.concatenate([v[np.isfinite(v)] for v in imps.values()])
    bins = np.histogram_bin_edges(finite if finite.size else [0.0],
                                  bins=min(20, max(5, len(records))))
    for metric, color in zip(metrics, ('tab:blue', 'tab:orange', 'tab:red')):
      imp = imps[metric][np.isfinite(imps[metric])]
      if imp.size:
        ax.hist(imp, bins=bins, alpha=0.45, color=color,
                label=f'{metric}: {np.mean(imp > 0):.0%} of tasks better')
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.axvline(0, color='k', lw=0.8)
    ax.set_xlabel('loss improvement over the best tuned baseline (positive: learned better)')
    ax.set_ylabel('tasks')
    ax.legend(fontsize=8)
    paths['fig1c_improvement'] = os.path.join(output_dir, 'fig1c_improvement.png')
    io_utils.atomic_savefig(fig, paths['fig1c_improvement'])
    plt.close(fig)
  return paths


def read_scalars(summary_dir):
  """{tag: (steps int64 [n], values float64 [n])} of the scalar summaries in `summary_dir`.

  Event files are read in order; a step written twice (a run resumed from an earlier checkpoint
  replays steps) keeps its last value, as TensorBoard shows it.
  """
  by_tag = {}
  for path in sorted(tf.io.gfile.glob(os.path.join(summary_dir, 'events.out.tfevents.*'))):
    try:
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          number = float(tf.make_ndarray(value.tensor)) if value.HasField('tensor') else \
              value.simple_value
          by_tag.setdefault(value.tag, {})[event.step] = number
    except tf.errors.DataLossError:  # a file cut short by a kill: keep what was read
      continue
  return {tag: (np.array(sorted(d), np.int64), np.array([d[k] for k in sorted(d)], np.float64))
          for tag, d in by_tag.items()}


def outer_training(summary_dir, path):
  """The outer-training curves of a bin/train run (paper Fig. 5) as a PNG at `path`.

  Panels: the outer loss per step (and its running median); meta-evaluation on the splits it ran
  on (outer-train, outer-valid, outer-test); the per-element variances of g_rp and g_es (Fig. 5a); the mean weight of g_rp
  in eq. 1. Returns `path`, or None when the summaries hold nothing to draw.
  """
  scalars = read_scalars(summary_dir)
  if 'outer_loss' not in scalars:
    return None
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  steps, loss = scalars['outer_loss']
  ax = axes[0, 0]
  ax.plot(steps, loss, lw=0.5, alpha=0.5, color='tab:gray', label='per step')
  window = max(1, len(loss) // 50)
  if len(loss) >= window:
    smooth = np.array([np.median(loss[max(0, i - window):i + 1]) for i in range(len(loss))])
    ax.plot(steps, smooth, color='k', label=f'running median ({window} steps)')
  ax.set_title('truncation outer loss L')
  ax.legend(fontsize=8)
  ax = axes[0, 1]
  for tag, style in (('mean_train_loss', '-'), ('mean_valid_loss', '--')):
    for split, color in (('outer_train', 'tab:blue'), ('outer_valid', 'tab:green'),
                         ('outer_test', 'tab:red')):
      key = f'meta_eval/{split}/{tag}'
      if key in scalars:
        ax.plot(*scalars[key], style, color=color, marker='.', label=f'{split} {tag}')
  ax.set_title('meta-evaluation over T inner steps (Fig. 5b,c)')
  ax.legend(fontsize=7)
  ax = axes[1, 0]
  for tag, color in (('var_rp', 'tab:blue'), ('var_es', 'tab:orange')):
    if tag in scalars:
      ax.semilogy(*scalars[tag], color=color, lw=0.8, label=tag)
  ax.set_title('estimator variances (Fig. 5a)')
  ax.legend(fontsize=8)
  ax = axes[1, 1]
  if 'rp_weight' in scalars:
    ax.plot(*scalars['rp_weight'], color='tab:green', lw=0.8)
  ax.set_ylim(-0.05, 1.05)
  ax.set_title('mean weight of g_rp in eq. 1')
  for ax in axes.flat:
    ax.set_xlabel('outer step')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  io_utils.atomic_savefig(fig, path)
  plt.close(fig)
  return path


def learning_curve(curve, path):
  """Win rates and median improvements against the outer step (`lo_tf.learning_curve`) as a PNG.

  Args:
    curve: the dict of `learning_curve.evaluate_checkpoints` (its 'points').
    path: the PNG to write (atomically). Returns `path`.
  """
  steps = [p['outer_step'] for p in curve['points']]
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for metric, color in zip(('train', 'valid', 'valid_final'), ('tab:blue', 'tab:orange',
                                                                'tab:red')):
    for ax, key in zip(axes, ('win_rate', 'median_improvement', 'speedup_wallclock')):
      ax.plot(steps, [p[f'{key}_{metric}'] for p in curve['points']], marker='.', color=color,
              label=metric)
  for ax, title in zip(axes, ('win rate over the best tuned baseline',
                              'median loss improvement (positive: learned better)',
                              'median wall-clock speedup')):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('outer step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylim(-0.05, 1.05)
  axes[1].axhline(0, color='k', lw=0.8)
  axes[2].axhline(1, color='k', lw=0.8)
  fig.suptitle(f'{curve["num_tasks"]} {curve["split"]} tasks x {curve["num_inits"]} inits, '
               f'{os.path.basename(curve["train_dir"])}', fontsize=10)
  fig.tight_layout()
  io_utils.atomic_savefig(fig, path)
  plt.close(fig)
  return path

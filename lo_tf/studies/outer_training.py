"""Figure 5: estimator variances and performance over outer-training for several θ seeds (§3, §4.3).

Reads bin/train runs (`--train_dir`, any number) or outer-trains its own: `num_seeds` seeds of θ
for each outer objective in `objectives`, with the study's config (gin/studies/
fig5_outer_training.gin) and `TruncatedStep.objective` set per objective, in
`<output_dir>/runs/<objective>/seed_<i>` (a rerun resumes unfinished runs and skips finished ones).

* Fig. 5a: the mean per-element variances of g_rp and g_es (`var_rp`, `var_es`, written by the
  loop at every outer step) against the outer step. The paper: var_rp starts ~5 orders of
  magnitude below var_es and ends ~20 above it as the curriculum lengthens the unrolls.
* Fig. 5b,c: the meta-evaluation (`MetaEvaluator`: T inner steps from fresh weights on fixed
  tasks) over outer-training, one line per seed, for L_train-trained (b) and L_valid-trained (c)
  runs: the run's selection metric (mean train loss over T, or mean inner-valid loss) on
  outer-train tasks (solid) and outer-test tasks (dotted). The dashed levels are Adam on the same
  tasks at its best rate of the §4.4 grid for that metric (the paper: "hyperparameter tuned
  Adam"). The seed with the best final outer-train score is drawn in orange (the paper's
  selected model).
"""

import os

import gin
import matplotlib.pyplot as plt
import numpy as np

from lo_tf import io_utils
from lo_tf import plotting
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.optimizers.hand_designed import learning_rate_grid
from lo_tf.outer_trainers import loop
from lo_tf.outer_trainers import run_checkpoints
from lo_tf.outer_trainers.meta_eval import MetaEvaluator
from lo_tf.studies import base
from lo_tf.tasks.distribution import OUTER_TEST
from lo_tf.tasks.distribution import OUTER_TRAIN

METRIC = {'train': 'mean_train_loss', 'valid': 'mean_valid_loss'}
SPLITS = (OUTER_TRAIN, OUTER_TEST)


def read_run(train_dir):
  """The Fig. 5 curves of one bin/train run: {'objective', 'metric', steps and values}.

  Raises:
    UserError: when `train_dir` is not a bin/train run or holds no summaries yet.
  """
  meta = io_utils.read_json(os.path.join(train_dir, run_checkpoints.LOPT_CONFIG), dict,
                            'run configuration', 'pass a train_dir written by bin/train')
  objective = meta.get('objective')
  if objective not in METRIC:
    raise UserError(f'{train_dir}/{run_checkpoints.LOPT_CONFIG} names no outer objective; pass a '
                    'train_dir written by bin/train')
  scalars = plotting.read_scalars(os.path.join(train_dir, 'summaries'))
  if 'var_rp' not in scalars:
    raise UserError(f'{train_dir} holds no outer-training summaries yet; train it first')
  metric = METRIC[objective]
  run = {'train_dir': train_dir, 'objective': objective, 'metric': metric,
         'steps': scalars['var_rp'][0].tolist(), 'var_rp': scalars['var_rp'][1].tolist(),
         'var_es': scalars['var_es'][1].tolist(), 'rp_weight': scalars['rp_weight'][1].tolist()}
  for split in SPLITS:
    steps, values = scalars.get(f'meta_eval/{split}/{metric}', (np.zeros(0), np.zeros(0)))
    run[f'meta_eval_steps_{split}'] = steps.tolist()
    run[f'meta_eval_{split}'] = values.tolist()
  return run


@gin.configurable
class OuterTrainingStudy(base.Study):
  """Fig. 5a-c (see the module docstring).

  Args:
    num_seeds: θ seeds per objective when the study trains (`--num_seeds` overrides).
    objectives: the outer objectives trained ('train' for Fig. 5b, 'valid' for Fig. 5c).
    adam_grid: Adam's learning rates for the tuned level (None: the §4.4 grid, 1e-4 ... 10).

  Raises:
    UserError: for bad settings.
  """

  name = 'fig5_outer_training'
  accepts = ('num_seeds', 'train_dirs')
  schema = {'runs': [{'train_dir': str, 'objective': str, 'metric': str, 'steps': [int],
                      'var_rp': [float], 'var_es': [float], 'meta_eval_steps_outer_train': [int],
                      'meta_eval_outer_train': [float], 'meta_eval_outer_test': [float]}],
            'adam': dict, 'summary': dict}

  def __init__(self, num_seeds=2, objectives=('train', 'valid'), adam_grid=None):
    self.num_seeds = check_int('OuterTrainingStudy', 'num_seeds', num_seeds)
    for objective in objectives:
      if objective not in METRIC:
        raise UserError(f'OuterTrainingStudy.objectives holds {objective!r}; use "train" '
                        'and/or "valid"')
    if not objectives:
      raise UserError('OuterTrainingStudy.objectives is empty; give "train" and/or "valid"')
    self.objectives = tuple(objectives)
    self.adam_grid = [float(g) for g in (learning_rate_grid() if adam_grid is None else adam_grid)]

  def compute(self, output_dir, options, parts):
    if options.train_dirs:
      dirs = list(options.train_dirs)
      for d in dirs:
        read_run(d)  # refuse a bad directory before any work
      seeds = None
    else:
      seeds = options.num_seeds or self.num_seeds
      dirs = []
      bar = base.progress(len(self.objectives) * seeds, 'fig5 outer-training runs')
      for objective in self.objectives:
        for seed in range(seeds):
          train_dir = os.path.join(output_dir, 'runs', objective, f'seed_{seed}')
          base.outer_train(options.gin_files, options.gin_bindings +
                           (f"TruncatedStep.objective = '{objective}'",), train_dir, seed)
          dirs.append(train_dir)
          bar.update(1)
      bar.close()
    runs = [read_run(d) for d in dirs]
    adam = {}
    for run in runs:
      level = self._adam_level(run['train_dir'], parts)
      adam.setdefault(run['objective'], level)
      run['adam'] = level
    summary = {'num_runs': len(runs), 'seeds_per_objective': seeds,
               'log10_var_rp_over_var_es': []}
    for run in runs:
      ratio = np.log10(base.floats(run['var_rp']) / base.floats(run['var_es']))
      ratio = ratio[np.isfinite(ratio)]
      summary['log10_var_rp_over_var_es'].append(
          {'train_dir': run['train_dir'], 'first': float(ratio[0]) if ratio.size else None,
           'last': float(ratio[-1]) if ratio.size else None})
    results = {'runs': runs, 'adam': adam, 'summary': summary}
    return results, {self.name: self._figure(runs)}

  def _adam_level(self, train_dir, parts):
    """Adam at its best grid rate on the run's meta-evaluation tasks, per split (a cached part)."""
    base.parse_sub_config([os.path.join(train_dir, 'config.gin')], [])
    trainer = loop.OuterTrainer(base.build_experiment(), train_dir)  # no files: only its pieces
    meta = trainer.meta_eval
    key = {'fingerprint': trainer.exp.fingerprint(), 'objective': meta.objective,
           'num_tasks': meta.num_tasks, 'grid': self.adam_grid}

    def compute():
      evaluator = MetaEvaluator(trainer.exp, Adam, meta.objective, meta.num_tasks)
      scores = [evaluator(lr) for lr in self.adam_grid]
      level = {}
      for split in SPLITS:
        values = base.floats([s[f'{split}/{METRIC[meta.objective]}'] for s in scores])
        best = int(np.argmin(np.where(np.isfinite(values), values, np.inf)))
        level[split] = float(values[best])
        level[f'learning_rate_{split}'] = self.adam_grid[best]
      return level

    return parts.get('adam', key, compute)

  def _figure(self, runs):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    colors = plt.cm.tab10(np.arange(len(runs)) % 10)
    for run, color in zip(runs, colors):
      label = f'{run["objective"]} {os.path.basename(run["train_dir"])}'
      ax.plot(run['steps'], run['var_rp'], color=color, lw=1, label=f'var_rp {label}')
      ax.plot(run['steps'], run['var_es'], color=color, lw=1, ls='--', label=f'var_es {label}')
    ax.set(yscale='log', xlabel='outer step', ylabel='mean per-element variance',
           title='(a) variance of g_rp (solid) and g_es (dashed)')
    ax.legend(fontsize=6)
    for ax, objective, panel in ((axes[1], 'train', 'b'), (axes[2], 'valid', 'c')):
      mine = [r for r in runs if r['objective'] == objective]
      ax.set(xlabel='outer step', title=f'({panel}) outer objective L_{objective}')
      if not mine:
        ax.text(0.5, 0.5, f'no L_{objective} runs', ha='center', transform=ax.transAxes)
        continue
      scores = [base.floats(r['meta_eval_outer_train'])[-1] for r in mine]
      best = int(np.nanargmin(scores)) if np.isfinite(scores).any() else -1
      for i, run in enumerate(mine):
        color = 'tab:orange' if i == best else 'tab:gray'
        name = os.path.basename(run['train_dir'])
        ax.plot(run['meta_eval_steps_outer_train'], run['meta_eval_outer_train'], color=color,
                marker='.', label=f'{name} outer-train tasks')
        ax.plot(run['meta_eval_steps_outer_test'], run['meta_eval_outer_test'], color=color,
                ls=':', marker='.', label=f'{name} outer-test tasks')
      adam = mine[0]['adam']
      for split, style in ((OUTER_TRAIN, '--'), (OUTER_TEST, '-.')):
        ax.axhline(adam[split], color='k', ls=style, lw=1,
                   label=f'tuned Adam, {split} (lr {adam["learning_rate_" + split]:.2g})')
      ax.set_ylabel(f'meta-eval {mine[0]["metric"]} over T inner steps')
      ax.legend(fontsize=6)
    for ax in axes:
      ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

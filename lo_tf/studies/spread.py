"""The spread of outer-training over seeds and numerical paths (issue 25; cf. the paper's Fig. 5b).

Outer-training is chaotic (the paper's own subject, §3): another seed, or the same seed on a CPU
whose kernels round differently, gives another θ. One run is then an anecdote, and a recipe is
robust only when its result holds over both. `OuterTrainingSpreadStudy` outer-trains one
configuration for every seed × kernel path, one run after another, each in its own train_dir
`<output_dir>/runs/seed_<s>_<path>` (a rerun resumes an unfinished run and skips a finished one),
then evaluates each run's best/ θ (chosen by its own meta-evaluation, §4.3) on held-out tasks with
the machine's default kernels, as bin/eval does, and reports:

* every run's selection score against the outer step (panel a), and the spread of the final and
  best scores over runs;
* every run's held-out win rates and wall-clock speedup (panel b), and how many runs reach the
  goals (`GOALS`).

A kernel path is the numerical path of a training process: the fused op's CPU kernel
(`MLPLOpt.cpu_isa`) and the widest instruction set oneDNN, which runs TensorFlow's own matrix
products and convolutions on x86 CPUs, may use (`ONEDNN_MAX_CPU_ISA`, read when a process first
runs an op; each run is its own process). 'avx2' on a CPU with AVX-512 thus follows the kernels a
CPU without it runs; it is not bit-identical to such a CPU, since Eigen's blocking also depends on
the cache sizes. Held-out figures are reported, never used to choose anything.
"""

import multiprocessing
import os

import gin
import matplotlib.pyplot as plt
import numpy as np

from lo_tf import config
from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.evaluation import Evaluator
from lo_tf.experiment import build_experiment
from lo_tf.kernels import ops
from lo_tf.learned_optimizers import pretrained
from lo_tf.outer_trainers import loop
from lo_tf.outer_trainers import run_checkpoints
from lo_tf.outer_trainers.meta_eval import MetaEvaluator
from lo_tf.studies import base
from lo_tf.tasks.distribution import OUTER_TEST

# ONEDNN_MAX_CPU_ISA of each kernel path (None: oneDNN's own choice, the widest this CPU has).
ONEDNN_MAX_ISA = {'auto': None, 'generic': 'SSE41', 'avx2': 'AVX2', 'avx512': None}
# What a run must reach on the held-out tasks (issue 25's goals): measure -> minimum.
GOALS = {'win_rate_train': 0.8, 'win_rate_valid_final': 0.8, 'speedup_wallclock_train': 1.0}
MEASURES = ('win_rate_train', 'win_rate_valid', 'win_rate_valid_final', 'median_improvement_train',
            'median_improvement_valid_final', 'speedup_steps_train', 'speedup_wallclock_train')
RUNS_DIR = 'runs'
# The configuration the runs under RUNS_DIR were trained with (a rerun with another is refused).
RUNS_CONFIG = 'spread_config.json'


def _train_in_child(gin_files, gin_bindings, train_dir, seed, errors):
  """bin/train's work in a fresh process (so ONEDNN_MAX_CPU_ISA applies); a UserError's text
  goes to `errors`."""
  try:
    base.outer_train(gin_files, gin_bindings, train_dir, seed)
  except UserError as e:
    errors.put(str(e))
    raise SystemExit(2) from None


def run_name(seed, path):
  """The run's directory name under runs/: seed_<s>_<path>."""
  return f'seed_{seed}_{path}'


@gin.configurable
class OuterTrainingSpreadStudy(base.Study):
  """Outer-trains the configuration for seeds × kernel paths and reports the spread.

  Args:
    seeds: θ seeds (bin/train --seed).
    kernel_paths: of 'auto', 'generic', 'avx2', 'avx512' (see the module docstring); each must
      run on this CPU.
    split: the held-out split each best/ θ is evaluated on ('outer_test' on the digits, which
      have no outer-valid split; reported only).
    num_tasks, num_inits: bin/eval's --num_tasks and --num_inits for that evaluation.
    num_reevaluations: the best/ θ's selection score is re-measured on the run's meta-evaluation
      tasks from this many other initializations: their spread is the meta-evaluation's own
      noise, and their mean against the recorded best score says how lucky best/'s pick was.

  Raises:
    UserError: for an empty seed or path list, an unknown path or one this CPU lacks.
  """

  name = 'outer_training_spread'
  schema = {'runs': [{'seed': int, 'kernel_path': str, 'train_dir': str, 'steps': [int],
                      'selection_scores': [float], 'final_selection_score': float,
                      'best_selection_score': float, 'best_step': int,
                      'outer_training_seconds': float, 'best_reevaluated_scores': [float],
                      'held_out': dict, 'meets_goals': bool}],
            'summary': dict}

  def __init__(self, seeds=(0, 1, 2, 3, 4), kernel_paths=('avx2', 'avx512'), split=OUTER_TEST,
               num_tasks=10, num_inits=3, num_reevaluations=5):
    if not isinstance(seeds, (tuple, list)) or not seeds:
      raise UserError(f'OuterTrainingSpreadStudy.seeds={seeds!r}; give a non-empty tuple of '
                      'seeds, e.g. (0, 1, 2)')
    self.seeds = tuple(check_int('OuterTrainingSpreadStudy', 'seeds', s, minimum=0)
                       for s in seeds)
    if len(set(self.seeds)) != len(self.seeds):
      raise UserError(f'OuterTrainingSpreadStudy.seeds={seeds!r} repeats a seed')
    if not isinstance(kernel_paths, (tuple, list)) or not kernel_paths:
      raise UserError(f'OuterTrainingSpreadStudy.kernel_paths={kernel_paths!r}; give a non-empty '
                      f'tuple of {tuple(ONEDNN_MAX_ISA)}')
    for path in kernel_paths:
      if path not in ONEDNN_MAX_ISA:
        raise UserError(f'OuterTrainingSpreadStudy.kernel_paths holds {path!r}; use '
                        f'{tuple(ONEDNN_MAX_ISA)}')
      if ops.available() and path not in ops.supported_cpu_isas():
        raise UserError(f'OuterTrainingSpreadStudy.kernel_paths holds {path!r}, which this CPU '
                        f'lacks; use {ops.supported_cpu_isas()}')
    self.kernel_paths = tuple(dict.fromkeys(kernel_paths))
    self.split = split
    self.num_tasks = check_int('OuterTrainingSpreadStudy', 'num_tasks', num_tasks)
    self.num_inits = check_int('OuterTrainingSpreadStudy', 'num_inits', num_inits)
    self.num_reevaluations = check_int('OuterTrainingSpreadStudy', 'num_reevaluations',
                                       num_reevaluations)

  def compute(self, output_dir, options, parts):
    runs_dir = os.path.join(output_dir, RUNS_DIR)
    self._check_runs_config(runs_dir, options)
    cells = [(s, p) for s in self.seeds for p in self.kernel_paths]
    bar = base.progress(len(cells), 'outer-training runs')
    runs = []
    for seed, path in cells:
      train_dir = os.path.join(runs_dir, run_name(seed, path))
      self._train(options, train_dir, seed, path)
      runs.append(self._read_run(options, train_dir, seed, path, parts))
      bar.update(1)
    bar.close()
    return {'runs': runs, 'summary': _summary(runs)}, {self.name: _figure(runs, self.split)}

  def _check_runs_config(self, runs_dir, options):
    """Records the runs' configuration, or refuses one that differs from the recorded one."""
    record = {'gin_files': [_read_text(f) for f in options.gin_files],
              'gin_bindings': [b for b in options.gin_bindings
                               if not b.strip().startswith(f'{type(self).__name__}.')]}
    path = os.path.join(runs_dir, RUNS_CONFIG)
    if os.path.exists(path):
      saved = io_utils.read_json(path, dict, 'the spread study\'s run configuration',
                                 'use a fresh --output_dir')
      if saved != io_utils.json_safe(record):
        raise UserError(f'{runs_dir} holds runs of another configuration (recorded in {path}); '
                        'use a fresh --output_dir or the same --gin_file/--gin_bindings')
      return
    io_utils.ensure_writable_dir(runs_dir)
    io_utils.atomic_write_json(path, record)

  def _train(self, options, train_dir, seed, path):
    """bin/train for one cell, in a child process with the path's oneDNN limit."""
    bindings = options.gin_bindings + (f"MLPLOpt.cpu_isa = '{path}'",)
    context = multiprocessing.get_context('spawn')
    errors = context.Queue()
    saved = os.environ.get('ONEDNN_MAX_CPU_ISA')
    limit = ONEDNN_MAX_ISA[path]
    try:  # a spawned child inherits the environment as it is at start()
      if limit is None:
        os.environ.pop('ONEDNN_MAX_CPU_ISA', None)
      else:
        os.environ['ONEDNN_MAX_CPU_ISA'] = limit
      child = context.Process(target=_train_in_child,
                              args=(options.gin_files, bindings, train_dir, seed, errors))
      child.start()
    finally:
      if saved is None:
        os.environ.pop('ONEDNN_MAX_CPU_ISA', None)
      else:
        os.environ['ONEDNN_MAX_CPU_ISA'] = saved
    child.join()
    if child.exitcode != 0:
      message = errors.get() if not errors.empty() else f'exit status {child.exitcode}'
      raise UserError(f'outer-training run {run_name(seed, path)} failed: {message}')

  def _read_run(self, options, train_dir, seed, path, parts):
    """The run's meta-evaluation curve and the held-out evaluation of its best/ θ."""
    log = io_utils.read_json(os.path.join(train_dir, loop.META_EVAL_LOG), dict,
                             'meta-evaluation log', 'rerun the study to retrain it')
    steps = sorted(int(k) for k in log)
    scores = [log[str(k)]['selection_score'] for k in steps]
    throughput = io_utils.read_json(os.path.join(train_dir, loop.THROUGHPUT), dict,
                                    'throughput record', 'rerun the study')
    best_dir = os.path.join(train_dir, run_checkpoints.BEST)
    best = int(np.nanargmin(base.floats(scores)))
    learned = pretrained.load(best_dir)
    # What both cached parts depend on: best/'s θ and the configuration it is evaluated in.
    key = {'theta': io_utils.array_digest(learned[2]),
           'config': [_read_text(f) for f in options.gin_files], 'bindings': options.gin_bindings}
    held_out = self._evaluate(options, best_dir, train_dir, learned, key, parts)
    reevaluated = self._reevaluate(train_dir, learned, key, parts)
    meets = all(held_out.get(k) is not None and held_out[k] >= v for k, v in GOALS.items())
    return {'seed': seed, 'kernel_path': path, 'train_dir': train_dir, 'steps': steps,
            'selection_scores': scores, 'final_selection_score': scores[-1],
            'best_selection_score': scores[best], 'best_step': steps[best],
            'outer_training_seconds': throughput.get('wall_seconds_total'),
            'recorded_kernel_path': throughput.get('kernel_path'),
            'best_reevaluated_scores': reevaluated, 'held_out': held_out, 'meets_goals': meets}

  def _reevaluate(self, train_dir, learned, key, parts):
    """best/ θ's selection score from `num_reevaluations` other inits (a cached part)."""
    _, family, theta, _ = learned
    key = dict(key, num=self.num_reevaluations)

    def compute():
      base.parse_sub_config([os.path.join(train_dir, 'config.gin')], [])
      trainer = config.build(lambda: loop.OuterTrainer(build_experiment(), train_dir))
      meta = MetaEvaluator(trainer.exp, family, trainer.meta_eval.objective,
                           trainer.meta_eval.num_tasks, outer_test=False)
      return {'scores': [meta(theta, init_seed=k)['selection_score']
                         for k in range(1, self.num_reevaluations + 1)]}

    return parts.get('reevaluated', key, compute)['scores']

  def _evaluate(self, options, best_dir, train_dir, learned, key, parts):
    """bin/eval of best/ on the held-out split (machine-default kernels); a cached part."""
    name, family, theta, meta = learned
    key = dict(key, split=self.split, num_tasks=self.num_tasks, num_inits=self.num_inits)

    def compute():
      base.parse_sub_config(options.gin_files, options.gin_bindings)
      experiment = build_experiment()
      results = Evaluator(experiment, os.path.join(train_dir, 'eval_' + self.split),
                          num_tasks=self.num_tasks, num_inits=self.num_inits,
                          learned=(name, family, theta), split=self.split,
                          provenance={'spec': best_dir, 'checkpoint': meta.get('checkpoint'),
                                      'theta_sha1': key['theta']}).run()
      return {k: results['summary'].get(k) for k in MEASURES}

    return parts.get('held_out', key, compute)


def _read_text(path):
  """The text of a gin file as `config.parse_gin` finds it (part of what a run depends on)."""
  with open(config.find_gin_file(path)) as f:
    return f.read()


def _summary(runs):
  """Spread of the selection scores and held-out measures over runs; runs meeting `GOALS`."""
  final = base.floats([r['final_selection_score'] for r in runs])
  best = base.floats([r['best_selection_score'] for r in runs])
  summary = {'num_runs': len(runs), 'goals': GOALS,
             'num_runs_meeting_goals': sum(r['meets_goals'] for r in runs),
             'final_selection_score_range': [float(np.nanmin(final)), float(np.nanmax(final))],
             'final_selection_score_spread': float(np.nanmax(final) - np.nanmin(final)),
             'best_selection_score_spread': float(np.nanmax(best) - np.nanmin(best))}
  # The meta-evaluation's noise at a fixed θ, and best/'s luck: recorded best minus its
  # re-measured mean (negative: the pick was a lucky draw of inits).
  again = [base.floats(r['best_reevaluated_scores']) for r in runs]
  summary['reevaluated_score_std_median'] = float(np.nanmedian([np.std(a) for a in again]))
  summary['best_pick_luck_median'] = float(np.nanmedian(
      [r['best_selection_score'] - np.mean(a) for r, a in zip(runs, again)]))
  reevaluated = base.floats([np.mean(a) for a in again])
  summary['reevaluated_best_score_spread'] = float(np.nanmax(reevaluated) -
                                                   np.nanmin(reevaluated))
  for measure in MEASURES:
    values = base.floats([r['held_out'].get(measure) for r in runs])
    summary[f'median_{measure}'] = float(np.nanmedian(values))
    summary[f'min_{measure}'] = float(np.nanmin(values))
  return summary


def _figure(runs, split):
  """Panel a: selection score against the outer step; panel b: held-out measures per run."""
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 4.8))
  paths = sorted({r['kernel_path'] for r in runs})
  styles = dict(zip(paths, ('-', '--', ':', '-.')))
  colors = plt.cm.tab10(np.arange(len(runs)) % 10)
  for run, color in zip(runs, colors):
    label = run_name(run['seed'], run['kernel_path'])
    ax.plot(run['steps'], run['selection_scores'], color=color, ls=styles[run['kernel_path']],
            marker='.', lw=1, label=label)
  ax.set(xlabel='outer step', ylabel='selection score (meta-eval, lower is better)',
         title='(a) meta-evaluation over outer-training, every run')
  ax.legend(fontsize=6, ncol=2)
  names = [run_name(r['seed'], r['kernel_path']) for r in runs]
  x = np.arange(len(runs))
  shown = (('win_rate_train', 'win rate, train'), ('win_rate_valid', 'win rate, valid'),
           ('win_rate_valid_final', 'win rate, valid_final'),
           ('speedup_wallclock_train', 'wall-clock speedup, train'))
  width = 0.8 / len(shown)
  for i, (measure, label) in enumerate(shown):
    values = base.floats([r['held_out'].get(measure) for r in runs])
    bx.bar(x + (i - 1.5) * width, values, width, label=label)
  bx.axhline(0.8, color='k', ls='--', lw=1, label='goal: win rates 0.8')
  bx.axhline(1.0, color='gray', ls=':', lw=1, label='goal: wall-clock 1.0')
  bx.set_xticks(x, names, rotation=45, ha='right', fontsize=7)
  bx.set(title=f'(b) best/ θ of every run on {split} tasks (reported only)')
  bx.legend(fontsize=6)
  for a in (ax, bx):
    a.grid(alpha=0.3)
  fig.tight_layout()
  return fig


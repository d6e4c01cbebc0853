"""Figures 7 and 15: the ablations of §4.5, each outer-trained for several seeds of θ.

Every ablation is a gin file of its own bindings in gin/studies/ablations/ (usable with bin/train
too: `bin/train --gin_file=gin/studies/fig7_ablations.gin --gin_file=gin/studies/ablations/
no_rms.gin`):

  full        the model of §4.1 (merged estimator, curriculum, every feature)
  gradients   g_rp only ("Gradients")         es          g_es only ("ES")
  fixed_10, fixed_100, fixed_1000             a fixed truncation length, no curriculum or jitter
  no_rms      no v_k, r_k, r_k·m_k            no_mom      no m_k, r_k·m_k
  only_grads  neither (gradient and weight only)
  no_time     no tanh(t/η − 1) features

The runner outer-trains each ablation for `num_seeds` seeds into
`<output_dir>/runs/<ablation>/seed_<i>` with the base config (the study's gin files) followed by
the ablation's file and then the --gin_bindings; a rerun resumes unfinished runs and skips finished
ones. Performance is the meta-evaluation's selection score (the outer objective over T inner steps
on fixed outer-train tasks, `MetaEvaluator`): Fig. 7 draws its distribution over seeds, averaged
over the last `final_window` meta-evaluations (the paper averages over a window of outer-training,
380k-420k inner problems); Fig. 15 draws it over outer-training, median with the 25/75 percentile
band and each seed thin.

A fixed length above T (InnerTrainer.num_steps) unrolls whole inner trainings: at this study's CPU
size T = 100, so fixed_100 and fixed_1000 coincide; the paper's T is 10k.
"""

import os

import gin
import matplotlib.pyplot as plt
import numpy as np

from lo_tf import config
from lo_tf import plotting
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.studies import base

ABLATIONS = ('full', 'gradients', 'es', 'fixed_10', 'fixed_100', 'fixed_1000', 'no_rms', 'no_mom',
             'only_grads', 'no_time')
SCORE = 'meta_eval/selection_score'


def ablation_file(name):
  """The gin file of ablation `name`: gin/studies/ablations/<name>.gin (`config.find_gin_file`)."""
  return config.find_gin_file(f'gin/studies/ablations/{name}.gin')


@gin.configurable
class AblationStudy(base.Study):
  """Figs. 7 and 15 (see the module docstring).

  Args:
    ablations: names of gin/studies/ablations/*.gin to run.
    num_seeds: θ seeds per ablation (`--num_seeds` overrides).
    final_window: meta-evaluations at the end of each run that Fig. 7 averages.

  Raises:
    UserError: for an unknown ablation or bad sizes.
  """

  name = 'fig7_ablations'
  accepts = ('num_seeds',)
  schema = {'ablations': [{'name': str, 'gin_file': str, 'final_score': [float],
                           'median_final_score': float,
                           'runs': [{'seed': int, 'train_dir': str, 'steps': [int],
                                     'score': [float]}]}],
            'summary': dict}

  def __init__(self, ablations=ABLATIONS, num_seeds=2, final_window=2):
    for name in ablations:
      if not os.path.isfile(ablation_file(name)):
        raise UserError(f'AblationStudy.ablations holds {name!r}, which has no '
                        f'{ablation_file(name)}; use some of {list(ABLATIONS)}')
    if not ablations:
      raise UserError('AblationStudy.ablations is empty; name at least one')
    self.ablations = tuple(ablations)
    self.num_seeds = check_int('AblationStudy', 'num_seeds', num_seeds)
    self.final_window = check_int('AblationStudy', 'final_window', final_window)

  def compute(self, output_dir, options, parts):
    del parts  # each run's train_dir is its own cache: bin/train resumes or skips it
    seeds = options.num_seeds or self.num_seeds
    results = []
    bar = base.progress(len(self.ablations) * seeds, 'fig7 ablation runs')
    for name in self.ablations:
      entry = {'name': name, 'gin_file': f'gin/studies/ablations/{name}.gin',
               'runs': []}
      for seed in range(seeds):
        train_dir = os.path.join(output_dir, 'runs', name, f'seed_{seed}')
        files = tuple(options.gin_files) + (ablation_file(name),)
        base.outer_train(files, options.gin_bindings, train_dir, seed)
        steps, score = plotting.read_scalars(os.path.join(train_dir, 'summaries'))[SCORE]
        entry['runs'].append({'seed': seed, 'train_dir': train_dir, 'steps': steps.tolist(),
                              'score': score.tolist()})
        bar.update(1)
      entry['final_score'] = [float(np.mean(r['score'][-self.final_window:]))
                              for r in entry['runs']]
      entry['median_final_score'] = float(np.median(entry['final_score']))
      results.append(entry)
    bar.close()
    summary = {'seeds': seeds,
               'median_final_score': {e['name']: e['median_final_score'] for e in results}}
    return ({'ablations': results, 'summary': summary},
            {'fig7_ablations': self._distribution(results),
             'fig15_ablation_curves': self._curves(results)})

  @staticmethod
  def _distribution(results):
    fig, ax = plt.subplots(figsize=(1.1 * len(results) + 2, 4.5))
    scores = [base.floats(e['final_score']) for e in results]
    ax.boxplot([s[np.isfinite(s)] for s in scores], showfliers=False)
    rng = np.random.default_rng(0)
    for i, s in enumerate(scores, start=1):
      ax.plot(i + rng.uniform(-0.12, 0.12, len(s)), s, 'o', color='tab:blue', alpha=0.7, ms=4)
    ax.set_xticks(range(1, len(results) + 1), [e['name'] for e in results], rotation=30)
    ax.set_ylabel('outer-train meta-eval score at the end')
    ax.set_title('Fig. 7: outer-loss performance per ablation (each dot a seed of θ)')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

  @staticmethod
  def _curves(results):
    cols = min(5, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), sharey=True,
                             squeeze=False)
    for ax, entry in zip(axes.flat, results):
      steps = entry['runs'][0]['steps']
      same = [r['score'] for r in entry['runs'] if r['steps'] == steps]
      for r in entry['runs']:
        ax.plot(r['steps'], r['score'], color='tab:blue', lw=0.7, alpha=0.6)
      stack = base.floats(same)
      lo, med, hi = np.percentile(stack, [25, 50, 75], axis=0)
      ax.fill_between(steps, lo, hi, color='tab:blue', alpha=0.25, lw=0)
      ax.plot(steps, med, color='k', lw=3)
      ax.plot(steps, med, color='tab:blue', lw=1.5)
      ax.set_title(entry['name'], fontsize=9)
      ax.set_xlabel('outer step')
      ax.grid(alpha=0.3)
    for ax in axes.flat[len(results):]:
      ax.axis('off')
    for ax in axes[:, 0]:
      ax.set_ylabel('meta-eval score')
    fig.suptitle('Fig. 15: ablation learning curves (median, 25/75 percentiles, each seed thin)',
                 fontsize=10)
    fig.tight_layout()
    return fig

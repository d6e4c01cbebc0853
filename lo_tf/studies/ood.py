"""Appendix E (Figs. 10-14): the learned optimizer on problems it was not outer-trained for.

Each problem is a bin/eval config in gin/ood/ (run one alone with
`bin/eval --gin_file=gin/ood/<name>.gin --checkpoint=... --output_dir=...`):

  mlp_2x32_mnist14    Fig. 10: MLP, 2 hidden layers of 32 ReLU units, 14x14 MNIST
  mlp_3x128_mnist14   Fig. 11: MLP, 3 hidden layers of 128, 14x14 MNIST
  cnn6_mnist28        Fig. 12: 6 conv layers of 32, strides (2, 1, 2, 1, 1, 1), 28x28 MNIST
  cnn3_mnist28        Fig. 13: 3 conv layers of 32, strides (2, 2, 1), 28x28 MNIST
  cnn3x128_omniglot   Fig. 14: 3 conv layers of 128 on held-out Omniglot classes (the paper:
                      held-out 32x32 ImageNet classes; Omniglot is this project's stand-in)

The MNIST tasks are 10-way over every MNIST class (`TaskDistribution.split_classes = False`): the
learned optimizer never saw MNIST, so no class needs holding out. The study runs `Evaluator` (the
§4.4 protocol: each baseline tuned over the 11-rate grid per task) for each config into
`<output_dir>/<name>/` (its results.json, Fig. 1-style curves and its cache of inner-training
runs, which a rerun reuses) and draws one summary figure: the best train and test loss of each
tuned baseline and of the learned optimizer per problem.
"""

import os

import gin
import matplotlib.pyplot as plt
import numpy as np

from lo_tf import config
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.evaluation import Evaluator
from lo_tf.metrics import BASELINE_NAMES
from lo_tf.studies import base

OOD_CONFIGS = ('mlp_2x32_mnist14', 'mlp_3x128_mnist14', 'cnn6_mnist28', 'cnn3_mnist28',
               'cnn3x128_omniglot')


@gin.configurable
class OODStudy(base.Study):
  """App. E (see the module docstring).

  Args:
    configs: names of gin/ood/*.gin to evaluate.
    num_tasks: held-out tasks per problem.
    num_inits: initializations per task.

  Raises:
    UserError: for an unknown config or bad sizes.
  """

  name = 'appe_ood'
  accepts = ('checkpoint',)
  schema = {'theta': str,
            'problems': [{'name': str, 'gin_file': str, 'summary': dict, 'best': dict,
                          'plots': dict}],
            'summary': dict}

  def __init__(self, configs=OOD_CONFIGS, num_tasks=1, num_inits=1):
    if not configs:
      raise UserError('OODStudy.configs is empty; name at least one of gin/ood/*.gin')
    for name in configs:
      if not os.path.isfile(config.find_gin_file(f'gin/ood/{name}.gin')):
        raise UserError(f'OODStudy.configs holds {name!r}, which has no gin/ood/{name}.gin; use '
                        f'some of {list(OOD_CONFIGS)}')
    self.configs = tuple(configs)
    self.num_tasks = check_int('OODStudy', 'num_tasks', num_tasks)
    self.num_inits = check_int('OODStudy', 'num_inits', num_inits)

  def compute(self, output_dir, options, parts):
    del parts  # each Evaluator keeps its own cache of inner-training runs
    label, family, theta = base.load_theta(options.checkpoint)
    learned = 'learned'
    problems = []
    bar = base.progress(len(self.configs), 'App. E problems')
    for name in self.configs:
      gin_file = f'gin/ood/{name}.gin'
      base.parse_sub_config([gin_file], options.gin_bindings)
      experiment = base.build_experiment()
      evaluator = Evaluator(experiment, os.path.join(output_dir, name), num_tasks=self.num_tasks,
                            num_inits=self.num_inits, learned=(learned, family, theta))
      result = evaluator.run()
      best = {}
      for metric in ('train', 'valid'):
        for opt in BASELINE_NAMES:
          best[f'{opt}_{metric}'] = float(np.median(
              [t[opt][f'at_best_lr_{metric}'][f'best_{metric}'] for t in result['tasks']]))
        best[f'{learned}_{metric}'] = float(np.median(
            [t[learned][f'best_{metric}'] for t in result['tasks']]))
      problems.append({'name': name, 'gin_file': gin_file,
                       'summary': result['summary'], 'best': best, 'plots': result['plots']})
      bar.update(1)
    bar.close()
    summary = {p['name']: {'win_rate_train': p['summary'].get('win_rate_train'),
                           'win_rate_valid': p['summary'].get('win_rate_valid')}
               for p in problems}
    results = {'theta': label, 'problems': problems, 'summary': summary}
    return results, {self.name: self._figure(problems, label)}

  @staticmethod
  def _figure(problems, label):
    names = list(BASELINE_NAMES) + ['learned']
    colors = {'adam': 'tab:blue', 'rmsprop': 'tab:green', 'sgdm': 'tab:orange',
              'learned': 'tab:red'}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    x = np.arange(len(problems))
    width = 0.8 / len(names)
    for ax, metric, title in ((axes[0], 'train', 'best train loss'),
                              (axes[1], 'valid', 'best test (inner-valid) loss')):
      for i, opt in enumerate(names):
        values = [p['best'][f'{opt}_{metric}'] for p in problems]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, color=colors[opt],
               label=opt if opt == 'learned' else f'{opt} (tuned)')
      ax.set_xticks(x, [p['name'] for p in problems], rotation=20, fontsize=8)
      ax.set(yscale='log', ylabel=f'{title} (median over tasks)', title=title)
      ax.grid(alpha=0.3, axis='y')
    axes[0].legend(fontsize=8)
    fig.suptitle(f'App. E: out-of-distribution problems, learned = {label}', fontsize=10)
    fig.tight_layout()
    return fig

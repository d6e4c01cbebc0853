"""`bin/eval`: the learned optimizer against tuned baselines on held-out tasks (paper §4.4)."""

import json
import os

from lo_tf import config
from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.evaluation import Evaluator
from lo_tf.experiment import build_experiment
from lo_tf.io_utils import array_digest
from lo_tf.launch import common
from lo_tf.learned_optimizers import pretrained
from lo_tf.learning_curve import evaluate_checkpoints
from lo_tf.tasks.distribution import OUTER_TEST


def evaluate_from_flags(gin_files, gin_bindings, checkpoint, test_source, num_tasks, num_inits,
                        output_dir, first_task=0, split=OUTER_TEST, plot_tasks=1,
                        every_checkpoint=False):
  """Parses gin, builds the experiment, loads the learned optimizer, evaluates, prints a summary.

  With `every_checkpoint`, `checkpoint` is a train_dir whose kept checkpoints are all evaluated
  (`lo_tf.learning_curve`).

  Raises:
    UserError: for bad gin configuration, sources, checkpoints or output directories.
  """
  checkpoint, output_dir = common.absolute_spec(checkpoint), common.absolute_path(output_dir)
  if every_checkpoint and not checkpoint:
    raise UserError('--every_checkpoint needs --checkpoint=TRAIN_DIR (a bin/train directory)')
  extra = [f'TaskDistribution.test_source = {test_source!r}'] if test_source else []
  config.parse_gin(gin_files, gin_bindings, extra)
  if every_checkpoint:
    experiment = config.build(build_experiment)
    with io_utils.remove_created_dirs_on_error(output_dir):
      curve = evaluate_checkpoints(experiment, checkpoint, output_dir, num_tasks, num_inits,
                                   split=split, first_task=first_task)
    for p in curve['points']:
      print(f'outer step {p["outer_step"]:5d}: ' + '  '.join(
          f'win_rate_{m} {p[f"win_rate_{m}"]:.2f}' for m in ('train', 'valid', 'valid_final')))
    print(f'learning curve: {os.path.join(output_dir, "learning_curve.json")}, {curve["plot"]}')
    return curve
  learned = provenance = None
  if checkpoint:
    name, family, theta, meta = pretrained.load(checkpoint)
    learned = (name, family, theta)
    provenance = {'spec': checkpoint, 'checkpoint': meta.get('checkpoint'),
                  'theta_sha1': array_digest(theta), 'outer_steps': meta.get('outer_steps'),
                  'objective': meta.get('objective'), 'lopt': meta.get('lopt')}
  experiment = config.build(build_experiment)
  with io_utils.remove_created_dirs_on_error(output_dir):  # a refused run leaves no empty dir
    results = Evaluator(experiment, output_dir, num_tasks=num_tasks, num_inits=num_inits,
                        learned=learned, first_task=first_task, split=split,
                        plot_tasks=plot_tasks, provenance=provenance).run()
  print(json.dumps(io_utils.json_safe(results['summary']), indent=2))
  print(f'results: {os.path.join(output_dir, "results.json")}')
  for name, path in results['plots'].items():
    print(f'{name}: {path}')
  return results

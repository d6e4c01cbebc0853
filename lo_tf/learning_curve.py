"""The claim's learning curve: every kept checkpoint of a run against the tuned baselines.

`bin/eval --every_checkpoint` evaluates each checkpoint that a train_dir keeps (§4.3 tracks the
learned optimizer over outer-training; Fig. 5b,c) on outer-valid tasks with the full §4.4
comparison of `lo_tf.evaluation.Evaluator`. All checkpoints share one run cache, so each tuned
baseline runs once and only the learned optimizer's runs are new per checkpoint. The win rates and
median improvements against the outer step say whether more outer-training would reach a goal.
"""

import json
import os

from absl import logging

from lo_tf import checkpointing
from lo_tf import io_utils
from lo_tf import plotting
from lo_tf.errors import UserError
from lo_tf.evaluation import Evaluator
from lo_tf.io_utils import array_digest
from lo_tf.learned_optimizers import pretrained
from lo_tf.tasks.distribution import OUTER_VALID

LEARNING_CURVE_JSON = 'learning_curve.json'
LEARNING_CURVE_PNG = 'learning_curve.png'


def evaluate_checkpoints(experiment, train_dir, output_dir, num_tasks, num_inits, split=OUTER_VALID,
                         first_task=0):
  """Evaluates every kept checkpoint of `train_dir`, oldest first; writes the curve's JSON and PNG.

  Args:
    experiment: `lo_tf.experiment.Experiment` of the run.
    train_dir: a bin/train directory.
    output_dir: gets learning_curve.json, learning_curve.png, one results directory per
      checkpoint (`ckpt-N/results.json`) and the shared run cache.
    num_tasks, num_inits, first_task: as `Evaluator`'s.
    split: the split evaluated (outer-valid: the curve is for choosing, so never outer-test by
      default).

  Returns:
    The curve dict written to learning_curve.json: {'split', 'train_dir', 'points': [{'outer_step',
    'checkpoint', 'theta_sha1', and the `Evaluator` summary's fields}], 'plot'}.

  Raises:
    UserError: `train_dir` is not a directory or keeps no checkpoint that loads.
  """
  if not os.path.isdir(train_dir):
    raise UserError(f'--every_checkpoint needs a train_dir, but {train_dir!r} is not a directory')
  prefixes, _ = checkpointing.kept_checkpoints(train_dir)
  cache_dir = os.path.join(output_dir, 'cache')
  families, points = {}, []
  for prefix in reversed(prefixes):  # oldest first
    try:
      name, family, theta, meta = pretrained.load(prefix)
    except UserError as e:
      logging.warning('skipping %s: %s', prefix, e)
      continue
    # One family object per configuration: the inner trainer traces its graph once per family.
    family = families.setdefault(json.dumps(meta.get('lopt'), sort_keys=True), family)
    provenance = {'checkpoint': prefix, 'theta_sha1': array_digest(theta),
                  'outer_steps': meta['outer_steps'], 'objective': meta.get('objective')}
    results = Evaluator(experiment, os.path.join(output_dir, os.path.basename(prefix)),
                        num_tasks=num_tasks, num_inits=num_inits, learned=(name, family, theta),
                        first_task=first_task, split=split, plot_tasks=0, provenance=provenance,
                        cache_dir=cache_dir).run()
    points.append(dict(outer_step=meta['outer_steps'], checkpoint=prefix,
                       theta_sha1=provenance['theta_sha1'], **results['summary']))
    logging.info('outer step %d: win rates train %.2f valid %.2f valid_final %.2f',
                 meta['outer_steps'], points[-1]['win_rate_train'],
                 points[-1]['win_rate_valid'], points[-1]['win_rate_valid_final'])
  if not points:
    raise UserError(f'{train_dir} keeps no checkpoint that loads; pass a train_dir written by '
                    'bin/train')
  curve = {'split': split, 'train_dir': os.path.abspath(train_dir), 'num_tasks': num_tasks,
           'num_inits': num_inits, 'first_task': first_task, 'points': points}
  curve['plot'] = plotting.learning_curve(curve, os.path.join(output_dir, LEARNING_CURVE_PNG))
  io_utils.atomic_write_json(os.path.join(output_dir, LEARNING_CURVE_JSON), curve)
  return curve

"""`bin/export_optimizer`: ships a trained θ into lo_tf/pretrained with how it was made."""

import os

from absl import logging

from lo_tf import config
from lo_tf import io_utils
from lo_tf import provenance
from lo_tf.errors import UserError
from lo_tf.launch import common
from lo_tf.learned_optimizers import pretrained
from lo_tf.outer_trainers import loop
from lo_tf.outer_trainers import run_checkpoints


def _candidate(spec):
  """(θ spec to export, its run directory, its outer-train meta-eval score or None) of a spec.

  A train_dir written by bin/train stands for its best θ (train_dir/best), scored by the run's
  `best_meta_eval_score` (paper §4.3: outer-training loss selects the model); a checkpoint path
  stands for itself and has no score.
  """
  best = os.path.join(spec, run_checkpoints.BEST)
  if os.path.isdir(spec) and os.path.isdir(best):
    record = os.path.join(spec, loop.THROUGHPUT)
    if not os.path.exists(record):
      raise UserError(f'{spec} has no {loop.THROUGHPUT}: its run did not finish; finish it with '
                      'bin/train or pass a checkpoint path')
    t = io_utils.read_json(record, dict, 'throughput record', 'rerun bin/train on that train_dir')
    return best, spec, t.get('best_meta_eval_score')
  directory = spec if os.path.isdir(spec) else os.path.dirname(spec)
  return spec, directory, None


# What a run's meta-evaluation score measures: its tasks, inner problem and inner training, the
# number of meta-evaluation tasks and the objective. Runs that differ in one are not ranked.
_SCORE_BINDINGS = ('TaskDistribution.', 'InnerTrainer.', 'build_experiment.', 'ConvNet.', 'MLP.',
                   'OuterTrainer.meta_eval_tasks', 'TruncatedStep.objective')


def _score_bindings(train_dir):
  """({binding: value} that define what `train_dir`'s score measures, complete), or (None, _)."""
  for name, complete in ((run_checkpoints.RUN_CONFIG, True), ('config.gin', False)):
    path = os.path.join(train_dir, name)
    if os.path.exists(path):
      try:
        with open(path) as f:
          bindings = config.parse_bindings(f.read())
      except (OSError, UnicodeDecodeError):
        continue
      return {k: v for k, v in bindings.items() if k.startswith(_SCORE_BINDINGS)}, complete
  return None, False


def _check_comparable(candidates):
  """Refuses to rank runs whose meta-evaluation scores measure different things."""
  records = [(spec, *_score_bindings(directory)) for spec, _, directory, _ in candidates]
  known = [(spec, b, complete) for spec, b, complete in records if b is not None]
  if len(known) < len(records):
    logging.warning('%d of the --checkpoint runs record no configuration: their tasks cannot be '
                    'compared', len(records) - len(known))
  for (spec_a, a, full_a), (spec_b, b, full_b) in zip(known, known[1:]):
    keys = set(a) | set(b) if full_a and full_b else set(a) & set(b)
    differences = config.config_differences({k: a[k] for k in keys if k in a},
                                            {k: b[k] for k in keys if k in b}, ignore=())
    if differences:
      raise UserError(f'--checkpoint runs {spec_a} and {spec_b} were outer-trained on different '
                      f'tasks or inner training: {config.describe_differences(differences, 3)}; '
                      'their meta-eval scores are not comparable: rank runs of one configuration')


def export_from_flags(checkpoints_specs, name, command, eval_results=None, git_revision=None,
                      overwrite=False, out_dir=pretrained.PRETRAINED_DIR):
  """`bin/export_optimizer`: picks the best of several runs and ships its θ with its provenance.

  Args:
    checkpoints_specs: train_dirs (each stands for its best θ, train_dir/best) or checkpoint
      paths. Of several train_dirs, the one with the lowest outer-train meta-evaluation score is
      shipped (paper §4.3: "we use outer-training loss to select the best model"); every
      candidate's score is recorded.
    name: the shipped name ([a-z0-9_]+).
    command: the outer-training command, recorded (default: the one the run's throughput.json
      records).
    eval_results: optional results.json whose summary is recorded.
    git_revision: the revision that trained it (default: from the run's throughput.json).
    overwrite: replace a shipped optimizer of that name.
    out_dir: where to ship (lo_tf/pretrained).

  Returns:
    The path of the written `<name>.json`.

  Raises:
    UserError: for a bad or existing name (without `overwrite`), several specs that are not all
      finished train_dirs or that ran on different tasks or inner training (their scores are not
      comparable), a missing or corrupt checkpoint, or an unreadable record.
  """
  pretrained.check_export_name(name, out_dir, overwrite)
  if isinstance(checkpoints_specs, str):
    checkpoints_specs = [checkpoints_specs]
  checkpoints_specs = [common.absolute_path(spec) for spec in checkpoints_specs]
  candidates = [(spec,) + _candidate(spec) for spec in checkpoints_specs]
  if len(candidates) > 1 and any(score is None for *_, score in candidates):
    raise UserError('several --checkpoint values must all be finished train_dirs (their best θ '
                    'is compared by outer-train meta-loss); pass one checkpoint path alone')
  if len(candidates) > 1:
    _check_comparable(candidates)
  spec, theta_spec, directory, score = min(
      candidates, key=lambda c: float('inf') if c[3] is None else c[3])
  meta = {'command': command, 'machine': provenance.machine(),
          'selection': [{'train_dir': s, 'best_meta_eval_score': sc} for s, _, _, sc in
                        candidates] if len(candidates) > 1 else None,
          'selected': spec}
  throughput = os.path.join(directory, loop.THROUGHPUT)
  if os.path.exists(throughput):
    t = io_utils.read_json(throughput, dict, 'throughput record',
                           'delete it (it is rewritten by the next bin/train run) and retry')
    meta.update(wall_seconds=t.get('wall_seconds_total') or t.get('wall_seconds_this_run'),
                throughput=t)
    meta['command'] = command or t.get('command') or ''
  theta_init = os.path.join(directory, loop.THETA_INIT)
  if os.path.exists(theta_init):
    record = io_utils.read_json(theta_init, dict, 'θ-initialization record',
                                'delete it (a warm start is then not recorded) and retry')
    meta['theta_init'] = record
    if record.get('kind') == 'checkpoint':  # outer_steps counts this run's steps only
      meta['source_outer_steps'] = record.get('source_outer_steps')
  config = os.path.join(directory, 'config.gin')
  if os.path.exists(config):
    with open(config) as f:
      meta['config'] = f.read()
  meta['git_revision'] = (git_revision or meta.get('throughput', {}).get('git_revision') or
                          provenance.git_revision())
  if eval_results:
    results = io_utils.read_json(eval_results, dict, 'evaluation results',
                                 'pass a results.json written by bin/eval')
    meta['eval_summary'] = results.get('summary')
  return pretrained.export(theta_spec, name, meta, out_dir, overwrite)

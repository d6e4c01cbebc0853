"""`bin/export_optimizer`: ships a trained θ into lo_tf/pretrained with how it was made."""

import os
import platform

from lo_tf import checkpoints
from lo_tf import io_utils
from lo_tf.outer_trainers import loop


def export_from_flags(checkpoint, name, command, eval_results=None, git_revision=None,
                      overwrite=False, out_dir=checkpoints.PRETRAINED_DIR):
  """`bin/export_optimizer`: gathers the provenance of a train_dir and ships its θ.

  Records the outer-training command, git revision, wall time and machine (from the train_dir's
  throughput.json), its config.gin, and optionally the summary of an evaluation.

  Raises:
    UserError: for a bad or existing name (without `overwrite`), a missing or corrupt checkpoint,
      or an unreadable throughput.json or results file.
  """
  checkpoints.check_export_name(name, out_dir, overwrite)
  directory = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
  meta = {'command': command, 'machine': platform.processor() or platform.machine()}
  throughput = os.path.join(directory, 'throughput.json')
  if os.path.exists(throughput):
    t = io_utils.read_json(throughput, dict, 'throughput record',
                           'delete it (it is rewritten by the next bin/train run) and retry')
    meta.update(wall_seconds=t.get('wall_seconds_total') or t.get('wall_seconds_this_run'),
                throughput=t)
  config = os.path.join(directory, 'config.gin')
  if os.path.exists(config):
    with open(config) as f:
      meta['config'] = f.read()
  meta['git_revision'] = (git_revision or meta.get('throughput', {}).get('git_revision') or
                          loop.git_revision())
  if eval_results:
    results = io_utils.read_json(eval_results, dict, 'evaluation results',
                                 'pass a results.json written by bin/eval')
    meta['eval_summary'] = results.get('summary')
  return checkpoints.export_pretrained(checkpoint, name, meta, out_dir, overwrite)

"""Loading learned optimizers: from a train_dir, a checkpoint path, or a shipped name.

A shipped optimizer is two small files in `lo_tf/pretrained/`: `<name>.npz` (θ) and `<name>.json`
(the `MLPLOpt` configuration and how θ was made: config, outer steps, wall time, machine, git
revision, command). `export_pretrained` writes them from a train_dir.
"""

import glob
import json
import os

import numpy as np
import tensorflow as tf

from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrained')
_THETA_KEY = 'theta/.ATTRIBUTES/VARIABLE_VALUE'
_STEP_KEY = 'step/.ATTRIBUTES/VARIABLE_VALUE'


def _digest_path(prefix):
  return prefix + '.sha256.json'


def write_digest(prefix):
  """Records the SHA-256 of every file of checkpoint `prefix` beside it (atomically).

  TensorFlow's checkpoint reader does not notice every corrupted byte of a data file; the digest
  lets `verify_digest` refuse such a checkpoint instead of loading garbage.
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  digests = {}
  for path in sorted(glob.glob(prefix + '.index') + glob.glob(prefix + '.data-*')):
    with open(path, 'rb') as f:
      digests[os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()
  io_utils.atomic_write_json(_digest_path(prefix), digests)


def remove_stale_digests(directory):
  """Deletes digests of checkpoints that the CheckpointManager has removed."""
  for path in glob.glob(os.path.join(directory, '*.sha256.json')):
    if not os.path.exists(path[:-len('.sha256.json')] + '.index'):
      os.remove(path)


def verify_digest(prefix):
  """Checks checkpoint `prefix` against its digest, when it has one.

  Raises:
    UserError: if a file is missing or its content changed since it was written.
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  path = _digest_path(prefix)
  if not os.path.exists(path):
    return
  digests = read_json(path)
  for name, expected in digests.items():
    file = os.path.join(os.path.dirname(prefix), name)
    try:
      with open(file, 'rb') as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    except OSError:
      actual = None
    if actual != expected:
      raise UserError(f'checkpoint {prefix} is corrupt ({name} is missing or changed since it '
                      'was written); use another checkpoint or a fresh --train_dir')


def shipped_names():
  """Names of the learned optimizers shipped in lo_tf/pretrained."""
  return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(PRETRAINED_DIR, '*.json')))


def read_json(path):
  """A JSON file written by lo_tf; UserError (one line) if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e}); re-create it with bin/train') from None


def _from_checkpoint(spec):
  """(checkpoint prefix, directory) for a train_dir or a checkpoint path, or (None, None)."""
  if os.path.isdir(spec):
    return tf.train.latest_checkpoint(spec), spec
  if glob.glob(spec + '.index'):
    return spec, os.path.dirname(spec)
  return None, None


def _build(config, theta, where):
  try:
    lopt = MLPLOpt(**config)
  except TypeError as e:
    raise UserError(f'{where}: learned-optimizer configuration is not understood ({e}); '
                    'it was written by an incompatible lo_tf version') from None
  theta = np.asarray(theta, np.float32)
  if theta.shape != (lopt.num_meta_params,):
    raise UserError(f'{where}: θ has shape {theta.shape} but its configuration needs '
                    f'({lopt.num_meta_params},); the files do not belong together')
  if not np.all(np.isfinite(theta)):
    raise UserError(f'{where}: θ holds non-finite values; use another checkpoint')
  return lopt, tf.constant(theta)


def load_learned_optimizer(spec):
  """Loads a learned optimizer for evaluation.

  Args:
    spec: a train_dir (its latest checkpoint), a checkpoint path (train_dir/ckpt-N) or the name
      of a shipped optimizer (see `shipped_names()`).

  Returns:
    (name str, the `MLPLOpt` (callable θ -> Optimizer), theta float32 [P] tensor, metadata dict).

  Raises:
    UserError: nothing found under that spec, or a corrupt or incompatible checkpoint.
  """
  if spec in shipped_names():
    meta = read_json(os.path.join(PRETRAINED_DIR, spec + '.json'))
    path = os.path.join(PRETRAINED_DIR, spec + '.npz')
    try:
      with np.load(path) as z:
        theta = z['theta']
    except (OSError, ValueError, KeyError) as e:
      raise UserError(f'shipped optimizer {spec!r}: {path} is unreadable ({e}); reinstall '
                      'lo_tf') from None
    lopt, theta = _build(meta['lopt'], theta, f'shipped optimizer {spec!r}')
    return spec, lopt, theta, meta
  prefix, directory = _from_checkpoint(spec)
  if prefix is None:
    raise UserError(f'no checkpoint at {spec!r}; pass a train_dir written by bin/train, a '
                    f'checkpoint path (train_dir/ckpt-N) or a shipped name {shipped_names()}')
  config_path = os.path.join(directory, 'lopt.json')
  if not os.path.exists(config_path):
    raise UserError(f'{directory} has checkpoints but no lopt.json; it was not written by '
                    'bin/train')
  meta = read_json(config_path)
  if not isinstance(meta, dict) or not isinstance(meta.get('lopt'), dict):
    raise UserError(f'{config_path} holds no learned-optimizer configuration; it was not '
                    'written by bin/train')
  verify_digest(prefix)
  try:
    reader = tf.train.load_checkpoint(prefix)
    theta = reader.get_tensor(_THETA_KEY)
    meta = dict(meta, outer_steps=int(reader.get_tensor(_STEP_KEY)), checkpoint=prefix)
  except Exception as e:  # TF raises DataLossError, NotFoundError, ...
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f'checkpoint {prefix} is corrupt or incompatible ({first}); use another '
                    'checkpoint') from None
  lopt, theta = _build(meta['lopt'], theta, f'checkpoint {prefix}')
  return f'learned_{meta.get("objective", "")}'.rstrip('_'), lopt, theta, meta


def export_pretrained(checkpoint, name, metadata, out_dir=PRETRAINED_DIR):
  """Writes `<name>.npz` (θ) and `<name>.json` (configuration + `metadata`) atomically.

  Args:
    checkpoint: a train_dir or checkpoint path.
    name: the shipped name ([a-z0-9_]+).
    metadata: extra JSON-able facts (command, git revision, wall time, machine, eval summary).

  Raises:
    UserError: for a bad name or checkpoint.
  """
  if not name or not all(c.isalnum() or c == '_' for c in name):
    raise UserError(f'name {name!r} must be letters, digits and underscores')
  _, _, theta, meta = load_learned_optimizer(checkpoint)
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, theta=theta.numpy())
  io_utils.ensure_writable_dir(out_dir)
  io_utils.atomic_write_bytes(os.path.join(out_dir, name + '.npz'), buf.getvalue())
  io_utils.atomic_write_json(os.path.join(out_dir, name + '.json'), dict(meta, **metadata))
  return os.path.join(out_dir, name + '.json')


def export_from_flags(checkpoint, name, command, eval_results=None, git_revision=None):
  """`bin/export_optimizer`: gathers the provenance of a train_dir and ships its θ.

  Records the outer-training command, git revision, wall time and machine (from the train_dir's
  throughput.json), its config.gin, and optionally the summary of an evaluation.

  Raises:
    UserError: for a missing or corrupt checkpoint or results file.
  """
  import platform  # pylint: disable=g-import-not-at-top
  directory = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
  meta = {'command': command, 'machine': platform.processor() or platform.machine()}
  throughput = os.path.join(directory, 'throughput.json')
  if os.path.exists(throughput):
    t = read_json(throughput)
    meta.update(wall_seconds=t.get('wall_seconds_total') or t.get('wall_seconds_this_run'),
                throughput=t)
  config = os.path.join(directory, 'config.gin')
  if os.path.exists(config):
    with open(config) as f:
      meta['config'] = f.read()
  from lo_tf.outer_trainers.trainer import git_revision as _git_revision  # pylint: disable=g-import-not-at-top
  meta['git_revision'] = (git_revision or meta.get('throughput', {}).get('git_revision') or
                          _git_revision())
  if eval_results:
    meta['eval_summary'] = read_json(eval_results).get('summary')
  return export_pretrained(checkpoint, name, meta)

"""Learned optimizers to load by name or path, and shipping one (`lo_tf/pretrained/`).

`load(spec)` gives a learned optimizer from a train_dir written by bin/train (its newest checkpoint
that verifies), a checkpoint path, or the name of a shipped optimizer. A shipped optimizer is two
small files in `lo_tf/pretrained/`: `<name>.npz` (θ) and `<name>.json` (the `MLPLOpt`
configuration and how θ was made: config, outer steps, wall time, machine, git revision, command).
`export` writes them from a train_dir; `from_config` rebuilds the family and checks θ against it.
"""

import glob
import io
import os
import re

import numpy as np
import tensorflow as tf

from lo_tf import checkpointing
from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.errors import one_line
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'pretrained')
_NAME = re.compile(r'[a-z0-9_]+')


def shipped_names():
  """Names of the learned optimizers shipped in lo_tf/pretrained."""
  return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(PRETRAINED_DIR, '*.json')))


def from_config(config, theta, where):
  """The `MLPLOpt` of `config` (its `config()` dict) and θ as a float32 [P] tensor.

  Args:
    config: the dict `MLPLOpt.config()` wrote (lopt.json's 'lopt', a shipped JSON's, Keras').
    theta: θ, float32 [P] (array, list or tensor).
    where: names the source in error messages.

  Raises:
    UserError: not a dict, a configuration this MLPLOpt does not take, θ of another shape than the
      configuration's [num_meta_params], or a non-finite θ.
  """
  if not isinstance(config, dict):
    raise UserError(f'{where}: holds no learned-optimizer configuration; it was not written by '
                    'lo_tf')
  try:
    lopt = MLPLOpt(**config)
  except (TypeError, ValueError) as e:  # unknown keys, or values MLPLOpt refuses
    raise UserError(f'{where}: learned-optimizer configuration is not understood '
                    f'({one_line(e, 120)}); it was written by an incompatible lo_tf '
                    'version') from None
  theta = np.asarray(theta, np.float32)
  if theta.shape != (lopt.num_meta_params,):
    raise UserError(f'{where}: θ has shape {theta.shape} but its configuration needs '
                    f'({lopt.num_meta_params},); the files do not belong together')
  if not np.all(np.isfinite(theta)):
    raise UserError(f'{where}: θ holds non-finite values; use another checkpoint')
  return lopt, tf.constant(theta)


def load(spec):
  """Loads a learned optimizer for evaluation.

  Args:
    spec: a train_dir (its newest checkpoint that verifies, see `restore_newest_valid`), a
      checkpoint path (train_dir/ckpt-N, used as is) or the name of a shipped optimizer (see
      `shipped_names()`).

  Returns:
    (name str, the `MLPLOpt` (callable θ -> Optimizer), theta float32 [P] tensor, metadata dict;
    from a checkpoint it holds `outer_steps`, `checkpoint` and, where saved, `wall_seconds`).

  Raises:
    UserError: nothing found under that spec, no checkpoint that verifies, an unreadable or
      incompatible configuration, or a non-finite θ.
  """
  if spec in shipped_names():
    where = f'shipped optimizer {spec!r}'
    meta = io_utils.read_json(os.path.join(PRETRAINED_DIR, spec + '.json'), dict, where,
                              'reinstall lo_tf')
    path = os.path.join(PRETRAINED_DIR, spec + '.npz')
    try:
      with np.load(path) as z:
        theta = z['theta']
    except Exception as e:  # pylint: disable=broad-except
      # numpy raises OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile...
      raise UserError(f'{where}: {path} is unreadable ({type(e).__name__}); reinstall '
                      'lo_tf') from None
    lopt, theta = from_config(meta.get('lopt'), theta, where)
    return spec, lopt, theta, meta
  restored, directory = checkpointing.read_checkpoint(spec)
  if restored is None:
    raise UserError(f'no checkpoint at {spec!r}; pass a train_dir written by bin/train, a '
                    f'checkpoint path (train_dir/ckpt-N) or a shipped name {shipped_names()}')
  config_path = os.path.join(directory, 'lopt.json')
  if not os.path.exists(config_path):
    raise UserError(f'{directory} has checkpoints but no lopt.json; it was not written by '
                    'bin/train')
  meta = io_utils.read_json(config_path, dict, 'learned-optimizer configuration',
                            'it was not written by bin/train, or restore it from a backup')
  where = f'checkpoint {restored.prefix}'
  try:
    theta = restored.reader.get_tensor(checkpointing.THETA_KEY)
    outer_steps = int(restored.reader.get_tensor(checkpointing.STEP_KEY))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{where} holds no θ or outer step ({one_line(e, 120)}); it was not written '
                    'by bin/train') from None
  lopt, theta = from_config(meta.get('lopt'), theta, where)
  meta = dict(meta, outer_steps=outer_steps, checkpoint=restored.prefix)
  if restored.reader.has_tensor(checkpointing.WALL_SECONDS_KEY):  # not in older best/ copies
    meta['wall_seconds'] = float(restored.reader.get_tensor(checkpointing.WALL_SECONDS_KEY))
  return f'learned_{meta.get("objective", "")}'.rstrip('_'), lopt, theta, meta


def check_export_name(name, out_dir=PRETRAINED_DIR, overwrite=False):
  """Checks `name` for `export` before any work is done.

  Raises:
    UserError: `name` is not ASCII `[a-z0-9_]+`, or `<name>.npz`/`<name>.json` exists in
      `out_dir` and `overwrite` is False.
  """
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise UserError(f'name {name!r} must be lowercase ASCII letters, digits and underscores '
                    '([a-z0-9_]+); pick another --name')
  existing = [p for p in (os.path.join(out_dir, name + ext) for ext in ('.npz', '.json'))
              if os.path.exists(p)]
  if existing and not overwrite:
    raise UserError(f'{existing[0]} exists (a shipped optimizer named {name!r}); pick another '
                    '--name or pass --overwrite to replace it')


def export(checkpoint, name, metadata, out_dir=PRETRAINED_DIR, overwrite=False):
  """Writes `<name>.npz` (θ) and `<name>.json` (configuration + `metadata`) atomically.

  Args:
    checkpoint: a train_dir or checkpoint path.
    name: the shipped name, ASCII [a-z0-9_]+.
    metadata: extra JSON-able facts (command, git revision, wall time, machine, eval summary).
    out_dir: where to write (lo_tf/pretrained by default).
    overwrite: replace an optimizer of that name; without it an existing name is refused.

  Returns:
    The path of the written `<name>.json`.

  Raises:
    UserError: for a bad or existing name or a bad checkpoint.
  """
  check_export_name(name, out_dir, overwrite)
  _, _, theta, meta = load(checkpoint)
  buf = io.BytesIO()
  np.savez(buf, theta=theta.numpy())
  io_utils.ensure_writable_dir(out_dir)
  io_utils.atomic_write_bytes(os.path.join(out_dir, name + '.npz'), buf.getvalue())
  io_utils.atomic_write_json(os.path.join(out_dir, name + '.json'), dict(meta, **metadata))
  return os.path.join(out_dir, name + '.json')

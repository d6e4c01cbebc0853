"""A train_dir's checkpoint files: digests, fallback to the newest valid one, index rewrite.

A train_dir keeps several checkpoints (`ckpt-N.index`, `ckpt-N.data-*`, `ckpt-N.sha256.json`)
listed in TensorFlow's `checkpoint` index file. `restore_newest_valid` uses the newest one that
verifies, so a checkpoint damaged by a kill, a full disk or a bad copy costs one checkpoint
interval rather than the run; `tidy_checkpoints` leaves the directory as an uninterrupted run's
manager would; `read_checkpoint` reads a train_dir or a checkpoint path for evaluation. What an
outer-training run saves through these is `lo_tf.outer_trainers.run_checkpoints`.
"""

import dataclasses
import glob
import hashlib
import os
import re
import shutil
import time

from absl import logging
from google.protobuf import text_format
import numpy as np
import tensorflow as tf

from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.errors import one_line

THETA_KEY = 'theta/.ATTRIBUTES/VARIABLE_VALUE'
STEP_KEY = 'step/.ATTRIBUTES/VARIABLE_VALUE'
WALL_SECONDS_KEY = 'wall_seconds/.ATTRIBUTES/VARIABLE_VALUE'
_INDEX = 'checkpoint'  # TensorFlow's CheckpointState file
# The files of checkpoint ckpt-N, and the temporary directory TensorFlow saves it through.
_CHECKPOINT_FILE = re.compile(r'(ckpt-(\d+))\.(index|data-\d+-of-\d+)')
_CHECKPOINT_NAME = re.compile(r'ckpt-(\d+)')
_TEMP_DIR = re.compile(r'ckpt-\d+_temp.*')



def _digest_path(prefix):
  return prefix + '.sha256.json'


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def write_digest(prefix):
  """Records the SHA-256 of every file of checkpoint `prefix` beside it (atomically).

  TensorFlow's checkpoint reader does not notice every corrupted byte (a flipped byte near the end
  of an index file reads back fine); the digest lets `verify_digest` refuse such a checkpoint
  instead of loading garbage (`digest_problem`).
  """
  digests = {os.path.basename(path): _sha256(path)
             for path in sorted(glob.glob(prefix + '.index') + glob.glob(prefix + '.data-*'))}
  io_utils.atomic_write_json(_digest_path(prefix), digests)


def remove_stale_digests(directory):
  """Deletes digests of checkpoints that the CheckpointManager has removed."""
  for path in glob.glob(os.path.join(directory, '*.sha256.json')):
    if not os.path.exists(path[:-len('.sha256.json')] + '.index'):
      os.remove(path)


def digest_problem(prefix):
  """Why checkpoint `prefix` does not match its digest, or None (also when it has none)."""
  path = _digest_path(prefix)
  if not os.path.exists(path):
    return None
  try:
    digests = io_utils.read_json(path, dict, 'checkpoint digest')
  except UserError:
    return f'its digest {os.path.basename(path)} is unreadable'
  for name, expected in digests.items():
    try:
      actual = _sha256(os.path.join(os.path.dirname(prefix), name))
    except OSError:
      actual = None
    if actual != expected:
      return f'{name} is missing or changed since it was written'
  return None


def remove_temp_dirs(train_dir):
  """Deletes the `ckpt-N_temp*` directories that saves killed midway left in `train_dir`.

  TensorFlow writes a checkpoint into `<prefix>_temp/part-*` and renames the parts into place; a
  kill during the save leaves that directory behind, empty or with partial `part-*` files, and
  TensorFlow documents it as safe to remove. A directory holding anything else is kept. Call it
  only while holding the train_dir's `io_utils.DirectoryLock`: a running save's directory would
  be removed otherwise.

  Returns:
    The removed directories (sorted paths).
  """
  removed = []
  for name in sorted(os.listdir(train_dir)):
    path = os.path.join(train_dir, name)
    if not (_TEMP_DIR.fullmatch(name) and os.path.isdir(path) and not os.path.islink(path)):
      continue
    entries = os.listdir(path)
    if all(e.startswith('part-') and os.path.isfile(os.path.join(path, e)) for e in entries):
      shutil.rmtree(path)
      removed.append(path)
  return removed


def kept_checkpoints(train_dir):
  """The checkpoints `ckpt-N` of `train_dir`, newest first, and what is wrong with its index.

  The candidates are the checkpoints that TensorFlow's `checkpoint` index file lists together with
  every `ckpt-N` that has an index or data file on disk, ordered by N (the outer step) descending.
  So an unreadable index, a stale one (a kill between a save and its index update) or a listed
  checkpoint whose files are gone all still leave the other checkpoints to try.

  Returns:
    (prefixes, index_problem): absolute prefixes `train_dir/ckpt-N`, newest first; a short reason
    when the `checkpoint` file exists but cannot be parsed, else None.
  """
  train_dir = os.path.abspath(train_dir)
  steps, index_problem = set(), None
  index = os.path.join(train_dir, _INDEX)
  if os.path.exists(index):
    paths = []
    try:
      state = tf.train.get_checkpoint_state(train_dir)  # None when unparsable or unreadable
      if state is None:
        index_problem = 'not a readable CheckpointState text proto'
      else:
        paths = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
    except UnicodeDecodeError:
      index_problem = 'not text'
    except ValueError:  # TF: "Invalid checkpoint state loaded from ..."
      index_problem = 'empty, or names no checkpoint'
    for path in paths:
      match = _CHECKPOINT_NAME.fullmatch(os.path.basename(path))
      if match:
        steps.add(int(match.group(1)))
  for name in os.listdir(train_dir):
    match = _CHECKPOINT_FILE.fullmatch(name)
    if match:
      steps.add(int(match.group(2)))
  return [os.path.join(train_dir, f'ckpt-{n}') for n in sorted(steps, reverse=True)], index_problem


def _verified_reader(prefix):
  """A `tf.train.CheckpointReader` of `prefix` after checking every byte, or raises ValueError.

  Checks: the index file exists, the SHA-256 digest (when there is one), every tensor reads back
  (TensorFlow's per-tensor CRC32C), and θ, when present, is finite.
  """
  if not os.path.exists(prefix + '.index'):
    raise ValueError('its .index file is missing')
  problem = digest_problem(prefix)
  if problem:
    raise ValueError(problem)
  try:
    reader = tf.train.load_checkpoint(prefix)
    tensors = {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()}
  except Exception as e:  # TF raises DataLossError, NotFoundError, IndexError, OpError, ...
    raise ValueError(one_line(e)) from None
  if THETA_KEY in tensors and not np.all(np.isfinite(tensors[THETA_KEY])):
    raise ValueError('θ holds non-finite values')
  return reader


@dataclasses.dataclass(frozen=True)
class Restored:
  """The checkpoint that `restore_newest_valid` chose.

  Attributes:
    prefix: its absolute path prefix, `train_dir/ckpt-N`.
    number: N, the outer step it was saved at (None for an explicit path not ending in -N).
    reader: a `tf.train.CheckpointReader` of it (for evaluation: θ without building a trainer).
    skipped: ((prefix, reason), ...) for the newer checkpoints that did not verify, newest first.
    older: prefixes of the older kept checkpoints, newest first (not verified).
    index_problem: why the `checkpoint` index file is unreadable, or None.
  """
  prefix: str
  number: int | None
  reader: object
  skipped: tuple
  older: tuple
  index_problem: str | None = None


def restore_newest_valid(train_dir, checkpoint=None):
  """Finds the newest checkpoint of `train_dir` that verifies and restores it into `checkpoint`.

  Tries `kept_checkpoints(train_dir)` newest first. A checkpoint verifies when its index file
  exists, its files match their SHA-256 digest (`write_digest`), TensorFlow reads every tensor back
  (CRC32C), θ is finite, and, given `checkpoint`, `checkpoint.restore(prefix)` matches every
  object of `checkpoint`. The first that verifies is used; when any was skipped or the
  `checkpoint` index is unreadable, one absl warning names them all. Writes nothing.

  A restore that fails midway may have assigned some variables of `checkpoint`; the next
  candidate's restore assigns all of them again, and when none verifies the caller must not use
  `checkpoint`.

  Args:
    train_dir: a directory written by a `tf.train.CheckpointManager` with the default `ckpt`
      prefix (bin/train's train_dir).
    checkpoint: a `tf.train.Checkpoint` to restore into, or None to only read (bin/eval).

  Returns:
    A `Restored`, or None when `train_dir` holds no checkpoint files and no `checkpoint` index
    (a fresh start).

  Raises:
    UserError (one line): checkpoint files or an index exist but no checkpoint verifies.
  """
  prefixes, index_problem = kept_checkpoints(train_dir)
  index = os.path.join(os.path.abspath(train_dir), _INDEX)
  if not prefixes and not os.path.exists(index):
    return None
  skipped = []
  for i, prefix in enumerate(prefixes):
    try:
      reader = _verified_reader(prefix)
      if checkpoint is not None:
        try:
          checkpoint.restore(prefix).assert_existing_objects_matched()
        except Exception as e:  # TF raises AssertionError, ValueError, OpError, ...
          raise ValueError(f'does not fit this run: {one_line(e, 120)}') from None
    except ValueError as e:
      skipped.append((prefix, str(e)))
      continue
    if skipped or index_problem:
      logging.warning('%s: skipped %s; using %s', train_dir,
                      _problems(skipped, index_problem), os.path.basename(prefix))
    return Restored(prefix=prefix, number=_number(prefix), reader=reader,
                    skipped=tuple(skipped), older=tuple(prefixes[i + 1:]),
                    index_problem=index_problem)
  if not prefixes:
    raise UserError(f"{train_dir} has a 'checkpoint' index but no ckpt-N checkpoint files "
                    f"({index_problem or 'it names none'}); restore them from a backup, or delete "
                    f'{index} to start afresh')
  raise UserError(f'no checkpoint in {train_dir} verifies ({_problems(skipped, index_problem)}); '
                  'every checkpoint is corrupt or incompatible: restore one from a backup, or use '
                  'a fresh --train_dir')


def _problems(skipped, index_problem):
  parts = [f'{os.path.basename(p)}: {reason}' for p, reason in skipped]
  if index_problem:
    parts.append(f"'checkpoint' index unreadable: {index_problem}")
  return '; '.join(parts)


def _write_index(directory, latest, prefixes):
  """Writes `directory`'s `checkpoint` index: `prefixes` (oldest first), `latest` the latest.

  The entries are the bare names `ckpt-N`, relative to `directory` itself: TensorFlow rewrites
  entries relative to a relative `directory` into paths relative to the working directory
  ('../../ckpt-6'), which then resolve to another directory's files.
  """
  directory = os.path.abspath(directory)
  # The manager deletes only checkpoints with a timestamp after last_preserved_timestamp.
  stamps = [os.path.getmtime(p + '.index') if os.path.exists(p + '.index') else time.time()
            for p in prefixes]
  state = tf.compat.v1.train.generate_checkpoint_state_proto(
      directory, os.path.basename(latest), [os.path.basename(p) for p in prefixes],
      all_model_checkpoint_timestamps=stamps, last_preserved_timestamp=min(stamps) - 1)
  io_utils.atomic_write_bytes(os.path.join(directory, _INDEX),
                              text_format.MessageToString(state).encode())


def tidy_checkpoints(directory, restored, keep):
  """Leaves `directory` as a `tf.train.CheckpointManager` that saved `restored` last would.

  A kill in the middle of a save can leave checkpoints that no manager will ever delete: one
  written whose index update never came (the index does not list it), one the index still lists
  beyond `max_to_keep` when no later save sweeps it (the final save of a run), or files whose
  digest was never written. After `restore_newest_valid` chose `restored`, the index is rewritten
  to list it and the `keep - 1` newest older ones; every other older checkpoint (files and digest)
  is deleted, and a missing digest of `restored` is written. Newer checkpoints that did not verify
  are left alone (a save of the same step replaces them). Call it while holding the train_dir's
  `io_utils.DirectoryLock`, before creating the `tf.train.CheckpointManager`.

  Returns:
    The removed prefixes, newest first.
  """
  directory = os.path.abspath(directory)
  # Every path in one form: the checkpoint's name inside `directory`, made absolute. So nothing
  # outside `directory` is deleted, and a listed path that leads elsewhere counts as a difference.
  inside = lambda prefix: os.path.join(directory, os.path.basename(prefix))
  kept = [inside(p) for p in restored.older[:keep - 1]]
  extra = [inside(p) for p in restored.older[keep - 1:]]
  prefixes = list(reversed(kept)) + [inside(restored.prefix)]
  try:
    state = tf.train.get_checkpoint_state(directory)
  except (UnicodeDecodeError, ValueError):
    state = None
  if (state is None or os.path.abspath(state.model_checkpoint_path) != prefixes[-1] or
      [os.path.abspath(p) for p in state.all_model_checkpoint_paths] != prefixes):
    _write_index(directory, prefixes[-1], prefixes)
  for prefix in extra:
    for path in glob.glob(glob.escape(prefix) + '.index') + glob.glob(
        glob.escape(prefix) + '.data-*') + glob.glob(glob.escape(_digest_path(prefix))):
      os.remove(path)
  # What the index listed a manager with a larger max_to_keep kept (or a kill stopped it from
  # sweeping); what it did not list a kill left between a save and its index update.
  listed = {os.path.abspath(p) for p in state.all_model_checkpoint_paths} if state else set()
  for why, removed in ((f'beyond the {keep} kept', [p for p in extra if p in listed]),
                       ('left by a kill during a save (not in the index)',
                        [p for p in extra if p not in listed])):
    if removed:
      logging.info('%s: removed checkpoint(s) %s: %s', directory, why,
                   ', '.join(os.path.basename(p) for p in removed))
  if not os.path.exists(_digest_path(prefixes[-1])):
    write_digest(prefixes[-1])
  remove_stale_digests(directory)
  return extra



def _number(prefix):
  """N of a checkpoint prefix `.../name-N`, or None."""
  match = re.search(r'-(\d+)$', prefix)
  return int(match.group(1)) if match else None



def read_checkpoint(spec):
  """(Restored or None, directory) for a train_dir or a checkpoint path, or (None, None).

  A train_dir gives its newest checkpoint that verifies (`restore_newest_valid`); an explicit
  checkpoint path is used as is, with no fallback to another one.

  Raises:
    UserError: checkpoints exist but none verifies, or the explicit one does not.
  """
  if os.path.isdir(spec):
    return restore_newest_valid(spec), spec
  if not glob.glob(glob.escape(spec) + '.*'):
    return None, None
  try:
    reader = _verified_reader(spec)
  except ValueError as e:
    raise UserError(f'checkpoint {spec} is corrupt or incompatible ({e}); use another '
                    'checkpoint') from None
  return Restored(prefix=spec, number=_number(spec), reader=reader, skipped=(), older=()), (
      os.path.dirname(spec))

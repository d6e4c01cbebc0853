"""The outer-training run's checkpoints (paper App. B): what is saved, the best θ, resume checks.

`RunCheckpoints` saves θ, the outer optimizer, the outer step and every slot's inner state through a
`tf.train.CheckpointManager` with digests (`lo_tf.checkpointing`), keeps the best θ by
meta-evaluation in `train_dir/best`, and on resume restores the newest checkpoint that verifies
after checking the run's recorded configuration (`lopt.json`, `operative_config.gin`): a run
resumed with another configuration is refused, except for the bindings in `RESUMABLE`.
"""

import os

from absl import logging
import numpy as np
import tensorflow as tf

from lo_tf import checkpointing
from lo_tf import config
from lo_tf import io_utils
from lo_tf.errors import UserError

# The files of a train_dir besides its 
LOPT_CONFIG = 'lopt.json'
RUN_CONFIG = 'operative_config.gin'
BEST = 'best'
# Bindings that may change when a run is resumed: none changes θ, best/, best_score, the meta-eval
# log or a summary of the steps both runs share (num_outer_steps extends or ends a run; the others
# only decide which checkpoints are kept).
RESUMABLE = ('OuterTrainer.num_outer_steps', 'OuterTrainer.checkpoint_every',
             'OuterTrainer.keep_checkpoints')


# How a lopt.json entry is named in a refusal: the binding that sets it.
_METADATA_BINDINGS = {'lopt': 'MLPLOpt', 'objective': 'TruncatedStep.objective',
                      'estimator': 'GradientEstimator.mode',
                      'num_meta_params': 'the number of meta-parameters (MLPLOpt)',
                      'num_inner_params': 'the inner problem (its parameter count)',
                      'num_slots': 'OuterTrainer.num_slots',
                      'num_inner_steps': 'InnerTrainer.num_steps',
                      'sample_source': 'the sample source (--cluster)',
                      'outer_learning_rate': 'OuterLearner.outer_learning_rate'}
# Entries an older lo_tf did not write into lopt.json: where absent, operative_config.gin alone
# (compared too) holds them.
_ADDED_ENTRIES = ('outer_learning_rate',)


def _metadata_difference(saved, current):
  """'<binding> (<saved> vs <current>)' of the first lopt.json entry that differs, or None."""
  for key in current:
    if key in _ADDED_ENTRIES and key not in saved:
      continue
    a, b = saved.get(key), current[key]
    if a == b:
      continue
    name = _METADATA_BINDINGS.get(key, key)
    if isinstance(a, dict) and isinstance(b, dict):  # name the entry, not the two dicts
      sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
      return f'{name}.{sub} ({a.get(sub)!r} vs {b.get(sub)!r})'
    return f'{name} ({a!r} vs {b!r})'
  return None


class RunCheckpoints:
  """The run's checkpoints in train_dir and the best θ by meta-evaluation in train_dir/best.

  Args:
    train_dir: the run's directory.
    trackables: {name: trackable} of everything to save (θ, outer optimizer, step, wall_seconds, slots).
    metadata: JSON-able description of the configuration; a resume with a different one is
      refused (`lopt.json`, also written beside the best θ so it loads on its own).
    keep: checkpoints kept.
    run_config: the run's operative configuration (`config.operative_config_text`), recorded as
      `operative_config.gin`; a resume whose configuration differs outside `RESUMABLE` is refused.
    best_theta: the variable best/ saves as its θ (default `trackables['theta']`; the learner's
      average θ̄ where it keeps one).
  """

  def __init__(self, train_dir, trackables, metadata, keep, run_config=None, best_theta=None):
    self.train_dir, self.metadata, self.keep = train_dir, metadata, keep
    self.run_config = run_config
    self.checkpoint = tf.train.Checkpoint(**trackables)
    # best/ keeps the outer-training time too, so a run warm-started from it counts that time.
    best_theta = trackables['theta'] if best_theta is None else best_theta
    self._best = tf.train.Checkpoint(theta=best_theta, step=trackables['step'],
                                     wall_seconds=trackables['wall_seconds'])
    self.best_dir = os.path.join(train_dir, BEST)
    self.manager = self._best_manager = None

  def restore(self):
    """Resumes from the newest checkpoint that verifies, after checking its configuration.

    Call with the train_dir lock held: leftovers of saves killed midway are removed, a corrupt
    newest checkpoint is skipped for the next older one that verifies (warning once), and the
    `checkpoint` index is rewritten to match before the CheckpointManager takes over.

    Returns:
      The restored outer step, or None for a fresh start.

    Raises:
      UserError: a checkpoint of another configuration, or checkpoints of which none verifies.
    """
    checkpointing.remove_temp_dirs(self.train_dir)
    config_path = os.path.join(self.train_dir, LOPT_CONFIG)
    kept, _ = checkpointing.kept_checkpoints(self.train_dir)
    if kept:
      if not os.path.exists(config_path):
        raise UserError(f'--train_dir {self.train_dir} holds checkpoints but no {LOPT_CONFIG}; it '
                        'was not written by bin/train: use a fresh --train_dir')
      self._check_run_config()
      saved = io_utils.read_json(config_path, dict, 'run configuration',
                                 'restore it from a backup or use a fresh --train_dir')
      difference = _metadata_difference(saved, self.metadata)
      if difference:
        raise UserError(f'--train_dir {self.train_dir} holds a run with a different '
                        f'{difference}; use a fresh --train_dir or the same configuration')
    if os.path.isdir(self.best_dir):  # best/ is saved through a manager too
      checkpointing.remove_temp_dirs(self.best_dir)
      try:
        best = checkpointing.restore_newest_valid(self.best_dir)
      except UserError:  # none verifies: the next best save replaces them
        best = None
      if best is not None:
        checkpointing.tidy_checkpoints(self.best_dir, best, keep=1)
    restored = checkpointing.restore_newest_valid(self.train_dir, self.checkpoint)
    if restored is not None:
      checkpointing.tidy_checkpoints(self.train_dir, restored, self.keep)
      logging.info('resumed from %s', restored.prefix)
    self.manager = tf.train.CheckpointManager(self.checkpoint, self.train_dir,
                                              max_to_keep=self.keep)
    self._best_manager = tf.train.CheckpointManager(self._best, self.best_dir, max_to_keep=1)
    return None if restored is None else int(self.checkpoint.step)

  def _check_run_config(self):
    """Refuses a resume whose operative configuration differs from the recorded one."""
    path = os.path.join(self.train_dir, RUN_CONFIG)
    if self.run_config is None:
      return
    if not os.path.exists(path):  # written by an older lo_tf: lopt.json alone is compared
      logging.warning('%s has no %s (an older lo_tf wrote it): only lopt.json is compared on this '
                      'resume', self.train_dir, RUN_CONFIG)
      return
    try:
      with open(path) as f:
        saved = config.parse_bindings(f.read())
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f'{path} cannot be read ({e}); restore it from a backup or use a fresh '
                      '--train_dir') from None
    differences = config.config_differences(saved, config.parse_bindings(self.run_config),
                                              ignore=RESUMABLE)
    # A parameter added to lo_tf after the run started, left at its default, changes nothing.
    differences = [(k, old, new) for k, old, new in differences
                   if not (old == '(unset)' and config.same_value(new, config.default_text(k)))]
    renamed = [(k, config.renamed_binding(k)) for k, old, _ in differences
               if old != '(unset)' and config.renamed_binding(k)]
    if renamed:
      names = ', '.join(f'{old} was renamed {new}' for old, new in renamed)
      raise UserError(f'--train_dir {self.train_dir} was started by an older lo_tf ({names}); '
                      f'resume it with the lo_tf revision that started it{self._revision()}, or '
                      'use a fresh --train_dir')
    if differences:
      resumable = ', '.join(k.split('.', 1)[1] for k in RESUMABLE)
      raise UserError(f'--train_dir {self.train_dir} holds a run of another configuration (saved '
                      f'vs now): {config.describe_differences(differences)}; use the same configuration '
                      f'or a fresh --train_dir (only OuterTrainer.{{{resumable}}} may change)')

  def _revision(self):
    """' (throughput.json names REV)': the lo_tf revision the run last ran with, or ''."""
    # throughput.json is loop.THROUGHPUT (the loop imports this module, not the reverse).
    path = os.path.join(self.train_dir, 'throughput.json')
    try:
      revision = io_utils.read_json(path, dict, 'throughput record').get('git_revision')
    except UserError:  # missing or damaged: the message names no revision
      return ''
    return f' (its throughput.json names {revision})' if revision not in (None, 'unknown') else ''

  def write_metadata(self):
    """Writes lopt.json into the run and best directories and the operative configuration into
    the run's (after the lock and the checks)."""
    for directory in (self.train_dir, self.best_dir):
      io_utils.ensure_writable_dir(directory)
      io_utils.atomic_write_json(os.path.join(directory, LOPT_CONFIG), self.metadata)
    if self.run_config is not None:
      io_utils.atomic_write_bytes(os.path.join(self.train_dir, RUN_CONFIG),
                                  self.run_config.encode())

  def save(self, step):
    """Saves every trackable as ckpt-<step>, with its digest."""
    _check_finite(self.checkpoint.theta)
    checkpointing.write_digest(self.manager.save(checkpoint_number=step))
    checkpointing.remove_stale_digests(self.train_dir)

  def save_best(self, step):
    """Saves θ as the best so far (train_dir/best/ckpt-<step>)."""
    _check_finite(self._best.theta)
    checkpointing.write_digest(self._best_manager.save(checkpoint_number=step))
    checkpointing.remove_stale_digests(self.best_dir)

  @property
  def latest(self):
    return self.manager.latest_checkpoint if self.manager else None


def _check_finite(theta):
  if not np.all(np.isfinite(theta.numpy())):  # the learner never lets this happen
    raise RuntimeError('refusing to checkpoint a non-finite θ')

"""The outer-training loop (paper App. B, Algorithm 1; §4.3): bookkeeping around estimator + learner.

Each outer step is one batch of S samples from a sample source (`samples.LocalSamples`: every
worker's antithetic truncation in one graph execution; `distributed.ClusterSamples`: closures on
a parameter-server cluster) and one call of the learner (eq. 1 and an Adam step). Everything else
lives here, in separate pieces: `Checkpoints` (resume, digests, the best-θ checkpoint),
`Summaries` (TensorBoard), the meta-evaluation (`meta_eval.MetaEvaluator`), a tqdm progress bar and
the throughput record.

A run is a pure function of its configuration and seed: the estimator's randomness at outer step i
is seeded by (seed, i), and the checkpoint holds θ, Adam's slots, the outer step (hence the
curriculum position) and every worker's inner state, so a resumed run continues exactly where the
killed one was. Everything a step saves is a function of the outer step alone: at step i the
summaries are written, then the meta-evaluation runs when it is due (i = 0 on a fresh start, every
`meta_eval_every` steps, and at `num_outer_steps`) and may save `best/`, and only then is the
checkpoint of step i saved. A run resumed from ckpt-i therefore never repeats the meta-evaluation
of step i, and a kill at any moment costs the replay of some steps, after which the run saves
exactly what an uninterrupted one saves. A rerun of a finished run completes what a kill or a full
disk left undone after the last checkpoint (throughput.json, outer_training.png, temporary
directories).

The run's whole operative gin configuration is recorded in `operative_config.gin` and compared on
resume: a run resumed with another one is refused, except for the bindings in `RESUMABLE`.
"""

import math
import os
import platform
import resource
import subprocess
import sys
import time

import gin
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging

from lo_tf import checkpoints
from lo_tf import io_utils
from lo_tf import plotting
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.outer_trainers.curriculum import Curriculum
from lo_tf.outer_trainers.estimators import MergedEstimator
from lo_tf.outer_trainers.learner import OuterLearner
from lo_tf.outer_trainers.meta_eval import MetaEvaluator
from lo_tf.outer_trainers.samples import LocalSamples
from lo_tf.outer_trainers.theta_init import ThetaInit
from lo_tf.outer_trainers.truncated_step import TruncatedStep

LOPT_CONFIG = 'lopt.json'
THROUGHPUT = 'throughput.json'
THETA_INIT = 'theta_init.json'
BEST = 'best'
OUTER_TRAINING_PNG = 'outer_training.png'
RUN_CONFIG = 'operative_config.gin'
META_EVAL_LOG = 'meta_eval.json'

# Bindings that may change when a run is resumed: none changes θ, best/, best_score, the meta-eval
# log or a summary of the steps both runs share (num_outer_steps extends or ends a run; the others
# only decide which checkpoints are kept).
RESUMABLE = ('OuterTrainer.num_outer_steps', 'OuterTrainer.checkpoint_every',
             'OuterTrainer.keep_checkpoints')

# Sane ranges (warned about outside) and absurd ones (refused): the paper's outer learning rates
# are 3e-3 and 3e-4 (App. C.3), its σ 0.01 to 0.1.
OUTER_LEARNING_RATE_SANE, OUTER_LEARNING_RATE_LIMITS = (1e-5, 3e-2), (1e-8, 1.0)
SIGMA_SANE, SIGMA_LIMITS = (1e-3, 1.0), (1e-6, 100.0)
# θ "moves measurably" in a step when ||Δθ|| exceeds this fraction of max(||θ||, 1).
MIN_RELATIVE_CHANGE = 1e-10
# A θ with an element beyond this has blown up (θ's initialization is O(1)).
THETA_BLOWN = 1e6


def git_revision():
  """The git revision of this lo_tf checkout, or "unknown"."""
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def parse_bindings(text):
  """{binding: value text} of a gin config string (as `gin.operative_config_str()` writes it).

  Comments, blank lines and imports are skipped; a value continued on indented lines (gin's
  `key = \\` form) is joined with single spaces.
  """
  bindings, key = {}, None
  for line in text.splitlines():
    stripped = line.strip()
    if not stripped or stripped.startswith('#'):
      continue
    if line[0].isspace() and key is not None:  # a continuation line
      bindings[key] = (bindings[key] + ' ' + stripped).strip()
      continue
    if ' = ' not in line or stripped.startswith(('import ', 'from ')):
      key = None
      continue
    key, value = line.split(' = ', 1)
    key, value = key.strip(), value.strip()
    bindings[key] = '' if value == '\\' else value
  return bindings


def run_config_text(values):
  """The run's operative configuration as gin text: gin's operative config (every parameter of
  every configurable called so far, defaults included) updated by `values` ({binding: value}: what
  a caller passed explicitly, which gin does not record)."""
  bindings = parse_bindings(gin.operative_config_str())
  bindings.update({k: repr(v) for k, v in values.items()})
  return ''.join(f'{k} = {v}\n' for k, v in sorted(bindings.items()))


def config_differences(saved, current, ignore=RESUMABLE):
  """[(binding, saved value, current value)] of two `parse_bindings` dicts, `ignore` left out."""
  return [(k, saved.get(k, '(unset)'), current.get(k, '(unset)'))
          for k in sorted(set(saved) | set(current))
          if k not in ignore and saved.get(k) != current.get(k)]


def describe_differences(differences, limit=4, width=40):
  """One short phrase naming the differing bindings: 'A (x vs y), B (u vs v) and 3 more'."""
  clip = lambda v: v if len(v) <= width else v[:width - 3] + '...'
  parts = [f'{k} ({clip(a)} vs {clip(b)})' for k, a, b in differences[:limit]]
  more = len(differences) - limit
  return ', '.join(parts) + (f' and {more} more' if more > 0 else '')


# How a lopt.json entry is named in a refusal: the binding that sets it.
_METADATA_BINDINGS = {'lopt': 'MLPLOpt', 'objective': 'TruncatedStep.objective',
                      'estimator': 'MergedEstimator.estimator',
                      'num_meta_params': 'the number of meta-parameters (MLPLOpt)',
                      'num_inner_params': 'the inner problem (its parameter count)',
                      'num_workers': 'OuterTrainer.num_workers',
                      'num_inner_steps': 'InnerTrainer.num_steps',
                      'sample_source': 'the sample source (--cluster)'}


def _metadata_difference(saved, current):
  """'<binding> (<saved> vs <current>)' of the first lopt.json entry that differs, or None."""
  for key in current:
    a, b = saved.get(key), current[key]
    if a == b:
      continue
    name = _METADATA_BINDINGS.get(key, key)
    if isinstance(a, dict) and isinstance(b, dict):  # name the entry, not the two dicts
      sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
      return f'{name}.{sub} ({a.get(sub)!r} vs {b.get(sub)!r})'
    return f'{name} ({a!r} vs {b!r})'
  return None


class Checkpoints:
  """The run's checkpoints in train_dir and the best θ by meta-evaluation in train_dir/best.

  Args:
    train_dir: the run's directory.
    trackables: {name: trackable} of everything to save (θ, outer optimizer, step, workers).
    metadata: JSON-able description of the configuration; a resume with a different one is
      refused (`lopt.json`, also written beside the best θ so it loads on its own).
    keep: checkpoints kept.
    run_config: the run's operative configuration (`run_config_text`), recorded as
      `operative_config.gin`; a resume whose configuration differs outside `RESUMABLE` is refused.
  """

  def __init__(self, train_dir, trackables, metadata, keep, run_config=None):
    self.train_dir, self.metadata, self.keep = train_dir, metadata, keep
    self.run_config = run_config
    self.checkpoint = tf.train.Checkpoint(**trackables)
    self._best = tf.train.Checkpoint(theta=trackables['theta'], step=trackables['step'])
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
    checkpoints.remove_temp_dirs(self.train_dir)
    config_path = os.path.join(self.train_dir, LOPT_CONFIG)
    kept, _ = checkpoints.kept_checkpoints(self.train_dir)
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
      checkpoints.remove_temp_dirs(self.best_dir)
      try:
        best = checkpoints.restore_newest_valid(self.best_dir)
      except UserError:  # none verifies: the next best save replaces them
        best = None
      if best is not None:
        checkpoints.tidy_checkpoints(self.best_dir, best, keep=1)
    restored = checkpoints.restore_newest_valid(self.train_dir, self.checkpoint)
    if restored is not None:
      checkpoints.tidy_checkpoints(self.train_dir, restored, self.keep)
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
        saved = parse_bindings(f.read())
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f'{path} cannot be read ({e}); restore it from a backup or use a fresh '
                      '--train_dir') from None
    differences = config_differences(saved, parse_bindings(self.run_config))
    if differences:
      resumable = ', '.join(k.split('.', 1)[1] for k in RESUMABLE)
      raise UserError(f'--train_dir {self.train_dir} holds a run of another configuration (saved '
                      f'vs now): {describe_differences(differences)}; use the same configuration '
                      f'or a fresh --train_dir (only OuterTrainer.{{{resumable}}} may change)')

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
    checkpoints.write_digest(self.manager.save(checkpoint_number=step))
    checkpoints.remove_stale_digests(self.train_dir)

  def save_best(self, step):
    """Saves θ as the best so far (train_dir/best/ckpt-<step>)."""
    _check_finite(self.checkpoint.theta)
    checkpoints.write_digest(self._best_manager.save(checkpoint_number=step))
    checkpoints.remove_stale_digests(self.best_dir)

  @property
  def latest(self):
    return self.manager.latest_checkpoint if self.manager else None


def _check_finite(theta):
  if not np.all(np.isfinite(theta.numpy())):  # the learner never lets this happen
    raise RuntimeError('refusing to checkpoint a non-finite θ')


class Summaries:
  """TensorBoard scalars in train_dir/summaries (tf.summary).

  Args:
    directory: the summaries directory.
    start_step: the first outer step this run writes. A `SessionLog.START` event at that step
      makes TensorBoard drop what an earlier, killed run wrote for steps >= start_step, so a
      resumed run's replayed steps show once.
  """

  def __init__(self, directory, start_step):
    self.writer = tf.summary.create_file_writer(directory)
    # tf.summary writes only Summary events; a SessionLog goes in through ImportEvent.
    event = tf.compat.v1.Event(step=start_step, wall_time=time.time(),
                               session_log=tf.compat.v1.SessionLog(
                                   status=tf.compat.v1.SessionLog.START))
    tf.raw_ops.ImportEvent(writer=self.writer._resource,  # pylint: disable=protected-access
                           event=event.SerializeToString())

  def write(self, step, scalars, prefix=''):
    with self.writer.as_default(step=step):
      for key, value in scalars.items():
        value = float(value)
        if math.isfinite(value):
          tf.summary.scalar(prefix + key, value)

  def flush(self):
    self.writer.flush()


@gin.configurable
class OuterTrainer:
  """Outer-trains θ of a learned optimizer on an experiment's outer-train tasks (Algorithm 1).

  The pieces are gin-configured on their own: `TruncatedStep` (objective, meta-loss batches, loss
  clip), `MergedEstimator` (σ, estimator), `Curriculum`, `OuterLearner` (outer learning rate, β1,
  clipping), `MLPLOpt` (the learned optimizer's features).

  Args:
    experiment: `lo_tf.experiment.Experiment`: task distribution, inner problem and the inner
      trainer (its num_steps is T, its batch_size the inner minibatch).
    train_dir: checkpoints, summaries, lopt.json, throughput.json and outer_training.png go here.
    num_workers: S, workers (antithetic samples) per outer step (paper: 128).
    num_outer_steps: outer steps to train for (a resumed run continues up to this count).
    checkpoint_every: save every this many outer steps (and at the end).
    keep_checkpoints: checkpoints kept.
    meta_eval_every: meta-evaluate every this many outer steps (and at the first and last); the
      best θ by meta-loss (outer-valid tasks where the split exists, else outer-train) is kept in
      train_dir/best.
    meta_eval_tasks: tasks per split of the meta-evaluation.
    meta_eval_outer_test: also meta-evaluate outer-test tasks (reported, never used to select;
      off in recipes that choose on outer-valid and keep outer-test for the final numbers).
    max_unusable_steps: stop with an error (naming the likely cause) after this many consecutive
      outer steps in which θ did not move measurably: no finite sample, a rejected non-finite
      update, a zero merged gradient, or a change below `MIN_RELATIVE_CHANGE`. Checkpoints are
      not saved during such a streak, so one from before a blow-up stays.
    seed: seeds θ's initialization and every outer step's randomness.
    family: the learned optimizer family (default: gin-configured `MLPLOpt()`).
    theta_init: chooses θ at outer step 0 of a fresh run (default: gin-configured `ThetaInit()`);
      its record goes to train_dir/theta_init.json.
    samples: where each outer step's batch of S samples comes from, called as
      `samples(estimator, num_workers, seed)` (`lo_tf.outer_trainers.samples`; default
      `LocalSamples`: all workers in this process; `distributed.ClusterSamples`: on a cluster).

  Raises:
    UserError: for bad settings.
  """

  def __init__(self, experiment, train_dir, num_workers=8, num_outer_steps=1000,
               checkpoint_every=25, keep_checkpoints=3, meta_eval_every=100, meta_eval_tasks=20,
               meta_eval_outer_test=True, max_unusable_steps=20, seed=0, family=None,
               theta_init=None, samples=None):
    for name, value in (('num_workers', num_workers), ('num_outer_steps', num_outer_steps),
                        ('checkpoint_every', checkpoint_every),
                        ('keep_checkpoints', keep_checkpoints),
                        ('meta_eval_every', meta_eval_every), ('meta_eval_tasks', meta_eval_tasks),
                        ('max_unusable_steps', max_unusable_steps)):
      check_int('OuterTrainer', name, value)
    self.seed = check_int('OuterTrainer', 'seed', seed, minimum=0)
    self.exp, self.train_dir = experiment, train_dir
    self.num_workers, self.num_outer_steps = num_workers, num_outer_steps
    self.checkpoint_every, self.meta_eval_every = checkpoint_every, meta_eval_every
    self.max_unusable_steps = max_unusable_steps
    self.family = family or MLPLOpt()
    self.theta_init = theta_init or ThetaInit()
    trainer = experiment.trainer
    step = TruncatedStep(experiment.tasks, experiment.problem, self.family, trainer.num_steps,
                         trainer.batch_size)
    self.estimator = MergedEstimator(step, Curriculum())
    # The sample source decides where the workers' inner states, θ and Adam's slots live.
    self.samples = (samples or LocalSamples)(self.estimator, num_workers, self.seed)
    with self.samples.placement():
      self.learner = OuterLearner(self.family.init_theta(tf.constant([seed, 0])),
                                  objective=step.objective, estimator=self.estimator.estimator)
    self.meta_eval = MetaEvaluator(experiment, self.family, step.objective, meta_eval_tasks,
                                   outer_test=meta_eval_outer_test)
    self.step = tf.Variable(0, dtype=tf.int64, name='outer_step')
    self.wall_seconds = tf.Variable(0.0, dtype=tf.float64, name='wall_seconds')
    self.best_score = tf.Variable(np.inf, dtype=tf.float64, name='best_meta_eval_score')
    self.workers = self.samples.workers
    self.metadata = {'lopt': self.family.config(), 'objective': step.objective,
                     'estimator': self.estimator.estimator,
                     'num_meta_params': self.family.num_meta_params,
                     'num_inner_params': experiment.problem.num_params,
                     'num_workers': num_workers, 'num_inner_steps': trainer.num_steps,
                     **self.samples.metadata()}
    trackables = dict(self.learner.trackables(), step=self.step, wall_seconds=self.wall_seconds,
                      best_score=self.best_score, **self.samples.trackables())
    own = dict(num_workers=num_workers, num_outer_steps=num_outer_steps,
               checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
               meta_eval_every=meta_eval_every, meta_eval_tasks=meta_eval_tasks,
               max_unusable_steps=max_unusable_steps, seed=self.seed)
    values = {f'OuterTrainer.{k}': v for k, v in own.items()}
    values.update({f'{type(self.family).__name__}.{k}': v
                   for k, v in self.family.config().items()})
    self.run_config = run_config_text(values)
    self.checkpoints = Checkpoints(train_dir, trackables, self.metadata, keep_checkpoints,
                                   self.run_config)
    self.summaries = None
    self._check_sane()

  def _check_sane(self):
    """Refuses an absurd outer learning rate or σ and warns about one outside the sane range."""
    for name, value, sane, limits in (
        ('OuterLearner.outer_learning_rate', self.learner.learning_rate,
         OUTER_LEARNING_RATE_SANE, OUTER_LEARNING_RATE_LIMITS),
        ('MergedEstimator.sigma', self.estimator.sigma, SIGMA_SANE, SIGMA_LIMITS)):
      if not limits[0] <= value <= limits[1]:
        raise UserError(f'{name}={value:g} is absurd: the sane range is {sane[0]:g} to '
                        f'{sane[1]:g}, and values outside {limits[0]:g} to {limits[1]:g} are '
                        'refused; fix the gin binding')
      if not sane[0] <= value <= sane[1]:
        logging.warning('%s=%g is outside the sane range %g to %g', name, value, *sane)

  @property
  def theta(self):
    return self.learner.theta

  def outer_step(self):
    """One outer step: a batch of S samples (`self.samples`), then eq. 1 and one Adam step.

    Returns the step's scalars (the sample source's own ones included)."""
    out, source_stats = self.samples.batch(self.theta, self.step)
    stats = self.learner.apply(out)
    self.step.assign_add(1)
    used = out.finite.numpy()
    lengths = out.lengths.numpy()
    loss = 0.5 * (out.loss_pos.numpy() + out.loss_neg.numpy())
    result = {k: float(v) for k, v in stats.items()}
    result.update(outer_loss=float(np.mean(loss[used])) if used.any() else math.nan,
                  inner_train_loss=float(np.mean(out.train_loss.numpy()[used]))
                  if used.any() else math.nan,
                  unroll_length=float(np.mean(lengths)), dropped_samples=int((~used).sum()),
                  resets=int(out.reset.numpy().sum()), theta_norm=float(tf.norm(self.theta)),
                  unrolled_steps=2 * int(lengths.sum()),
                  # Peak resident memory: flat once the graphs are built (nothing accumulates).
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                  **source_stats)
    return result

  def _meta_evaluate(self, step, log):
    """Meta-evaluates θ at `step`: summaries, the meta-eval log, best/ when it is the best."""
    result = self.meta_eval(self.theta)
    self.summaries.write(step, result, prefix='meta_eval/')
    log[step] = result
    io_utils.atomic_write_json(os.path.join(self.train_dir, META_EVAL_LOG),
                               {str(k): v for k, v in sorted(log.items())})
    logging.info('meta-eval at outer step %d: %s', step,
                 '  '.join(f'{k} {v:.4f}' for k, v in result.items()))
    if result['selection_score'] < float(self.best_score):
      self.best_score.assign(result['selection_score'])
      self.checkpoints.save_best(step)
    return result

  def _meta_eval_due(self, step):
    return step % self.meta_eval_every == 0 or step == self.num_outer_steps

  def _read_meta_eval_log(self, before):
    """{step: result} of the meta-eval log for the steps < `before` (later ones are replayed)."""
    path = os.path.join(self.train_dir, META_EVAL_LOG)
    if not os.path.exists(path):
      return {}
    saved = io_utils.read_json(path, dict, 'meta-evaluation log',
                               f'delete it (its entries are then missing from {THROUGHPUT})')
    return {int(k): v for k, v in saved.items() if k.isdigit() and int(k) < before}

  def _finished(self, step):
    """Whether the final outputs of a run at `step` are all there (throughput and plot)."""
    path = os.path.join(self.train_dir, THROUGHPUT)
    if not os.path.exists(path) or not os.path.exists(os.path.join(self.train_dir,
                                                                   OUTER_TRAINING_PNG)):
      return False
    try:
      return io_utils.read_json(path, dict, 'throughput record').get('outer_steps') == step
    except UserError:  # damaged: rewrite it
      return False

  def train(self, config_str=None):
    """Outer-trains up to `num_outer_steps`, resuming from train_dir. Returns the throughput dict.

    A rerun of a finished run whose final outputs are missing (a kill or a full disk after the
    last checkpoint) writes them.

    Args:
      config_str: the gin configuration text, saved as train_dir/config.gin once the lock is held
        and the checkpoint (if any) matched this configuration.

    Returns:
      The throughput record also written to throughput.json, or None when the run had already
      reached `num_outer_steps` and written its final outputs.

    Raises:
      UserError: another process uses train_dir, a checkpoint of another configuration or none
        readable, or `max_unusable_steps` consecutive steps in which θ did not move measurably
        (the error names the likely cause and the last checkpoint from before the streak).
    """
    io_utils.ensure_writable_dir(self.train_dir)
    with io_utils.DirectoryLock(self.train_dir):
      restored = self.checkpoints.restore()
      if restored is None:
        self._initialize_theta()
      self.checkpoints.write_metadata()
      if config_str is not None:
        io_utils.atomic_write_bytes(os.path.join(self.train_dir, 'config.gin'),
                                    config_str.encode())
      return self._train(fresh=restored is None)

  def _initialize_theta(self):
    """θ0 of a fresh run by `theta_init`, recorded in train_dir/theta_init.json."""
    theta, record = self.theta_init(self.exp, self.family, self.meta_eval.objective, self.seed)
    self.learner.theta.assign(theta)
    logging.info('θ init: %s', record)
    io_utils.atomic_write_json(os.path.join(self.train_dir, THETA_INIT), record)

  def _train(self, fresh):
    first = int(self.step)
    # The first step this run writes: 0 (the first meta-evaluation) on a fresh start, else the
    # step after the checkpoint. What a killed run wrote from there on is replayed.
    start = 0 if fresh else first + 1
    log = self._read_meta_eval_log(start)
    timing = {'unrolled': 0, 'seconds': 0.0, 'steps': 0}
    run_start = time.perf_counter()
    if first < self.num_outer_steps:
      self._train_steps(first, fresh, start, log, timing)
    elif self._finished(first):
      logging.info('already trained for %d outer steps', first)
      return None
    else:
      logging.info('trained for %d outer steps; writing the final outputs', first)
    if self.checkpoints.latest is None:
      self.checkpoints.save(int(self.step))
    return self._write_outputs(first, log, timing, run_start)

  def _train_steps(self, first, fresh, start, log, timing):
    """The outer steps from `first` to `num_outer_steps`, with summaries, meta-evals, saves."""
    self.summaries = Summaries(os.path.join(self.train_dir, 'summaries'), start)
    if fresh:
      self._meta_evaluate(first, log)
    stall = _Stall(self)
    bar = tqdm.tqdm(total=self.num_outer_steps, initial=first, unit='outer step',
                    file=sys.stderr, mininterval=5.0, dynamic_ncols=True)
    try:
      while int(self.step) < self.num_outer_steps:
        t0 = time.perf_counter()
        before = self.theta.numpy()
        stats = self.outer_step()
        seconds = time.perf_counter() - t0
        step = int(self.step)
        if step > first + 1:  # the first step of a run includes tracing
          timing['unrolled'] += stats['unrolled_steps']
          timing['seconds'] += seconds
          timing['steps'] += 1
        self.summaries.write(step, dict(stats, seconds_per_outer_step=seconds))
        stall.update(step, stats, before, self.theta.numpy())  # raises after too many
        if self._meta_eval_due(step):
          self._meta_evaluate(step, log)
        # No checkpoint during a streak: the last one from before a blow-up stays.
        if ((step % self.checkpoint_every == 0 and not stall.steps) or
            step == self.num_outer_steps):
          self.checkpoints.save(step)
        self.wall_seconds.assign_add(time.perf_counter() - t0)
        bar.set_postfix_str(f'L {stats["outer_loss"]:.3f} k {stats["unroll_length"]:.0f} '
                            f'rp-weight {stats["rp_weight"]:.2f} '
                            f'{timing["unrolled"] / max(timing["seconds"], 1e-9):.0f} unrolled '
                            'steps/s', refresh=False)
        bar.update(1)
    finally:  # an error message then starts on a line of its own
      bar.close()
      self.summaries.flush()

  def _write_outputs(self, first, log, timing, run_start):
    """throughput.json and outer_training.png; returns the throughput record."""
    steps = sorted(log)
    result = {'outer_steps': int(self.step), 'outer_steps_this_run': int(self.step) - first,
              'wall_seconds_this_run': time.perf_counter() - run_start,
              'wall_seconds_total': float(self.wall_seconds), 'git_revision': git_revision(),
              'machine': platform.processor() or platform.machine(),
              'cpu_count': os.cpu_count(),
              'meta_eval_first': log[steps[0]] if steps else None,
              'meta_eval_last': log[steps[-1]] if steps else None,
              'best_meta_eval_score': float(self.best_score),
              'implementation': getattr(self.family, 'implementation', None)}
    if timing['steps']:
      result.update(unrolled_steps_per_sec=timing['unrolled'] / timing['seconds'],
                    samples_per_minute=60.0 * self.num_workers * timing['steps'] /
                    timing['seconds'])
    io_utils.atomic_write_json(os.path.join(self.train_dir, THROUGHPUT), result)
    plotting.outer_training(os.path.join(self.train_dir, 'summaries'),
                            os.path.join(self.train_dir, OUTER_TRAINING_PNG))
    return result


class _Stall:
  """Counts consecutive outer steps in which θ did not move measurably; raises after too many.

  Kinds of stalled step: 'no sample' (no finite sample), 'rejected' (the update would have made θ
  non-finite), 'zero gradient' and 'tiny' (θ changed by less than `MIN_RELATIVE_CHANGE`).
  """

  def __init__(self, trainer):
    self.trainer = trainer
    self.steps = []  # (step, kind, relative change) of the current streak

  def update(self, step, stats, before, after):
    change = float(np.linalg.norm(after.astype(np.float64) - before)) / max(
        float(np.linalg.norm(before.astype(np.float64))), 1.0)
    if stats['num_used'] == 0:
      kind = 'no sample'
    elif not stats['applied']:
      kind = 'rejected'
    elif stats['grad_norm'] == 0:
      kind = 'zero gradient'
    elif change <= MIN_RELATIVE_CHANGE:
      kind = 'tiny'
    else:
      self.steps = []
      return
    self.steps.append((step, kind, change))
    if len(self.steps) >= self.trainer.max_unusable_steps:
      self.trainer.summaries.flush()
      raise UserError(self._message(step))

  def _message(self, step):
    t = self.trainer
    n, kinds = len(self.steps), {kind for _, kind, _ in self.steps}
    lr = f'OuterLearner.outer_learning_rate={float(t.learner.optimizer.learning_rate):g}'
    sigma = f'MergedEstimator.sigma={t.estimator.sigma:g}'
    lr_range = '{:g} to {:g}'.format(*OUTER_LEARNING_RATE_SANE)
    sigma_range = '{:g} to {:g}'.format(*SIGMA_SANE)
    size = float(np.max(np.abs(t.theta.numpy())))
    if kinds & {'no sample', 'rejected'}:
      what = 'no usable update (every sample non-finite, or a non-finite step rejected)'
      if size > THETA_BLOWN:
        cause = f'θ blew up (max |θ| {size:.1e}): {lr} is probably too large (sane: {lr_range})'
        # θ after step b-1 made step b's samples unusable: a checkpoint from step b-2 or earlier
        # is the last whose θ is known to be good.
        good = self._last_checkpoint(self.steps[0][0] - 2)
        where = (f'the last good checkpoint is {good}' if good else
                 'no kept checkpoint predates the blow-up')
      elif 'rejected' in kinds:
        cause = f'the update would make θ non-finite: {lr} is probably too large (sane: {lr_range})'
        good = self._last_checkpoint(step)
        where = f'the last checkpoint is {good}' if good else 'no checkpoint was kept'
      else:
        cause = (f'θ is moderate (max |θ| {size:.2g}), the perturbations are not: {sigma} is '
                 f'probably too large (sane: {sigma_range})')
        good = self._last_checkpoint(step)
        where = f'the last checkpoint is {good}' if good else 'no checkpoint was kept'
    else:
      if kinds == {'zero gradient'}:
        what, cause = 'a zero merged gradient', f'{sigma} is probably too large (sane: {sigma_range})'
      else:
        biggest = max(change for *_, change in self.steps)
        what = f'θ moving by at most {biggest:.1e} of its norm'
        cause = f'{lr} is probably too small (sane: {lr_range})'
      good = self._last_checkpoint(step)
      where = f'the last checkpoint is {good}' if good else 'no checkpoint was kept'
    return (f'{n} consecutive outer steps with {what}, up to step {step}: {cause}; {where}; '
            'start a fresh --train_dir with a saner value')

  def _last_checkpoint(self, step):
    kept = [p for p in (self.trainer.checkpoints.manager.checkpoints
                        if self.trainer.checkpoints.manager else [])
            if int(p.rsplit('-', 1)[1]) <= step]
    return kept[-1] if kept else None

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
killed one was.
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


def git_revision():
  """The git revision of this lo_tf checkout, or "unknown"."""
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


class Checkpoints:
  """The run's checkpoints in train_dir and the best θ by meta-evaluation in train_dir/best.

  Args:
    train_dir: the run's directory.
    trackables: {name: trackable} of everything to save (θ, outer optimizer, step, workers).
    metadata: JSON-able description of the configuration; a resume with a different one is
      refused (`lopt.json`, also written beside the best θ so it loads on its own).
    keep: checkpoints kept.
  """

  def __init__(self, train_dir, trackables, metadata, keep):
    self.train_dir, self.metadata, self.keep = train_dir, metadata, keep
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
      saved = io_utils.read_json(config_path, dict, 'run configuration',
                                 'restore it from a backup or use a fresh --train_dir')
      mismatch = [k for k in self.metadata if saved.get(k) != self.metadata[k]]
      if mismatch:
        raise UserError(f'--train_dir {self.train_dir} holds a run with a different '
                        f'{mismatch[0]} ({saved.get(mismatch[0])!r} vs '
                        f'{self.metadata[mismatch[0]]!r}); use a fresh --train_dir or the same '
                        'configuration')
    restored = checkpoints.restore_newest_valid(self.train_dir, self.checkpoint)
    if restored is not None:
      checkpoints.write_checkpoint_index(self.train_dir, restored)
      logging.info('resumed from %s', restored.prefix)
    self.manager = tf.train.CheckpointManager(self.checkpoint, self.train_dir,
                                              max_to_keep=self.keep)
    self._best_manager = tf.train.CheckpointManager(self._best, self.best_dir, max_to_keep=1)
    return None if restored is None else int(self.checkpoint.step)

  def write_metadata(self):
    """Writes lopt.json into the run and best directories (after the lock and the checks)."""
    for directory in (self.train_dir, self.best_dir):
      io_utils.ensure_writable_dir(directory)
      io_utils.atomic_write_json(os.path.join(directory, LOPT_CONFIG), self.metadata)

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
      best θ by outer-train meta-loss is kept in train_dir/best.
    meta_eval_tasks: tasks per split of the meta-evaluation.
    meta_eval_outer_test: also meta-evaluate outer-test tasks (reported, never used to select;
      off in recipes that choose on outer-valid and keep outer-test for the final numbers).
    max_unusable_steps: stop with an error after this many consecutive outer steps in which θ did
      not change (no finite sample, or a rejected non-finite update).
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
    self.checkpoints = Checkpoints(train_dir, trackables, self.metadata, keep_checkpoints)
    self.summaries = None

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

  def _meta_evaluate(self, step):
    result = self.meta_eval(self.theta)
    self.summaries.write(step, result, prefix='meta_eval/')
    logging.info('meta-eval at outer step %d: %s', step,
                 '  '.join(f'{k} {v:.4f}' for k, v in result.items()))
    if result['selection_score'] < float(self.best_score):
      self.best_score.assign(result['selection_score'])
      self.checkpoints.save_best(step)
    return result

  def train(self, config_str=None):
    """Outer-trains up to `num_outer_steps`, resuming from train_dir. Returns the throughput dict.

    Args:
      config_str: the gin configuration text, saved as train_dir/config.gin once the lock is held
        and the checkpoint (if any) matched this configuration.

    Returns:
      The throughput record also written to throughput.json, or None when the run had already
      reached `num_outer_steps`.

    Raises:
      UserError: another process uses train_dir, a checkpoint of another configuration or none
        readable, or `max_unusable_steps` consecutive steps without an update (the last good
        checkpoint stays).
    """
    io_utils.ensure_writable_dir(self.train_dir)
    with io_utils.DirectoryLock(self.train_dir):
      if self.checkpoints.restore() is None:
        self._initialize_theta()
      self.checkpoints.write_metadata()
      if config_str is not None:
        io_utils.atomic_write_bytes(os.path.join(self.train_dir, 'config.gin'),
                                    config_str.encode())
      self.summaries = Summaries(os.path.join(self.train_dir, 'summaries'), int(self.step) + 1)
      return self._train()

  def _initialize_theta(self):
    """θ0 of a fresh run by `theta_init`, recorded in train_dir/theta_init.json."""
    theta, record = self.theta_init(self.exp, self.family, self.meta_eval.objective, self.seed)
    self.learner.theta.assign(theta)
    logging.info('θ init: %s', record)
    io_utils.atomic_write_json(os.path.join(self.train_dir, THETA_INIT), record)

  def _train(self):
    first = int(self.step)
    revision = git_revision()
    if first >= self.num_outer_steps:
      logging.info('already trained for %d outer steps', first)
      return None
    meta_evals = [self._meta_evaluate(first)]
    unrolled, estimate_seconds, unusable = 0, 0.0, 0
    run_start = time.perf_counter()
    bar = tqdm.tqdm(total=self.num_outer_steps, initial=first, unit='outer step',
                    file=sys.stderr, mininterval=5.0, dynamic_ncols=True)
    while int(self.step) < self.num_outer_steps:
      t0 = time.perf_counter()
      stats = self.outer_step()
      seconds = time.perf_counter() - t0
      step = int(self.step)
      if step > first + 1:  # the first step of a run includes tracing
        unrolled += stats['unrolled_steps']
        estimate_seconds += seconds
      self.summaries.write(step, dict(stats, seconds_per_outer_step=seconds))
      unusable = 0 if stats['applied'] else unusable + 1
      if unusable >= self.max_unusable_steps:
        self.summaries.flush()
        raise UserError(f'{unusable} consecutive outer steps without a usable update (no finite '
                        f'sample, or a non-finite step rejected) up to step {step}; lower '
                        'OuterLearner.outer_learning_rate or MergedEstimator.sigma. The last good '
                        f'checkpoint is {self.checkpoints.latest}')
      if step % self.checkpoint_every == 0 or step == self.num_outer_steps:
        self.checkpoints.save(step)
      if step % self.meta_eval_every == 0 or step == self.num_outer_steps:
        meta_evals.append(self._meta_evaluate(step))
      self.wall_seconds.assign_add(time.perf_counter() - t0)
      bar.set_postfix_str(f'L {stats["outer_loss"]:.3f} k {stats["unroll_length"]:.0f} '
                          f'rp-weight {stats["rp_weight"]:.2f} '
                          f'{unrolled / max(estimate_seconds, 1e-9):.0f} unrolled steps/s',
                          refresh=False)
      bar.update(1)
    bar.close()
    self.summaries.flush()
    if self.checkpoints.latest is None:
      self.checkpoints.save(int(self.step))
    result = {'outer_steps': int(self.step), 'outer_steps_this_run': int(self.step) - first,
              'wall_seconds_this_run': time.perf_counter() - run_start,
              'wall_seconds_total': float(self.wall_seconds), 'git_revision': revision,
              'machine': platform.processor() or platform.machine(),
              'cpu_count': os.cpu_count(), 'meta_eval_first': meta_evals[0],
              'meta_eval_last': meta_evals[-1], 'best_meta_eval_score': float(self.best_score),
              'implementation': getattr(self.family, 'implementation', None)}
    if unrolled:
      result.update(unrolled_steps_per_sec=unrolled / estimate_seconds,
                    samples_per_minute=60.0 * self.num_workers * (int(self.step) - first - 1) /
                    estimate_seconds)
    io_utils.atomic_write_json(os.path.join(self.train_dir, THROUGHPUT), result)
    plotting.outer_training(os.path.join(self.train_dir, 'summaries'),
                            os.path.join(self.train_dir, OUTER_TRAINING_PNG))
    return result

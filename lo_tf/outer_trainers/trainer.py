"""Outer-training of a learned optimizer (paper App. B, Algorithm 1; §3, §4.3, App. C.3).

S inner problems ("workers") are kept alive; each holds a task from the outer-train distribution,
its inner weights and learned-optimizer state. Every outer step, each worker runs one antithetic
truncation of k inner steps (k from the curriculum) from its carried inner state, giving one sample
of g_rp and g_es; the S samples are merged by eq. 1 and θ takes one Adam step (β1 = 0.5). A worker
whose inner training reaches T steps starts a new task with freshly initialized weights; a worker
whose sample is non-finite is dropped from the batch and restarted.

Everything needed to resume lives in a `tf.train.Checkpoint` in `train_dir`: θ, the outer
optimizer's slots, the outer step (which fixes the curriculum position), the RNG state and every
worker's inner state. TensorBoard summaries go to `train_dir/summaries`.
"""

import concurrent.futures
import functools
import glob
import json
import math
import os
import platform
import time

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from lo_tf import checkpoints
from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.errors import check_number
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.outer_trainers import estimators
from lo_tf.outer_trainers.curriculum import Curriculum
from lo_tf.outer_trainers.truncated import TruncatedStep
from lo_tf.tasks.distribution import OUTER_TEST
from lo_tf.tasks.distribution import OUTER_TRAIN

LOPT_CONFIG = 'lopt.json'
THROUGHPUT = 'throughput.json'
_DEFAULT_OUTER_LR = {'train': 3e-3, 'valid': 3e-4}  # App. C.3


@gin.configurable
class OuterTrainer:
  """Outer-trains θ of an `MLPLOpt` on an experiment's outer-train tasks.

  Args:
    experiment: `lo_tf.experiment.Experiment`; its trainer's num_steps is the inner-training
      length T and its batch_size the inner minibatch size.
    train_dir: checkpoints, summaries, lopt.json and throughput.json go here.
    lopt: the learned optimizer family (default `MLPLOpt()`, gin-configurable).
    objective: 'train' (L_train) or 'valid' (L_valid).
    estimator: 'merged' (eq. 1), 'rp' or 'es'.
    num_samples: S, antithetic samples (workers) per outer step (paper: 128).
    sigma: perturbation standard deviation (paper: σ² = 0.01).
    outer_learning_rate: Adam learning rate (None: 3e-3 for L_train, 3e-4 for L_valid).
    beta_1: Adam β1 (paper: 0.5).
    num_outer_steps: outer steps to train for (a resumed run continues up to this count).
    curriculum: `Curriculum` of truncation lengths (default: gin-configured `Curriculum()`).
    checkpoint_every: save a checkpoint every this many outer steps (and at the end).
    keep_checkpoints: checkpoints kept by the CheckpointManager.
    log_every: console progress every this many outer steps.
    seed: seeds θ's initialization and the outer RNG.
    parallel_samples: samples computed concurrently (threads; TF releases the GIL).
    meta_eval_every: every this many outer steps (and at the first and last), inner-train with the
      current θ for T steps on fixed outer-train and outer-test tasks and log the mean train loss
      and the final valid loss (the performance curves of Fig. 5b,c).
    meta_eval_tasks: tasks per split in that evaluation.
    jit_compile: XLA-compile each antithetic sample (see `TruncatedStep`).

  Raises:
    UserError: bad settings, or a checkpoint in train_dir that is corrupt or was written for a
      different learned-optimizer configuration.
  """

  def __init__(self, experiment, train_dir, lopt=None, objective='train', estimator='merged',
               num_samples=8, sigma=0.1, outer_learning_rate=None, beta_1=0.5,
               num_outer_steps=1000, curriculum=None, checkpoint_every=25, keep_checkpoints=3,
               log_every=10, seed=0, parallel_samples=2, jit_compile=False, meta_eval_every=50,
               meta_eval_tasks=2):
    if objective not in _DEFAULT_OUTER_LR:
      raise UserError(f'OuterTrainer.objective={objective!r}; use "train" or "valid"')
    if estimator not in estimators.ESTIMATORS:
      raise UserError(f'OuterTrainer.estimator={estimator!r}; use one of {estimators.ESTIMATORS}')
    for name, value in (('num_samples', num_samples), ('num_outer_steps', num_outer_steps),
                        ('checkpoint_every', checkpoint_every), ('log_every', log_every),
                        ('parallel_samples', parallel_samples), ('keep_checkpoints',
                                                                 keep_checkpoints),
                        ('meta_eval_every', meta_eval_every), ('meta_eval_tasks', meta_eval_tasks)):
      check_int('OuterTrainer', name, value)
    check_int('OuterTrainer', 'seed', seed, minimum=0)
    check_number('OuterTrainer', 'sigma', sigma, 0.0, low_open=True)
    check_number('OuterTrainer', 'beta_1', beta_1, 0.0, 1.0, high_open=True)
    if outer_learning_rate is not None:
      check_number('OuterTrainer', 'outer_learning_rate', outer_learning_rate, 0.0, low_open=True)
    self.exp = experiment
    self.train_dir = io_utils.ensure_writable_dir(train_dir)
    self.lopt = lopt or MLPLOpt()
    self.objective, self.estimator = objective, estimator
    self.num_samples, self.num_outer_steps = int(num_samples), int(num_outer_steps)
    self.curriculum = curriculum or Curriculum()
    self.checkpoint_every, self.log_every = int(checkpoint_every), int(log_every)
    self.parallel_samples = int(parallel_samples)
    self.meta_eval_every, self.meta_eval_tasks = int(meta_eval_every), int(meta_eval_tasks)
    self.num_inner_steps = experiment.trainer.num_steps
    # The XLA-compiled step helps plain inner training but not differentiated unrolls (measured:
    # 126 vs 161 unrolled steps/s), and cannot nest inside an XLA-compiled sample.
    family = self.lopt.optimizer
    self.truncated = TruncatedStep(
        experiment.problem, family, experiment.trainer.batch_size, objective=objective,
        sigma=sigma, with_rp=estimator != 'es',
        max_length=min(self.curriculum.max_length(), self.num_inner_steps),
        jit_compile=jit_compile)
    self.sigma = float(sigma)
    lr = outer_learning_rate or _DEFAULT_OUTER_LR[objective]
    self._metadata = {'lopt': self.lopt.config(), 'objective': objective, 'estimator': estimator,
                      'num_meta_params': self.lopt.num_meta_params,
                      'num_inner_params': experiment.problem.num_params,
                      'num_samples': self.num_samples}

    s = self.num_samples
    self.theta = tf.Variable(self.lopt.init_theta(tf.constant([seed, 0])), name='theta')
    self.outer_optimizer = keras.optimizers.Adam(learning_rate=lr, beta_1=beta_1)
    self.outer_optimizer.build([self.theta])
    self.step = tf.Variable(0, dtype=tf.int64, name='outer_step')
    self.wall_seconds = tf.Variable(0.0, dtype=tf.float64, name='wall_seconds')
    self.rng = tf.random.Generator.from_seed(seed)
    # Every worker's inner state (weights and optimizer state), one [S, ...] variable per leaf.
    params = experiment.problem.init(tf.constant([0, 0]))
    self._state_template = (params, self.lopt.optimizer(self.theta).init(params))
    self.inner_state = [tf.Variable(tf.zeros([s] + x.shape.as_list(), x.dtype))
                        for x in tf.nest.flatten(self._state_template)]
    self.inner_step = tf.Variable(tf.zeros([s], tf.int32), name='inner_step')
    self.task_seed = tf.Variable(-tf.ones([s], tf.int64), name='task_seed')  # -1: new task
    self.inner = {f'inner_state_{i}': v for i, v in enumerate(self.inner_state)}
    self.inner.update(inner_step=self.inner_step, task_seed=self.task_seed)
    self.checkpoint = tf.train.Checkpoint(theta=self.theta, outer_optimizer=self.outer_optimizer,
                                          step=self.step, wall_seconds=self.wall_seconds,
                                          rng=self.rng, **self.inner)
    self.manager = tf.train.CheckpointManager(self.checkpoint, self.train_dir,
                                              max_to_keep=keep_checkpoints)
    self._writer = tf.summary.create_file_writer(os.path.join(self.train_dir, 'summaries'))

  def restore_or_initialize(self):
    """Resumes from the latest checkpoint in train_dir, if any. Returns the outer step.

    Raises:
      UserError: if the checkpoint is unreadable, or train_dir was written with another
        learned-optimizer configuration.
    """
    config_path = os.path.join(self.train_dir, LOPT_CONFIG)
    latest = self.manager.latest_checkpoint
    leftovers = glob.glob(os.path.join(self.train_dir, 'ckpt-*.index'))
    if latest is None and (leftovers or os.path.exists(os.path.join(self.train_dir, 'checkpoint'))):
      # Never start over on top of checkpoints we cannot read: that would overwrite them.
      raise UserError(f'--train_dir {self.train_dir} holds checkpoint files but no readable '
                      "'checkpoint' index pointing at one; restore that file or use a fresh "
                      '--train_dir')
    if os.path.exists(config_path):
      try:
        with open(config_path) as f:
          saved = json.load(f)
        if not isinstance(saved, dict):
          raise ValueError('not a JSON object')
      except (OSError, ValueError) as e:
        raise UserError(f'{config_path} is unreadable ({e}); use a fresh --train_dir') from None
      mismatch = [k for k in self._metadata if saved.get(k) != self._metadata[k]]
      if mismatch and latest:
        raise UserError(f'--train_dir {self.train_dir} holds a run with a different {mismatch[0]} '
                        f'({saved.get(mismatch[0])!r} vs {self._metadata[mismatch[0]]!r}); use a '
                        'fresh --train_dir or the same configuration')
    if latest:
      checkpoints.verify_digest(latest)
      try:
        self.checkpoint.restore(latest).assert_existing_objects_matched()
      except Exception as e:  # TF raises DataLossError, NotFoundError, ValueError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f'checkpoint {latest} is corrupt or incompatible ({first}); delete '
                        f'{self.train_dir} or pass a fresh --train_dir') from None
      logging.info('resumed from %s at outer step %d', latest, int(self.step))
    io_utils.atomic_write_json(config_path, self._metadata)
    return int(self.step)

  def _worker_state(self, s):
    return tf.nest.pack_sequence_as(self._state_template, [v[s] for v in self.inner_state])

  def _set_worker_state(self, s, state):
    for var, value in zip(self.inner_state, tf.nest.flatten(state)):
      var[s].assign(value)

  def _reset_worker(self, s, task_seed):
    params = self.exp.problem.init(tf.constant([task_seed, 1], tf.int64))
    self._set_worker_state(s, (params, self.lopt.optimizer(self.theta).init(params)))
    self.inner_step[s].assign(0)
    self.task_seed[s].assign(task_seed)

  def _run_sample(self, s, length, noise_seed):
    task_seed = int(self.task_seed[s])
    task = self.exp.tasks.sample_task(OUTER_TRAIN, task_seed)
    params, opt_state = self._worker_state(s)
    out = self.truncated.sample(
        self.theta, params, opt_state, *task.data, self.inner_step[s], tf.constant(length),
        tf.constant([task_seed, 2], tf.int64), noise_seed)
    return tf.nest.map_structure(lambda x: x.numpy(), out)

  def outer_step(self, pool):
    """One outer-training step: S antithetic samples, eq. 1, one Adam update of θ.

    Returns:
      dict of scalar statistics of the step (for summaries and tests).
    """
    step = int(self.step)
    s_count = self.num_samples
    draws = self.rng.uniform_full_int([s_count, 3], tf.int64).numpy()
    jitter = self.rng.uniform([s_count]).numpy()
    lengths = []
    for s in range(s_count):
      if int(self.task_seed[s]) < 0 or int(self.inner_step[s]) >= self.num_inner_steps:
        self._reset_worker(s, int(draws[s, 2] % (2**31)))
      remaining = self.num_inner_steps - int(self.inner_step[s])
      lengths.append(min(self.curriculum.sample_length(step, jitter[s]), remaining))
    start = time.perf_counter()
    futures = [pool.submit(self._run_sample, s, lengths[s], tf.constant(draws[s, :2]))
               for s in range(s_count)]
    outs = [f.result() for f in futures]
    sample_seconds = time.perf_counter() - start
    finite = np.array([all(np.all(np.isfinite(x)) for x in tf.nest.flatten(o)) for o in outs])
    for s, o in enumerate(outs):
      if finite[s]:
        self._set_worker_state(s, o['state'])
        self.inner_step[s].assign(int(self.inner_step[s]) + lengths[s])
      else:
        self.task_seed[s].assign(-1)  # restart this worker on a new task
    grad, stats = estimators.combine(np.stack([o['g_rp'] for o in outs]),
                                     np.stack([o['g_es'] for o in outs]), finite, self.estimator)
    if grad is not None and np.all(np.isfinite(grad)):
      self.outer_optimizer.apply_gradients([(tf.constant(grad, tf.float32), self.theta)])
      stats['grad_norm'] = float(np.linalg.norm(grad))
    self.step.assign_add(1)
    used = [o for o, f in zip(outs, finite) if f]
    stats.update(
        outer_loss=float(np.mean([0.5 * (o['loss_pos'] + o['loss_neg']) for o in used]))
        if used else float('nan'),
        truncation_end_loss=float(np.mean([o['last_loss'] for o in used])) if used else float('nan'),
        unroll_length=float(np.mean(lengths)), dropped_samples=int((~finite).sum()),
        mean_step_size=float(np.mean([o['mean_step'] for o in used])) if used else float('nan'),
        theta_norm=float(tf.norm(self.theta)),
        rp_grad_norm=float(np.linalg.norm(np.mean([o['g_rp'] for o in used], 0))) if used else 0.0,
        es_grad_norm=float(np.linalg.norm(np.mean([o['g_es'] for o in used], 0))) if used else 0.0,
        sample_seconds=sample_seconds, unrolled_steps=2 * int(np.sum(lengths)))
    return stats

  def _write_summaries(self, stats, step_seconds):
    with self._writer.as_default(step=int(self.step)):
      for key, value in stats.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          tf.summary.scalar(key, value)
      tf.summary.scalar('seconds_per_outer_step', step_seconds)

  def meta_evaluate(self):
    """Inner-trains with the current θ on fixed tasks of both splits (Fig. 5b,c).

    Returns:
      {'<split>/mean_train_loss': mean minibatch train loss over the T steps (L_train over the whole
      inner training), '<split>/final_valid_loss': inner-valid loss after T steps}, averaged over
      `meta_eval_tasks` tasks (seeds 10**6 + i, disjoint from outer-training's task seeds' range).
    """
    out = {}
    for split in (OUTER_TRAIN, OUTER_TEST):
      mean_train, final_valid = [], []
      for i in range(self.meta_eval_tasks):
        task = self.exp.tasks.sample_task(split, 10**6 + i)
        curves = self.exp.trainer.train(self.lopt.optimizer, self.theta, task, seed=i)
        mean_train.append(np.mean(curves.train_loss) if not curves.diverged else np.inf)
        final_valid.append(curves.valid_loss[-1] if not curves.diverged else np.inf)
      out[f'{split}/mean_train_loss'] = float(np.mean(mean_train))
      out[f'{split}/final_valid_loss'] = float(np.mean(final_valid))
    return out

  def _log_meta_eval(self):
    result = self.meta_evaluate()
    with self._writer.as_default(step=int(self.step)):
      for key, value in result.items():
        if math.isfinite(value):
          tf.summary.scalar('meta_eval/' + key, value)
    logging.info('meta-eval at outer step %d: %s', int(self.step),
                 '  '.join(f'{k} {v:.4f}' for k, v in result.items()))
    return result

  def adam_steps_per_second(self, steps=200, repeats=3):
    """Plain Adam inner-training steps/s on this config's problem and batch size (in-graph)."""
    from lo_tf import speed  # pylint: disable=g-import-not-at-top
    from lo_tf.optimizers.hand_designed import Adam  # pylint: disable=g-import-not-at-top
    task = self.exp.tasks.sample_task(OUTER_TRAIN, 0)
    bs = self.exp.trainer.batch_size
    idx = np.arange(bs) % task.x_train.shape[0]
    x, y = tf.gather(task.x_train, idx), tf.gather(task.y_train, idx)
    loop = speed.make_train_loop(self.exp.problem, Adam, bs, steps)
    loop(tf.constant(1e-3), x, y).numpy()
    rates = []
    for _ in range(repeats):
      start = time.perf_counter()
      loop(tf.constant(1e-3), x, y).numpy()
      rates.append(steps / (time.perf_counter() - start))
    return float(np.median(rates))

  def _save(self, step):
    checkpoints.write_digest(self.manager.save(checkpoint_number=step))
    checkpoints.remove_stale_digests(self.train_dir)

  def _eta(self, step, unrolled_rate, step_rate):
    """Seconds left: the curriculum's remaining unrolled steps at the measured rate."""
    if not unrolled_rate:
      return (self.num_outer_steps - step) / max(step_rate, 1e-9)
    remaining = sum(2 * self.num_samples * min(self.curriculum.base_length(s), self.num_inner_steps)
                    for s in range(step, self.num_outer_steps))
    return remaining / unrolled_rate

  def train(self):
    """Outer-trains up to `num_outer_steps`, resuming from train_dir. Returns the throughput dict.

    Console progress (steps, rate, ETA) every `log_every` steps; a checkpoint every
    `checkpoint_every` steps; throughput.json (unrolled inner steps/s with both antithetic
    trajectories counted, outer-gradient samples/minute, and the plain-Adam steps/s of the same
    config) at the end.
    """
    with io_utils.DirectoryLock(self.train_dir):  # one run per train_dir at a time
      return self._train()

  def _train(self):
    first = self.restore_or_initialize()
    revision = git_revision()  # the code that runs now, not whatever is checked out at the end
    if first >= self.num_outer_steps:
      logging.info('already trained for %d outer steps', first)
    unrolled, sample_seconds, losses = 0, 0.0, []
    meta_evals = [self._log_meta_eval()] if first < self.num_outer_steps else []
    run_start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(self.parallel_samples) as pool:
      while int(self.step) < self.num_outer_steps:
        t0 = time.perf_counter()
        stats = self.outer_step(pool)
        step_seconds = time.perf_counter() - t0
        step = int(self.step)
        if step > first + 1:  # the first step includes tracing and XLA compilation
          unrolled += stats['unrolled_steps']
          sample_seconds += stats['sample_seconds']
        losses.append(stats['outer_loss'])
        self._write_summaries(stats, step_seconds)
        if step % self.checkpoint_every == 0 or step == self.num_outer_steps:
          self._save(step)
        if step % self.meta_eval_every == 0 or step == self.num_outer_steps:
          meta_evals.append(self._log_meta_eval())
        self.wall_seconds.assign_add(time.perf_counter() - t0)
        if step % self.log_every == 0 or step == self.num_outer_steps:
          rate = (step - first) / (time.perf_counter() - run_start)
          unrolled_rate = unrolled / max(sample_seconds, 1e-9)
          logging.info(
              'outer step %d/%d  L_%s %.4f  k %.0f  dropped %d  rp-weight %.2f  %.2f steps/s  '
              '%.0f unrolled steps/s  ETA %.0fs', step, self.num_outer_steps, self.objective,
              np.nanmean(losses[-self.log_every:]), stats['unroll_length'],
              stats['dropped_samples'], stats.get('rp_weight', float('nan')), rate,
              unrolled_rate, self._eta(step, unrolled_rate, rate))
    self._writer.flush()
    if self.manager.latest_checkpoint is None:
      self._save(int(self.step))
    result = {'outer_steps': int(self.step), 'outer_steps_this_run': int(self.step) - first,
              'wall_seconds_this_run': time.perf_counter() - run_start,
              'wall_seconds_total': float(self.wall_seconds), 'git_revision': revision,
              'machine': platform.processor() or platform.machine(),
              'cpu_count': os.cpu_count()}
    if unrolled:
      unrolled_rate = unrolled / sample_seconds
      adam_rate = self.adam_steps_per_second()
      result.update(
          unrolled_steps_per_sec=unrolled_rate,
          samples_per_minute=60.0 * self.num_samples * (int(self.step) - first - 1) / sample_seconds,
          adam_steps_per_sec=adam_rate, unrolled_over_adam=unrolled_rate / adam_rate,
          first_outer_loss=float(losses[0]), last_outer_loss=float(np.nanmean(losses[-10:])),
          meta_eval_first=meta_evals[0], meta_eval_last=meta_evals[-1])
      logging.info('throughput: %.1f unrolled inner steps/s (both antithetic trajectories), '
                   '%.1f samples/min; plain Adam %.1f steps/s; ratio %.3f',
                   unrolled_rate, result['samples_per_minute'], adam_rate,
                   result['unrolled_over_adam'])
      io_utils.atomic_write_json(os.path.join(self.train_dir, THROUGHPUT), result)
    return result


def git_revision():
  """The git revision of this lo_tf checkout, or "unknown"."""
  import subprocess  # pylint: disable=g-import-not-at-top
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def train_from_flags(gin_files, gin_bindings, train_dir, train_source=None, test_source=None,
                     seed=0):
  """`bin/train`: parses gin, builds the experiment and `OuterTrainer`, outer-trains.

  Raises:
    UserError: for bad gin configuration, sources, train_dir or checkpoints.
  """
  from lo_tf import cli  # pylint: disable=g-import-not-at-top
  from lo_tf.experiment import build_experiment  # pylint: disable=g-import-not-at-top
  extra = []
  if train_source:
    extra.append(f'TaskDistribution.train_source = {train_source!r}')
  if test_source:
    extra.append(f'TaskDistribution.test_source = {test_source!r}')
  cli.parse_gin(gin_files, gin_bindings, extra)
  io_utils.ensure_writable_dir(train_dir)
  trainer = cli.build(lambda: OuterTrainer(build_experiment(), train_dir, seed=seed))
  io_utils.atomic_write_bytes(os.path.join(train_dir, 'config.gin'), gin.config_str().encode())
  result = trainer.train()
  print(json.dumps(result, indent=2))
  print(f'throughput: {os.path.join(train_dir, THROUGHPUT)}')
  print(f'TensorBoard summaries: {os.path.join(train_dir, "summaries")} '
        f'(tensorboard --logdir {train_dir})')
  print(f'checkpoints: {train_dir}  (evaluate with bin/eval --checkpoint={train_dir})')
  return result

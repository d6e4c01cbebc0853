"""The outer-training loop (paper App. B, Algorithm 1; §4.3): bookkeeping around estimator + learner.

Each outer step is one batch of S samples from a sample source (`samples.LocalSamples`: every
slot's antithetic truncation in one graph execution; `distributed.ClusterSamples`: closures on
a parameter-server cluster) and one call of the learner (eq. 1 and an Adam step). Around them:
`run_checkpoints.RunCheckpoints` (resume, digests, the best-θ checkpoint), `monitoring`
(TensorBoard summaries, stalls), the meta-evaluation (`meta_eval.MetaEvaluator`), a tqdm progress
bar and the throughput record.

A run is a pure function of its configuration and seed: the estimator's randomness at outer step i
is seeded by (seed, i), and the checkpoint holds θ, Adam's slots, the outer step (hence the
curriculum position) and every slot's inner state, so a resumed run continues exactly where the
killed one was. Everything a step saves is a function of the outer step alone: at step i the
summaries are written, then the meta-evaluation runs when it is due (i = 0 on a fresh start, every
`meta_eval_every` steps, and at `num_outer_steps`) and may save `best/`, and only then is the
checkpoint of step i saved. A run resumed from ckpt-i therefore never repeats the meta-evaluation
of step i, and a kill at any moment costs the replay of some steps, after which the run saves
exactly what an uninterrupted one saves. A rerun of a finished run completes what a kill or a full
disk left undone after the last checkpoint (throughput.json, outer_training.png, temporary
directories).

The run's whole operative gin configuration is recorded in `operative_config.gin` and compared on
resume: a run resumed with another one is refused, except for the bindings in
`run_checkpoints.RESUMABLE`.
"""

import math
import os
import resource
import sys
import time

import gin
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging

from lo_tf import config
from lo_tf import io_utils
from lo_tf import plotting
from lo_tf import provenance
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.outer_trainers import monitoring
from lo_tf.outer_trainers.estimators import GradientEstimator
from lo_tf.outer_trainers.learner import OuterLearner
from lo_tf.outer_trainers.meta_eval import MetaEvaluator
from lo_tf.outer_trainers.run_checkpoints import RunCheckpoints
from lo_tf.outer_trainers.samples import LocalSamples
from lo_tf.outer_trainers.theta_init import ThetaInit

THROUGHPUT = 'throughput.json'
THETA_INIT = 'theta_init.json'
OUTER_TRAINING_PNG = 'outer_training.png'
META_EVAL_LOG = 'meta_eval.json'
# The throughput measured up to the last checkpoint: a rerun that trains no step (a kill after
# the final checkpoint) reports it instead of nothing.
MEASURED = 'measured_throughput.json'


# Passed by bin/train (--seed, --cluster) and by the studies: a gin binding of one is an error.
@gin.configurable(denylist=['experiment', 'train_dir', 'seed', 'sample_source'])
class OuterTrainer:
  """Outer-trains θ of a learned optimizer on an experiment's outer-train tasks (Algorithm 1).

  Its parts are gin-configured on their own: `TruncatedStep` (objective, meta-loss batches, loss
  clip), `GradientEstimator` (σ, mode), `Curriculum`, `OuterLearner` (outer learning rate, β1,
  clipping), `MLPLOpt` (the learned optimizer's features), `ThetaInit`; the family, θ0's rule and
  the estimator can also be passed in built.

  Args:
    experiment: `lo_tf.experiment.Experiment`: task distribution, inner problem and the inner
      trainer (its num_steps is T, its batch_size the inner minibatch).
    train_dir: checkpoints, summaries, lopt.json, throughput.json and outer_training.png go here.
    num_slots: S, slots (one antithetic sample each) per outer step (the paper's 128 workers).
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
      update, a zero merged gradient, or a change below `monitoring.MIN_RELATIVE_CHANGE`.
      Checkpoints are not saved during such a streak, so one from before a blow-up stays.
    seed: seeds θ's initialization and every outer step's randomness.
    family: the `LearnedOptimizerFamily` (default: gin-configured `MLPLOpt()`).
    theta_init: chooses θ at outer step 0 of a fresh run (default: gin-configured `ThetaInit()`);
      its record goes to train_dir/theta_init.json.
    estimator: the `GradientEstimator` (default: `GradientEstimator.for_experiment`).
    sample_source: where each outer step's batch of S samples comes from, called as
      `sample_source(estimator, num_slots, seed)` (`lo_tf.outer_trainers.samples`; default
      `LocalSamples`: all slots in this process; `distributed.ClusterSamples`: on a cluster).

  Raises:
    UserError: for bad settings.
  """

  def __init__(self, experiment, train_dir, num_slots=8, num_outer_steps=1000,
               checkpoint_every=25, keep_checkpoints=3, meta_eval_every=100, meta_eval_tasks=20,
               meta_eval_outer_test=True, max_unusable_steps=20, seed=0, family=None,
               theta_init=None, estimator=None, sample_source=None):
    own = dict(num_slots=num_slots, num_outer_steps=num_outer_steps,
               checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
               meta_eval_every=meta_eval_every, meta_eval_tasks=meta_eval_tasks,
               max_unusable_steps=max_unusable_steps)
    for name, value in own.items():
      check_int('OuterTrainer', name, value)
    self.seed = own['seed'] = check_int('OuterTrainer', 'seed', seed, minimum=0)
    self.exp, self.train_dir = experiment, train_dir
    self.num_slots, self.num_outer_steps = num_slots, num_outer_steps
    self.checkpoint_every, self.meta_eval_every = checkpoint_every, meta_eval_every
    self.max_unusable_steps = max_unusable_steps
    self.family = family or MLPLOpt()
    self.theta_init = theta_init or ThetaInit()
    self.estimator = estimator or GradientEstimator.for_experiment(experiment, self.family)
    objective = self.estimator.step.objective
    # The sample source decides where the slots' inner states, θ and Adam's moments live.
    self.sample_source = (sample_source or LocalSamples)(self.estimator, num_slots, self.seed)
    with self.sample_source.placement():
      self.learner = OuterLearner(self.family.init_theta(tf.constant([seed, 0])),
                                  self.estimator.merge, objective=objective)
    self.meta_eval = MetaEvaluator(experiment, self.family, objective, meta_eval_tasks,
                                   outer_test=meta_eval_outer_test)
    self.step = tf.Variable(0, dtype=tf.int64, name='outer_step')
    self.wall_seconds = tf.Variable(0.0, dtype=tf.float64, name='wall_seconds')
    self.best_score = tf.Variable(np.inf, dtype=tf.float64, name='best_meta_eval_score')
    self.metadata = {'lopt': self.family.config(), 'objective': objective,
                     'estimator': self.estimator.mode,
                     'num_meta_params': self.family.num_meta_params,
                     'num_inner_params': experiment.problem.num_params,
                     'num_slots': num_slots, 'num_inner_steps': experiment.trainer.num_steps,
                     # The rate in use (a default depends on the objective): a resume compares
                     # it even where a damaged operative_config.gin lacks its binding.
                     'outer_learning_rate': self.learner.learning_rate,
                     **self.sample_source.metadata()}
    trackables = dict(self.learner.trackables(), step=self.step, wall_seconds=self.wall_seconds,
                      best_score=self.best_score, **self.sample_source.trackables())
    values = {f'OuterTrainer.{k}': v for k, v in own.items()}
    values.update({f'{type(self.family).__name__}.{k}': v
                   for k, v in self.family.config().items()})
    self.run_config = config.operative_config_text(values)
    self.checkpoints = RunCheckpoints(train_dir, trackables, self.metadata, keep_checkpoints,
                                      self.run_config, best_theta=self.learner.evaluated_theta)
    self.summaries = None
    self._counted_until = None  # the moment up to which wall_seconds counts, within a step
    self._command = None
    monitoring.check_sane(self.learner.learning_rate, self.estimator.sigma)

  @property
  def theta(self):
    return self.learner.theta

  def outer_step(self):
    """One outer step: a batch of S samples (`self.sample_source`), then eq. 1 and one Adam step.

    Returns the step's scalars (the sample source's own ones included)."""
    out, source_stats = self.sample_source.batch(self.theta, self.step)
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
    result = self.meta_eval(self.learner.evaluated_theta)
    if self.learner.theta_average is not None:  # the iterate too: what the average changes
      result['iterate_selection_score'] = self.meta_eval(self.theta)['selection_score']
    self.summaries.write(step, result, prefix='meta_eval/')
    log[step] = result
    io_utils.atomic_write_json(os.path.join(self.train_dir, META_EVAL_LOG),
                               {str(k): v for k, v in sorted(log.items())})
    logging.info('meta-eval at outer step %d: %s', step,
                 '  '.join(f'{k} {v:.4f}' for k, v in result.items()))
    if result['selection_score'] < float(self.best_score):
      self.best_score.assign(result['selection_score'])
      self._count_time()
      self.checkpoints.save_best(step)
    return result

  def _count_time(self):
    """Adds the time of the current outer step so far to wall_seconds (a save then records the
    outer-training time up to and including its step; outside the steps, nothing is counted)."""
    if self._counted_until is not None:
      now = time.perf_counter()
      self.wall_seconds.assign_add(now - self._counted_until)
      self._counted_until = now

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

  def train(self, config_str=None, command=None):
    """Outer-trains up to `num_outer_steps`, resuming from train_dir. Returns the throughput dict.

    A rerun of a finished run whose final outputs are missing (a kill or a full disk after the
    last checkpoint) writes them.

    Args:
      config_str: the gin configuration text, saved as train_dir/config.gin once the lock is held
        and the checkpoint (if any) matched this configuration.
      command: the command line that runs this (bin/train's), recorded in throughput.json
        (`bin/export_optimizer` ships it).

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
      self._command = command
      return self._train(fresh=restored is None)

  def _initialize_theta(self):
    """θ0 of a fresh run by `theta_init`, recorded in train_dir/theta_init.json."""
    theta, record = self.theta_init(self.exp, self.family, self.meta_eval.objective, self.seed)
    source = record.get('checkpoint')
    if source and not os.path.relpath(os.path.realpath(source),
                                      os.path.realpath(self.train_dir)).startswith('..'):
      raise UserError(f'ThetaInit.checkpoint={record["source"]!r} lies in this run\'s own '
                      f'--train_dir {self.train_dir}; warm-start from another run')
    self.learner.theta.assign(theta)
    self.learner.reset_average()
    # A warm-started θ carries the outer-training time behind it (ThetaInit kind='checkpoint').
    self.wall_seconds.assign(record.get('wall_seconds') or 0.0)
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
    self.summaries = monitoring.Summaries(os.path.join(self.train_dir, 'summaries'), start)
    if fresh:
      self._meta_evaluate(first, log)
    stall = monitoring.Stall(self)
    bar = tqdm.tqdm(total=self.num_outer_steps, initial=first, unit='outer step',
                    file=sys.stderr, mininterval=5.0, dynamic_ncols=True)
    try:
      while int(self.step) < self.num_outer_steps:
        t0 = self._counted_until = time.perf_counter()
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
          if timing['steps']:
            io_utils.atomic_write_json(os.path.join(self.train_dir, MEASURED),
                                       self._rates(timing))
          self._count_time()
          self.checkpoints.save(step)
        self._count_time()
        bar.set_postfix_str(f'L {stats["outer_loss"]:.3f} k {stats["unroll_length"]:.0f} '
                            f'rp-weight {stats["rp_weight"]:.2f} '
                            f'{timing["unrolled"] / max(timing["seconds"], 1e-9):.0f} unrolled '
                            'steps/s', refresh=False)
        bar.update(1)
    finally:  # an error message then starts on a line of its own
      self._counted_until = None
      bar.close()
      self.summaries.flush()

  def _rates(self, timing):
    """The throughput of the timed steps: unrolled inner steps per second, samples per minute."""
    return {'unrolled_steps_per_sec': timing['unrolled'] / timing['seconds'],
            'samples_per_minute': 60.0 * self.num_slots * timing['steps'] / timing['seconds']}

  def _read_measured(self):
    """The rates measured up to the last checkpoint by an earlier process, or {} (none timed)."""
    path = os.path.join(self.train_dir, MEASURED)
    if not os.path.exists(path):
      return {}
    try:
      saved = io_utils.read_json(path, dict, 'measured throughput')
    except UserError:  # damaged: the rates are then unknown, nothing else depends on them
      return {}
    return {k: saved.get(k) for k in ('unrolled_steps_per_sec', 'samples_per_minute')}

  def _write_outputs(self, first, log, timing, run_start):
    """throughput.json and outer_training.png; returns the throughput record."""
    steps = sorted(log)
    result = {'outer_steps': int(self.step), 'outer_steps_this_run': int(self.step) - first,
              'wall_seconds_this_run': time.perf_counter() - run_start,
              'wall_seconds_total': float(self.wall_seconds), 'git_revision': provenance.git_revision(),
              'machine': provenance.machine(),
              'cpu_count': os.cpu_count(),
              'meta_eval_first': log[steps[0]] if steps else None,
              'meta_eval_last': log[steps[-1]] if steps else None,
              'best_meta_eval_score': float(self.best_score),
              'implementation': getattr(self.family, 'implementation', None),
              # The numerical path this process ran (issue 25: another path, another θ).
              'kernel_path': getattr(self.family, 'kernel_path', None),
              'onednn_max_cpu_isa': os.environ.get('ONEDNN_MAX_CPU_ISA'),
              'command': self._command}
    result.update(self._rates(timing) if timing['steps'] else self._read_measured())
    io_utils.atomic_write_json(os.path.join(self.train_dir, THROUGHPUT), result)
    plotting.outer_training(os.path.join(self.train_dir, 'summaries'),
                            os.path.join(self.train_dir, OUTER_TRAINING_PNG))
    return result

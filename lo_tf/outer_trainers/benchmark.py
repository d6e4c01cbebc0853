"""Outer-training throughput against plain inner training (paper App. B, App. F).

`outer_benchmark` times the gradient estimator at a fixed truncation length k (no curriculum, no
jitter, no first-truncation desynchronization) against plain in-graph Adam inner training of the
same problem with the same batch size and the same in-graph minibatch sampling, alternating the two
in one process and reporting medians over repeats, so slow drifts of a shared machine hit both.
Unrolled steps count both antithetic trajectories; the backward pass of g_rp is included.
"""

import resource
import time

import numpy as np
import tensorflow as tf
from absl import logging

from lo_tf.errors import check_int
from lo_tf.inner_training import inner_step
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.outer_trainers.curriculum import Curriculum
from lo_tf.outer_trainers.estimators import MergedEstimator
from lo_tf.outer_trainers.truncated_step import TruncatedStep


def _adam_loop(truncated_step, steps):
  """`steps` steps of Adam on one worker's task, minibatches drawn as the unroll draws them."""
  problem = truncated_step.problem

  @tf.function
  def run(state, seed):
    params = [p[:1] for p in state.params]
    opt = Adam(tf.constant([1e-3]))
    loss_fn = lambda p, x, y: problem.batched_loss(p, x, y, clip=truncated_step.loss_clip)

    def body(i, params, opt_state, _):
      x, y = truncated_step._batch(state.train_idx[:1],  # pylint: disable=protected-access
                                   tf.random.experimental.stateless_fold_in(seed, i),
                                   truncated_step.tasks.n_train, 1)
      loss, params, opt_state = inner_step(loss_fn, opt, params, opt_state, x[0], y[0])
      return i + 1, params, opt_state, loss[0]

    return tf.while_loop(lambda i, *_: i < steps, body,
                         (tf.constant(0), params, opt.init(params), tf.constant(0.0)),
                         parallel_iterations=1)[-1]

  return run


def outer_benchmark(experiment, family, num_workers, unroll_length, repeats=5):
  """Unrolled inner steps/s of the outer-gradient estimator vs plain Adam steps/s.

  Args:
    experiment: `lo_tf.experiment.Experiment` (task distribution, problem, T and batch size).
    family: the learned optimizer family (e.g. `MLPLOpt()`).
    num_workers: S, antithetic samples per outer step.
    unroll_length: k, inner steps per truncation (every worker runs exactly k).
    repeats: timed estimator calls and Adam runs, alternated (medians reported).

  Returns:
    {"num_samples", "unroll_length", "unrolled_steps_per_sec", "samples_per_sec",
    "adam_steps_per_sec", "unrolled_over_adam", "unrolled_over_adam_cpu" (the same ratio per
    second of this process's CPU time), "peak_rss_mb", "estimate_seconds" (every run),
    "adam_seconds", "first_call_seconds", "implementation"} — peak_rss_mb is the process's peak
    resident memory (MiB).
  """
  check_int('outer_benchmark', 'num_workers', num_workers)
  check_int('outer_benchmark', 'unroll_length', unroll_length)
  check_int('outer_benchmark', 'repeats', repeats)
  trainer = experiment.trainer
  step = TruncatedStep(experiment.tasks, experiment.problem, family,
                       max(trainer.num_steps, unroll_length), trainer.batch_size)
  estimator = MergedEstimator(step, Curriculum(unroll_length, unroll_length, 1, 0.0))
  theta = tf.Variable(family.init_theta(tf.constant([0, 0])))
  state, _ = tf.function(step.reset)(step.init_worker_state(num_workers),
                                     tf.constant([0, 0], tf.int64))
  # Workers mid-task: no reset and the full k (a reset's first truncation would be shorter).
  state = state._replace(inner_step=tf.ones_like(state.inner_step))
  outer_step = tf.constant(0, tf.int64)
  adam = _adam_loop(step, unroll_length)
  start = time.perf_counter()
  out, _ = estimator.estimate(theta, state, outer_step, tf.constant([0, 0], tf.int64))
  out.g_rp.numpy()
  first = time.perf_counter() - start
  adam(state, tf.constant([0, 0], tf.int64)).numpy()  # trace
  estimate_seconds, adam_seconds, estimate_cpu, adam_cpu = [], [], [], []
  for r in range(repeats):
    seed = tf.constant([1, r], tf.int64)
    start, cpu = time.perf_counter(), time.process_time()
    out, _ = estimator.estimate(theta, state, outer_step, seed)
    out.g_rp.numpy()
    estimate_seconds.append(time.perf_counter() - start)
    estimate_cpu.append(time.process_time() - cpu)
    start, cpu = time.perf_counter(), time.process_time()
    adam(state, seed).numpy()
    adam_seconds.append(time.perf_counter() - start)
    adam_cpu.append(time.process_time() - cpu)
    logging.info('repeat %d/%d: estimate %.2fs, adam %.2fs', r + 1, repeats,
                 estimate_seconds[-1], adam_seconds[-1])
  unrolled = 2 * num_workers * unroll_length / float(np.median(estimate_seconds))
  adam_rate = unroll_length / float(np.median(adam_seconds))
  # Per CPU-second of this process (all threads): robust to other processes on a shared machine.
  cpu_ratio = (2 * num_workers * float(np.median(adam_cpu)) / float(np.median(estimate_cpu)))
  return {'num_samples': num_workers, 'unroll_length': unroll_length,
          'unrolled_steps_per_sec': unrolled,
          'samples_per_sec': num_workers / float(np.median(estimate_seconds)),
          'adam_steps_per_sec': adam_rate, 'unrolled_over_adam': unrolled / adam_rate,
          'unrolled_over_adam_cpu': cpu_ratio,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
          'estimate_seconds': estimate_seconds, 'adam_seconds': adam_seconds,
          'first_call_seconds': first,
          'implementation': getattr(family, 'implementation', None)}

"""Outer-training throughput against plain inner training (paper App. B, App. F).

`benchmark` times the gradient estimator at a fixed truncation length k (no curriculum, no jitter,
no first-truncation desynchronization) against plain in-graph Adam inner training of the same
problem with the same batch size and the same in-graph minibatch sampling, the two alternated by
`harness.alternate`. Unrolled steps count both antithetic trajectories; the backward pass of g_rp
is included.
"""

import resource

import tensorflow as tf

from lo_tf.benchmarks import harness
from lo_tf.errors import check_int
from lo_tf.inner_training import train_steps
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.outer_trainers.curriculum import Curriculum
from lo_tf.outer_trainers.estimators import GradientEstimator
from lo_tf.outer_trainers.truncated_step import TruncatedStep


def _adam_loop(truncated_step, steps):
  """`steps` steps of Adam on one slot's task, minibatches drawn as the unroll draws them."""
  problem, tasks = truncated_step.problem, truncated_step.tasks

  @tf.function
  def run(state, seed):
    def minibatch(i):
      x, y = truncated_step.minibatches(state.train_idx[:1],
                                        tf.random.experimental.stateless_fold_in(seed, i),
                                        tasks.n_train, 1)
      return x[0], y[0]

    loss_fn = lambda p, x, y: problem.batched_loss(p, x, y, clip=truncated_step.loss_clip)[0]
    return train_steps(loss_fn, Adam(tf.constant([1e-3])), [p[:1] for p in state.params], steps,
                       minibatch)

  return run


def benchmark(experiment, family, num_slots, unroll_length, repeats=5):
  """Unrolled inner steps/s of the outer-gradient estimator vs plain Adam steps/s.

  Args:
    experiment: `lo_tf.experiment.Experiment` (task distribution, problem, T and batch size).
    family: the learned optimizer family (e.g. `MLPLOpt()`).
    num_slots: S, antithetic samples per outer step.
    unroll_length: k, inner steps per truncation (every slot runs exactly k).
    repeats: timed estimator calls and Adam runs, alternated (medians reported).

  Returns:
    {"num_samples", "unroll_length", "unrolled_steps_per_sec", "samples_per_sec",
    "adam_steps_per_sec", "unrolled_over_adam", "unrolled_over_adam_cpu" (the same ratio per
    second of this process's CPU time), "peak_rss_mb", "estimate_seconds" (every run),
    "adam_seconds", "first_call_seconds", "implementation"} — peak_rss_mb is the process's peak
    resident memory (MiB).
  """
  check_int('outer_benchmark', 'num_slots', num_slots)
  check_int('outer_benchmark', 'unroll_length', unroll_length)
  check_int('outer_benchmark', 'repeats', repeats)
  trainer = experiment.trainer
  step = TruncatedStep(experiment.tasks, experiment.problem, family,
                       max(trainer.num_steps, unroll_length), trainer.batch_size)
  estimator = GradientEstimator(step, Curriculum(unroll_length, unroll_length, 1, 0.0))
  theta = tf.Variable(family.init_theta(tf.constant([0, 0])))
  state, _ = tf.function(step.reset)(step.init_slot_state(num_slots),
                                     tf.constant([0, 0], tf.int64))
  # Slots mid-task: no reset and the full k (a reset's first truncation would be shorter).
  state = state._replace(inner_step=tf.ones_like(state.inner_step))
  outer_step, seed = tf.constant(0, tf.int64), tf.constant([1, 0], tf.int64)
  adam = _adam_loop(step, unroll_length)
  timings = harness.alternate({
      'estimate': lambda: estimator.estimate(theta, state, outer_step, seed)[0].g_rp.numpy(),
      'adam': lambda: adam(state, seed).numpy()}, repeats)
  unrolled = 2 * num_slots * unroll_length / timings.median_wall('estimate')
  adam_rate = unroll_length / timings.median_wall('adam')
  # Per CPU-second of this process (all threads): robust to other processes on a shared machine.
  cpu_ratio = 2 * num_slots * timings.median_cpu('adam') / timings.median_cpu('estimate')
  return {'num_samples': num_slots, 'unroll_length': unroll_length,
          'unrolled_steps_per_sec': unrolled,
          'samples_per_sec': num_slots / timings.median_wall('estimate'),
          'adam_steps_per_sec': adam_rate, 'unrolled_over_adam': unrolled / adam_rate,
          'unrolled_over_adam_cpu': cpu_ratio,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
          'estimate_seconds': timings.wall['estimate'], 'adam_seconds': timings.wall['adam'],
          'first_call_seconds': timings.first['estimate'],
          'implementation': getattr(family, 'implementation', None)}

"""Where an outer step's batch of S estimator samples comes from (paper App. B, Algorithm 1).

`OuterTrainer` asks a *sample source* for one batch per outer step and leaves everything else
(eq. 1 and the Adam step, checkpoints, summaries, meta-evaluation) to itself. A sample source is
built as `source(estimator, num_slots, seed)` and offers:

  slots: the nest of variables that holds every slot's inner state.
  placement(): a context manager under which θ and the outer optimizer's slots are created.
  trackables(): {name: trackable} the checkpoint must hold besides θ, Adam and the counters.
  metadata(): extra entries of the run configuration (lopt.json); a resume with others is refused.
  batch(theta, step): (`EstimatorOutput` of S samples, dict of extra float scalars for summaries).

`LocalSamples` (this module) runs all S slots in one graph execution in this process;
`lo_tf.outer_trainers.distributed.ClusterSamples` runs them as closures on the workers (tasks) of
a `tf.distribute` parameter-server cluster.
"""

import contextlib

import tensorflow as tf


class LocalSamples:
  """All S slots' samples from one `GradientEstimator.estimate` call in this process.

  Outer step i's estimate is seeded by (seed, i), so a run is a pure function of its
  configuration and seed.

  Args:
    estimator: `lo_tf.outer_trainers.estimators.GradientEstimator`.
    num_slots: S.
    seed: the run's seed (int >= 0).
  """

  def __init__(self, estimator, num_slots, seed):
    self.estimator, self.seed = estimator, seed
    self.slots = tf.nest.map_structure(tf.Variable, estimator.init_slot_state(num_slots))

  def placement(self):
    """θ and Adam's moment variables live in this process."""
    return contextlib.nullcontext()

  def trackables(self):
    return {'slots': tf.nest.flatten(self.slots)}

  def metadata(self):
    return {}

  def batch(self, theta, step):
    """Every slot's next truncation at θ; the slots carry their end states.

    Args:
      theta: the θ variable, float32 [P].
      step: the outer-step variable (int64), the curriculum position.

    Returns:
      (`EstimatorOutput` of S samples, {}).
    """
    seed = tf.constant([self.seed, int(step)], tf.int64)
    out, state = self.estimator.estimate(theta, tf.nest.map_structure(tf.identity, self.slots),
                                         step, seed)
    tf.nest.map_structure(lambda v, x: v.assign(x), self.slots, state)
    return out, {}

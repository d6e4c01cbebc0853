"""Curriculum over the number of inner steps per truncation (paper §4.3, App. C.3)."""

import gin
import tensorflow as tf

from lo_tf.errors import check_int
from lo_tf.errors import check_number


@gin.configurable
class Curriculum:
  """Unroll length k per truncation: linear from `start` to `end` over `num_outer_steps`.

  The paper grows k from 50 to 10,000 over 5,000 outer-training updates and jitters each length by
  a factor drawn uniformly from (1 - jitter, 1 + jitter) with jitter = 20% (App. C.3). A fixed
  length (the ablations of Fig. 7: 10, 100, 1000) is `start == end` with `jitter=0`.

  Args:
    start: k at outer step 0 (inner steps).
    end: k from outer step `num_outer_steps` on.
    num_outer_steps: outer steps over which k grows linearly.
    jitter: relative half-width of the uniform jitter.

  Raises:
    UserError: for non-positive lengths or a jitter outside [0, 1).
  """

  def __init__(self, start=50, end=10000, num_outer_steps=5000, jitter=0.2):
    self.start = check_int('Curriculum', 'start', start)
    self.end = check_int('Curriculum', 'end', end)
    self.num_outer_steps = check_int('Curriculum', 'num_outer_steps', num_outer_steps)
    self.jitter = check_number('Curriculum', 'jitter', jitter, 0.0, 1.0, high_open=True)

  def sample_lengths(self, outer_step, u):
    """The jittered k at `outer_step`: int32 (shape of u, each >= 1) for uniform draws u in [0, 1).

    k = round(base * (1 - jitter + 2 * jitter * u)), base linear from `start` to `end`.
    """
    frac = tf.clip_by_value(tf.cast(outer_step, tf.float32) / self.num_outer_steps, 0.0, 1.0)
    base = self.start + frac * (self.end - self.start)
    factor = 1.0 - self.jitter + 2.0 * self.jitter * u
    return tf.maximum(1, tf.cast(tf.round(base * factor), tf.int32))

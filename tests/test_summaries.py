"""TensorBoard summaries of outer-training: one value per step after a resume.
"""

import time

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import plugin_event_accumulator


# ------------------------------------------------------------------ TensorBoard after a resume


def _session_start(writer, step):
  """Marks a (re)start at `step` in `writer`'s event file: TensorBoard drops older events >= step.

  tf.summary has no public call for an Event that is not a Summary, so the Event proto goes in
  through the ImportEvent op on the writer's resource.
  """
  event = tf.compat.v1.Event(step=step, wall_time=time.time(), session_log=tf.compat.v1.SessionLog(
      status=tf.compat.v1.SessionLog.START))
  resource = writer._resource  # pylint: disable=protected-access
  tf.raw_ops.ImportEvent(writer=resource, event=event.SerializeToString())


def _write_run(logdir, steps, offset, start_marker):
  writer = tf.summary.create_file_writer(logdir)
  if start_marker:
    _session_start(writer, steps[0])
  with writer.as_default():
    for s in steps:
      tf.summary.scalar('outer_loss', s + offset, step=s)
  writer.close()


def _shown(logdir):
  """(step, value) of 'outer_loss' as TensorBoard's Python loader serves them."""
  acc = plugin_event_accumulator.EventAccumulator(logdir, size_guidance={'tensors': 0})
  acc.Reload()
  return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors('outer_loss')]


@pytest.mark.parametrize('start_marker', [False, True])
def test_tensorboard_shows_one_value_per_step_after_a_resume(tmp_path, start_marker):
  logdir = str(tmp_path / 'summaries')
  _write_run(logdir, list(range(1, 11)), 0.0, start_marker)  # killed after step 10
  time.sleep(1.1)  # event file names carry whole seconds; a resume comes later
  _write_run(logdir, list(range(7, 11)), 0.5, start_marker)  # resumed from the step-6 checkpoint
  shown = _shown(logdir)
  if start_marker:
    assert shown == [(s, s + (0.5 if s > 6 else 0.0)) for s in range(1, 11)]
  else:  # without the marker, steps 7..10 appear twice
    assert [s for s, _ in shown] == list(range(1, 11)) + list(range(7, 11))

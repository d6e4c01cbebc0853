"""The one timing harness of every benchmark: warm-up, alternated repeats, medians.

Each timed call runs once untimed first (tracing and warm-up), then all calls run `repeats` times
in a rotating order within one process, so slow drifts of a shared machine hit every call alike.
Each run's wall-clock and CPU time of this process (all threads; other processes on a shared machine
inflate it less) are recorded, and benchmarks report medians.
"""

import dataclasses
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from lo_tf import provenance
from lo_tf.errors import UserError

DEVICES = ('cpu', 'gpu')


@dataclasses.dataclass
class Timings:
  """Seconds of every run of each timed call, in the order they ran.

  Attributes:
    first: {name: seconds of the untimed first call (tracing included)}.
    wall: {name: [wall-clock seconds per repeat]}.
    cpu: {name: [CPU seconds of this process per repeat]}.
  """
  first: dict
  wall: dict
  cpu: dict

  def median_wall(self, name):
    return float(np.median(self.wall[name]))

  def median_cpu(self, name):
    return float(np.median(self.cpu[name]))


def alternate(calls, repeats):
  """Times `calls` ({name: callable returning once its work is done}) alternated `repeats` times.

  Returns:
    `Timings`.
  """
  first, wall, cpu = {}, {name: [] for name in calls}, {name: [] for name in calls}
  for name, call in calls.items():
    start = time.perf_counter()
    call()
    first[name] = time.perf_counter() - start
  order = list(calls)
  for r in range(repeats):
    for name in order:
      start, cpu_start = time.perf_counter(), time.process_time()
      calls[name]()
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - cpu_start)
    logging.info('repeat %d/%d: %s', r + 1, repeats,
                 ', '.join(f'{n} {1e3 * wall[n][-1]:.1f} ms' for n in calls))
    order = order[1:] + order[:1]
  return Timings(first=first, wall=wall, cpu=cpu)


def device_scope(device):
  """`tf.device` of 'cpu' or 'gpu' (its first GPU).

  Raises:
    UserError: for an unknown device, or 'gpu' where TensorFlow sees none.
  """
  if device not in DEVICES:
    raise UserError(f'device={device!r} is unknown; use cpu or gpu')
  if device == 'gpu' and not tf.config.list_physical_devices('GPU'):
    raise UserError('device=gpu but TensorFlow sees no GPU; install tensorflow[and-cuda] on a '
                    'GPU machine or use --device=cpu')
  return tf.device('/GPU:0' if device == 'gpu' else '/CPU:0')


def environment(device):
  """What every benchmark record says about where it ran: device, machine and CPU count."""
  return {'device': device, 'machine': provenance.machine(), 'cpu_count': os.cpu_count()}

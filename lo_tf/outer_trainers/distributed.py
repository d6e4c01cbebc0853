"""Asynchronous outer-training on a tf.distribute parameter-server cluster (paper §4.3, App. B).

The paper outer-trains "with asynchronous batched SGD using 128 CPU workers": each worker carries
its inner problem across truncations and sends (g_rp, g_es) samples; a central learner merges a
batch of S samples by eq. 1 and updates θ. `ClusterSamples` is that arrangement as a sample source
of `OuterTrainer` (`lo_tf.outer_trainers.samples`) on TensorFlow's own engine,
`tf.distribute.experimental.ParameterServerStrategy` with a `ClusterCoordinator`:

* θ, the outer optimizer's slots and the S inner states (*slots*) are variables on the parameter
  server(s). The S slots are split into G groups (`closures_per_step`, default one per cluster
  worker); a group's truncation is one closure that the coordinator runs on whichever worker is
  free. The closure gathers its slots' inner states from the parameter server, runs
  `GradientEstimator.estimate` on them and writes the end states back, and returns its
  `EstimatorOutput` (per-sample values, so the G outputs concatenate exactly into a batch of S).
  The chief applies an update whenever G outputs (S samples) have arrived. A closure whose worker
  dies is rerun elsewhere by the coordinator, or by the chief where the coordinator gives up on it
  while the parameter server still answers; the summaries count these (rescheduled_closures).
* Each slot's inner state is double-buffered: truncation j of a slot reads buffer j mod 2 and writes
  buffer (j + 1) mod 2, and the chief counts the truncations it received per slot. A closure that
  the coordinator reruns (its worker died mid-truncation) therefore reads the same state with the
  same seed and reproduces the lost output exactly; a half-written buffer is never read. A dead
  worker loses only its in-flight truncation, which another worker redoes.
* Asynchrony: a closure is computed at the θ of the moment it was scheduled; when it is used at
  update u its staleness is u minus that version. `may_schedule` lets a closure start only if,
  however the results then arrive, no in-flight one is used more than `max_staleness` updates
  later, so nothing is ever computed in vain. max_staleness = 0 is synchronous: with one worker
  and one closure per step the run is the single-process run (same seeds, same θ trajectory).
* Every task writes a manifest (its parsed gin configuration) before serving; the chief compares
  every worker's, at the start and inside every closure (a restarted worker is checked too), so a
  worker of another configuration is refused with a one-line error, never mixed in.

Checkpoints come from the chief as for one process, plus the per-slot truncation counters; a chief
killed and restarted resumes from its last checkpoint (checkpoints are taken between updates, when
no received output is pending).
"""

import json
import os
import queue
import re
import threading
import time

import gin
import numpy as np
import tensorflow as tf
from absl import logging
# TensorFlow counts the closures it reruns after a worker failure but offers no public reader.
# pylint: disable-next=g-direct-tensorflow-import
from tensorflow.python.distribute.coordinator import metric_utils

from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.errors import check_number
from lo_tf.outer_trainers.estimators import concat_outputs

# What a lost worker can surface as in a closure that the coordinator did not rerun itself.
_WORKER_LOSS = (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError)
MAX_RECOVERIES = 20  # failures in a row, with no closure finishing, before giving up
_LIVENESS_S = 1.0  # how often a chief waiting for closures checks that a worker is left
MISMATCH = "lo_tf: a worker's configuration differs from the chief's"
SAMPLE_SOURCE = 'cluster'


def may_schedule(version, buffered, in_flight, groups, max_staleness):
  """Whether one more closure may start now without any in-flight one getting too stale.

  Updates use `groups` outputs each, in arrival order. In the worst case every other closure
  arrives before a given one, so with `buffered` outputs waiting and `len(in_flight)` other
  closures out, the last to arrive is used at update version + (buffered + len(in_flight)) //
  groups; that must not exceed the oldest in-flight version (or this one) + max_staleness.

  Args:
    version: the current θ version (updates applied so far), at which the new closure would run.
    buffered: outputs received and not yet used (< groups).
    in_flight: θ versions of the closures scheduled and not yet received.
    groups: outputs per update (G).
    max_staleness: the bound (>= 0).

  Returns:
    bool. With nothing in flight it is always True, so training never stalls.
  """
  worst = version + (buffered + len(in_flight)) // groups
  return worst <= min(list(in_flight) + [version]) + max_staleness


def _worker_failures():
  """Closures ClusterCoordinator put back after their worker failed, so far in this process."""
  try:
    return int(metric_utils.get_metric_summary('worker_failures'))
  except KeyError:  # its metrics are set up with the first closure
    return 0


def task_manifest():
  """What every task of a cluster must share: the parsed gin configuration (JSON text)."""
  return json.dumps({'gin': gin.config_str()}, sort_keys=True)


def manifest_path(task_dir, job, index, address):
  """Where task `job:index` (serving at host:port `address`) writes its manifest."""
  return os.path.join(task_dir, f'lo_tf-{job}-{index}-{re.sub(r"[^A-Za-z0-9.-]", "_", address)}'
                                '.json')


def worker_manifest_paths(cluster_spec, task_dir):
  """Manifest paths of the workers of a `tf.train.ClusterSpec`, by worker index."""
  return [manifest_path(task_dir, 'worker', i, address)
          for i, address in enumerate(cluster_spec.job_tasks('worker'))]


def _difference(worker_text, chief_text):
  """The first gin binding one side has and the other has not, for the error message."""
  def lines(text):
    try:
      return [l for l in json.loads(text)['gin'].splitlines() if l and not l.startswith('#')]
    except (ValueError, KeyError, TypeError):
      return ['(an unreadable manifest)']
  worker, chief = lines(worker_text), lines(chief_text)
  extra = [l for l in worker if l not in chief]
  if extra:
    return f'the worker has {extra[0].strip()!r}'
  return f'the worker lacks {[l for l in chief if l not in worker][0].strip()!r}'


def check_workers(paths, manifest):
  """Reads each worker's manifest on that worker and compares it with the chief's.

  Args:
    paths: manifest path per worker index (`worker_manifest_paths`), on the workers' hosts.
    manifest: the chief's `task_manifest()`.

  Raises:
    UserError: naming the first worker whose manifest is missing or differs, and the first binding
      that differs.
  """
  for i, path in enumerate(paths):
    with tf.device(f'/job:worker/replica:0/task:{i}/device:CPU:0'):
      try:
        text = tf.io.read_file(path).numpy().decode()
      except tf.errors.NotFoundError:
        raise UserError(f'worker {i} has no lo_tf manifest {path}; start every task with bin/train '
                        '--cluster=tf_config and the same flags as the chief') from None
    if text != manifest:
      raise UserError(f'worker {i} runs another configuration than the chief '
                      f'({_difference(text, manifest)}); start every task with the same '
                      '--gin_file/--gin_bindings')


@gin.configurable(denylist=['coordinator', 'estimator', 'num_slots', 'seed', 'manifest',
                            'manifest_paths', 'cluster_workers', 'lost_workers'])
class ClusterSamples:
  """Batches of S samples from closures on a parameter-server cluster (see the module docstring).

  Args:
    coordinator: a `tf.distribute.coordinator.ClusterCoordinator` of a ParameterServerStrategy
      (θ, Adam's slots and the inner states are created under its strategy's scope).
    estimator: `lo_tf.outer_trainers.estimators.GradientEstimator`.
    num_slots: S, slots (samples per update).
    seed: the run's seed; slot group starting at slot f seeds its j-th truncation by
      (seed, j + f * 2^32), so with one group truncation j is seeded as the single-process step j.
    manifest: the chief's `task_manifest()`, checked inside every closure (None: no check).
    manifest_paths: manifest path per worker index (with `manifest`).
    cluster_workers: workers in the cluster (the default of closures_per_step).
    closures_per_step: G, closures per update; must divide S (None: one per cluster worker).
    max_staleness: the most updates a sample's θ may lag the θ it updates (0: synchronous).
    closure_timeout_s: stop with an error when no closure finishes for this long.
    lost_workers: a callable giving a description of each cluster worker known to be gone for
      good (a local cluster's exited tasks), or None (unknown: closure_timeout_s bounds the wait).
      When every worker is gone the run stops with an error instead of waiting for one.

  Raises:
    UserError: for bad settings.
  """

  def __init__(self, coordinator, estimator, num_slots, seed, manifest=None, manifest_paths=(),
               cluster_workers=1, closures_per_step=None, max_staleness=0,
               closure_timeout_s=1800.0, lost_workers=None):
    groups = check_int('ClusterSamples', 'closures_per_step',
                       cluster_workers if closures_per_step is None else closures_per_step)
    if num_slots % groups:
      raise UserError(f'OuterTrainer.num_slots={num_slots} is not a multiple of '
                      f'{groups} closures per step; set ClusterSamples.closures_per_step to a '
                      'divisor of it')
    self.max_staleness = check_int('ClusterSamples', 'max_staleness', max_staleness, minimum=0)
    self.closure_timeout_s = check_number('ClusterSamples', 'closure_timeout_s',
                                          closure_timeout_s, 0.0, low_open=True)
    self.coordinator, self.estimator, self.seed = coordinator, estimator, seed
    self.num_slots, self.groups = num_slots, groups
    size = num_slots // groups
    self._group_slots = [np.arange(g * size, (g + 1) * size, dtype=np.int32) for g in range(groups)]
    self._manifest = manifest
    self._cluster_workers, self._lost_workers = cluster_workers, lost_workers
    self._paths = tf.constant(list(manifest_paths) or [''])
    with self.placement():
      # Row p * S + s holds slot s's inner state in buffer p.
      self.slots = tf.nest.map_structure(tf.Variable,
                                           estimator.init_slot_state(2 * num_slots))
    self.truncations = tf.Variable(tf.zeros([num_slots], tf.int64), name='truncations')
    self._closure = tf.function(self._truncation)
    self._results = queue.SimpleQueue()  # (ticket, output or exception) from the fetch threads
    self._in_flight = {}  # ticket -> (group, θ version, the closure's arguments)
    self._idle = set(range(groups))
    self._buffer = []  # (group, θ version, output) received, not yet used
    self._counts = None  # numpy mirror of truncations (read after the restore)
    self._tickets = 0
    self._failures = _worker_failures()
    self.rescheduled = 0  # closures rerun after a worker failure, in this run
    self._rerun = 0  # of which rerun by `_recover` rather than by the coordinator
    self._recoveries = 0  # failures since a closure last finished

  def placement(self):
    """θ, Adam's slots and the inner states live on the parameter server(s)."""
    return self.coordinator.strategy.scope()

  def trackables(self):
    return {'slots': tf.nest.flatten(self.slots), 'truncations': self.truncations}

  def metadata(self):
    return {'sample_source': SAMPLE_SOURCE}

  def _truncation(self, theta, slots, parity, version, seed):
    """One closure on a worker: its slots' next truncation at θ (runs in the graph).

    Args:
      theta: float32 [P], θ at `version`.
      slots: int32 [s], the group's slots.
      parity: int32 [s], the buffer each slot reads (its truncation count mod 2).
      version: int64, the θ version (the curriculum position).
      seed: int64 [2].

    Returns:
      `EstimatorOutput` of s samples.
    """
    checks = []
    if self._manifest is not None:
      worker = tf.distribute.coordinator.experimental_get_current_worker_index()
      here = tf.gather(self._paths, worker)
      checks.append(tf.debugging.Assert(tf.equal(tf.io.read_file(here), self._manifest),
                                        [MISMATCH]))
    with tf.control_dependencies(checks):
      theta = tf.identity(theta)
    n = self.num_slots
    state = tf.nest.map_structure(lambda v: tf.gather(v, parity * n + slots), self.slots)
    out, end = self.estimator.estimate(theta, state, version, seed)
    for v, x in zip(tf.nest.flatten(self.slots), tf.nest.flatten(end)):
      v.scatter_update(tf.IndexedSlices(x, (1 - parity) * n + slots))
    return out

  def _launch(self, group, theta, version):
    slots = self._group_slots[group]
    counts = self._counts[slots]
    seed = tf.constant([self.seed, int(counts[0]) + (int(slots[0]) << 32)], tf.int64)
    args = (theta, tf.constant(slots), tf.constant(counts % 2, tf.int32),
            tf.constant(version, tf.int64), seed)
    self._idle.remove(group)
    self._start(group, version, args)

  def _start(self, group, version, args):
    """Schedules a group's closure and a thread that fetches its output."""
    while True:
      try:
        remote = self.coordinator.schedule(self._closure, args=args)
        break
      except _WORKER_LOSS as e:  # the coordinator re-raises a failure once, at the next schedule
        self._recover(e)
    ticket = self._tickets = self._tickets + 1
    self._in_flight[ticket] = (group, version, args)
    threading.Thread(target=self._fetch, args=(ticket, remote), daemon=True,
                     name=f'lo_tf-fetch-{ticket}').start()

  def _recover(self, error):
    """Takes a closure's failure for a lost worker if the parameter server still answers.

    ClusterCoordinator reruns a dead worker's closure by itself, except when its cluster update
    after the death fails (the dead worker is not back): then the error of that update reaches
    the closures of the live workers too. Their inputs and seeds are unchanged and they read the
    buffer they read before, so rerunning them reproduces their outputs exactly.

    Raises:
      UserError: every worker is known to be lost.
      tf.errors.OpError: from the parameter server when it is gone, or `error` after
        MAX_RECOVERIES failures without a closure finishing.
    """
    self._check_a_worker_is_left()
    self._recoveries += 1
    if self._recoveries > MAX_RECOVERIES:
      raise error
    self.slots.inner_step.read_value()  # raises UnavailableError if the parameter server is gone
    self._rerun += 1
    logging.warning('a closure failed with %s; the parameter server answers, so it is taken for a '
                    'lost worker and the closure is rerun', type(error).__name__)

  def _fetch(self, ticket, remote):
    # Daemon threads: one still waiting for a closure abandoned at exit does not hold the process.
    try:
      self._results.put((ticket, remote.fetch()))
    except Exception as e:  # pylint: disable=broad-except  (re-raised in the chief's thread)
      self._results.put((ticket, e))

  def _check_a_worker_is_left(self):
    """Raises UserError, naming them, when every worker of the cluster is known to be lost."""
    lost = self._lost_workers() if self._lost_workers else []
    if len(lost) >= self._cluster_workers:
      # ClusterCoordinator waits for a lost worker to come back; none of these will.
      raise UserError(f'lost every worker of the cluster ({"; ".join(lost)}): no closure can '
                      'run; re-run the same command: training resumes from the last checkpoint')

  def _next_result(self):
    """(ticket, output or exception) of the next closure to finish.

    Raises:
      UserError: every worker is lost (checked every `_LIVENESS_S`), or no closure finished in
        closure_timeout_s.
    """
    deadline = time.monotonic() + self.closure_timeout_s
    while True:
      try:
        return self._results.get(timeout=max(0.0, min(_LIVENESS_S, deadline - time.monotonic())))
      except queue.Empty:
        pass
      self._check_a_worker_is_left()
      if time.monotonic() >= deadline:
        raise UserError(f'no closure finished in {self.closure_timeout_s:g} s; check that the '
                        'cluster\'s workers run, or raise ClusterSamples.closure_timeout_s')

  def _receive(self):
    """Waits for the next closure to finish and books its output."""
    ticket, value = self._next_result()
    group, version, args = self._in_flight.pop(ticket)
    if isinstance(value, (tf.errors.InvalidArgumentError, tf.errors.NotFoundError)) and (
        self._manifest is not None):
      check_workers([p.decode() for p in self._paths.numpy()], self._manifest)
    if isinstance(value, _WORKER_LOSS):
      self._recover(value)
      self._start(group, version, args)
      return
    if isinstance(value, Exception):
      raise value
    self._recoveries = 0
    self._counts[self._group_slots[group]] += 1
    self.truncations.assign(self._counts)
    self._buffer.append((group, version, value))
    self._idle.add(group)

  def batch(self, theta, step):
    """Collects S samples (G closure outputs), scheduling idle groups at the current θ.

    Args:
      theta: the θ variable (on a parameter server).
      step: the outer-step variable: θ's version, the number of updates applied.

    Returns:
      (`EstimatorOutput` of S samples ordered by slot, dict: staleness_mean, staleness_max (in
      updates), rescheduled_closures (closures the coordinator put back for another worker after
      theirs failed, since the previous batch), closure_wait_seconds (the chief's time waiting
      for closures)).

    Raises:
      UserError: a worker of another configuration, every worker lost, or no closure finished in
        closure_timeout_s.
      tf.errors.OpError: from the cluster, e.g. UnavailableError when a parameter server is gone.
    """
    if self._counts is None:  # after the checkpoint (if any) was restored
      self._counts = self.truncations.numpy()
    version = int(step)
    current = theta.read_value()  # θ at this version, for every closure scheduled now
    waited = 0.0
    while len(self._buffer) < self.groups:
      for group in sorted(self._idle):
        if not may_schedule(version, len(self._buffer),
                            [v for _, v, _ in self._in_flight.values()], self.groups,
                            self.max_staleness):
          break
        self._launch(group, current, version)
      t0 = time.perf_counter()
      self._receive()
      waited += time.perf_counter() - t0
    used = sorted(self._buffer, key=lambda r: (int(self._group_slots[r[0]][0]), r[1]))
    self._buffer = []
    staleness = [version - v for _, v, _ in used]
    failures = _worker_failures() + self._rerun
    rescheduled, self._failures = failures - self._failures, failures
    if rescheduled:
      self.rescheduled += rescheduled
      logging.warning('%d closure(s) rescheduled on other workers after a worker failed (%d in '
                      'this run)', rescheduled, self.rescheduled)
    return concat_outputs([r[2] for r in used]), {
        'staleness_mean': float(np.mean(staleness)), 'staleness_max': float(max(staleness)),
        'rescheduled_closures': float(rescheduled), 'closure_wait_seconds': waited}

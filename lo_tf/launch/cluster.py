"""`bin/train --cluster`: the tasks of a parameter-server cluster and the chief's connection.

Every task of a cluster runs the same `bin/train` command with `--cluster=tf_config` and its own
`TF_CONFIG` (TensorFlow's cluster description): a `ps` or `worker` task writes its manifest
(`distributed.task_manifest`) and serves a `tf.distribute.Server`; the `chief` connects a
`ParameterServerStrategy` and outer-trains (`lo_tf.outer_trainers.distributed.ClusterSamples`).

`--cluster=local:N` is that same procedure on one machine: `LocalCluster` starts 1 parameter server
and N workers as `bin/train --cluster=tf_config` subprocesses on free 127.0.0.1 ports and the chief
in this process, and stops them on every way out (a normal end, an error, Ctrl-C, SIGTERM); the
tasks also stop on their own once the chief is gone (kill -9).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import tensorflow as tf
from absl import logging

from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.kernels import ops
from lo_tf.outer_trainers import distributed

LOCAL = 'local'
TF_CONFIG = 'tf_config'
# Set by LocalCluster for its tasks: the chief's pid (a task stops once it is gone) and the
# directory of the manifests.
PARENT_PID_ENV = 'LO_TF_PARENT_PID'
TASK_DIR_ENV = 'LO_TF_TASK_DIR'
_STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long


def parse(value):
  """Parses --cluster: '' or None (one process), 'tf_config', or 'local:N' with N >= 1.

  Returns:
    None, (TF_CONFIG, None) or (LOCAL, N).

  Raises:
    UserError: for anything else.
  """
  if not value:
    return None
  if value == TF_CONFIG:
    return TF_CONFIG, None
  kind, _, count = value.partition(':')
  if kind == LOCAL and count.isdigit() and int(count) >= 1:
    return LOCAL, int(count)
  raise UserError(f'--cluster={value!r}; use local:N (N >= 1 workers on this machine) or '
                  'tf_config (the cluster in $TF_CONFIG)')


def task_dir():
  """The directory of this host's task manifests ($LO_TF_TASK_DIR, else the temp directory)."""
  return os.environ.get(TASK_DIR_ENV) or tempfile.gettempdir()


def tf_config_resolver():
  """The `TFConfigClusterResolver` of $TF_CONFIG, checked for a ps/worker/chief cluster.

  Raises:
    UserError: TF_CONFIG unset or unreadable, or without a chief, a ps and a worker job.
  """
  if not os.environ.get('TF_CONFIG'):
    raise UserError('--cluster=tf_config but $TF_CONFIG is not set; set it on every task (see the '
                    'README) or use --cluster=local:N')
  try:
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    jobs = resolver.cluster_spec().as_dict()
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'$TF_CONFIG cannot be read ({e}); set it to the JSON of the README') from None
  missing = [job for job in ('chief', 'ps', 'worker') if not jobs.get(job)]
  if missing or resolver.task_type not in jobs:
    raise UserError(f'$TF_CONFIG needs chief, ps and worker jobs and this task among them (no '
                    f'{(missing or [resolver.task_type])[0]!r}); fix TF_CONFIG')
  resolver.rpc_layer = resolver.rpc_layer or 'grpc'
  return resolver


def serve(resolver, manifest, intra_op_threads=0):
  """Runs this ps or worker task: writes its manifest, then serves until stopped.

  A task of a `LocalCluster` returns once its chief is gone (removing the cluster's temporary
  directory); otherwise it serves until killed (SIGTERM, Ctrl-C).

  Args:
    resolver: the task's cluster resolver (task_type 'ps' or 'worker').
    manifest: `distributed.task_manifest()` of this task's configuration.
    intra_op_threads: threads per op (0: TensorFlow's default).
  """
  job, index = resolver.task_type, resolver.task_id
  spec = resolver.cluster_spec()
  address = spec.task_address(job, index)
  # Written before the server answers, so that the chief never reads a stale one.
  path = distributed.manifest_path(task_dir(), job, index, address)
  io_utils.ensure_writable_dir(os.path.dirname(path))
  io_utils.atomic_write_bytes(path, manifest.encode())
  # The chief's functions may hold the fused op (MLPLOpt.implementation 'auto'/'custom_op'); a task
  # runs them only if its process has registered the op before serving.
  ops.available()
  config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_op_threads)
  tf.distribute.Server(spec, job_name=job, task_index=index, protocol=resolver.rpc_layer,
                       config=config, start=True)
  logging.info('%s %d serving at %s', job, index, address)
  parent = os.environ.get(PARENT_PID_ENV)
  while parent is None or os.getppid() == int(parent):
    time.sleep(0.5)
  # The local cluster's chief was killed: remove the temporary directory it could not.
  shutil.rmtree(task_dir(), ignore_errors=True)


def connect(resolver):
  """Connects the chief to the cluster; returns its `ClusterCoordinator`."""
  strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
  return tf.distribute.coordinator.ClusterCoordinator(strategy)


def free_ports(count):
  """`count` distinct free TCP ports of 127.0.0.1 (held together while chosen)."""
  socks = [socket.socket() for _ in range(count)]
  try:
    for s in socks:
      s.bind(('127.0.0.1', 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def _interrupt(signum, frame):  # pylint: disable=unused-argument
  raise KeyboardInterrupt


class LocalCluster:
  """1 parameter server and N workers on 127.0.0.1 as subprocesses; a context manager.

  Each task runs `task_command` (bin/train with the chief's flags and --cluster=tf_config) with its
  TF_CONFIG, in its own session (so a Ctrl-C at the terminal reaches the chief only), its output in
  a log file of the cluster's temporary directory. Leaving the `with` block stops every task
  (SIGTERM, SIGKILL after 10 s) and removes that directory; SIGTERM to the chief is turned into
  KeyboardInterrupt meanwhile so that this happens on it too. A task that exits while the cluster
  runs is logged; one that exits before `connected()` (it could not start) stops the chief with a
  one-line error and exit status 2, since the chief would wait for it.

  Attributes (inside the block):
    resolver: the chief's `SimpleClusterResolver`.
    task_dir: the directory of the tasks' manifests.

  Args:
    num_workers: N.
    task_command: argv of a task, without TF_CONFIG.
  """

  def __init__(self, num_workers, task_command):
    self.num_workers, self.task_command = num_workers, list(task_command)
    self._procs, self._exited = {}, set()
    self._stopping, self._connected = threading.Event(), threading.Event()
    self.resolver = self.task_dir = self._monitor = self._old_sigterm = None

  def __enter__(self):
    self._old_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
      self.task_dir = tempfile.mkdtemp(prefix='lo_tf-cluster-')
      ports = free_ports(self.num_workers + 2)
      spec = {'chief': [f'127.0.0.1:{ports[0]}'], 'ps': [f'127.0.0.1:{ports[1]}'],
              'worker': [f'127.0.0.1:{p}' for p in ports[2:]]}
      for job in ('ps', 'worker'):
        for index in range(len(spec[job])):
          self._start(spec, job, index)
      self.resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
          tf.train.ClusterSpec(spec), task_type='chief', task_id=0, rpc_layer='grpc')
      self._monitor = threading.Thread(target=self._watch, name='lo_tf-local-cluster',
                                       daemon=True)
      self._monitor.start()
    except BaseException:
      self._stop()
      raise
    logging.info('local cluster: ps at %s, workers at %s (task logs in %s)', spec['ps'][0],
                 ', '.join(spec['worker']), self.task_dir)
    return self

  def __exit__(self, *exc):
    self._stop()

  def _start(self, spec, job, index):
    env = dict(os.environ, TF_CONFIG=json.dumps({'cluster': spec,
                                                 'task': {'type': job, 'index': index}}),
               **{PARENT_PID_ENV: str(os.getpid()), TASK_DIR_ENV: self.task_dir})
    with open(os.path.join(self.task_dir, f'{job}-{index}.log'), 'wb') as log:
      self._procs[(job, index)] = subprocess.Popen(
          self.task_command, env=env, stdin=subprocess.DEVNULL, stdout=log,
          stderr=subprocess.STDOUT, start_new_session=True)

  def lost_workers(self):
    """'worker I (pid P) exited with status S' for each worker task that has exited."""
    return [f'worker {index} (pid {proc.pid}) exited with status {proc.returncode}'
            for (job, index), proc in sorted(self._procs.items())
            if job == 'worker' and proc.poll() is not None]

  def connected(self):
    """Marks the chief connected: from now on a task's exit is TensorFlow's to handle."""
    self._connected.set()

  def _last_line(self, job, index):
    try:
      with open(os.path.join(self.task_dir, f'{job}-{index}.log'), 'rb') as f:
        lines = [l for l in f.read().decode(errors='replace').splitlines() if l.strip()]
      return lines[-1].strip() if lines else '(no output)'
    except OSError:
      return '(no log)'

  def _watch(self):
    while not self._stopping.wait(0.5):
      for (job, index), proc in list(self._procs.items()):
        if proc.poll() is None or (job, index) in self._exited:
          continue
        self._exited.add((job, index))
        what = f'{job} {index} (pid {proc.pid}) exited with status {proc.returncode}'
        if not self._connected.is_set():
          # The chief is blocked connecting to this task and would wait for it for minutes.
          print(f'error: the local cluster\'s {what} before the chief connected: '
                f'{self._last_line(job, index)}', file=sys.stderr, flush=True)
          for other in self._procs.values():
            _kill_group(other, signal.SIGKILL)
          shutil.rmtree(self.task_dir, ignore_errors=True)
          os._exit(2)
        if job == 'worker':
          left = self.num_workers - len(self.lost_workers())
          logging.warning('local cluster: %s; %s', what,
                          f'its closures go to the other {left} worker(s)' if left else
                          'no worker is left: the chief stops')
        else:
          logging.error('local cluster: %s; the chief stops at its next access to it', what)

  def _stop(self):
    """Stops every task (SIGTERM, then SIGKILL) and removes the task directory."""
    self._stopping.set()
    if self._monitor is not None:
      self._monitor.join()
    for proc in self._procs.values():
      _kill_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for proc in self._procs.values():
      try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        proc.wait()
    if self.task_dir:
      shutil.rmtree(self.task_dir, ignore_errors=True)
    signal.signal(signal.SIGTERM, self._old_sigterm)


def _kill_group(proc, sig):
  """Sends `sig` to a task's process group (the task and anything it started)."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:  # exited meanwhile
      pass

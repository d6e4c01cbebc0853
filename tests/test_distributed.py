"""Distributed outer-training (paper §4.3, App. B): ClusterSamples, the staleness bound, and
bin/train on loopback ParameterServerStrategy clusters with real faults (kill -9 of a worker, the
parameter server, the chief; SIGTERM; a worker of another configuration).

The cluster tests start real TensorFlow servers on 127.0.0.1 as subprocesses and check that none
is left running afterwards.
"""

import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
import types

import gin
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from lo_tf import config
from lo_tf.errors import UserError
from lo_tf.experiment import build_experiment
from lo_tf.launch import cluster as cluster_lib
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.outer_trainers import distributed
from lo_tf.outer_trainers.loop import OuterTrainer
from lo_tf.plotting import read_scalars

# ------------------------------------------------------------------ the staleness rule


def _simulate(groups, max_staleness, updates, rng):
  """Drives `may_schedule` as ClusterSamples does, results arriving in a random order.

  Returns the staleness of every used sample and the number of closures started.
  """
  version, buffered, idle, in_flight, staleness, started = 0, [], list(range(groups)), [], [], 0
  while version < updates:
    for group in sorted(idle):
      if not distributed.may_schedule(version, len(buffered), [v for _, v in in_flight], groups,
                                      max_staleness):
        break
      idle.remove(group)
      in_flight.append((group, version))
      started += 1
    assert in_flight, 'nothing in flight and nothing schedulable: training would stall'
    group, v = in_flight.pop(rng.randrange(len(in_flight)))
    buffered.append(v)
    idle.append(group)
    if len(buffered) == groups:
      staleness += [version - b for b in buffered]
      buffered, version = [], version + 1
  return staleness, started


@pytest.mark.parametrize('max_staleness', [0, 1, 3])
def test_the_staleness_bound_holds_for_any_arrival_order(max_staleness):
  rng = random.Random(0)
  for groups in (1, 2, 5):
    staleness, _ = _simulate(groups, max_staleness, 60, rng)
    assert max(staleness) <= max_staleness
    if max_staleness and groups > 1:
      assert max(staleness) >= 1  # asynchronous: results are used at a later θ
  # max_staleness = 0 is synchronous: each update's G closures all start at its own θ.
  assert _simulate(4, 0, 10, rng) == ([0] * 40, 40)


def test_cluster_flag_is_parsed_or_refused():
  assert cluster_lib.parse(None) is None and cluster_lib.parse('') is None
  assert cluster_lib.parse('tf_config') == ('tf_config', None)
  assert cluster_lib.parse('local:3') == ('local', 3)
  for bad in ('local', 'local:0', 'local:-1', 'local:x', 'yarn'):
    with pytest.raises(UserError, match='use local:N'):
      cluster_lib.parse(bad)


# ------------------------------------------------------------------ ClusterSamples in-process


class _Coordinator:
  """Runs each closure at once in this process; its result is fetched after a random delay, so
  results arrive in a random order (as from workers of unequal speed)."""

  strategy = types.SimpleNamespace(scope=contextlib.nullcontext)

  def __init__(self, max_delay=0.0, seed=0):
    self.max_delay, self.rng, self.closures = max_delay, random.Random(seed), 0

  def schedule(self, fn, args):
    value = tf.nest.map_structure(lambda x: x.numpy(), fn(*args))
    delay = self.rng.uniform(0, self.max_delay)
    self.closures += 1

    def fetch():
      time.sleep(delay)
      return value
    return types.SimpleNamespace(fetch=fetch)


def _trainer(experiment, train_dir, steps, sample_source=None):
  gin.clear_config()
  gin.parse_config(['Curriculum.start = 3', 'Curriculum.end = 6', 'Curriculum.num_outer_steps = 4'])
  return OuterTrainer(experiment, str(train_dir), num_slots=4, num_outer_steps=steps,
                      checkpoint_every=2, meta_eval_every=1000, meta_eval_tasks=1,
                      family=MLPLOpt(implementation='reference'), sample_source=sample_source)


def _cluster(coordinator, **kwargs):
  return functools.partial(distributed.ClusterSamples, coordinator, **kwargs)


def test_one_closure_per_step_is_the_single_process_run(experiment, tmp_path):
  local = _trainer(experiment, tmp_path / 'local', 3)
  local.train()
  cluster = _trainer(experiment, tmp_path / 'cluster', 3, _cluster(_Coordinator(),
                                                                    closures_per_step=1))
  cluster.train()
  # The same computation in another graph (variables on the parameter server, the estimate in a
  # scheduled function): TensorFlow's graph rewrites may order a float sum differently (1 ulp).
  np.testing.assert_allclose(cluster.theta.numpy(), local.theta.numpy(), rtol=1e-5, atol=1e-7)
  source = cluster.sample_source
  np.testing.assert_array_equal(source.truncations.numpy(), [3, 3, 3, 3])
  # Truncation 3 reads buffer 1: it holds the inner states the single-process slots hold now.
  for buffers, slots in zip(tf.nest.flatten(source.slots),
                            tf.nest.flatten(local.sample_source.slots)):
    np.testing.assert_allclose(buffers.numpy()[4:], slots.numpy(), rtol=1e-5, atol=1e-6)
  scalars = read_scalars(str(tmp_path / 'cluster' / 'summaries'))
  np.testing.assert_array_equal(scalars['staleness_max'][1], [0, 0, 0])


class _FailingCoordinator(_Coordinator):
  """Fails as ClusterCoordinator does when its cluster update after a worker's death fails: in
  outer step 2, the closure's fetch and then the schedule of its rerun raise UnavailableError (the
  failed closure ran: it may have written its end states already)."""

  def __init__(self):
    super().__init__()
    self.calls = 0

  def schedule(self, fn, args):
    self.calls += 1
    lost = tf.errors.UnavailableError(None, None, 'Socket closed (/job:worker/replica:0/task:0)')
    if self.calls == 3:
      raise lost
    remote = super().schedule(fn, args)
    if self.calls == 2:
      def fetch():
        raise lost
      return types.SimpleNamespace(fetch=fetch)
    return remote


def test_closures_failed_by_a_lost_worker_are_rerun_exactly(experiment, tmp_path):
  local = _trainer(experiment, tmp_path / 'local', 3)
  local.train()
  cluster = _trainer(experiment, tmp_path / 'cluster', 3, _cluster(_FailingCoordinator(),
                                                                    closures_per_step=1))
  cluster.train()
  np.testing.assert_allclose(cluster.theta.numpy(), local.theta.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(cluster.sample_source.truncations.numpy(), [3, 3, 3, 3])
  scalars = read_scalars(str(tmp_path / 'cluster' / 'summaries'))
  np.testing.assert_array_equal(scalars['rescheduled_closures'][1], [0, 2, 0])
  assert cluster.sample_source.rescheduled == 2


def test_asynchronous_samples_stay_within_max_staleness(experiment, tmp_path):
  coordinator = _Coordinator(max_delay=0.05)
  trainer = _trainer(experiment, tmp_path, 8, _cluster(coordinator, closures_per_step=4,
                                                       max_staleness=1))
  theta0 = trainer.theta.numpy().copy()
  trainer.train()
  scalars = read_scalars(str(tmp_path / 'summaries'))
  assert np.all(scalars['staleness_max'][1] <= 1)
  # Every closure started delivered its sample: none was computed in vain, none is lost.
  counts = trainer.sample_source.truncations.numpy()
  assert counts.sum() == coordinator.closures - len(trainer.sample_source._in_flight)
  assert counts.sum() >= 8 * 4 and np.all(np.isfinite(trainer.theta.numpy()))
  assert not np.allclose(trainer.theta.numpy(), theta0)


def test_closures_must_split_the_workers_evenly(experiment, tmp_path):
  with pytest.raises(UserError, match='not a multiple of 3 closures per step'):
    _trainer(experiment, tmp_path, 2, _cluster(_Coordinator(), closures_per_step=3))


# ------------------------------------------------------------------ bin/train on loopback clusters

_BINDINGS = ['OuterTrainer.num_slots=2', 'OuterTrainer.checkpoint_every=1',
             'OuterTrainer.keep_checkpoints=10', 'OuterTrainer.meta_eval_every=1000',
             'OuterTrainer.meta_eval_tasks=1', "MLPLOpt.implementation='reference'",
             # The quickstart's digits at its old, cheaper size: a small MLP from a Glorot θ.
             'build_experiment.problem=@MLP', "ThetaInit.kind='glorot'",
             'MLP.hidden=(8,)', 'InnerTrainer.num_steps=20',
             'Curriculum.start=3', 'Curriculum.end=5']
_GIN = os.path.join(REPO, 'gin', 'quickstart.gin')
_ENV = dict(os.environ, PYTHONPATH=REPO)  # this checkout's lo_tf in bin/train and its tasks


def _command(train_dir, steps, cluster, bindings=()):
  return ([sys.executable, os.path.join(REPO, 'bin', 'train'), f'--gin_file={_GIN}',
           f'--train_dir={train_dir}', f'--cluster={cluster}',
           f'--gin_bindings=OuterTrainer.num_outer_steps={steps}'] +
          [f'--gin_bindings={b}' for b in _BINDINGS + list(bindings)])


def _tasks(chief_pid):
  """{'ps0': pid, 'worker1': pid, ...} of the live tasks a local cluster's chief started."""
  found = {}
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/environ', 'rb') as f:
        env = dict(e.split(b'=', 1) for e in f.read().split(b'\0') if b'=' in e)
      with open(f'/proc/{pid}/stat') as f:
        zombie = f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
      continue
    if env.get(cluster_lib.PARENT_PID_ENV.encode()) == str(chief_pid).encode() and not zombie:
      task = json.loads(env[b'TF_CONFIG'])['task']
      found[f'{task["type"]}{task["index"]}'] = int(pid)
  return found


def _wait_for(condition, proc, what, limit=300):
  """Polls `condition` while `proc` runs; a hang guard, not a timing check."""
  deadline = time.monotonic() + limit
  while not condition():
    assert proc.poll() is None, f'the run ended (status {proc.returncode}) before {what}'
    assert time.monotonic() < deadline, f'no {what} after {limit} s'
    time.sleep(0.1)


def _run(command, train_dir, until_checkpoint=None, then=None, tasks_expected=2):
  """Runs bin/train; once its tasks run (and ckpt-<until_checkpoint> exists), `then(chief, tasks)`.

  Returns (status, stderr). Every task the chief started must be gone soon after it ended.
  """
  with open(f'{train_dir}.stderr', 'w+') as err:
    proc = subprocess.Popen(command, env=_ENV, stdout=subprocess.DEVNULL, stderr=err)
    try:
      seen = {}
      _wait_for(lambda: seen.update(_tasks(proc.pid)) or len(seen) == tasks_expected, proc,
                'the cluster\'s tasks')
      if until_checkpoint is not None:
        _wait_for(lambda: os.path.exists(f'{train_dir}/ckpt-{until_checkpoint}.index'), proc,
                  f'ckpt-{until_checkpoint}')
      if then is not None:
        then(proc, _tasks(proc.pid))
      status = proc.wait(timeout=300)
      # Tasks stop at once on teardown, or by themselves within a second once the chief is gone.
      deadline = time.monotonic() + 30
      while any(os.path.exists(f'/proc/{p}') and p in _tasks(proc.pid).values()
                for p in seen.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
      assert not _tasks(proc.pid), f'tasks left running: {_tasks(proc.pid)}'
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      for pid in _tasks(proc.pid).values():
        os.kill(pid, signal.SIGKILL)
    err.seek(0)
    return status, err.read()


def _error_line(stderr):
  """bin/train's one-line error: the last line, after a progress bar that it may end unfinished."""
  last = [l for l in stderr.splitlines() if l.strip()][-1]
  return last[last.find('error: '):]


def _newest(train_dir):
  return max(int(p.name[5:-6]) for p in train_dir.glob('ckpt-*.index'))


def _theta(train_dir, step):
  return tf.train.load_variable(os.path.join(str(train_dir), f'ckpt-{step}'),
                                'theta/.ATTRIBUTES/VARIABLE_VALUE')


@pytest.mark.slow  # minutes on 2 cores: run with pytest -m slow tests
def test_local1_is_the_single_process_run_through_ps_and_chief_faults(tmp_path):
  """kill -9 of the parameter server: exit 2 with one line; the same command resumes. kill -9 of
  the chief: its tasks stop by themselves; the same command resumes. The result is the
  single-process run's θ trajectory, bit for bit (sync, one closure per step, same seeds)."""
  config.parse_gin([_GIN], _BINDINGS + ['OuterTrainer.num_outer_steps=6'])
  reference = OuterTrainer(build_experiment(), str(tmp_path / 'single'))
  reference.train()
  train_dir = tmp_path / 'cluster'
  command = _command(train_dir, 6, 'local:1')
  kill = lambda job: (lambda chief, tasks: os.kill(chief.pid if job == 'chief' else tasks[job],
                                                   signal.SIGKILL))
  status, stderr = _run(command, train_dir, 1, kill('ps0'))
  assert status == 2, stderr[-3000:]
  assert _error_line(stderr).startswith('error: lost the parameter server 127.0.0.1:')
  assert 'Traceback' not in stderr
  status, stderr = _run(command, train_dir, _newest(train_dir) + 2, kill('chief'))
  assert status == -signal.SIGKILL, stderr[-3000:]
  status, stderr = _run(command, train_dir)
  assert status == 0, stderr[-3000:]
  assert 'resumed from' in stderr and 'Traceback' not in stderr
  for step in range(2, 7):  # each step's θ was checkpointed by one of the three runs
    np.testing.assert_array_equal(_theta(train_dir, step), _theta(tmp_path / 'single', step))


def test_a_killed_worker_loses_only_its_in_flight_truncation(tmp_path):
  """local:2, asynchronous (max_staleness=1): kill -9 worker 1 mid-run; the run completes all
  outer steps on worker 0, the summaries and the log count the rescheduled closure(s)."""
  train_dir = tmp_path / 'run'
  command = _command(train_dir, 10, 'local:2', [
      'ClusterSamples.max_staleness=1', 'InnerTrainer.num_steps=100', 'Curriculum.start=50',
      'Curriculum.end=50'])

  def kill_worker(chief, tasks):
    time.sleep(0.3)  # into the next closures
    os.kill(tasks['worker1'], signal.SIGKILL)
  status, stderr = _run(command, train_dir, 3, kill_worker, tasks_expected=3)
  assert status == 0, stderr[-3000:]
  scalars = read_scalars(str(train_dir / 'summaries'))
  np.testing.assert_array_equal(scalars['outer_loss'][0], np.arange(1, 11))
  assert scalars['rescheduled_closures'][1].sum() >= 1
  assert 'rescheduled on other workers after a worker failed' in stderr
  assert 'worker 1' in stderr and 'exited with status -9' in stderr
  assert np.all(scalars['staleness_max'][1] <= 1)
  assert np.all(np.isfinite(_theta(train_dir, 10)))


_SLOW_STEPS = ['InnerTrainer.num_steps=100', 'Curriculum.start=50', 'Curriculum.end=50']


@pytest.mark.slow  # minutes on 2 cores: run with pytest -m slow tests
def test_losing_every_worker_stops_the_chief_naming_them(tmp_path):
  """Issue 29: local:2, kill -9 worker 0 after ckpt-2 and worker 1 after ckpt-4; the chief hung.
  Now: exit 2 within seconds with one line naming both, and the same command resumes."""
  train_dir = tmp_path / 'run'
  command = _command(train_dir, 20, 'local:2', _SLOW_STEPS)
  killed = {}

  def kill_both(chief, tasks):
    os.kill(tasks['worker0'], signal.SIGKILL)
    _wait_for(lambda: os.path.exists(f'{train_dir}/ckpt-4.index'), chief, 'ckpt-4')
    os.kill(tasks['worker1'], signal.SIGKILL)
    killed['at'] = time.monotonic()

  status, stderr = _run(command, train_dir, 2, kill_both, tasks_expected=3)
  assert status == 2, stderr[-3000:]
  assert time.monotonic() - killed['at'] < 60, 'the chief waited for a worker'
  line = _error_line(stderr)
  assert line.startswith('error: lost every worker of the cluster (worker 0 (pid '), line
  assert 'worker 1 (pid ' in line and line.count('exited with status -9') == 2, line
  assert 'Traceback' not in stderr and 'no worker is left: the chief stops' in stderr
  status, stderr = _run(command, train_dir, tasks_expected=3)
  assert status == 0, stderr[-3000:]
  assert 'resumed from' in stderr and _newest(train_dir) == 20


@pytest.mark.slow  # minutes on 2 cores: run with pytest -m slow tests
def test_a_worker_and_the_parameter_server_lost_together_name_the_parameter_server(tmp_path):
  """Issue 29: the error line blamed the disk ('... contains an invalid device')."""
  train_dir = tmp_path / 'run'
  command = _command(train_dir, 20, 'local:2', _SLOW_STEPS)

  def kill_two(chief, tasks):
    os.kill(tasks['worker1'], signal.SIGKILL)
    os.kill(tasks['ps0'], signal.SIGKILL)

  status, stderr = _run(command, train_dir, 2, kill_two, tasks_expected=3)
  assert status == 2, stderr[-3000:]
  assert _error_line(stderr).startswith('error: lost the parameter server 127.0.0.1:'), (
      stderr[-3000:])
  assert 'disk is not full' not in stderr and 'Traceback' not in stderr


def test_sigterm_stops_the_chief_and_every_task(tmp_path):
  """SIGTERM to the chief as soon as its tasks run: exit 2 with one line, no task left."""
  train_dir = tmp_path / 'run'
  status, stderr = _run(_command(train_dir, 50, 'local:1'), train_dir,
                        then=lambda chief, tasks: chief.send_signal(signal.SIGTERM))
  assert status == 2, stderr[-3000:]
  assert _error_line(stderr).startswith('error: interrupted')


def test_a_worker_of_another_configuration_is_refused(tmp_path):
  """--cluster=tf_config, every task started by hand as on real hosts; the worker was given
  another learned-optimizer size."""
  chief, ps, worker = (f'127.0.0.1:{p}' for p in cluster_lib.free_ports(3))
  spec = {'chief': [chief], 'ps': [ps], 'worker': [worker]}
  train_dir = tmp_path / 'run'
  env = lambda job: dict(_ENV, LO_TF_TASK_DIR=str(tmp_path), TF_CONFIG=json.dumps(
      {'cluster': spec, 'task': {'type': job, 'index': 0}}))
  command = _command(train_dir, 2, 'tf_config')
  tasks = [subprocess.Popen(command, env=env('ps'), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL),
           subprocess.Popen(command + ['--gin_bindings=MLPLOpt.hidden_size=16'],
                            env=env('worker'), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)]
  try:
    done = subprocess.run(command, env=env('chief'), capture_output=True, text=True, timeout=300)
  finally:
    for task in tasks:
      task.terminate()
    for task in tasks:
      task.wait(timeout=60)
  assert done.returncode == 2, done.stderr[-3000:]
  assert _error_line(done.stderr) == (
      "error: worker 0 runs another configuration than the chief (the worker has "
      "'MLPLOpt.hidden_size = 16'); start every task with the same --gin_file/--gin_bindings")
  assert not train_dir.exists()  # refused before anything was written

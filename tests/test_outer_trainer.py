"""Outer-training: updates, dropped samples, checkpoints and resumption (paper App. B)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from lo_tf import checkpoints
from lo_tf.errors import UserError
from lo_tf.experiment import Experiment
from lo_tf.inner_training import InnerTrainer
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.outer_trainers.curriculum import Curriculum
from lo_tf.outer_trainers.trainer import OuterTrainer
from lo_tf.tasks.distribution import TaskDistribution
from lo_tf.tasks.problems import ConvNet


@pytest.fixture(scope='module')
def experiment():
  tasks = TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5)
  problem = ConvNet(tasks.image_shape, 3, channels=(4,), strides=(2,))
  return Experiment(tasks, problem, InnerTrainer(problem, num_steps=12, batch_size=8,
                                                 eval_every=6))


def _trainer(experiment, train_dir, steps=4, **kwargs):
  kwargs.setdefault('lopt', MLPLOpt())
  return OuterTrainer(experiment, str(train_dir), num_samples=2, num_outer_steps=steps,
                      curriculum=Curriculum(3, 6, 4, 0.2), checkpoint_every=2, log_every=2,
                      meta_eval_every=1000, meta_eval_tasks=1, **kwargs)


@pytest.fixture(scope='module')
def trained(experiment, tmp_path_factory):
  train_dir = tmp_path_factory.mktemp('outer')
  trainer = _trainer(experiment, train_dir)
  theta0 = trainer.theta.numpy().copy()
  result = trainer.train()
  return train_dir, trainer, theta0, result


def test_training_updates_theta_and_writes_outputs(trained):
  train_dir, trainer, theta0, result = trained
  theta = trainer.theta.numpy()
  assert np.all(np.isfinite(theta)) and not np.allclose(theta, theta0)
  assert int(trainer.step) == 4 and result['outer_steps'] == 4
  assert os.path.basename(trainer.manager.latest_checkpoint) == 'ckpt-4'
  with open(train_dir / 'throughput.json') as f:
    throughput = json.load(f)
  for key in ('unrolled_steps_per_sec', 'samples_per_minute', 'adam_steps_per_sec',
              'unrolled_over_adam', 'meta_eval_first', 'meta_eval_last'):
    assert key in throughput
  assert throughput['unrolled_steps_per_sec'] > 0
  assert os.listdir(train_dir / 'summaries')
  # Workers carry their inner state: inner steps advanced by the truncation lengths (3..6 each).
  steps = trainer.inner_step.numpy()
  assert np.all((steps >= 0) & (steps <= 12))


def test_resume_continues_from_the_saved_step_with_the_same_theta(experiment, trained):
  train_dir, trainer, _, _ = trained
  resumed = _trainer(experiment, train_dir, steps=6)
  assert resumed.restore_or_initialize() == 4
  np.testing.assert_array_equal(resumed.theta.numpy(), trainer.theta.numpy())
  np.testing.assert_array_equal(resumed.inner_step.numpy(), trainer.inner_step.numpy())
  for a, b in zip(resumed.inner_state, trainer.inner_state):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert int(resumed.outer_optimizer.iterations) == int(trainer.outer_optimizer.iterations) == 4
  resumed.train()
  assert int(resumed.step) == 6


def _corrupt(trainer, which):
  """Wraps `_run_sample` so that the samples in `which` come back with NaN losses."""
  original = trainer._run_sample

  def run(s, length, noise_seed):
    out = original(s, length, noise_seed)
    if s in which:
      out['loss_pos'] = np.float32(np.nan)
    return out

  trainer._run_sample = run


def test_a_nan_sample_is_dropped_and_its_worker_restarted(experiment, tmp_path):
  import concurrent.futures
  trainer = _trainer(experiment, tmp_path)
  trainer.restore_or_initialize()
  _corrupt(trainer, {0})
  theta0 = trainer.theta.numpy().copy()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    stats = trainer.outer_step(pool)
  assert stats['dropped_samples'] == 1 and stats['num_used'] == 1
  assert int(trainer.task_seed[0]) == -1 and int(trainer.task_seed[1]) >= 0
  theta = trainer.theta.numpy()
  assert np.all(np.isfinite(theta)) and not np.array_equal(theta, theta0)


def test_a_batch_without_finite_samples_changes_nothing(experiment, tmp_path):
  import concurrent.futures
  trainer = _trainer(experiment, tmp_path)
  trainer.restore_or_initialize()
  _corrupt(trainer, {0, 1})
  theta0 = trainer.theta.numpy().copy()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    stats = trainer.outer_step(pool)
  assert stats['dropped_samples'] == 2 and stats['num_used'] == 0
  np.testing.assert_array_equal(trainer.theta.numpy(), theta0)
  assert int(trainer.outer_optimizer.iterations) == 0


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(experiment, trained, tmp_path):
  train_dir, _, _, _ = trained
  import shutil
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  for name in os.listdir(copy):
    if '.data-' in name:
      with open(copy / name, 'r+b') as f:
        f.seek(0)
        f.write(b'\x00garbage' * 64)
  with pytest.raises(UserError, match='is corrupt'):
    _trainer(experiment, copy, steps=8).restore_or_initialize()
  with pytest.raises(UserError, match='is corrupt'):  # bin/eval's loader refuses it too
    checkpoints.load_learned_optimizer(str(copy))
  for digest in copy.glob('*.sha256.json'):  # without digests, TensorFlow's reader must notice
    os.remove(digest)
  with pytest.raises(UserError, match='corrupt or incompatible'):
    _trainer(experiment, copy, steps=8).restore_or_initialize()


def test_checkpoint_of_another_configuration_is_refused(experiment, trained):
  train_dir, _, _, _ = trained
  with pytest.raises(UserError, match='different lopt'):
    _trainer(experiment, train_dir, steps=8, lopt=MLPLOpt(hidden_size=16)).restore_or_initialize()


def _train_cmd(train_dir, steps):
  return [sys.executable, os.path.join(REPO, 'bin', 'train'),
          '--gin_file=' + os.path.join(REPO, 'gin', 'quickstart.gin'),
          f'--train_dir={train_dir}',
          f'--gin_bindings=OuterTrainer.num_outer_steps={steps}',
          '--gin_bindings=OuterTrainer.num_samples=2',
          '--gin_bindings=OuterTrainer.checkpoint_every=1',
          '--gin_bindings=OuterTrainer.meta_eval_every=1000',
          '--gin_bindings=OuterTrainer.meta_eval_tasks=1',
          '--gin_bindings=InnerTrainer.num_steps=20',
          '--gin_bindings=ConvNet.channels=(4,)', '--gin_bindings=ConvNet.strides=(2,)',
          '--gin_bindings=Curriculum.start=3', '--gin_bindings=Curriculum.end=5']


def test_sigkill_midway_then_resume(tmp_path):
  """A run killed with SIGKILL resumes from its last checkpoint (at most one interval lost)."""
  train_dir = tmp_path / 'run'
  proc = subprocess.Popen(_train_cmd(train_dir, 400), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  state = train_dir / 'checkpoint'
  deadline = time.time() + 240
  try:
    while time.time() < deadline:
      if state.exists() and 'ckpt-3' in state.read_text():
        break
      time.sleep(0.2)
    else:
      pytest.fail('no checkpoint 3 within 240 s')
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  saved = int(tf.train.latest_checkpoint(str(train_dir)).rsplit('-', 1)[1])
  assert saved >= 3
  done = subprocess.run(_train_cmd(train_dir, saved + 2), cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'at outer step {saved}' in done.stderr
  assert json.loads(done.stdout[:done.stdout.rindex('}') + 1])['outer_steps'] == saved + 2


def test_unreadable_checkpoint_index_is_refused_not_overwritten(experiment, trained, tmp_path):
  import shutil
  train_dir, _, _, _ = trained
  copy = tmp_path / 'garbled_state'
  shutil.copytree(train_dir, copy)
  (copy / 'checkpoint').write_text('this is not a checkpoint state file')
  before = sorted(os.listdir(copy))
  with pytest.raises(UserError, match="no readable 'checkpoint' index"):
    _trainer(experiment, copy, steps=8).restore_or_initialize()
  assert sorted(os.listdir(copy)) == before


@pytest.mark.parametrize('binding', [dict(sigma=float('inf')), dict(sigma=0.0),
                                     dict(parallel_samples=0), dict(beta_1=1.0)])
def test_nonsense_settings_are_refused(experiment, tmp_path, binding):
  with pytest.raises(UserError, match='OuterTrainer'):
    _trainer(experiment, tmp_path, **binding)

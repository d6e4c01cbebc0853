"""Issue 19: a rerun finishes a finished run, a resumed run saves what an uninterrupted one saves,
a changed configuration is refused, runaway or frozen outer-training stops with an error.

Kills are simulated in-process: a `_Kill` raised at a chosen moment (during an outer step, after a
meta-evaluation and before its checkpoint, between a checkpoint's index and its digest, before the
final outputs) abandons the trainer, and a fresh trainer resumes from what is on disk, as a new
process would.
"""

import errno
import json
import logging
import os
import re
import shutil
import sys
import time

import gin
import numpy as np
import pytest
import tensorflow as tf
from absl import logging as absl_logging

from conftest import one_line
from lo_tf import checkpointing
from lo_tf import io_utils
from lo_tf import plotting
from lo_tf.errors import UserError
from lo_tf.experiment import build_experiment
from lo_tf.launch import common
from lo_tf.launch import export
from lo_tf.launch import train
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.outer_trainers import loop
from lo_tf.outer_trainers import run_checkpoints
from lo_tf.outer_trainers.loop import OuterTrainer

_CONFIG = ["TaskDistribution.train_source = 'digits'", 'TaskDistribution.num_classes = 3',
           'TaskDistribution.outer_train_fraction = 0.5', 'ConvNet.channels = (4,)',
           'ConvNet.strides = (2,)', 'InnerTrainer.num_steps = 12', 'InnerTrainer.batch_size = 8',
           'InnerTrainer.eval_every = 6', 'Curriculum.start = 3', 'Curriculum.end = 6',
           'Curriculum.num_outer_steps = 4']
_STEPS = 8
# Meta-evaluations at 0, 3, 6 and 8; checkpoints at 2, 4, 6 and 8 (3 kept).
_LOOP = dict(num_slots=2, checkpoint_every=2, meta_eval_every=3, meta_eval_tasks=1,
             keep_checkpoints=3)
# Scalars that time the run rather than describe it.
_TIMING = ('seconds_per_outer_step', 'peak_rss_mb')


class _Kill(BaseException):
  """Stands for a kill -9: nothing after it runs."""


def _trainer(train_dir, steps=_STEPS, bindings=(), family=None, **kwargs):
  gin.clear_config()
  gin.parse_config(_CONFIG + list(bindings))
  loop_kwargs = dict(_LOOP, **kwargs)
  return OuterTrainer(build_experiment(), str(train_dir), num_outer_steps=steps,
                      family=family or MLPLOpt(implementation='reference'), **loop_kwargs)


def _tensors(prefix):
  """Every tensor of a checkpoint but the wall-clock time and tf.train.Checkpoint's count of the
  saves its Python object made (best/ is saved by a fresh object in every process)."""
  reader = tf.train.load_checkpoint(prefix)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if not k.startswith(('wall_seconds', 'save_counter'))
          and k != '_CHECKPOINTABLE_OBJECT_GRAPH'}


def _saved(train_dir):
  """Everything a run saves that must not depend on when it was killed."""
  train_dir = str(train_dir)
  names = lambda d: sorted(n for n in os.listdir(d) if n.startswith('ckpt-'))
  out = {'files': names(train_dir), 'best_files': names(os.path.join(train_dir, 'best'))}
  for directory, key in ((train_dir, 'ckpt'), (os.path.join(train_dir, 'best'), 'best')):
    for name in names(directory):
      if name.endswith('.index'):
        out[f'{key}/{name}'] = _tensors(os.path.join(directory, name[:-len('.index')]))
  with open(os.path.join(train_dir, loop.META_EVAL_LOG)) as f:
    out['meta_eval'] = json.load(f)
  scalars = plotting.read_scalars(os.path.join(train_dir, 'summaries'))
  out['summaries'] = {tag: (steps.tolist(), values.tolist())
                      for tag, (steps, values) in scalars.items() if tag not in _TIMING}
  with open(os.path.join(train_dir, loop.THROUGHPUT)) as f:
    t = json.load(f)
  out['throughput'] = {k: t[k] for k in ('outer_steps', 'meta_eval_first', 'meta_eval_last',
                                         'best_meta_eval_score')}
  return out


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], dict) and key.startswith(('ckpt/', 'best/')):
      assert a[key].keys() == b[key].keys(), key
      for k in a[key]:
        np.testing.assert_array_equal(a[key][k], b[key][k], err_msg=f'{key} {k}')
    else:
      assert a[key] == b[key], key


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  train_dir = tmp_path_factory.mktemp('uninterrupted')
  result = _trainer(train_dir).train(config_str='# test\n')
  return train_dir, result, _saved(train_dir)


def _kill_at(monkeypatch, target, name, when):
  """Makes `target.name` raise `_Kill` on the call for which `when(*args)` holds (after it when
  `when` returns 'after')."""
  original = getattr(target, name)

  def wrapper(*args, **kwargs):
    moment = when(*args, **kwargs)
    if moment == 'before':
      raise _Kill(name)
    result = original(*args, **kwargs)
    if moment == 'after':
      raise _Kill(name)
    return result

  monkeypatch.setattr(target, name, wrapper)


# ------------------------------------------------------------------ A and B


def test_a_run_killed_at_four_moments_saves_what_an_uninterrupted_one_saves(uninterrupted,
                                                                           tmp_path):
  _, _, expected = uninterrupted
  train_dir = tmp_path / 'killed'
  calls = {'batch': 0}

  def during_outer_step_5(*_):
    calls['batch'] += 1
    return 'before' if calls['batch'] == 5 else None

  kills = [
      # a kill during outer step 5: resumes from ckpt-4 (meta-evaluated at 3, not at 4)
      (loop.LocalSamples, 'batch', during_outer_step_5),
      # meta-evaluated at step 6 (perhaps best/ saved), killed before ckpt-6: step 6 is replayed
      (run_checkpoints.RunCheckpoints, 'save', lambda self, step: 'before' if step == 6 else None),
      # the final checkpoint's index written, killed before its digest
      (checkpointing, 'write_digest',
       lambda prefix: 'before' if prefix.endswith('ckpt-8') else None),
  ]
  for target, name, when in kills:
    with pytest.MonkeyPatch.context() as m:
      _kill_at(m, target, name, when)
      with pytest.raises(_Kill):
        _trainer(train_dir).train(config_str='# test\n')
  # The final checkpoint is complete; killed before throughput.json and the plot.
  with pytest.MonkeyPatch.context() as m:
    _kill_at(m, plotting, 'outer_training', lambda *_: 'before')
    with pytest.raises(_Kill):
      _trainer(train_dir).train(config_str='# test\n')
  assert not (train_dir / 'outer_training.png').exists()
  result = _trainer(train_dir).train(config_str='# test\n')
  assert result is not None and result['outer_steps'] == _STEPS
  _assert_same(_saved(train_dir), expected)
  assert sorted(expected['meta_eval']) == ['0', '3', '6', '8']
  assert (train_dir / 'outer_training.png').stat().st_size > 10_000
  # Now finished: a rerun has nothing to do.
  assert _trainer(train_dir).train(config_str='# test\n') is None


def test_a_rerun_finishes_a_finished_run_that_lost_its_final_outputs(uninterrupted, tmp_path):
  """Issue 19 A: killed (or out of disk) after the final checkpoint, before the final outputs."""
  train_dir, result, expected = uninterrupted
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  for name in (loop.THROUGHPUT, loop.OUTER_TRAINING_PNG):
    os.remove(copy / name)
  for leftover in (copy / 'best' / 'ckpt-8_temp', copy / 'ckpt-9_temp'):  # a save killed midway
    leftover.mkdir()
    (leftover / 'part-00000-of-00001.data-00000-of-00001.tempstate1').write_bytes(b'\0' * 10)
  redone = _trainer(copy).train(config_str='# test\n')
  assert redone['outer_steps'] == _STEPS and redone['outer_steps_this_run'] == 0
  assert redone['best_meta_eval_score'] == result['best_meta_eval_score']
  assert redone['meta_eval_first'] == result['meta_eval_first']
  assert redone['meta_eval_last'] == result['meta_eval_last']
  assert (copy / loop.OUTER_TRAINING_PNG).exists()
  assert not (copy / 'best' / 'ckpt-8_temp').exists() and not (copy / 'ckpt-9_temp').exists()
  _assert_same(_saved(copy), expected)
  # bin/export_optimizer takes it now.
  meta = json.load(open(export.export_from_flags([str(copy), str(train_dir)], 'x', 'cmd',
                                                 out_dir=str(tmp_path / 'pretrained'))))
  assert meta['outer_steps'] == int(expected['best_files'][0].split('-')[1].split('.')[0])


def test_orphan_checkpoints_left_by_a_kill_midway_through_a_save_are_removed(uninterrupted,
                                                                            tmp_path):
  """ckpt-8 written but its index update and digest never came; ckpt-2 listed beyond keep."""
  train_dir, _, expected = uninterrupted
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  for suffix in ('.index', '.data-00000-of-00001', '.sha256.json'):
    shutil.copy(copy / f'ckpt-4{suffix}', copy / f'ckpt-2{suffix}')
  os.remove(copy / 'ckpt-8.sha256.json')
  (copy / 'checkpoint').write_text(
      'model_checkpoint_path: "ckpt-6"\nall_model_checkpoint_paths: "ckpt-2"\n'
      'all_model_checkpoint_paths: "ckpt-4"\nall_model_checkpoint_paths: "ckpt-6"\n')
  assert _trainer(copy).train() is None  # finished: nothing to train
  assert sorted(p.name for p in copy.glob('ckpt-*')) == expected['files']
  assert tf.train.get_checkpoint_state(str(copy)).all_model_checkpoint_paths == [
      str(copy / f'ckpt-{n}') for n in (4, 6, 8)]
  assert checkpointing.digest_problem(str(copy / 'ckpt-8')) is None


# ------------------------------------------------------------------ C


def test_a_changed_configuration_is_refused_naming_every_binding(uninterrupted, tmp_path):
  train_dir, _, _ = uninterrupted
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  before = {p: p.read_bytes() for p in copy.rglob('*') if p.is_file()}
  changed = ['InnerTrainer.batch_size = 16', 'TaskDistribution.split_seed = 7',
             'OuterLearner.outer_learning_rate = 0.001']
  with pytest.raises(UserError) as e:
    _trainer(copy, steps=_STEPS + 2, bindings=changed).train(config_str='# changed\n')
  message = str(e.value)
  assert '\n' not in message and len(message) < 450, message
  for part in ('InnerTrainer.batch_size (8 vs 16)', 'TaskDistribution.split_seed (0 vs 7)',
               'OuterLearner.outer_learning_rate (None vs 0.001)'):
    assert part in message, message
  assert 'OuterTrainer.num_outer_steps (' not in message
  assert {p: p.read_bytes() for p in copy.rglob('*') if p.is_file()} == before
  # The seed is part of the configuration too.
  with pytest.raises(UserError, match=r'OuterTrainer\.seed \(0 vs 3\)'):
    _trainer(copy, seed=3).train()
  # RESUMABLE bindings may change: a finished run with a new cadence is simply finished.
  assert _trainer(copy, checkpoint_every=4, keep_checkpoints=5).train() is None


def test_a_parameter_added_since_the_run_started_is_accepted_at_its_default_only(uninterrupted,
                                                                                tmp_path):
  train_dir, _, _ = uninterrupted
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  path = copy / run_checkpoints.RUN_CONFIG
  lines = path.read_text().splitlines(keepends=True)
  assert 'ThetaInit.checkpoint = None\n' in lines
  # As a run saved before ThetaInit.checkpoint existed: it resumes (here: is finished).
  path.write_text(''.join(l for l in lines if not l.startswith('ThetaInit.checkpoint ')))
  assert _trainer(copy).train() is None
  # A binding absent from the saved configuration and not at the code's default is a change.
  path.write_text(''.join(l for l in lines if not l.startswith('InnerTrainer.batch_size ')))
  with pytest.raises(UserError, match=r'InnerTrainer\.batch_size \(\(unset\) vs 8\)'):
    _trainer(copy).train()


def test_without_recorded_configuration_the_refusal_names_the_binding(uninterrupted, tmp_path):
  train_dir, _, _ = uninterrupted
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  os.remove(copy / 'config.gin')
  os.remove(copy / run_checkpoints.RUN_CONFIG)
  with pytest.raises(UserError) as e:
    _trainer(copy, family=MLPLOpt(hidden_size=16, implementation='reference')).train()
  message = str(e.value)
  assert 'different MLPLOpt.hidden_size (32 vs 16)' in message and len(message) < 200, message


# ------------------------------------------------------------------ D


@pytest.mark.parametrize('binding', ['OuterLearner.outer_learning_rate = 1e38',
                                     'OuterLearner.outer_learning_rate = 1e-30',
                                     'OuterLearner.outer_learning_rate = 0.0',
                                     'OuterLearner.outer_learning_rate = -0.001',
                                     'GradientEstimator.sigma = 1e10'])
def test_absurd_outer_learning_rates_and_sigmas_are_refused_up_front(tmp_path, binding):
  with pytest.raises(UserError) as e:
    _trainer(tmp_path / 'run', bindings=[binding])
  name = binding.split(' = ')[0]
  assert f'{name}=' in str(e.value) and 'sane range' in str(e.value), str(e.value)
  assert not (tmp_path / 'run').exists()


def test_an_outer_learning_rate_outside_the_sane_range_is_warned_about(tmp_path, caplog):
  with caplog.at_level('WARNING'):
    _trainer(tmp_path, bindings=['OuterLearner.outer_learning_rate = 0.1'])
  assert 'OuterLearner.outer_learning_rate=0.1 is outside the sane range 1e-05 to 0.03' in (
      caplog.text)


def test_a_blow_up_stops_the_run_naming_a_checkpoint_from_before_it(tmp_path, monkeypatch):
  """θ jumps to ~1e37 at step 3: the learning rate is set behind the up-front check, after the
  restore (Adam's learning rate is a checkpointed variable)."""
  _trainer(tmp_path, steps=2, checkpoint_every=1, max_unusable_steps=3).train()
  trainer = _trainer(tmp_path, steps=8, checkpoint_every=1, max_unusable_steps=3)
  restore = run_checkpoints.RunCheckpoints.restore

  def restore_then_raise_the_learning_rate(self):
    step = restore(self)
    trainer.learner.optimizer.learning_rate.assign(1e37)
    return step

  monkeypatch.setattr(run_checkpoints.RunCheckpoints, 'restore', restore_then_raise_the_learning_rate)
  with pytest.raises(UserError) as e:
    trainer.train()
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith('3 consecutive outer steps with no usable update'), message
  assert 'up to step 6' in message and 'θ blew up' in message
  assert 'OuterLearner.outer_learning_rate=1e+37 is probably too large' in message
  assert f'the last good checkpoint is {tmp_path / "ckpt-2"};' in message, message
  # ckpt-3 holds the blown-up θ; no checkpoint is saved during the streak.
  assert sorted(p.name for p in tmp_path.glob('ckpt-*.index')) == [
      'ckpt-1.index', 'ckpt-2.index', 'ckpt-3.index']
  assert np.abs(_tensors(str(tmp_path / 'ckpt-3'))['theta/.ATTRIBUTES/VARIABLE_VALUE']).max() > 1e30
  assert np.abs(_tensors(str(tmp_path / 'ckpt-2'))['theta/.ATTRIBUTES/VARIABLE_VALUE']).max() < 10


@pytest.mark.parametrize('setting, fragment', [
    ('learning_rate', 'θ moving by at most'),
    ('sigma', 'GradientEstimator.sigma=1e+10 is probably too large')])
def test_a_frozen_run_stops_naming_the_cause(tmp_path, setting, fragment):
  trainer = _trainer(tmp_path, steps=8, max_unusable_steps=3)
  if setting == 'learning_rate':  # set behind the up-front check
    trainer.learner.optimizer.learning_rate.assign(1e-30)
  else:
    trainer.estimator.sigma = 1e10
  with pytest.raises(UserError) as e:
    trainer.train()
  message = str(e.value)
  assert '\n' not in message and message.startswith('3 consecutive outer steps'), message
  assert fragment in message, message
  if setting == 'learning_rate':
    assert 'OuterLearner.outer_learning_rate=1e-30 is probably too small' in message
    assert 'up to step 3' in message


# ------------------------------------------------------------------ an I/O error mid-run

_DISK_FULL = ('{{function_node __wrapped__SaveV2_dtypes_14_device_/job:localhost/replica:0/task:0/'
              'device:CPU:0}} {dir}/ckpt-2_temp/part-00000-of-00001.data-00000-of-00001.tempstate88'
              '41452563374350367; No space left on device [Op:SaveV2]')


def test_a_full_disk_mid_run_is_a_clean_error_line(tmp_path, monkeypatch, capfd):
  """The error TensorFlow raises when a checkpoint save hits a full disk, through bin/'s runner:
  the progress bar ends its line, and the error line names the file and the cause only."""

  def full(self, step):
    raise tf.errors.ResourceExhaustedError(None, None, _DISK_FULL.replace('{dir}', str(tmp_path)))

  monkeypatch.setattr(run_checkpoints.RunCheckpoints, 'save', full)
  monkeypatch.setattr(sys, 'argv', ['bin/train'])
  trainer = _trainer(tmp_path, steps=4)
  verbosity = absl_logging.get_verbosity()
  try:
    with pytest.raises(SystemExit) as e:
      common.run(lambda argv: trainer.train())
  finally:
    absl_logging.set_verbosity(verbosity)
  assert e.value.code == 2
  err = capfd.readouterr().err
  assert 'outer step' in err  # the progress bar was drawn
  errors = [l for l in err.splitlines() if 'No space left on device' in l]
  assert len(errors) == 1 and errors[0] == (
      f'error: {tmp_path}/ckpt-2_temp/part-00000-of-00001.data-00000-of-00001.tempstate884145256'
      '3374350367; No space left on device; check that the paths exist and are writable and '
      'that the disk is not full'), errors
  assert '{{function_node' not in err and '[Op:' not in err


# ------------------------------------------------------------------ issue 29: the train_dir's form


def _gin_file(tmp_path):
  """The tests' configuration as a gin file for bin/train's code path (`train_from_flags`)."""
  path = tmp_path / 'run.gin'
  path.write_text('\n'.join(_CONFIG + [f'OuterTrainer.{k} = {v}' for k, v in _LOOP.items()] +
                            ["MLPLOpt.implementation = 'reference'"]) + '\n')
  return str(path)


def _bin_train(gin_file, train_dir, steps=_STEPS):
  return train.train_from_flags([gin_file], [f'OuterTrainer.num_outer_steps = {steps}'],
                                train_dir)


def _killed_during_step(gin_file, train_dir, step, steps=_STEPS):
  """bin/train killed during outer step `step` (after the checkpoint before it)."""
  calls = {'batch': 0}

  def during(*_):
    calls['batch'] += 1
    return 'before' if calls['batch'] == step else None

  with pytest.MonkeyPatch.context() as m:
    _kill_at(m, loop.LocalSamples, 'batch', during)
    with pytest.raises(_Kill):
      _bin_train(gin_file, train_dir, steps)


def _assert_index(directory, steps):
  """`directory`'s index lists ckpt-N of `steps` (oldest first) by bare name, and exactly those
  checkpoints are on disk."""
  lines = (directory / 'checkpoint').read_text().splitlines()
  assert lines[0] == f'model_checkpoint_path: "ckpt-{steps[-1]}"', lines
  assert [l.split('"')[1] for l in lines if l.startswith('all_model_checkpoint_paths')] == [
      f'ckpt-{s}' for s in steps], lines
  assert tf.train.latest_checkpoint(str(directory)) == str(directory / f'ckpt-{steps[-1]}')
  assert sorted(p.name for p in directory.glob('ckpt-*.index')) == sorted(
      f'ckpt-{s}.index' for s in steps)


def _snapshot(directory):
  return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob('*')
          if p.is_file()}


@pytest.mark.parametrize('form', ['relative', 'absolute', 'dot_prefixed', 'symlink'])
def test_the_index_names_the_train_dirs_own_checkpoints_after_a_resume_and_a_rerun(
    tmp_path, monkeypatch, form):
  """Issue 29: with --train_dir=runs/x the rewritten index read "../../ckpt-6"."""
  gin_file = _gin_file(tmp_path)
  real = tmp_path / 'runs' / 'x'
  real.mkdir(parents=True)
  if form == 'symlink':
    os.symlink(real, tmp_path / 'link')
  given = {'relative': 'runs/x', 'absolute': str(real), 'dot_prefixed': './runs/x',
           'symlink': 'link'}[form]
  monkeypatch.chdir(tmp_path)
  _killed_during_step(gin_file, given, 5)
  _assert_index(real, [2, 4])
  result = _bin_train(gin_file, given)  # resumed mid-run from ckpt-4
  assert result['outer_steps'] == _STEPS and result['outer_steps_this_run'] == 4
  _assert_index(real, [4, 6, 8])
  assert _bin_train(gin_file, given) is None  # a rerun of the finished run
  _assert_index(real, [4, 6, 8])
  best = tf.train.get_checkpoint_state(str(real / 'best'))
  assert len(best.all_model_checkpoint_paths) == 1 and len(list((real / 'best').glob(
      'ckpt-*.index'))) == 1
  assert os.path.dirname(best.model_checkpoint_path) == str(real / 'best')


def test_a_resume_from_inside_another_run_leaves_that_run_byte_identical(tmp_path, monkeypatch):
  """Issue 29: `cd runs/victim && bin/train --train_dir=../k8` deleted runs/victim/ckpt-*."""
  gin_file = _gin_file(tmp_path)
  monkeypatch.chdir(tmp_path)
  _bin_train(gin_file, 'runs/victim')  # ckpt-4, 6, 8
  _killed_during_step(gin_file, 'runs/k8', 7)  # ckpt-2, 4, 6: the victim's names
  victim = tmp_path / 'runs' / 'victim'
  before = _snapshot(victim)
  monkeypatch.chdir(victim)
  result = _bin_train(gin_file, '../k8', steps=_STEPS + 2)  # saves ckpt-8 and ckpt-10
  assert result['outer_steps'] == _STEPS + 2 and result['outer_steps_this_run'] == 4
  _assert_index(tmp_path / 'runs' / 'k8', [6, 8, 10])
  assert _snapshot(victim) == before
  monkeypatch.chdir(tmp_path)
  assert _bin_train(gin_file, 'runs/victim') is None  # still a finished run of its own


def test_a_rerun_after_a_kill_right_after_the_final_digest_keeps_the_measured_throughput(
    tmp_path, monkeypatch):
  gin_file = _gin_file(tmp_path)
  monkeypatch.chdir(tmp_path)
  final = str(tmp_path / 'x' / f'ckpt-{_STEPS}')
  with pytest.MonkeyPatch.context() as m:
    _kill_at(m, checkpointing, 'write_digest', lambda prefix: 'after' if prefix == final else None)
    with pytest.raises(_Kill):
      _bin_train(gin_file, 'x')
  with open(tmp_path / 'x' / loop.MEASURED) as f:
    measured = json.load(f)
  assert measured['samples_per_minute'] > 0 and measured['unrolled_steps_per_sec'] > 0
  result = _bin_train(gin_file, 'x')
  assert result['outer_steps'] == _STEPS and result['outer_steps_this_run'] == 0
  with open(tmp_path / 'x' / loop.THROUGHPUT) as f:
    written = json.load(f)
  for key in ('samples_per_minute', 'unrolled_steps_per_sec'):
    assert result[key] == written[key] == measured[key], key


# ------------------------------------------------------------------ issue 29: resume compatibility


@pytest.mark.parametrize('binding', ['MLPLOpt.decays', 'MLPLOpt.time_scales'])
def test_a_recorded_configuration_without_a_sequence_default_resumes(uninterrupted, tmp_path,
                                                                     binding):
  """An old operative_config.gin lacks the binding: the default is compared as a value (the
  recorded lists are tuples in the code)."""
  train_dir, _, _ = uninterrupted
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  path = copy / run_checkpoints.RUN_CONFIG
  lines = path.read_text().splitlines(keepends=True)
  assert any(l.startswith(binding + ' = [') for l in lines), lines
  path.write_text(''.join(l for l in lines if not l.startswith(binding + ' ')))
  assert _trainer(copy).train() is None  # resumed: finished, nothing to train
  # A changed value is still a change, whatever its brackets.
  path.write_text(''.join(l if not l.startswith(binding + ' ') else f'{binding} = (0.5,)\n'
                          for l in lines))
  with pytest.raises(UserError, match=re.escape(f'{binding} ((0.5,) vs [')):
    _trainer(copy).train()


def test_a_deleted_outer_learning_rate_line_cannot_change_the_rate(tmp_path):
  train_dir = tmp_path / 'run'
  _trainer(train_dir, steps=2, bindings=['OuterLearner.outer_learning_rate = 1e-3']).train()
  path = train_dir / run_checkpoints.RUN_CONFIG
  lines = path.read_text().splitlines(keepends=True)
  path.write_text(''.join(l for l in lines if not l.startswith('OuterLearner.outer_learning_rate')))
  with pytest.raises(UserError) as e:  # at the default: 3e-3 for L_train
    _trainer(train_dir, steps=4).train()
  assert 'different OuterLearner.outer_learning_rate (0.001 vs 0.003)' in one_line(e), str(e.value)


def test_a_lopt_json_of_an_older_lo_tf_without_the_outer_learning_rate_resumes(uninterrupted,
                                                                               tmp_path):
  train_dir, _, _ = uninterrupted
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  with open(copy / run_checkpoints.LOPT_CONFIG) as f:
    saved = json.load(f)
  assert saved.pop('outer_learning_rate') == 3e-3
  (copy / run_checkpoints.LOPT_CONFIG).write_text(json.dumps(saved))
  assert _trainer(copy).train() is None
  with pytest.raises(UserError, match=r'OuterLearner\.outer_learning_rate \(None vs 0\.01\)'):
    _trainer(copy, bindings=['OuterLearner.outer_learning_rate = 1e-2']).train()


# ------------------------------------------------------------------ issue 29: notes


def test_an_old_train_dir_with_a_renamed_binding_says_so(uninterrupted, tmp_path):
  train_dir, _, _ = uninterrupted
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  path = copy / run_checkpoints.RUN_CONFIG
  text = path.read_text()
  assert 'OuterTrainer.num_slots = 2\n' in text
  path.write_text(text.replace('OuterTrainer.num_slots = 2\n', 'OuterTrainer.num_workers = 2\n'))
  with open(copy / loop.THROUGHPUT) as f:
    revision = json.load(f)['git_revision']
  with pytest.raises(UserError) as e:
    _trainer(copy).train()
  message = one_line(e)
  assert 'was started by an older lo_tf (OuterTrainer.num_workers was renamed ' in message
  assert 'OuterTrainer.num_slots); resume it with the lo_tf revision that started it' in message
  if revision != 'unknown':
    assert f'(its throughput.json names {revision})' in message, message


def test_every_checkpoint_counts_the_time_of_its_own_outer_step(tmp_path, monkeypatch):
  """A warm start from best/ckpt-N took the source's time without step N's."""
  batch = loop.LocalSamples.batch

  def slow_batch(self, *args):
    time.sleep(0.3)
    return batch(self, *args)

  monkeypatch.setattr(loop.LocalSamples, 'batch', slow_batch)
  _trainer(tmp_path, steps=2, checkpoint_every=1, meta_eval_every=1).train()
  prefixes = [str(tmp_path / 'ckpt-1'), str(tmp_path / 'ckpt-2'),
              tf.train.latest_checkpoint(str(tmp_path / 'best'))]
  for prefix in prefixes:
    step = int(prefix.rsplit('-', 1)[1])
    seconds = tf.train.load_checkpoint(prefix).get_tensor(checkpointing.WALL_SECONDS_KEY)
    assert seconds >= 0.3 * step, (prefix, seconds)


def test_export_of_a_warm_started_run_records_the_source_and_the_command(uninterrupted,
                                                                         tmp_path):
  source, _, _ = uninterrupted
  command = 'bin/train --gin_file=run.gin --train_dir=warm'
  warm = str(tmp_path / 'warm')
  train.train_from_flags([_gin_file(tmp_path)], [
      'OuterTrainer.num_outer_steps = 2', "ThetaInit.kind = 'checkpoint'",
      f'ThetaInit.checkpoint = {str(source)!r}'], warm, command=command)
  with open(os.path.join(warm, loop.THROUGHPUT)) as f:
    assert json.load(f)['command'] == command
  meta = json.load(open(export.export_from_flags(warm, 'w', '', out_dir=str(tmp_path / 'out'))))
  assert meta['command'] == command and meta['outer_steps'] in (0, 1, 2)
  assert meta['source_outer_steps'] == _STEPS and meta['theta_init']['source'] == str(source)
  # A --command given to bin/export_optimizer is recorded instead.
  meta = json.load(open(export.export_from_flags(warm, 'w2', 'given', out_dir=str(tmp_path /
                                                                                  'out'))))
  assert meta['command'] == 'given'


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch, capfd):
  def full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', full)
  monkeypatch.setattr(sys, 'argv', ['bin/train'])
  path = str(tmp_path / 'throughput.json')
  verbosity = absl_logging.get_verbosity()
  try:
    with pytest.raises(SystemExit) as e:
      common.run(lambda argv: io_utils.atomic_write_json(path, {'a': 1}))
  finally:
    absl_logging.set_verbosity(verbosity)
  assert e.value.code == 2
  lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith('error:')]
  assert lines == [f"error: cannot write '{path}': No space left on device; free space on that "
                   'disk and re-run the same command'], lines
  assert os.listdir(tmp_path) == []  # the temporary file is gone


def test_a_resume_with_fewer_kept_checkpoints_does_not_blame_a_kill(uninterrupted, tmp_path,
                                                                    caplog):
  train_dir, _, _ = uninterrupted
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  with caplog.at_level(logging.INFO, logger='absl'):
    assert _trainer(copy, keep_checkpoints=1).train() is None
  removed = [r.getMessage() for r in caplog.records if 'removed checkpoint' in r.getMessage()]
  assert removed == [f'{copy}: removed checkpoint(s) beyond the 1 kept: ckpt-6, ckpt-4'], removed
  assert sorted(p.name for p in copy.glob('ckpt-*.index')) == ['ckpt-8.index']
  # A checkpoint the index never listed was left by a kill.
  for suffix in ('.index', '.data-00000-of-00001'):
    shutil.copy(copy / f'ckpt-8{suffix}', copy / f'ckpt-2{suffix}')
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='absl'):
    assert _trainer(copy, keep_checkpoints=1).train() is None
  removed = [r.getMessage() for r in caplog.records if 'removed checkpoint' in r.getMessage()]
  assert removed == [f'{copy}: removed checkpoint(s) left by a kill during a save (not in the '
                     'index): ckpt-2'], removed

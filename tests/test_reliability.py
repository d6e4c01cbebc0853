"""Reliability: the OS directory lock, checkpoint fallback, strict JSON, export names, litter.

Every corrupt file here is a real file damaged on disk (truncated, a flipped byte, deleted); every
lock test races real processes.
"""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import plugin_event_accumulator

from conftest import REPO
from lo_tf import checkpoints
from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.launch import export
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt


def _one_line(excinfo):
  message = str(excinfo.value)
  assert message and '\n' not in message, repr(message)
  return message


# ------------------------------------------------------------------ DirectoryLock

# A worker takes the lock once per line read from stdin. While it holds the lock it creates a
# marker file exclusively: a second holder at the same time finds the marker and says 'overlap'.
_LOCK_WORKER = r'''
import os, sys, time
sys.path.insert(0, sys.argv[3])
from lo_tf.errors import UserError
from lo_tf.io_utils import DirectoryLock
directory, marker = sys.argv[1], sys.argv[2]
for _ in sys.stdin:
  try:
    lock = DirectoryLock(directory)
  except UserError:
    print('busy', flush=True)
    continue
  try:
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    lock.release()
    print('overlap', flush=True)
    continue
  time.sleep(0.01)
  os.close(fd)
  os.remove(marker)
  lock.release()
  print('held', flush=True)
'''


def test_directory_lock_is_held_by_one_of_six_racing_processes(tmp_path):
  locked = tmp_path / 'train_dir'
  locked.mkdir()
  marker = str(tmp_path / 'inside')
  workers = [subprocess.Popen([sys.executable, '-c', _LOCK_WORKER, str(locked), marker, REPO],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
  counts = {'held': 0, 'busy': 0, 'overlap': 0}
  try:
    for _ in range(60):
      for w in workers:  # all six try at once
        w.stdin.write('\n')
        w.stdin.flush()
      outcomes = [w.stdout.readline().strip() for w in workers]
      assert 'held' in outcomes, outcomes  # a free lock is always taken by someone
      for outcome in outcomes:
        counts[outcome] += 1
  finally:
    for w in workers:
      w.stdin.close()
      w.wait(timeout=30)
  assert counts['overlap'] == 0, counts
  assert counts['busy'] > 0, counts  # the trials did contend
  assert not os.path.exists(locked / '.lock')  # released locks leave nothing behind


def test_a_sigkilled_holder_frees_the_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; sys.path.insert(0, sys.argv[2]); '
       'from lo_tf.io_utils import DirectoryLock; lock = DirectoryLock(sys.argv[1]); '
       'print("locked", flush=True); time.sleep(600)', str(tmp_path), REPO],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(UserError) as e:
      io_utils.DirectoryLock(str(tmp_path))
    assert f'pid {holder.pid}' in _one_line(e) and 'in use by another process' in str(e.value)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert (tmp_path / '.lock').exists()  # the kill left the file, but the kernel freed the lock
  with io_utils.DirectoryLock(str(tmp_path)):
    assert (tmp_path / '.lock').read_text() == str(os.getpid())
  assert not (tmp_path / '.lock').exists()


def test_lock_contents_do_not_matter_and_release_is_idempotent(tmp_path):
  (tmp_path / '.lock').write_text('1')  # a pid that lives (init) no longer blocks: only flock does
  lock = io_utils.DirectoryLock(str(tmp_path))
  with pytest.raises(UserError, match=f'pid {os.getpid()}'):
    io_utils.DirectoryLock(str(tmp_path))  # a second lock of the same process is refused too
  lock.release()
  lock.release()
  io_utils.DirectoryLock(str(tmp_path)).release()


# ------------------------------------------------------------------ checkpoint fallback

_STEPS = (2, 4, 6)


def _theta(step):
  return np.full(MLPLOpt().num_meta_params, 0.01 * step, np.float32)


def _objects():
  lopt = MLPLOpt()
  theta = tf.Variable(tf.zeros([lopt.num_meta_params]), name='theta')
  step = tf.Variable(0, dtype=tf.int64)
  extra = tf.Variable(tf.zeros([3, 5]))
  return tf.train.Checkpoint(theta=theta, step=step, extra=extra), theta, step, extra


def _write_train_dir(directory, steps=_STEPS, nan_at=None):
  """A train_dir as bin/train writes it: kept checkpoints with digests, and lopt.json."""
  ckpt, theta, step, extra = _objects()
  manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=len(steps))
  for s in steps:
    theta.assign(_theta(s) * (np.nan if s == nan_at else 1.0))
    step.assign(s)
    extra.assign(tf.fill([3, 5], float(s)))
    checkpoints.write_digest(manager.save(checkpoint_number=s))
  io_utils.atomic_write_json(os.path.join(directory, 'lopt.json'),
                             {'lopt': MLPLOpt().config(), 'objective': 'train'})
  return str(directory)


def _data(directory, step):
  return os.path.join(directory, f'ckpt-{step}.data-00000-of-00001')


def _index(directory, step):
  return os.path.join(directory, f'ckpt-{step}.index')


def _flip(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0x10]))


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _remove_digests(directory):
  for name in os.listdir(directory):
    if name.endswith('.sha256.json'):
      os.remove(os.path.join(directory, name))


CORRUPTIONS = {
    'data_flipped': lambda d, s: _flip(_data(d, s), os.path.getsize(_data(d, s)) // 2),
    'data_truncated': lambda d, s: _truncate(_data(d, s)),
    'data_missing': lambda d, s: os.remove(_data(d, s)),
    'index_truncated': lambda d, s: _truncate(_index(d, s)),
    'index_missing': lambda d, s: os.remove(_index(d, s)),
    'index_tail_flipped': lambda d, s: _flip(_index(d, s), os.path.getsize(_index(d, s)) - 10),
    'digest_truncated': lambda d, s: _truncate(d + f'/ckpt-{s}.sha256.json'),
}


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
  return _write_train_dir(tmp_path_factory.mktemp('pristine'))


@pytest.fixture
def train_dir(pristine, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(pristine, copy)
  return copy


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and
          r.pathname.endswith('checkpoints.py')]


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(train_dir, corruption, caplog):
  CORRUPTIONS[corruption](train_dir, 6)
  ckpt, theta, step, extra = _objects()
  with caplog.at_level(logging.WARNING):
    restored = checkpoints.restore_newest_valid(train_dir, ckpt)
  assert restored.prefix == os.path.join(train_dir, 'ckpt-4') and restored.number == 4
  np.testing.assert_array_equal(theta.numpy(), _theta(4))
  assert int(step) == 4 and np.all(extra.numpy() == 4.0)
  assert [os.path.basename(p) for p, _ in restored.skipped] == ['ckpt-6']
  assert restored.older == (os.path.join(train_dir, 'ckpt-2'),)
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and 'ckpt-6' in warnings[0] and 'using ckpt-4' in warnings[0], warnings
  # bin/eval's loader takes the same fallback.
  _, _, loaded_theta, meta = checkpoints.load_learned_optimizer(train_dir)
  np.testing.assert_array_equal(loaded_theta.numpy(), _theta(4))
  assert meta['outer_steps'] == 4 and meta['checkpoint'].endswith('ckpt-4')


def test_tensorflow_alone_notices_a_flipped_data_byte(train_dir):
  _remove_digests(train_dir)
  CORRUPTIONS['data_flipped'](train_dir, 6)
  assert checkpoints.restore_newest_valid(train_dir).number == 4


def test_two_corrupt_checkpoints_fall_back_to_the_oldest(train_dir):
  CORRUPTIONS['data_truncated'](train_dir, 6)
  CORRUPTIONS['index_missing'](train_dir, 4)
  restored = checkpoints.restore_newest_valid(train_dir)
  assert restored.number == 2 and len(restored.skipped) == 2 and restored.older == ()
  np.testing.assert_array_equal(restored.reader.get_tensor(checkpoints._THETA_KEY), _theta(2))


@pytest.mark.parametrize('content', [b'', b'garbage that is no CheckpointState',
                                     b'\xff\xfe\x00\x01binary'])
def test_unreadable_checkpoint_index_is_bypassed_by_scanning(train_dir, content, caplog):
  with open(os.path.join(train_dir, 'checkpoint'), 'wb') as f:
    f.write(content)
  with caplog.at_level(logging.WARNING):
    restored = checkpoints.restore_newest_valid(train_dir)
  assert restored.number == 6 and restored.skipped == () and restored.index_problem
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and "'checkpoint' index unreadable" in warnings[0], warnings


def test_rewritten_index_lets_a_checkpoint_manager_continue(train_dir):
  with open(os.path.join(train_dir, 'checkpoint'), 'wb') as f:
    f.write(b'')  # makes tf.train.CheckpointManager's constructor raise
  CORRUPTIONS['data_flipped'](train_dir, 6)
  ckpt, theta, _, _ = _objects()
  restored = checkpoints.restore_newest_valid(train_dir, ckpt)
  checkpoints.write_checkpoint_index(train_dir, restored)
  manager = tf.train.CheckpointManager(ckpt, train_dir, max_to_keep=3)
  assert manager.latest_checkpoint == os.path.join(train_dir, 'ckpt-4')
  assert manager.checkpoints == [os.path.join(train_dir, f'ckpt-{s}') for s in (2, 4)]
  for s in (5, 6):  # resumed training saves again; the corrupt ckpt-6 is replaced
    theta.assign(_theta(s))
    checkpoints.write_digest(manager.save(checkpoint_number=s))
  assert [os.path.basename(p) for p in manager.checkpoints] == ['ckpt-4', 'ckpt-5', 'ckpt-6']
  assert checkpoints.restore_newest_valid(train_dir).number == 6
  assert tf.train.get_checkpoint_state(train_dir).model_checkpoint_path.endswith('ckpt-6')


def test_write_checkpoint_index_does_nothing_when_all_was_well(train_dir):
  before = open(os.path.join(train_dir, 'checkpoint')).read()
  checkpoints.write_checkpoint_index(train_dir, checkpoints.restore_newest_valid(train_dir))
  assert open(os.path.join(train_dir, 'checkpoint')).read() == before


def test_every_checkpoint_corrupt_is_one_line_error(train_dir):
  CORRUPTIONS['data_flipped'](train_dir, 6)
  CORRUPTIONS['index_truncated'](train_dir, 4)
  CORRUPTIONS['data_missing'](train_dir, 2)
  with open(os.path.join(train_dir, 'checkpoint'), 'w') as f:
    f.write('garbled')
  ckpt, _, _, _ = _objects()
  for call in (lambda: checkpoints.restore_newest_valid(train_dir, ckpt),
               lambda: checkpoints.load_learned_optimizer(train_dir)):
    with pytest.raises(UserError) as e:
      call()
    message = _one_line(e)
    for part in ('ckpt-6', 'ckpt-4', 'ckpt-2', "'checkpoint' index unreadable", 'is corrupt'):
      assert part in message, (part, message)


def test_non_finite_theta_is_never_accepted(tmp_path):
  directory = _write_train_dir(tmp_path, nan_at=6)
  assert checkpoints.restore_newest_valid(directory).number == 4
  with pytest.raises(UserError, match='non-finite'):
    checkpoints.load_learned_optimizer(os.path.join(directory, 'ckpt-6'))


def test_a_checkpoint_of_another_shape_is_skipped_as_incompatible(train_dir):
  theta = tf.Variable(tf.zeros([7]))
  with pytest.raises(UserError) as e:
    checkpoints.restore_newest_valid(train_dir, tf.train.Checkpoint(theta=theta))
  assert 'does not fit this run' in _one_line(e)


def test_fresh_and_index_only_train_dirs(tmp_path):
  assert checkpoints.restore_newest_valid(str(tmp_path)) is None
  (tmp_path / 'checkpoint').write_text('model_checkpoint_path: "ckpt-3"\n')
  with pytest.raises(UserError) as e:
    checkpoints.restore_newest_valid(str(tmp_path))
  assert 'ckpt-3' in _one_line(e)  # listed, but its files are gone
  (tmp_path / 'checkpoint').write_text('garbled')
  with pytest.raises(UserError) as e:
    checkpoints.restore_newest_valid(str(tmp_path))
  assert 'no ckpt-N checkpoint files' in _one_line(e)


def test_explicit_checkpoint_path_has_no_fallback(train_dir):
  CORRUPTIONS['data_truncated'](train_dir, 6)
  with pytest.raises(UserError) as e:
    checkpoints.load_learned_optimizer(os.path.join(train_dir, 'ckpt-6'))
  assert 'ckpt-6 is corrupt or incompatible' in _one_line(e)
  _, _, theta, meta = checkpoints.load_learned_optimizer(os.path.join(train_dir, 'ckpt-2'))
  np.testing.assert_array_equal(theta.numpy(), _theta(2))
  assert meta['outer_steps'] == 2


def test_remove_temp_dirs_deletes_only_tensorflow_leftovers(train_dir):
  empty = os.path.join(train_dir, 'ckpt-8_temp')
  partial = os.path.join(train_dir, 'ckpt-10_temp')
  foreign = os.path.join(train_dir, 'ckpt-12_temp')
  for d in (empty, partial, foreign):
    os.mkdir(d)
  # What a SIGKILL during a save leaves (observed with TF 2.21).
  with open(os.path.join(partial, 'part-00000-of-00001.data-00000-of-00001.tempstate123'),
            'wb') as f:
    f.write(b'\x00' * 100)
  with open(os.path.join(foreign, 'notes.txt'), 'w') as f:
    f.write('mine')
  with open(os.path.join(train_dir, 'ckpt-14_temp'), 'w') as f:
    f.write('a file, not a directory')
  assert checkpoints.remove_temp_dirs(train_dir) == sorted([empty, partial])
  assert os.path.isdir(foreign) and os.path.isfile(os.path.join(train_dir, 'ckpt-14_temp'))
  assert checkpoints.restore_newest_valid(train_dir).number == 6


# ------------------------------------------------------------------ JSON files


@pytest.mark.parametrize('content,fragment', [
    (b'', 'is empty'),
    (b'  \n', 'is empty'),
    (b'{"lopt": {"hidden_size": 3', 'truncated or not JSON'),
    (b'\xff\xfe{}', 'truncated or not JSON'),
    (b'[1, 2]', 'holds JSON an array, not an object'),
    (b'"text"', 'holds JSON a string, not an object'),
])
def test_read_json_refuses_damaged_files_in_one_line(tmp_path, content, fragment):
  path = tmp_path / 'x.json'
  path.write_bytes(content)
  with pytest.raises(UserError) as e:
    io_utils.read_json(str(path), dict, 'test record', 'rewrite it')
  message = _one_line(e)
  assert fragment in message and str(path) in message and message.endswith('rewrite it')


def test_read_json_missing_file_and_accepted_types(tmp_path):
  with pytest.raises(UserError, match='cannot be read'):
    io_utils.read_json(str(tmp_path / 'absent.json'), dict, 'test record')
  (tmp_path / 'l.json').write_text('[1, 2.5]')
  assert io_utils.read_json(str(tmp_path / 'l.json'), (dict, list), 'test record') == [1, 2.5]


def test_atomic_write_json_maps_non_finite_numbers_to_null(tmp_path):
  path = str(tmp_path / 'out.json')
  io_utils.atomic_write_json(path, {
      'nan': float('nan'), 'inf': [math.inf, -math.inf, 1.5], 'np_nan': np.float32('nan'),
      'np_value': np.float32(2.5), 'array': np.array([1.0, np.inf]), 'int': np.int64(3),
      'nested': {'t': (np.float64('-inf'), 'text', None, True)}})
  text = open(path).read()
  assert 'NaN' not in text and 'Infinity' not in text

  def refuse(token):
    raise AssertionError(f'non-standard JSON token {token}')

  assert json.loads(text, parse_constant=refuse) == {
      'nan': None, 'inf': [None, None, 1.5], 'np_nan': None, 'np_value': 2.5,
      'array': [1.0, None], 'int': 3, 'nested': {'t': [None, 'text', None, True]}}


@pytest.mark.parametrize('content,fragment', [
    (b'', 'is empty'), (b'{"lopt": ', 'truncated'), (b'[]', 'an array'),
    (b'{"objective": "train"}', 'no learned-optimizer configuration'),
    (b'{"lopt": {"hidden_size": "big"}}', 'not understood'),
    (b'{"lopt": {"no_such_option": 1}}', 'not understood'),
])
def test_damaged_lopt_json_is_one_line_error(train_dir, content, fragment):
  with open(os.path.join(train_dir, 'lopt.json'), 'wb') as f:
    f.write(content)
  with pytest.raises(UserError) as e:
    checkpoints.load_learned_optimizer(train_dir)
  assert fragment in _one_line(e)


def test_damaged_provenance_files_are_one_line_errors(train_dir, tmp_path):
  out = str(tmp_path / 'pretrained')
  with open(os.path.join(train_dir, 'throughput.json'), 'w') as f:
    f.write('{"wall_seconds_total": 12')
  with pytest.raises(UserError) as e:
    export.export_from_flags(train_dir, 'x', 'cmd', git_revision='abc', out_dir=out)
  assert 'throughput record' in _one_line(e)
  os.remove(os.path.join(train_dir, 'throughput.json'))
  results = tmp_path / 'results.json'
  results.write_text('[]')
  with pytest.raises(UserError) as e:
    export.export_from_flags(train_dir, 'x', 'cmd', str(results), 'abc', out_dir=out)
  assert 'evaluation results' in _one_line(e)


# ------------------------------------------------------------------ export


def test_export_refuses_an_existing_name_unless_overwrite(train_dir, tmp_path, monkeypatch):
  out = str(tmp_path / 'pretrained')
  first = export.export_from_flags(train_dir, 'my_opt_1', 'cmd', git_revision='abc',
                                        out_dir=out)
  assert first == os.path.join(out, 'my_opt_1.json')
  with pytest.raises(UserError) as e:
    export.export_from_flags(train_dir, 'my_opt_1', 'other', git_revision='abc', out_dir=out)
  assert '--overwrite' in _one_line(e) and 'my_opt_1' in str(e.value)
  assert json.load(open(first))['command'] == 'cmd'  # untouched
  export.export_from_flags(os.path.join(train_dir, 'ckpt-2'), 'my_opt_1', 'other',
                                git_revision='abc', overwrite=True, out_dir=out)
  meta = json.load(open(first))
  assert meta['command'] == 'other' and meta['outer_steps'] == 2
  # The shipped files load back by name.
  monkeypatch.setattr(checkpoints, 'PRETRAINED_DIR', out)
  name, _, theta, _ = checkpoints.load_learned_optimizer('my_opt_1')
  assert name == 'my_opt_1'
  np.testing.assert_array_equal(theta.numpy(), _theta(2))


@pytest.mark.parametrize('name', ['', 'Omniglot', 'ö_opt', 'ｆｕｌｌ', 'a-b', 'a b', 'a/b',
                                  '..'])
def test_export_names_are_ascii_lowercase_digits_underscores(name, tmp_path):
  with pytest.raises(UserError) as e:  # refused before the (missing) checkpoint is even read
    checkpoints.export_pretrained(str(tmp_path / 'missing'), name, {}, out_dir=str(tmp_path))
  assert '[a-z0-9_]+' in _one_line(e)


def test_damaged_shipped_files_are_one_line_errors(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoints, 'PRETRAINED_DIR', str(tmp_path))
  (tmp_path / 'a.json').write_text('["not", "an", "object"]')
  (tmp_path / 'b.json').write_text(json.dumps({'lopt': MLPLOpt().config()}))
  (tmp_path / 'b.npz').write_bytes(b'truncated')
  for name, fragment in (('a', 'an array'), ('b', 'unreadable')):
    with pytest.raises(UserError) as e:
      checkpoints.load_learned_optimizer(name)
    assert fragment in _one_line(e)


def test_bin_export_optimizer_refuses_a_non_ascii_name(tmp_path):
  # PYTHONPATH: this checkout's lo_tf, not the one an editable install may point at.
  done = subprocess.run([sys.executable, os.path.join(REPO, 'bin', 'export_optimizer'),
                         f'--checkpoint={tmp_path}', '--name=ömni'], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 2 and 'Traceback' not in done.stderr, done.stderr[-2000:]
  assert 'error: ' in done.stderr and '[a-z0-9_]+' in done.stderr
  assert not any(n.startswith('ömni') for n in os.listdir(checkpoints.PRETRAINED_DIR))


# ------------------------------------------------------------------ refused runs leave nothing


def test_refused_run_removes_the_directories_it_created(tmp_path):
  target = tmp_path / 'a' / 'b' / 'run'
  with pytest.raises(UserError):
    with io_utils.remove_created_dirs_on_error(str(target)):
      io_utils.ensure_writable_dir(str(target))
      with io_utils.DirectoryLock(str(target)):
        raise UserError('bad input')
  assert os.listdir(tmp_path) == []


def test_directories_with_content_or_that_existed_are_kept(tmp_path):
  target = tmp_path / 'a' / 'run'
  with pytest.raises(KeyboardInterrupt):
    with io_utils.remove_created_dirs_on_error(str(target)):
      io_utils.ensure_writable_dir(str(target))
      (target / 'config.gin').write_text('x')
      raise KeyboardInterrupt
  assert (target / 'config.gin').exists()
  existing = tmp_path / 'existing'
  existing.mkdir()
  with pytest.raises(UserError):
    with io_utils.remove_created_dirs_on_error(str(existing)):
      raise UserError('bad input')
  assert existing.is_dir()
  with io_utils.remove_created_dirs_on_error(str(tmp_path / 'ok')):
    io_utils.ensure_writable_dir(str(tmp_path / 'ok'))
  assert (tmp_path / 'ok').is_dir()


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


def test_export_of_several_runs_ships_the_best_by_outer_train_meta_loss(tmp_path):
  """Paper §4.3: θ seeds are compared by outer-training loss; each run stands for its best θ."""
  runs = []
  for i, score in enumerate((0.9, 0.4, 0.7)):
    run = tmp_path / f'seed{i}'
    _write_train_dir(str(run / 'best'), steps=(i + 1,))
    io_utils.atomic_write_json(str(run / 'throughput.json'),
                               {'best_meta_eval_score': score, 'git_revision': 'abc'})
    runs.append(str(run))
  out = str(tmp_path / 'pretrained')
  meta = json.load(open(export.export_from_flags(runs, 'best_of_3', 'cmd', out_dir=out)))
  assert meta['selected'] == runs[1] and meta['outer_steps'] == 2
  assert [c['best_meta_eval_score'] for c in meta['selection']] == [0.9, 0.4, 0.7]
  with pytest.raises(UserError, match='finished train_dirs'):
    export.export_from_flags(runs + [os.path.join(runs[0], 'best', 'ckpt-1')], 'x', 'cmd',
                             out_dir=out)


def _export_candidate(tmp_path, name, score, config_file, config_text):
  run = tmp_path / name
  _write_train_dir(str(run / 'best'), steps=(1,))
  io_utils.atomic_write_json(str(run / 'throughput.json'), {'best_meta_eval_score': score})
  (run / config_file).write_text(config_text)
  return str(run)


@pytest.mark.parametrize('config_file', ['operative_config.gin', 'config.gin'])
def test_export_refuses_to_rank_runs_of_different_task_distributions(tmp_path, config_file):
  three = "TaskDistribution.num_classes = 3\nTaskDistribution.train_source = 'digits'\n"
  four = "TaskDistribution.num_classes = 4\nTaskDistribution.train_source = 'digits'\n"
  runs = [_export_candidate(tmp_path, 'three_way', 0.9, config_file, three),
          _export_candidate(tmp_path, 'four_way', 0.4, config_file, four)]
  out = str(tmp_path / 'pretrained')
  with pytest.raises(UserError) as e:
    export.export_from_flags(runs, 'mixed', 'cmd', out_dir=out)
  message = _one_line(e)
  assert 'TaskDistribution.num_classes (3 vs 4)' in message and 'not comparable' in message
  assert not os.path.exists(out)
  # Runs of one task distribution (the other bindings may differ) are ranked.
  runs.append(_export_candidate(tmp_path, 'three_way_again', 0.5, config_file,
                                three + 'OuterLearner.outer_learning_rate = 0.001\n'))
  meta = json.load(open(export.export_from_flags([runs[0], runs[2]], 'same', 'cmd',
                                                 out_dir=out)))
  assert meta['selected'] == runs[2]


# ------------------------------------------------------------------ evaluation cache


def _curves(num_steps, num_evals):
  from lo_tf.inner_training import InnerCurves  # pylint: disable=g-import-not-at-top
  e = np.linspace(1.0, 0.5, num_evals, dtype=np.float32)
  return InnerCurves(train_loss=np.linspace(1.0, 0.5, num_steps, dtype=np.float32),
                     seconds=np.arange(1, num_steps + 1, dtype=np.float64),
                     eval_steps=np.arange(num_evals, dtype=np.int32) * 6,
                     eval_seconds=np.arange(num_evals, dtype=np.float64), valid_loss=e,
                     valid_acc=e, train_eval_loss=e, train_eval_acc=e,
                     steps_completed=num_steps, diverged=False)


def test_a_cache_entry_with_arrays_of_the_wrong_length_is_recomputed(tmp_path):
  """A well-formed .npz of another run length (a baseline came back with 1 step) is a miss."""
  from lo_tf.evaluation import CurveCache  # pylint: disable=g-import-not-at-top
  from lo_tf.evaluation import Evaluator  # pylint: disable=g-import-not-at-top
  from lo_tf.experiment import Experiment  # pylint: disable=g-import-not-at-top
  from lo_tf.inner_training import InnerTrainer  # pylint: disable=g-import-not-at-top
  from lo_tf.tasks.distribution import TaskDistribution  # pylint: disable=g-import-not-at-top
  from lo_tf.tasks.problems import ConvNet  # pylint: disable=g-import-not-at-top
  cache = CurveCache(str(tmp_path / 'cache'), num_steps=12, num_evals=3)
  for key, curves in (('good', _curves(12, 3)), ('one_step', _curves(1, 3)),
                      ('one_eval', _curves(12, 1))):
    cache.put(key, curves)
  np.testing.assert_array_equal(cache.get('good').train_loss, _curves(12, 3).train_loss)
  assert cache.get('one_step') is None and cache.get('one_eval') is None
  assert (cache.hits, cache.misses) == (1, 2)
  # The evaluator's cache expects its inner trainer's T and number of evaluations.
  tasks = TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5)
  problem = ConvNet(tasks.image_shape, 3, channels=(4,), strides=(2,))
  experiment = Experiment(tasks, problem, InnerTrainer(problem, num_steps=12, batch_size=8,
                                                       eval_every=6))
  evaluator = Evaluator(experiment, str(tmp_path / 'eval'), num_tasks=1, num_inits=1)
  assert (evaluator.cache.num_steps, evaluator.cache.num_evals) == (12, 3)

"""The io_utils guarantees: one process per directory (an OS lock), strict JSON, atomic
writes, and no litter from a refused run. Every lock test races real processes.
"""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from conftest import one_line
from lo_tf import io_utils
from lo_tf.errors import UserError


# ------------------------------------------------------------------ DirectoryLock

# A process takes the lock once per line read from stdin. While it holds the lock it creates a
# marker file exclusively: a second holder at the same time finds the marker and says 'overlap'.
_LOCK_TAKER = r'''
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
  takers = [subprocess.Popen([sys.executable, '-c', _LOCK_TAKER, str(locked), marker, REPO],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
  counts = {'held': 0, 'busy': 0, 'overlap': 0}
  try:
    for _ in range(60):
      for w in takers:  # all six try at once
        w.stdin.write('\n')
        w.stdin.flush()
      outcomes = [w.stdout.readline().strip() for w in takers]
      assert 'held' in outcomes, outcomes  # a free lock is always taken by someone
      for outcome in outcomes:
        counts[outcome] += 1
  finally:
    for w in takers:
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
    assert f'pid {holder.pid}' in one_line(e) and 'in use by another process' in str(e.value)
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


# ------------------------------------------------------------------ JSON files


@pytest.mark.parametrize('content,fragment', [
    (b'', 'is empty'),
    (b'  \n', 'is empty'),
    (b'{"lopt": {"hidden_size": 3', 'truncated or not JSON'),
    (b'\xff\xfe{}', 'truncated or not JSON'),
    (b'[1, 2]', 'holds JSON an array, not an object'),
    (b'"text"', 'holds JSON a string, not an object'),
])
def test_read_json_refuses_damaged_files_inone_line(tmp_path, content, fragment):
  path = tmp_path / 'x.json'
  path.write_bytes(content)
  with pytest.raises(UserError) as e:
    io_utils.read_json(str(path), dict, 'test record', 'rewrite it')
  message = one_line(e)
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

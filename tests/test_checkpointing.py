"""A train_dir's checkpoints: digests, fallback to the newest valid one, the index, temp dirs.

Every corrupt file here is a real file damaged on disk (truncated, a flipped byte, deleted).
"""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import checkpoint_objects
from conftest import one_line
from conftest import theta_at
from conftest import write_train_dir
from lo_tf import checkpointing
from lo_tf.errors import UserError
from lo_tf.learned_optimizers import pretrained


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


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and
          r.pathname.endswith('checkpointing.py')]


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(train_dir, corruption, caplog):
  CORRUPTIONS[corruption](train_dir, 6)
  ckpt, theta, step, extra = checkpoint_objects()
  with caplog.at_level(logging.WARNING):
    restored = checkpointing.restore_newest_valid(train_dir, ckpt)
  assert restored.prefix == os.path.join(train_dir, 'ckpt-4') and restored.number == 4
  np.testing.assert_array_equal(theta.numpy(), theta_at(4))
  assert int(step) == 4 and np.all(extra.numpy() == 4.0)
  assert [os.path.basename(p) for p, _ in restored.skipped] == ['ckpt-6']
  assert restored.older == (os.path.join(train_dir, 'ckpt-2'),)
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and 'ckpt-6' in warnings[0] and 'using ckpt-4' in warnings[0], warnings
  # bin/eval's loader takes the same fallback.
  _, _, loaded_theta, meta = pretrained.load(train_dir)
  np.testing.assert_array_equal(loaded_theta.numpy(), theta_at(4))
  assert meta['outer_steps'] == 4 and meta['checkpoint'].endswith('ckpt-4')


def test_tensorflow_alone_notices_a_flipped_data_byte(train_dir):
  _remove_digests(train_dir)
  CORRUPTIONS['data_flipped'](train_dir, 6)
  assert checkpointing.restore_newest_valid(train_dir).number == 4


def test_two_corrupt_checkpoints_fall_back_to_the_oldest(train_dir):
  CORRUPTIONS['data_truncated'](train_dir, 6)
  CORRUPTIONS['index_missing'](train_dir, 4)
  restored = checkpointing.restore_newest_valid(train_dir)
  assert restored.number == 2 and len(restored.skipped) == 2 and restored.older == ()
  np.testing.assert_array_equal(restored.reader.get_tensor(checkpointing.THETA_KEY), theta_at(2))


@pytest.mark.parametrize('content', [b'', b'garbage that is no CheckpointState',
                                     b'\xff\xfe\x00\x01binary'])
def test_unreadable_checkpoint_index_is_bypassed_by_scanning(train_dir, content, caplog):
  with open(os.path.join(train_dir, 'checkpoint'), 'wb') as f:
    f.write(content)
  with caplog.at_level(logging.WARNING):
    restored = checkpointing.restore_newest_valid(train_dir)
  assert restored.number == 6 and restored.skipped == () and restored.index_problem
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and "'checkpoint' index unreadable" in warnings[0], warnings


def test_rewritten_index_lets_a_checkpoint_manager_continue(train_dir):
  with open(os.path.join(train_dir, 'checkpoint'), 'wb') as f:
    f.write(b'')  # makes tf.train.CheckpointManager's constructor raise
  CORRUPTIONS['data_flipped'](train_dir, 6)
  ckpt, theta, _, _ = checkpoint_objects()
  restored = checkpointing.restore_newest_valid(train_dir, ckpt)
  checkpointing.tidy_checkpoints(train_dir, restored, keep=3)
  manager = tf.train.CheckpointManager(ckpt, train_dir, max_to_keep=3)
  assert manager.latest_checkpoint == os.path.join(train_dir, 'ckpt-4')
  assert manager.checkpoints == [os.path.join(train_dir, f'ckpt-{s}') for s in (2, 4)]
  for s in (5, 6):  # resumed training saves again; the corrupt ckpt-6 is replaced
    theta.assign(theta_at(s))
    checkpointing.write_digest(manager.save(checkpoint_number=s))
  assert [os.path.basename(p) for p in manager.checkpoints] == ['ckpt-4', 'ckpt-5', 'ckpt-6']
  assert checkpointing.restore_newest_valid(train_dir).number == 6
  assert tf.train.get_checkpoint_state(train_dir).model_checkpoint_path.endswith('ckpt-6')


def test_tidying_does_nothing_when_all_was_well(train_dir):
  before = open(os.path.join(train_dir, 'checkpoint')).read()
  checkpointing.tidy_checkpoints(train_dir, checkpointing.restore_newest_valid(train_dir), keep=3)
  assert open(os.path.join(train_dir, 'checkpoint')).read() == before


def test_every_checkpoint_corrupt_is_one_line_error(train_dir):
  CORRUPTIONS['data_flipped'](train_dir, 6)
  CORRUPTIONS['index_truncated'](train_dir, 4)
  CORRUPTIONS['data_missing'](train_dir, 2)
  with open(os.path.join(train_dir, 'checkpoint'), 'w') as f:
    f.write('garbled')
  ckpt, _, _, _ = checkpoint_objects()
  for call in (lambda: checkpointing.restore_newest_valid(train_dir, ckpt),
               lambda: pretrained.load(train_dir)):
    with pytest.raises(UserError) as e:
      call()
    message = one_line(e)
    for part in ('ckpt-6', 'ckpt-4', 'ckpt-2', "'checkpoint' index unreadable", 'is corrupt'):
      assert part in message, (part, message)


def test_non_finite_theta_is_never_accepted(tmp_path):
  directory = write_train_dir(tmp_path, nan_at=6)
  assert checkpointing.restore_newest_valid(directory).number == 4
  with pytest.raises(UserError, match='non-finite'):
    pretrained.load(os.path.join(directory, 'ckpt-6'))


def test_a_checkpoint_of_another_shape_is_skipped_as_incompatible(train_dir):
  theta = tf.Variable(tf.zeros([7]))
  with pytest.raises(UserError) as e:
    checkpointing.restore_newest_valid(train_dir, tf.train.Checkpoint(theta=theta))
  assert 'does not fit this run' in one_line(e)


def test_fresh_and_index_only_train_dirs(tmp_path):
  assert checkpointing.restore_newest_valid(str(tmp_path)) is None
  (tmp_path / 'checkpoint').write_text('model_checkpoint_path: "ckpt-3"\n')
  with pytest.raises(UserError) as e:
    checkpointing.restore_newest_valid(str(tmp_path))
  assert 'ckpt-3' in one_line(e)  # listed, but its files are gone
  (tmp_path / 'checkpoint').write_text('garbled')
  with pytest.raises(UserError) as e:
    checkpointing.restore_newest_valid(str(tmp_path))
  assert 'no ckpt-N checkpoint files' in one_line(e)


def test_explicit_checkpoint_path_has_no_fallback(train_dir):
  CORRUPTIONS['data_truncated'](train_dir, 6)
  with pytest.raises(UserError) as e:
    pretrained.load(os.path.join(train_dir, 'ckpt-6'))
  assert 'ckpt-6 is corrupt or incompatible' in one_line(e)
  _, _, theta, meta = pretrained.load(os.path.join(train_dir, 'ckpt-2'))
  np.testing.assert_array_equal(theta.numpy(), theta_at(2))
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
  assert checkpointing.remove_temp_dirs(train_dir) == sorted([empty, partial])
  assert os.path.isdir(foreign) and os.path.isfile(os.path.join(train_dir, 'ckpt-14_temp'))
  assert checkpointing.restore_newest_valid(train_dir).number == 6

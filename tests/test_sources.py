"""lo_tf.data.sources.load_source: the four spec kinds and their one-line UserErrors."""

import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import OMNIGLOT
from conftest import require
from lo_tf.data.sources import load_source
from lo_tf.errors import UserError


def _message(excinfo):
  """The UserError's own message: its first line.

  gin appends "\n  In call to configurable 'load_source' (...)" to exceptions raised inside a
  configurable; anything after the first line must be only that annotation.
  """
  lines = str(excinfo.value).splitlines()
  assert lines and lines[0].strip(), 'empty error message'
  for extra in lines[1:]:
    assert extra.strip().startswith('In call to configurable'), (
        f'error message has more than one line of its own: {str(excinfo.value)!r}')
  return lines[0]


def _write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(path, tf.io.encode_png(tf.constant(array, tf.uint8)))


# ------------------------------------------------------------------ digits


def test_digits_shape_dtype_and_classes():
  s = load_source('digits')
  assert s.images.shape == (1797, 8, 8, 1)
  assert s.images.dtype == np.uint8
  assert s.labels.shape == (1797,)
  assert s.labels.dtype == np.int64
  assert s.num_classes == 10
  assert s.class_names == tuple(str(i) for i in range(10))
  assert set(np.unique(s.labels)) == set(range(10))
  # The 0..16 counts are rescaled to the full uint8 range.
  assert s.images.max() == 255 and s.images.min() == 0
  assert s.spec == 'digits'


# ------------------------------------------------------------------ folder: (Omniglot)


@pytest.fixture(scope='module')
def small1():
  path = require(os.path.join(OMNIGLOT, 'images_background_small1'))
  return load_source('folder:' + path)


def test_omniglot_folder_has_136_classes_of_20(small1):
  assert small1.num_classes == 136
  assert small1.images.shape == (136 * 20, 105, 105, 1)
  assert small1.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(small1.labels, minlength=136), np.full(136, 20))
  # Leaf folders alphabet/character are the classes, in sorted order.
  assert small1.class_names[0] == 'Balinese/character01'
  assert len(set(small1.class_names)) == 136
  assert all(name.count('/') == 1 for name in small1.class_names)
  assert list(small1.class_names) == sorted(small1.class_names)


def test_omniglot_background_is_white(small1):
  frac_white = np.mean(small1.images == 255)
  assert frac_white > 0.8, frac_white
  # Binary PNGs: only black strokes and white background.
  assert set(np.unique(small1.images)) <= {0, 255}
  assert np.mean(small1.images == 0) > 0.01  # there are strokes


# ------------------------------------------------------------------ folder: (synthetic)


def test_folder_reads_class_subfolders(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for cls in ('b_cls', 'a_cls'):
    for j in range(2):
      arr = rng.integers(0, 256, size=(5, 4, 1), dtype=np.uint8)
      arrays[(cls, j)] = arr
      _write_png(str(tmp_path / cls / f'{j}.png'), arr)
  s = load_source(f'folder:{tmp_path}')
  assert s.class_names == ('a_cls', 'b_cls')
  assert s.images.shape == (4, 5, 4, 1)
  np.testing.assert_array_equal(s.labels, [0, 0, 1, 1])
  np.testing.assert_array_equal(s.images[0], arrays[('a_cls', 0)])
  np.testing.assert_array_equal(s.images[3], arrays[('b_cls', 1)])


# ------------------------------------------------------------------ npz:


def test_npz_imagenet32_layout_decodes_channel_first_rows(tmp_path):
  n, side = 3, 4
  data = np.arange(n * 3 * side * side, dtype=np.int64) % 251
  data = data.astype(np.uint8).reshape(n, 3 * side * side)
  labels = np.array([1, 5, 1])  # 1-based, as in Imagenet32_train_npz
  np.savez(tmp_path / 'train_data_batch_1.npz', data=data, labels=labels)
  s = load_source(f'npz:{tmp_path}/train_data_batch_*.npz')
  assert s.images.shape == (n, side, side, 3)
  assert s.images.dtype == np.uint8
  for i in range(n):
    for y in range(side):
      for x in range(side):
        for c in range(3):
          assert s.images[i, y, x, c] == data[i, c * side * side + y * side + x]
  # Labels shifted to 0-based: raw 1 -> name '0', raw 5 -> name '4'; ids contiguous.
  assert s.class_names == ('0', '4')
  np.testing.assert_array_equal(s.labels, [0, 1, 0])


def test_npz_images_layout_adds_channel_axis_and_concatenates_files(tmp_path):
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, size=(3, 6, 5), dtype=np.uint8)
  b = rng.integers(0, 256, size=(2, 6, 5), dtype=np.uint8)
  np.savez(tmp_path / 'part0.npz', images=a, labels=np.array([7, 3, 7]))
  np.savez(tmp_path / 'part1.npz', images=b, labels=np.array([3, 9]))
  s = load_source(f'npz:{tmp_path}/part*.npz')
  assert s.images.shape == (5, 6, 5, 1)
  np.testing.assert_array_equal(s.images[..., 0], np.concatenate([a, b]))
  assert s.class_names == ('3', '7', '9')
  np.testing.assert_array_equal(s.labels, [1, 0, 1, 0, 2])


# ------------------------------------------------------------------ errors


def test_unknown_source_kind():
  with pytest.raises(UserError) as e:
    load_source('foo:bar')
  msg = _message(e)
  assert "'foo:bar'" in msg and 'unknown source' in msg


def test_empty_spec():
  with pytest.raises(UserError) as e:
    load_source('')
  assert 'empty' in _message(e)


def test_missing_folder(tmp_path):
  missing = tmp_path / 'does_not_exist'
  with pytest.raises(UserError) as e:
    load_source(f'folder:{missing}')
  msg = _message(e)
  assert str(missing) in msg and 'does not exist' in msg


def test_folder_without_images(tmp_path):
  (tmp_path / 'cls').mkdir()
  (tmp_path / 'cls' / 'readme.txt').write_text('not an image')
  with pytest.raises(UserError) as e:
    load_source(f'folder:{tmp_path}')
  msg = _message(e)
  assert 'no images' in msg and str(tmp_path) in msg


def test_folder_with_inconsistent_image_sizes(tmp_path):
  _write_png(str(tmp_path / 'a' / '0.png'), np.zeros((4, 4, 1), np.uint8))
  _write_png(str(tmp_path / 'b' / '0.png'), np.zeros((5, 3, 1), np.uint8))
  with pytest.raises(UserError) as e:
    load_source(f'folder:{tmp_path}')
  msg = _message(e)
  assert 'inconsistent image sizes' in msg
  assert '(4, 4, 1)' in msg and '(5, 3, 1)' in msg


def test_folder_with_undecodable_image(tmp_path):
  _write_png(str(tmp_path / 'a' / '0.png'), np.zeros((4, 4, 1), np.uint8))
  (tmp_path / 'b').mkdir()
  (tmp_path / 'b' / 'broken.png').write_bytes(b'this is not a png')
  with pytest.raises(UserError) as e:
    load_source(f'folder:{tmp_path}')
  assert 'cannot be decoded' in _message(e)


def test_npz_glob_matching_nothing(tmp_path):
  pattern = f'{tmp_path}/nothing_*.npz'
  with pytest.raises(UserError) as e:
    load_source(f'npz:{pattern}')
  msg = _message(e)
  assert 'no file matches' in msg and pattern in msg


@pytest.mark.parametrize('arrays,fragments', [
    (dict(x=np.zeros((2, 3, 3), np.uint8), y=np.zeros(2)), ("['x', 'y']", '"images" and "labels"')),
    (dict(images=np.zeros((2, 3, 3), np.float32), labels=np.zeros(2)), ('float32', 'uint8')),
    (dict(images=np.zeros((3, 3, 3), np.uint8), labels=np.zeros(2)), ('3 images but 2 labels',)),
])
def test_npz_with_wrong_arrays(tmp_path, arrays, fragments):
  np.savez(tmp_path / 'f.npz', **arrays)
  with pytest.raises(UserError) as e:
    load_source(f'npz:{tmp_path}/f.npz')
  msg = _message(e)
  assert all(f in msg for f in fragments), msg


def test_npz_imagenet_layout_with_wrong_row_length(tmp_path):
  np.savez(tmp_path / 'f.npz', data=np.zeros((2, 10), np.uint8), labels=np.array([1, 2]))
  with pytest.raises(UserError) as e:
    load_source(f'npz:{tmp_path}/f.npz')
  assert '3*S*S' in _message(e)


def test_npz_not_a_zip(tmp_path):
  (tmp_path / 'f.npz').write_bytes(b'garbage')
  with pytest.raises(UserError) as e:
    load_source(f'npz:{tmp_path}/f.npz')
  assert 'not a readable .npz' in _message(e)


@pytest.fixture
def no_network(monkeypatch):
  """Any Python-level connection attempt (tfds downloads use requests/urllib) fails the test."""
  import socket  # pylint: disable=g-import-not-at-top
  attempts = []

  def refuse(self, address, *args, **kwargs):
    attempts.append(address)
    raise OSError(f'test: network access to {address} refused')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket.socket, 'connect_ex', refuse)
  yield attempts
  assert not attempts, f'load_source tried to reach the network: {attempts}'


def test_tfds_not_prepared_does_not_download(tmp_path, no_network):
  data_dir = tmp_path / 'tfds'
  data_dir.mkdir()
  with pytest.raises(UserError) as e:
    load_source('tfds:mnist', tfds_data_dir=str(data_dir))
  msg = _message(e)
  assert 'not prepared' in msg and str(data_dir) in msg and 'mnist' in msg
  # Nothing was downloaded or written into the data dir.
  assert list(data_dir.iterdir()) == []


def test_tfds_unknown_name(tmp_path, no_network):
  with pytest.raises(UserError) as e:
    load_source('tfds:no_such_dataset_xyz', tfds_data_dir=str(tmp_path))
  msg = _message(e)
  assert "'no_such_dataset_xyz'" in msg and 'has no dataset' in msg


def test_npz_imagenet_layout_with_1d_data(tmp_path):
  np.savez(tmp_path / 'f.npz', data=np.zeros(12, np.uint8), labels=np.array([1]))
  with pytest.raises(UserError) as e:
    load_source(f'npz:{tmp_path}/f.npz')
  assert '3*S*S' in _message(e)


def test_npz_edge_cases_are_user_errors(tmp_path):
  np.savez(tmp_path / 'strlabels.npz', images=np.zeros((2, 4, 4), np.uint8),
           labels=np.array(['a', 'b']))
  np.save(tmp_path / 'single.npy', np.zeros((2, 4, 4), np.uint8))
  (tmp_path / 'trunc.npz').write_bytes(
      (lambda b: b[:len(b) // 2])(_npz_bytes(tmp_path)))
  for spec, fragment in ((f'npz:{tmp_path}/strlabels.npz', 'labels must be integers'),
                         (f'npz:{tmp_path}/single.npy', 'not an .npz archive'),
                         (f'npz:{tmp_path}/trunc.npz', 'not a readable .npz archive'),
                         (f'npz:{tmp_path}', 'is a directory')):
    with pytest.raises(UserError) as e:
      load_source(spec)
    assert fragment in str(e.value), str(e.value)


def _npz_bytes(tmp_path):
  np.savez(tmp_path / 'full.npz', images=np.zeros((8, 4, 4), np.uint8), labels=np.arange(8))
  return (tmp_path / 'full.npz').read_bytes()


@pytest.mark.parametrize('arrays,fragment', [
    (dict(images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, -1, 2])),
     'has label -1; store class ids >= 0'),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0.0, 1.5])),
     'labels must be integers'),
    (dict(data=np.zeros((2, 3 * 4 * 4), np.uint8), labels=np.array([0, 1])),
     'has label 0 (the Imagenet32 layout numbers classes from 1)'),
    (dict(images=np.zeros((2, 1, 1), np.uint8), labels=np.array([0, 1])),
     'images are 1x1 pixels; they must be at least 2x2'),
    (dict(images=np.zeros((2, 1, 5, 3), np.uint8), labels=np.array([0, 1])),
     'images are 1x5 pixels'),
    (dict(data=np.zeros((2, 3), np.uint8), labels=np.array([1, 2])), 'images are 1x1 pixels'),
])
def test_npz_with_bad_labels_or_tiny_images(tmp_path, arrays, fragment):
  np.savez(tmp_path / 'f.npz', **arrays)
  with pytest.raises(UserError) as e:
    load_source(f'npz:{tmp_path}/f.npz')
  assert fragment in _message(e)


def test_npz_smallest_accepted_images_and_float_integer_labels(tmp_path):
  np.savez(tmp_path / 'f.npz', images=np.arange(16, dtype=np.uint8).reshape(4, 2, 2),
           labels=np.array([3.0, 0.0, 3.0, 7.0]))
  s = load_source(f'npz:{tmp_path}/f.npz')
  assert s.images.shape == (4, 2, 2, 1)
  np.testing.assert_array_equal(s.labels, [1, 0, 1, 2])
  assert s.class_names == ('0', '3', '7')

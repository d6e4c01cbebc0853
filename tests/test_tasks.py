"""lo_tf.tasks.distribution: class-disjoint outer splits, seeded K-way tasks, preprocessing."""

import os

import numpy as np
import pytest

from conftest import OMNIGLOT
from conftest import require
from lo_tf.errors import UserError
from lo_tf.tasks import distribution
from lo_tf.tasks.distribution import OUTER_TEST
from lo_tf.tasks.distribution import OUTER_TRAIN
from lo_tf.tasks.distribution import OUTER_VALID
from lo_tf.tasks.distribution import TaskDistribution

SPLITS = (OUTER_TRAIN, OUTER_TEST)


def _uncached(dist, split, seed):
  """sample_task without its lru_cache, so determinism is not just a cache hit."""
  return TaskDistribution.sample_task.__wrapped__(dist, split, seed)


@pytest.fixture(scope='module')
def digits3():
  return TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5)


def _write_indexed_npz(path, num_classes, per_class):
  """An npz source whose image n is 2x2 pixels encoding n, so tasks can be decoded exactly.

  Image n has pixels [n % 256, n // 256, 0, 0]; its raw label is n // per_class.
  """
  n = np.arange(num_classes * per_class)
  images = np.zeros((len(n), 2, 2), np.uint8)
  images[:, 0, 0] = n % 256
  images[:, 0, 1] = n // 256
  labels = n // per_class
  np.savez(path, images=images, labels=labels)
  return f'npz:{path}'


def _decode_indices(x):
  """Inverse of _write_indexed_npz's encoding, for float32 task images in [0, 1]."""
  px = np.round(np.asarray(x) * 255).astype(np.int64)
  return px[:, 0, 0, 0] + 256 * px[:, 0, 1, 0]


@pytest.fixture(scope='module')
def indexed(tmp_path_factory):
  """(distribution, per_class) over 12 classes of 8 uniquely-encoded images."""
  path = tmp_path_factory.mktemp('indexed') / 'src.npz'
  spec = _write_indexed_npz(path, num_classes=12, per_class=8)
  return TaskDistribution(spec, num_classes=4, outer_train_fraction=0.5, valid_fraction=0.25), 8


# ------------------------------------------------------------------ class split


def test_fraction_split_is_class_disjoint_and_complete(digits3):
  train, test = digits3.classes(OUTER_TRAIN), digits3.classes(OUTER_TEST)
  assert len(train) == 5 and len(test) == 5
  assert not set(train) & set(test)
  assert sorted(set(train) | set(test)) == list(range(10))
  assert digits3.source(OUTER_TRAIN) is digits3.source(OUTER_TEST)


def test_default_fraction_is_70_30():
  d = TaskDistribution('digits', num_classes=3)
  assert len(d.classes(OUTER_TRAIN)) == 7 and len(d.classes(OUTER_TEST)) == 3


def test_split_depends_on_split_seed_only():
  a = TaskDistribution('digits', num_classes=2, outer_train_fraction=0.5, split_seed=3)
  b = TaskDistribution('digits', num_classes=2, outer_train_fraction=0.5, split_seed=3)
  np.testing.assert_array_equal(a.classes(OUTER_TRAIN), b.classes(OUTER_TRAIN))
  # Over several split seeds the outer-train set is not always the same.
  sets = {tuple(TaskDistribution('digits', num_classes=2, outer_train_fraction=0.5,
                                 split_seed=s).classes(OUTER_TRAIN)) for s in range(4)}
  assert len(sets) > 1


@pytest.mark.parametrize('split', SPLITS)
def test_sampled_classes_lie_in_split(digits3, split):
  allowed = set(digits3.classes(split))
  names = digits3.source(split).class_names
  for seed in range(25):
    task = digits3.sample_task(split, seed)
    assert len(task.classes) == 3 and len(set(task.classes)) == 3
    assert set(task.classes) <= allowed
    assert task.class_names == tuple(names[c] for c in task.classes)
    assert task.split == split and task.seed == seed


@pytest.mark.parametrize('split', SPLITS)
def test_task_images_come_from_the_chosen_classes(indexed, split):
  dist, per_class = indexed
  src_labels = dist.source(split).labels
  for seed in range(5):
    task = _uncached(dist, split, seed)
    tr, va = _decode_indices(task.x_train), _decode_indices(task.x_valid)
    # Every image is the source image of class classes[label].
    np.testing.assert_array_equal(src_labels[tr], task.classes[task.y_train.numpy()])
    np.testing.assert_array_equal(src_labels[va], task.classes[task.y_valid.numpy()])
    assert set(src_labels[tr]) <= set(dist.classes(split))
    # Inner-train and inner-valid never share an image, and no image repeats.
    assert not set(tr) & set(va)
    assert len(set(tr)) == len(tr) and len(set(va)) == len(va)
    assert len(tr) + len(va) == 4 * per_class


# ------------------------------------------------------------------ task contents


def test_labels_and_per_class_counts(digits3):
  assert digits3.examples_per_class == 174  # the smallest digit class
  assert digits3.n_valid == round(0.25 * 174) and digits3.n_train == 174 - digits3.n_valid
  task = digits3.sample_task(OUTER_TRAIN, 7)
  k, nt, nv = 3, digits3.n_train, digits3.n_valid
  assert task.x_train.shape == (k * nt, 8, 8, 1) and task.x_valid.shape == (k * nv, 8, 8, 1)
  assert task.x_train.dtype.name == 'float32'
  assert task.y_train.dtype.name == 'int32'
  np.testing.assert_array_equal(task.y_train.numpy(), np.repeat(np.arange(k), nt))
  np.testing.assert_array_equal(task.y_valid.numpy(), np.repeat(np.arange(k), nv))
  x = task.x_train.numpy()
  assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0


def test_task_is_deterministic_under_seed(digits3):
  other = TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5)
  a = _uncached(digits3, OUTER_TRAIN, 11)
  b = _uncached(other, OUTER_TRAIN, 11)
  np.testing.assert_array_equal(a.classes, b.classes)
  for ta, tb in zip(a.data, b.data):
    np.testing.assert_array_equal(ta.numpy(), tb.numpy())
  # The cached path returns the same values too.
  np.testing.assert_array_equal(digits3.sample_task(OUTER_TRAIN, 11).x_valid.numpy(),
                                a.x_valid.numpy())


def test_different_seeds_give_different_tasks(digits3):
  a = _uncached(digits3, OUTER_TRAIN, 0)
  for seed in (1, 2, 3):
    b = _uncached(digits3, OUTER_TRAIN, seed)
    same_classes = np.array_equal(a.classes, b.classes)
    same_images = np.array_equal(a.x_train.numpy(), b.x_train.numpy())
    assert not (same_classes and same_images)
  # Same seed, other split: other classes.
  c = _uncached(digits3, OUTER_TEST, 0)
  assert not set(a.classes) & set(c.classes)


# ------------------------------------------------------------------ errors


def test_fewer_classes_than_k():
  with pytest.raises(UserError) as e:
    TaskDistribution('digits', num_classes=6, outer_train_fraction=0.5)
  msg = str(e.value).splitlines()[0]
  assert 'fewer than K=6' in msg and '5 classes' in msg


def test_class_too_small_to_split(tmp_path):
  spec = _write_indexed_npz(tmp_path / 'one.npz', num_classes=6, per_class=1)
  with pytest.raises(UserError) as e:
    TaskDistribution(spec, num_classes=2, outer_train_fraction=0.5)
  assert 'cannot be split' in str(e.value).splitlines()[0]


def test_same_source_for_train_and_test():
  with pytest.raises(UserError) as e:
    TaskDistribution('digits', test_source='digits', num_classes=2)
  assert 'overlap' in str(e.value).splitlines()[0]


def test_examples_per_class_above_smallest_class():
  with pytest.raises(UserError) as e:
    TaskDistribution('digits', num_classes=2, examples_per_class=175)
  assert 'smallest class has 174' in str(e.value).splitlines()[0]


def test_bad_arguments():
  with pytest.raises(UserError):
    TaskDistribution('digits', num_classes=1)
  with pytest.raises(UserError):
    TaskDistribution('digits', valid_fraction=1.0)
  with pytest.raises(UserError):
    TaskDistribution('digits', outer_train_fraction=1.0)
  with pytest.raises(UserError):
    TaskDistribution('digits', channels=2)


def test_unknown_split(digits3):
  with pytest.raises(UserError) as e:
    digits3.sample_task('outer_dev', 0)
  assert "'outer_dev'" in str(e.value)


def test_sources_of_different_shapes_need_image_size(tmp_path):
  spec = _write_indexed_npz(tmp_path / 'small.npz', num_classes=4, per_class=4)  # 2x2 images
  with pytest.raises(UserError) as e:
    TaskDistribution('digits', test_source=spec, num_classes=2)
  assert 'image_size' in str(e.value).splitlines()[0]
  # With a common image_size the two sources combine.
  d = TaskDistribution('digits', test_source=spec, num_classes=2, image_size=(4, 4))
  assert d.image_shape == (4, 4, 1)
  assert d.sample_task(OUTER_TEST, 0).x_train.shape[1:] == (4, 4, 1)


# ------------------------------------------------------------------ preprocessing


def test_channels_3_tiles_grayscale(digits3):
  rgb = TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5, channels=3)
  assert rgb.image_shape == (8, 8, 3)
  a, g = _uncached(rgb, OUTER_TEST, 4), _uncached(digits3, OUTER_TEST, 4)
  x = a.x_train.numpy()
  assert x.shape == g.x_train.shape[:3] + (3,)
  for c in range(3):
    np.testing.assert_array_equal(x[..., c], g.x_train.numpy()[..., 0])


def test_resize_with_area_averaging():
  d = TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5, image_size=(4, 4))
  full = TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5)
  assert d.image_shape == (4, 4, 1)
  small, big = _uncached(d, OUTER_TRAIN, 2), _uncached(full, OUTER_TRAIN, 2)
  np.testing.assert_array_equal(small.classes, big.classes)
  # 8x8 -> 4x4 area resize: each pixel is the mean of a 2x2 block (up to uint8 rounding).
  b = np.round(big.x_train.numpy() * 255)
  expected = b.reshape(-1, 4, 2, 4, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(small.x_train.numpy() * 255, expected, atol=0.5 + 1e-3)


# ------------------------------------------------------------------ Omniglot small1 vs small2


@pytest.fixture(scope='module')
def omniglot_pair():
  s1 = require(os.path.join(OMNIGLOT, 'images_background_small1'))
  s2 = require(os.path.join(OMNIGLOT, 'images_background_small2'))
  return TaskDistribution(train_source='folder:' + s1, test_source='folder:' + s2,
                          num_classes=5, image_size=(28, 28))


def test_two_sources_are_the_two_splits(omniglot_pair):
  d = omniglot_pair
  assert d.source(OUTER_TRAIN).num_classes == 136
  assert d.source(OUTER_TEST).num_classes == 156
  assert d.source(OUTER_TRAIN).spec.endswith('images_background_small1')
  assert d.source(OUTER_TEST).spec.endswith('images_background_small2')
  np.testing.assert_array_equal(d.classes(OUTER_TRAIN), np.arange(136))
  test_classes = d.classes(OUTER_TEST)
  assert len(test_classes) == 106 and set(test_classes) < set(range(156))
  for split in SPLITS:
    names = set(d.source(split).class_names)
    for seed in range(10):
      assert set(d.sample_task(split, seed).class_names) <= names


def test_two_source_split_is_class_disjoint(omniglot_pair):
  d = omniglot_pair
  train_names = {d.source(OUTER_TRAIN).class_names[c] for c in d.classes(OUTER_TRAIN)}
  test_names = {d.source(OUTER_TEST).class_names[c] for c in d.classes(OUTER_TEST)}
  assert not train_names & test_names, sorted(train_names & test_names)[:5]
  # small2's Greek (24) and Latin (26) alphabets duplicate small1's and are left out.
  assert d.num_dropped_test_classes == 50
  assert len(d.classes(OUTER_TEST)) == 156 - 50 and len(d.classes(OUTER_TRAIN)) == 136


def test_omniglot_resized_to_28x28_stays_white(omniglot_pair):
  d = omniglot_pair
  assert d.image_shape == (28, 28, 1)
  assert d.examples_per_class == 20 and d.n_valid == 5 and d.n_train == 15
  task = d.sample_task(OUTER_TRAIN, 0)
  x = task.x_train.numpy()
  assert x.shape == (5 * 15, 28, 28, 1) and task.x_valid.shape == (5 * 5, 28, 28, 1)
  assert x.min() >= 0.0 and x.max() <= 1.0
  assert np.median(x) == 1.0  # white background survives area resizing
  assert np.mean(x >= 0.99) > 0.6
  assert np.mean(x < 0.5) > 0.005  # strokes survive too
  xt = d.sample_task(OUTER_TEST, 0).x_valid.numpy()
  assert np.median(xt) == 1.0


def test_channels_1_converts_rgb_to_luma(tmp_path):
  rng = np.random.default_rng(0)
  side, per_class = 4, 10
  data = rng.integers(0, 256, size=(4 * per_class, 3 * side * side), dtype=np.uint8)
  labels = np.repeat(np.arange(1, 5), per_class)
  np.savez(tmp_path / 'in32.npz', data=data, labels=labels)
  spec = f'npz:{tmp_path}/in32.npz'
  gray = TaskDistribution(spec, num_classes=2, outer_train_fraction=0.5, channels=1)
  rgb = TaskDistribution(spec, num_classes=2, outer_train_fraction=0.5)
  assert gray.image_shape == (4, 4, 1) and rgb.image_shape == (4, 4, 3)
  g, c = _uncached(gray, OUTER_TRAIN, 0), _uncached(rgb, OUTER_TRAIN, 0)
  np.testing.assert_array_equal(g.classes, c.classes)
  luma = c.x_train.numpy() @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  np.testing.assert_allclose(g.x_train.numpy()[..., 0], luma, atol=1.01 / 255)


# ------------------------------------------------------------------ outer-valid and distinct tasks


def test_outer_valid_split_is_disjoint_and_seeded():
  d = TaskDistribution('digits', num_classes=2, outer_train_fraction=0.7, outer_valid_classes=2)
  train, valid, test = (set(d.classes(s)) for s in (OUTER_TRAIN, OUTER_VALID, OUTER_TEST))
  assert (len(train), len(valid), len(test)) == (5, 2, 3)
  assert not train & valid and not train & test and not valid & test
  assert train | valid | test == set(range(10))
  assert d.splits == (OUTER_TRAIN, OUTER_VALID, OUTER_TEST)
  # The same split_seed carves the same outer-valid classes; outer-test is untouched by it.
  again = TaskDistribution('digits', num_classes=2, outer_train_fraction=0.7,
                           outer_valid_classes=2)
  np.testing.assert_array_equal(again.classes(OUTER_VALID), d.classes(OUTER_VALID))
  plain = TaskDistribution('digits', num_classes=2, outer_train_fraction=0.7)
  np.testing.assert_array_equal(plain.classes(OUTER_TEST), d.classes(OUTER_TEST))
  for seed in range(6):
    assert set(d.sample_task(OUTER_VALID, seed).classes) <= valid


def test_outer_valid_split_of_two_sources_comes_from_the_train_source(omniglot_small1,
                                                                     omniglot_small2):
  d = TaskDistribution(f'folder:{omniglot_small1}', f'folder:{omniglot_small2}', num_classes=5,
                       image_size=(8, 8), channels=1, outer_valid_classes=30)
  assert len(d.classes(OUTER_VALID)) == 30 and len(d.classes(OUTER_TRAIN)) == 136 - 30
  assert d.source(OUTER_VALID) is d.source(OUTER_TRAIN)
  assert not set(d.classes(OUTER_VALID)) & set(d.classes(OUTER_TRAIN))


def test_a_missing_outer_valid_split_is_a_one_line_error(digits3):
  with pytest.raises(UserError, match='outer_valid_classes'):
    digits3.sample_task(OUTER_VALID, 0)
  assert OUTER_VALID not in digits3.splits
  with pytest.raises(UserError, match='outer_valid_classes'):
    TaskDistribution('digits', num_classes=2, split_classes=False, outer_valid_classes=2)
  with pytest.raises(UserError, match='fewer than K'):
    TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5, outer_valid_classes=3)


@pytest.mark.parametrize('split', SPLITS)
def test_seeds_enumerate_every_distinct_class_set_before_repeating(digits3, split):
  assert digits3.num_distinct_tasks(split) == 10  # C(5, 3)
  sets = [frozenset(digits3.sample_task(split, seed).classes.tolist()) for seed in range(10)]
  assert len(set(sets)) == 10
  # Seed i and i + 10 are the same class set; the in-graph draw for a large seed agrees.
  assert frozenset(digits3.sample_task(split, 13).classes.tolist()) == sets[3]
  big = 2**61 + 7
  _, _, positions = digits3.task_indices(split, big)
  expected = sets[big % 10]
  assert frozenset(digits3.classes(split)[positions.numpy()].tolist()) == expected


def test_splits_with_many_class_sets_draw_them_at_random(monkeypatch):
  monkeypatch.setattr(distribution, 'MAX_ENUMERATED_TASKS', 1)
  d = TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5)
  sets = [frozenset(_uncached(d, OUTER_TRAIN, seed).classes.tolist()) for seed in range(10)]
  # Independent draws of 10 out of 10 sets repeat some (all distinct has probability 4e-4) ...
  assert len(set(sets)) < 10
  # ... and stay a pure function of the seed, K distinct classes of the split.
  assert sets == [frozenset(_uncached(d, OUTER_TRAIN, seed).classes.tolist()) for seed in range(10)]
  assert all(len(s) == 3 and s <= set(d.classes(OUTER_TRAIN)) for s in sets)

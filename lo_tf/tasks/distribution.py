"""Class-split task distributions of K-way image classification (paper §4.2).

The paper splits ImageNet's 1,000 classes into 700 outer-train and 300 outer-test classes and samples
each task as 10 classes drawn at random with all their images. Here a `TaskDistribution` splits a
source's classes by a seeded fraction, or takes two sources whose classes are disjoint by
construction (Omniglot ``images_background_small1`` vs ``small2``). A third, optional class set,
outer-valid, is carved out of the outer-train classes: every configuration value, seed and
checkpoint is chosen on it, so outer-test is only ever evaluated for the reported numbers.

A task is a pure function of its (split, seed): the same seed gives the same classes, images and
inner-train/inner-valid split. Where a split has few distinct K-class sets (at most
`MAX_ENUMERATED_TASKS`; 10 for 3-way tasks of 5 digit classes), seeds 0, 1, ... enumerate all of them
in a fixed shuffled order before any repeats, so "10 tasks" means the 10 distinct tasks.
"""

import dataclasses
import functools
import hashlib
import itertools
import math

from absl import logging
import gin
import numpy as np
import tensorflow as tf

from lo_tf.data.sources import load_source
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.errors import check_number

OUTER_TRAIN = 'outer_train'
OUTER_VALID = 'outer_valid'
OUTER_TEST = 'outer_test'
SPLITS = (OUTER_TRAIN, OUTER_VALID, OUTER_TEST)
_SPLIT_IDS = {OUTER_TRAIN: 0, OUTER_TEST: 1, OUTER_VALID: 2}
# Splits with at most this many distinct K-class sets draw them from an enumerated table.
MAX_ENUMERATED_TASKS = 4096


@dataclasses.dataclass(frozen=True)
class Task:
  """One K-way classification inner problem's data, already preprocessed.

  Attributes:
    x_train: float32 [K * n_train, H, W, C] inner-train images in [0, 1].
    y_train: int32 [K * n_train] labels in [0, K).
    x_valid: float32 [K * n_valid, H, W, C] inner-valid images.
    y_valid: int32 [K * n_valid].
    classes: int64 [K] class ids in the source the task was drawn from.
    class_names: K strings.
    split: OUTER_TRAIN, OUTER_VALID or OUTER_TEST.
    seed: the integer seed the task is a pure function of.
  """
  x_train: tf.Tensor
  y_train: tf.Tensor
  x_valid: tf.Tensor
  y_valid: tf.Tensor
  classes: np.ndarray
  class_names: tuple
  split: str
  seed: int

  @property
  def data(self):
    """(x_train, y_train, x_valid, y_valid): the tensors the in-graph loops take."""
    return (self.x_train, self.y_train, self.x_valid, self.y_valid)


def _preprocess(images, image_size, channels):
  """uint8 [N,H,W,C] -> uint8 [N,h,w,c]: resize (area averaging) and convert channels.

  Stays uint8 so that large sources (ImageNet 32x32: 1.28M images) fit in memory; tasks are
  converted to float32 one at a time.
  """
  x = tf.convert_to_tensor(images)
  if channels not in (None, 1, 3):
    raise UserError(f'channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)')
  if channels == 1 and x.shape[-1] == 3:
    x = tf.image.rgb_to_grayscale(x)
  elif channels == 3 and x.shape[-1] == 1:
    x = tf.image.grayscale_to_rgb(x)
  if image_size is not None and tuple(x.shape[1:3]) != tuple(image_size):
    out = []
    for start in range(0, x.shape[0], 4096):  # chunks bound the float32 working memory
      chunk = tf.image.resize(tf.cast(x[start:start + 4096], tf.float32), image_size,
                              method='area', antialias=True)
      out.append(tf.cast(tf.round(tf.clip_by_value(chunk, 0, 255)), tf.uint8))
    x = tf.concat(out, 0)
  return x.numpy()


def _classes_not_in(source, other):
  """Class ids of `source` that share no image (exact pixels) with `other`.

  Two folders can hold the same classes (Omniglot's images_background_small1 and small2 both
  contain the Greek and Latin alphabets): such classes must not count as held out. Names are not
  compared: numeric label names ('0', '1', ...) coincide across unrelated datasets.
  """
  other_images = {hashlib.sha1(im.tobytes()).digest() for im in other.images}
  shared = {int(label) for im, label in zip(source.images, source.labels)
            if hashlib.sha1(im.tobytes()).digest() in other_images}
  return np.array([c for c in range(source.num_classes) if c not in shared], np.int64)


@gin.configurable
class TaskDistribution:
  """Outer-train / outer-valid / outer-test distributions of K-way classification tasks (§4.2).

  Args:
    train_source: source spec (see `lo_tf.data.sources`) of the outer-train classes; also of the
      outer-test classes when `test_source` is None.
    test_source: source spec of the outer-test classes, or None to split `train_source`'s classes.
      Its classes that share any image with `train_source` are left out, so outer-test stays
      held out.
    outer_train_fraction: with one source, the fraction of its classes that is outer-train (paper:
      700/1000 = 0.7); the rest is outer-test. The split is a permutation seeded by `split_seed`.
    outer_valid_classes: this many of the outer-train classes (drawn by a permutation seeded by
      `split_seed`) form the outer-valid split instead, disjoint from outer-train and outer-test;
      0: no outer-valid split.
    num_classes: K, the classes per task (paper: 10).
    image_size: (height, width) the images are resized to, or None to keep them.
    channels: 1 (grayscale) or 3 (RGB), or None to keep the source's.
    valid_fraction: fraction of each class's images that is inner-valid (the rest inner-train).
    examples_per_class: images used per class (None: the smallest class count over both splits),
      so every task has the same tensor shapes and the in-graph loops never retrace.
    split_seed: seed of the class split.
    split_classes: False puts every class of `train_source` into both outer-train and outer-test
      (no held-out classes): for studies of one dataset's tasks (Fig. 4: Adam's learning rate on
      10-way MNIST) and out-of-distribution evaluations (App. E), never for outer-training an
      optimizer meant to generalize. Refused together with `test_source`.

  Raises:
    UserError: for an unloadable source, a split with fewer than K classes, the same source given
      for both splits, or classes too small to split into inner-train and inner-valid.
  """

  def __init__(self, train_source='digits', test_source=None, outer_train_fraction=0.7,
               num_classes=10, image_size=None, channels=None, valid_fraction=0.25,
               examples_per_class=None, split_seed=0, split_classes=True, outer_valid_classes=0):
    self.valid_fraction = check_number('TaskDistribution', 'valid_fraction', valid_fraction, 0.0,
                                       1.0, low_open=True, high_open=True)
    self.num_classes = check_int('TaskDistribution', 'num_classes', num_classes, minimum=2)
    check_int('TaskDistribution', 'split_seed', split_seed, minimum=0)
    check_int('TaskDistribution', 'outer_valid_classes', outer_valid_classes, minimum=0)
    if examples_per_class is not None:
      check_int('TaskDistribution', 'examples_per_class', examples_per_class, minimum=2)
    if image_size is not None and (not isinstance(image_size, (tuple, list)) or
                                   len(image_size) != 2):
      raise UserError(f'TaskDistribution.image_size={image_size!r} must be (height, width) or '
                      'None; fix the gin binding')
    if image_size is not None:
      image_size = tuple(check_int('TaskDistribution', 'image_size', d) for d in image_size)
    for name, spec in (('train_source', train_source), ('test_source', test_source)):
      if spec is not None and not isinstance(spec, str):
        raise UserError(f'TaskDistribution.{name}={spec!r} must be a source spec string')
    self.train_spec, self.test_spec = train_source, test_source
    self.num_dropped_test_classes = 0
    if test_source is not None and test_source == train_source:
      raise UserError(f'train_source and test_source are both {train_source!r}, so outer-train '
                      'and outer-test classes would overlap; omit test_source to split by fraction')
    if not isinstance(split_classes, bool):
      raise UserError(f'TaskDistribution.split_classes={split_classes!r} must be True or False')
    if not split_classes and test_source is not None:
      raise UserError('TaskDistribution.split_classes=False uses every class of train_source for '
                      'both splits; drop test_source or set split_classes=True')
    sources = [load_source(train_source)]
    if test_source is not None:
      sources.append(load_source(test_source))
    self._images = [_preprocess(s.images, image_size, channels) for s in sources]
    shapes = {im.shape[1:] for im in self._images}
    if len(shapes) != 1:
      raise UserError(f'outer-train images are {self._images[0].shape[1:]} but outer-test images '
                      f'are {self._images[1].shape[1:]}; set TaskDistribution.image_size and '
                      'channels so both sources match')
    self.image_shape = tuple(int(d) for d in self._images[0].shape[1:])
    self._sources = sources
    if not split_classes:
      every = np.arange(sources[0].num_classes)
      self._classes = {OUTER_TRAIN: (0, every), OUTER_TEST: (0, every)}
    elif test_source is None:
      check_number('TaskDistribution', 'outer_train_fraction', outer_train_fraction, 0.0, 1.0,
                   low_open=True, high_open=True)
      perm = np.random.default_rng(split_seed).permutation(sources[0].num_classes)
      n_train = int(round(outer_train_fraction * sources[0].num_classes))
      self._classes = {OUTER_TRAIN: (0, np.sort(perm[:n_train])),
                       OUTER_TEST: (0, np.sort(perm[n_train:]))}
    else:
      test_classes = _classes_not_in(sources[1], sources[0])
      self.num_dropped_test_classes = sources[1].num_classes - len(test_classes)
      if self.num_dropped_test_classes:
        logging.warning('%d of the %d classes of %s share images with %s; they are left out '
                        'of outer-test to keep it held out',
                        self.num_dropped_test_classes, sources[1].num_classes, test_source,
                        train_source)
      self._classes = {OUTER_TRAIN: (0, np.arange(sources[0].num_classes)),
                       OUTER_TEST: (1, test_classes)}
    if outer_valid_classes:
      if not split_classes:
        raise UserError('TaskDistribution.outer_valid_classes needs split_classes=True (with one '
                        'class set for every split there is nothing to hold out)')
      src, train_classes = self._classes[OUTER_TRAIN]
      perm = np.random.default_rng([split_seed, _SPLIT_IDS[OUTER_VALID]]).permutation(
          len(train_classes))
      self._classes[OUTER_VALID] = (src, np.sort(train_classes[perm[:outer_valid_classes]]))
      self._classes[OUTER_TRAIN] = (src, np.sort(train_classes[perm[outer_valid_classes:]]))
    self._members = [[np.flatnonzero(s.labels == c) for c in range(s.num_classes)]
                     for s in sources]
    for split, (src, classes) in self._classes.items():
      if len(classes) < self.num_classes:
        raise UserError(f'the {split} split of {sources[src].spec!r} has {len(classes)} classes, '
                        f'fewer than K={self.num_classes}; lower num_classes or use more classes')
    counts = [len(self._members[src][c]) for src, classes in self._classes.values()
              for c in classes]
    smallest = min(counts)
    self.examples_per_class = int(examples_per_class or smallest)
    if self.examples_per_class > smallest:
      raise UserError(f'examples_per_class={examples_per_class} but the smallest class has '
                      f'{smallest} images; lower it or leave it None')
    self.n_valid = int(round(self.valid_fraction * self.examples_per_class))
    self.n_train = self.examples_per_class - self.n_valid
    if self.n_valid < 1 or self.n_train < 1:
      raise UserError(f'a class with {self.examples_per_class} images cannot be split into '
                      f'inner-train and inner-valid at valid_fraction={self.valid_fraction}; '
                      'use classes with at least 2 images or change valid_fraction')
    self._build_tables()

  def classes(self, split):
    """Class ids (int64 [C_split]) of `split` in its source. Raises UserError for unknown splits."""
    return self._split(split)[1]

  def source(self, split):
    """The `Source` that `split`'s classes come from."""
    return self._sources[self._split(split)[0]]

  @property
  def splits(self):
    """The splits this distribution has, in SPLITS order (outer-valid only when configured)."""
    return tuple(s for s in SPLITS if s in self._classes)

  def _split(self, split):
    if split == OUTER_VALID and split not in self._classes:
      raise UserError('this task distribution has no outer-valid split; set '
                      'TaskDistribution.outer_valid_classes to hold out outer-train classes')
    if split not in self._classes:
      raise UserError(f'unknown split {split!r}; use one of {SPLITS}')
    return self._classes[split]

  def num_distinct_tasks(self, split):
    """How many distinct K-class sets `split` has: C(classes, K)."""
    return math.comb(len(self._split(split)[1]), self.num_classes)

  def _build_tables(self):
    """In-graph task tables: all pixels (uint8) and, per split, its classes' member indices."""
    offsets = np.cumsum([0] + [len(im) for im in self._images])
    self.pixels = tf.constant(np.concatenate(self._images))  # uint8 [N_all, H, W, C]
    self._tables = {}
    for split, (src, classes) in self._classes.items():
      members = [self._members[src][c] + offsets[src] for c in classes]
      width = max(len(m) for m in members)
      table = np.zeros((len(members), width), np.int32)
      for row, m in zip(table, members):
        row[:len(m)] = m
      self._tables[split] = (tf.constant(table),
                             tf.constant([len(m) for m in members], tf.int32))
    self._class_sets = {}
    for split, (_, classes) in self._classes.items():
      if self.num_distinct_tasks(split) <= MAX_ENUMERATED_TASKS:
        sets = np.array(list(itertools.combinations(range(len(classes)), self.num_classes)),
                        np.int32)
        order = np.random.default_rng(_SPLIT_IDS[split]).permutation(len(sets))
        self._class_sets[split] = tf.constant(sets[order])

  def task_indices(self, split, seed):
    """The K-way task of `split` determined by `seed`, as indices into `pixels` (paper §4.2).

    A pure TensorFlow function of (split, seed), usable inside graphs: K classes are drawn without
    replacement from the split (seed mod C(classes, K) indexes a shuffled table of every K-class
    set where there are at most MAX_ENUMERATED_TASKS), and from each class `examples_per_class`
    images in random order,
    the first `n_valid` inner-valid and the rest inner-train. Labels are implied by position:
    entry j of the train (valid) indices has label j // n_train (j // n_valid).

    Args:
      split: OUTER_TRAIN, OUTER_VALID or OUTER_TEST (a Python string).
      seed: non-negative int or int64 scalar tensor.

    Returns:
      (train int32 [K * n_train], valid int32 [K * n_valid], classes int32 [K]: positions in
      `classes(split)`).

    Raises:
      UserError: for an unknown split.
    """
    self._split(split)
    table, counts = self._tables[split]
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(_SPLIT_IDS[split], tf.int64)])
    k, e = self.num_classes, self.examples_per_class
    if split in self._class_sets:
      sets = self._class_sets[split]
      classes = tf.gather(sets, tf.math.floormod(tf.cast(seed, tf.int64),
                                                 tf.cast(tf.shape(sets)[0], tf.int64)))
    else:
      keys = tf.random.stateless_uniform(tf.shape(counts), base)
      classes = tf.math.top_k(keys, k).indices
    width = tf.shape(table)[1]
    member_keys = tf.random.stateless_uniform(
        [k, width], tf.random.experimental.stateless_fold_in(base, 1))
    # Padding entries (beyond a class's count) sort last.
    member_keys += tf.cast(tf.range(width)[None, :] >= tf.gather(counts, classes)[:, None],
                           tf.float32) * 2.0
    order = tf.math.top_k(-member_keys, e).indices
    chosen = tf.gather(tf.gather(table, classes), order, batch_dims=1)  # [K, E]
    valid = tf.reshape(chosen[:, :self.n_valid], [-1])
    train = tf.reshape(chosen[:, self.n_valid:], [-1])
    return train, valid, classes

  def images(self, indices):
    """float32 images in [0, 1] (shape of `indices` + image_shape) for indices into `pixels`."""
    return tf.cast(tf.gather(self.pixels, indices), tf.float32) / 255.0

  @functools.lru_cache(maxsize=32)
  def sample_task(self, split, seed):
    """Samples the K-way task of `split` determined by `seed` (paper §4.2), on the host.

    The same task `task_indices(split, seed)` gives inside graphs.

    Args:
      split: OUTER_TRAIN, OUTER_VALID or OUTER_TEST.
      seed: non-negative int; the task is a pure function of (split, seed).

    Returns:
      A `Task` with x_train float32 [K*n_train, H, W, C] and x_valid float32 [K*n_valid, H, W, C].
    """
    train, valid, classes = self.task_indices(split, int(seed))
    src, split_classes = self._split(split)
    chosen = split_classes[classes.numpy()]
    labels = lambda n: tf.constant(np.repeat(np.arange(self.num_classes, dtype=np.int32), n))
    names = tuple(self._sources[src].class_names[c] for c in chosen)
    return Task(self.images(train), labels(self.n_train), self.images(valid),
                labels(self.n_valid), chosen.astype(np.int64), names, split, int(seed))

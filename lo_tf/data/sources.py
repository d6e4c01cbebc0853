"""Image-classification sources: where the images of a task distribution come from (paper §4.2).

A *source* is all images of a many-class dataset held in memory: `images` uint8 [N, H, W, C],
`labels` int64 [N] with values in [0, num_classes) and `class_names` (num_classes strings). Task
distributions (`lo_tf.tasks.distribution`) split a source's classes into outer-train and outer-test
sets and sample K-way tasks from them.

Source specs (strings, as accepted by `load_source` and the `--train_source`/`--test_source` flags):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes); needs no
  download and is the embedded default.
* ``folder:PATH``: every leaf directory under PATH holding images is one class (ImageNet-style
  ``root/class/*.png`` and Omniglot's ``root/alphabet/character/*.png``).
* ``npz:GLOB``: ``.npz`` files with ``images`` ([N,H,W] or [N,H,W,C] uint8) and ``labels``, or in the
  Downsampled-ImageNet layout of ``Imagenet32_train_npz`` (``data`` uint8 [N, 3*S*S] channel-first,
  ``labels`` 1-based).
* ``tfds:NAME[:SPLIT]``: a tensorflow-datasets image classification dataset (for instance the
  paper's ``imagenet_resized/32x32``), read from ``tfds_data_dir``; never downloaded here.
"""

import dataclasses
import glob
import os

import gin
import numpy as np

from lo_tf.errors import UserError

_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')


@dataclasses.dataclass(frozen=True)
class Source:
  """All images of a labelled image set.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int64 [N], values in [0, num_classes).
    class_names: tuple of num_classes strings.
    spec: the source spec string it was loaded from.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple
  spec: str

  @property
  def num_classes(self):
    return len(self.class_names)


# Smallest image height and width a source may hold (a 1x1 image has no spatial structure).
MIN_IMAGE_SIZE = 2


def _integer_labels(labels, where):
  """`labels` as int64 [N]; integer-valued floats are accepted, anything else is a UserError."""
  raw = np.asarray(labels).reshape(-1)
  if not (np.issubdtype(raw.dtype, np.integer) or
          (np.issubdtype(raw.dtype, np.floating) and np.all(np.isfinite(raw)) and
           np.all(raw == np.round(raw)))):
    raise UserError(f'{where}: labels must be integers, got dtype {raw.dtype}; store integer '
                    'class ids')
  return raw.astype(np.int64)


def _relabel(images, raw_labels, names_by_raw, spec):
  """Maps arbitrary label values to contiguous ids 0..C-1, ordered by raw label.

  Raises:
    UserError: non-integer labels, not one label per image, no images, or images smaller than
      MIN_IMAGE_SIZE x MIN_IMAGE_SIZE pixels.
  """
  raw = _integer_labels(raw_labels, f'source {spec!r}')
  if images.shape[0] != raw.shape[0]:
    raise UserError(f'source {spec!r}: {images.shape[0]} images but {raw.shape[0]} labels; '
                    'images and labels must have the same length')
  if raw.size == 0:
    raise UserError(f'source {spec!r} holds no images; point it at a non-empty dataset')
  height, width = images.shape[1:3]
  if min(height, width) < MIN_IMAGE_SIZE:
    raise UserError(f'source {spec!r}: images are {height}x{width} pixels; they must be at least '
                    f'{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}')
  uniq, labels = np.unique(raw, return_inverse=True)
  names = tuple(names_by_raw(int(u)) for u in uniq)
  return Source(images=images, labels=labels.astype(np.int64), class_names=names, spec=spec)


def _load_digits(spec):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  # Pixel values are counts 0..16: rescale to the uint8 range every other source uses.
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return _relabel(images, d.target, str, spec)


def _load_folder(spec, path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise UserError(f'source {spec!r}: directory {path!r} does not exist (relative paths are '
                    'taken from the working directory, or from load_source.data_root, e.g. '
                    'OMNIGLOT_ROOT); pass an existing folder')
  class_dirs = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    imgs = sorted(f for f in files if f.lower().endswith(_IMAGE_EXTENSIONS))
    if imgs:
      class_dirs.append((os.path.relpath(root, path), [os.path.join(root, f) for f in imgs]))
  if not class_dirs:
    raise UserError(f'source {spec!r}: no images ({"/".join(_IMAGE_EXTENSIONS)}) under {path!r}; '
                    'expected one sub-folder of images per class')
  paths = [p for _, ps in class_dirs for p in ps]
  labels = np.concatenate([np.full(len(ps), i) for i, (_, ps) in enumerate(class_dirs)])
  ds = tf.data.Dataset.from_tensor_slices(paths).map(
      lambda p: tf.io.decode_image(tf.io.read_file(p), expand_animations=False),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  images = []
  try:
    for p, img in zip(paths, ds.as_numpy_iterator()):
      if images and img.shape != images[0].shape:
        raise UserError(f'source {spec!r}: inconsistent image sizes, {p} is {img.shape} but '
                        f'{paths[0]} is {images[0].shape}; resize the images to one size')
      images.append(img)
  except tf.errors.InvalidArgumentError:
    bad = next(p for p in paths if not _decodes(p))
    raise UserError(f'source {spec!r}: image {bad} cannot be decoded; remove or fix it') from None
  names = [name for name, _ in class_dirs]
  return _relabel(np.stack(images).astype(np.uint8), labels, lambda i: names[i], spec)


def _decodes(path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    return True
  except tf.errors.OpError:
    return False


def _load_npz(spec, pattern):
  if os.path.isdir(pattern):
    raise UserError(f'source {spec!r}: {pattern!r} is a directory; pass a glob of files, e.g. '
                    f'npz:{os.path.join(pattern, "*.npz")}')
  files = sorted(glob.glob(pattern))
  if not files:
    raise UserError(f'source {spec!r}: no file matches {pattern!r}; pass a glob of .npz files')
  all_images, all_labels = [], []
  for f in files:
    try:
      loaded = np.load(f, allow_pickle=False)
      if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UserError(f'source {spec!r}: {f} is a single array, not an .npz archive; save it '
                        'with numpy.savez(images=..., labels=...)')
      with loaded as z:
        keys = set(z.files)
        if {'images', 'labels'} <= keys:
          images, labels, first_label = z['images'], z['labels'], 0
          if images.ndim == 3:
            images = images[..., None]
        elif {'data', 'labels'} <= keys:
          # Downsampled ImageNet: rows are channel-first flattened S x S x 3 images, labels 1..1000.
          data, labels, first_label = z['data'], z['labels'], 1
          side = int(round(np.sqrt(data.shape[1] / 3))) if data.ndim == 2 else 0
          if data.ndim != 2 or side == 0 or 3 * side * side != data.shape[1]:
            raise UserError(f'source {spec!r}: {f} has data of shape {data.shape}, expected '
                            '[N, 3*S*S] as in Imagenet32_train_npz')
          images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
        else:
          raise UserError(f'source {spec!r}: {f} holds arrays {sorted(keys)}; expected '
                          '"images" and "labels" (or "data" and "labels" as in Imagenet32)')
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # numpy raises OSError, ValueError, EOFError, zipfile.BadZipFile... for damaged archives.
      raise UserError(f'source {spec!r}: {f} is not a readable .npz archive '
                      f'({type(e).__name__}); re-create it with numpy.savez') from None
    if images.ndim != 4 or images.dtype != np.uint8:
      raise UserError(f'source {spec!r}: {f} images have shape {images.shape} and dtype '
                      f'{images.dtype}; expected uint8 [N,H,W] or [N,H,W,C]')
    if all_images and images.shape[1:] != all_images[0].shape[1:]:
      raise UserError(f'source {spec!r}: inconsistent image sizes across files ({f} has '
                      f'{images.shape[1:]}, {files[0]} has {all_images[0].shape[1:]})')
    labels = _integer_labels(labels, f'source {spec!r}: {f}')
    if labels.size and labels.min() < first_label:
      layout = ' (the Imagenet32 layout numbers classes from 1)' if first_label else ''
      raise UserError(f'source {spec!r}: {f} has label {labels.min()}{layout}; store class ids '
                      f'>= {first_label}')
    all_images.append(images)
    all_labels.append(labels - first_label)
  return _relabel(np.concatenate(all_images), np.concatenate(all_labels), str, spec)


def _load_tfds(spec, name, split, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or '~/tensorflow_datasets'
  how = (f'prepare it on a machine with network access with `tfds build {name} '
         f'--data_dir={where}` (manual-download datasets: see their tfds page) and copy it here, '
         'or use a folder: or npz: source')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several unrelated types for unknown names.
    raise UserError(f'source {spec!r}: tensorflow-datasets has no dataset {name!r} '
                    f'({type(e).__name__}); check the name in the tfds catalog') from None
  if not builder.is_prepared():
    raise UserError(f'source {spec!r}: tfds dataset {name!r} is not prepared in {where}; {how}')
  try:
    images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                      as_supervised=True))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'source {spec!r}: cannot read split {split!r} of {name!r} '
                    f'({type(e).__name__}: {str(e).splitlines()[0]}); check the split name') from None
  label_feature = builder.info.features[builder.info.supervised_keys[1]]
  names = getattr(label_feature, 'names', None)
  return _relabel(np.asarray(images, np.uint8), labels,
                  (lambda i: names[i]) if names else str, spec)


def _resolve(path, data_root):
  """`path` under `data_root` when relative and present there, else `path` as given."""
  path = os.path.expanduser(path)
  if data_root and not os.path.isabs(path):
    rooted = os.path.join(os.path.expanduser(data_root), path)
    if os.path.exists(rooted) or glob.glob(rooted) or not (os.path.exists(path) or glob.glob(path)):
      return rooted
  return path


@gin.configurable(denylist=['spec'])
def load_source(spec, tfds_data_dir=None, data_root=None):
  """Loads an image-classification source from its spec string (see the module docstring).

  Args:
    spec: 'digits', 'folder:PATH', 'npz:GLOB' or 'tfds:NAME[:SPLIT]' (split defaults to 'train').
    tfds_data_dir: tensorflow-datasets data directory for ``tfds:`` specs (None: tfds default).
    data_root: directory that relative ``folder:``/``npz:`` paths are looked up in first (gin
      configs set it through a macro, e.g. ``OMNIGLOT_ROOT`` in gin/omniglot.gin).

  Returns:
    A `Source` with uint8 images [N, H, W, C] and int64 labels [N].

  Raises:
    UserError: unknown source kind, missing path, no images, inconsistent image sizes, an
      unreadable file, or a tfds dataset that is unknown or not prepared offline.
  """
  if not isinstance(spec, str) or not spec:
    raise UserError(f'source spec {spec!r} is empty; use digits, folder:PATH, npz:GLOB or '
                    'tfds:NAME[:SPLIT]')
  kind, _, rest = spec.partition(':')
  if kind == 'digits' and not rest:
    return _load_digits(spec)
  if kind == 'folder' and rest:
    return _load_folder(spec, _resolve(rest, data_root))
  if kind == 'npz' and rest:
    return _load_npz(spec, _resolve(rest, data_root))
  if kind == 'tfds' and rest:
    # Dataset names may hold a '/' config (imagenet_resized/32x32) but never a ':'.
    name, _, split = rest.partition(':')
    return _load_tfds(spec, name, split or 'train', tfds_data_dir)
  raise UserError(f'unknown source spec {spec!r}; use digits, folder:PATH, npz:GLOB or '
                  'tfds:NAME[:SPLIT]')

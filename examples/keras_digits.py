#!/usr/bin/env python3
"""Trains a small Keras CNN with the learned optimizer and with Adam tuned over a rate grid.

Every optimizer starts from the same initial weights and sees the same batches (`model.fit` on one
seeded tf.data pipeline). Adam runs at every rate of --adam_learning_rates; the tuned Adam is the
rate with the lowest test loss reached (the per-task tuning of paper §4.4). Writes a PNG of train
loss, test loss and test accuracy against steps, and the curves as JSON beside it, atomically.

Data: the MNIST test set of ../shared/data/mnist/mnist_test.npz when it is present (80% of its
10,000 images to train, 20% to test), else scikit-learn's bundled 8x8 digits.

  python examples/keras_digits.py --optimizer=NAME|TRAIN_DIR|CKPT --output=runs/keras_digits.png
"""

import os
import sys
import time

from absl import app
from absl import flags
import keras
import matplotlib
import numpy as np
import tensorflow as tf

from lo_tf import io_utils
from lo_tf.data.sources import load_source
from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.keras import LearnedOptimizer
from lo_tf.learned_optimizers import pretrained

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position  (after use('Agg'))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MNIST = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'mnist', 'mnist_test.npz')

flags.DEFINE_string('optimizer', None, 'Learned optimizer: a shipped name, a train_dir written by '
                    'bin/train or a checkpoint path (default: the first shipped optimizer).')
flags.DEFINE_string('data', 'auto', 'A source spec (digits, npz:GLOB, folder:PATH); auto: '
                    '../shared/data/mnist/mnist_test.npz when present, else digits.')
flags.DEFINE_float('test_fraction', 0.2, 'Share of the images held out to test.')
flags.DEFINE_integer('steps', 600, 'Training steps (batches) per optimizer.')
flags.DEFINE_integer('eval_every', 25, 'Steps between evaluations on the test images.')
flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
flags.DEFINE_list('adam_learning_rates', ['1e-4', '3e-4', '1e-3', '3e-3', '1e-2'],
                  'Adam learning-rate grid.')
flags.DEFINE_integer('seed', 0, 'Seed of the split, the initial weights and the batch order.')
flags.DEFINE_boolean('jit_compile', False, 'XLA-compile the train step.')
flags.DEFINE_string('output', 'runs/keras_digits.png', 'PNG to write; the curves go to .json.')
FLAGS = flags.FLAGS


def _load(spec, test_fraction, seed):
  """(x_train, y_train, x_test, y_test, spec, num_classes): float32 images in [0, 1], int64
  labels."""
  if spec == 'auto':
    spec = f'npz:{SHARED_MNIST}' if os.path.exists(SHARED_MNIST) else 'digits'
  source = load_source(spec)
  order = np.random.default_rng(seed).permutation(len(source.labels))
  n_test = int(round(test_fraction * len(order)))
  if not 0 < n_test < len(order):
    raise UserError(f'--test_fraction={test_fraction} leaves no train or no test images of '
                    f'{len(order)}; use a value in (0, 1)')
  x = source.images.astype(np.float32) / 255.0
  test, train = order[:n_test], order[n_test:]
  return x[train], source.labels[train], x[test], source.labels[test], spec, source.num_classes


def _cnn(input_shape, num_classes, seed):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input(input_shape),
      keras.layers.Conv2D(16, 3, strides=2, padding='same', activation='relu'),
      keras.layers.Conv2D(32, 3, strides=2, padding='same', activation='relu'),
      keras.layers.Flatten(),
      keras.layers.Dense(num_classes),
  ])


def _train(optimizer, data, num_classes):
  """Fits the CNN; returns curves: steps, train loss (mean over each interval), test loss/acc."""
  x, y, x_test, y_test = data
  model = _cnn(x.shape[1:], num_classes, FLAGS.seed)
  model.compile(optimizer=optimizer, metrics=['accuracy'], jit_compile=FLAGS.jit_compile,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  batches = (tf.data.Dataset.from_tensor_slices((x, y))
             .shuffle(len(y), seed=FLAGS.seed, reshuffle_each_iteration=True).repeat()
             .batch(FLAGS.batch_size, drop_remainder=True))
  start = time.perf_counter()
  history = model.fit(batches, epochs=FLAGS.steps // FLAGS.eval_every,
                      steps_per_epoch=FLAGS.eval_every, validation_data=(x_test, y_test),
                      validation_batch_size=1024, shuffle=False, verbose=0).history
  seconds = time.perf_counter() - start
  steps = [FLAGS.eval_every * (i + 1) for i in range(len(history['loss']))]
  return {'steps': steps, 'train_loss': history['loss'], 'test_loss': history['val_loss'],
          'test_accuracy': history['val_accuracy'], 'seconds': seconds}


def _plot(runs, learned, tuned, title, path):
  matplotlib.use('Agg')
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, key, label in zip(axes, ('train_loss', 'test_loss', 'test_accuracy'),
                            ('train loss (mean over each interval)', 'test loss',
                             'test accuracy')):
    for name, run in runs.items():
      if name.startswith('adam') and name != tuned:
        ax.plot(run['steps'], run[key], color='tab:blue', alpha=0.25, lw=0.8)
    ax.plot(runs[tuned]['steps'], runs[tuned][key], color='tab:blue', lw=2,
            label=f'{tuned} (tuned over the grid; faint: other rates)')
    ax.plot(runs[learned]['steps'], runs[learned][key], color='tab:red', lw=2, label=learned)
    ax.set_xlabel('training steps')
    ax.set_ylabel(label)
    if key != 'test_accuracy':
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  io_utils.atomic_savefig(fig, path)
  plt.close(fig)


def main(argv):
  """Runs the comparison; bad input is one `error:` line and exit status 2, as bin/ tools do."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; flags are --name=value')
  try:
    compare()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def compare():
  """Trains the learned optimizer and every Adam rate; writes the PNG and JSON."""
  for name in ('steps', 'eval_every', 'batch_size'):
    check_int('flags', name, getattr(FLAGS, name))
  if FLAGS.steps < FLAGS.eval_every:
    raise UserError(f'--steps={FLAGS.steps} is below --eval_every={FLAGS.eval_every}; '
                    'train for at least one evaluation interval')
  try:
    rates = [float(r) for r in FLAGS.adam_learning_rates]
  except ValueError:
    raise UserError(f'--adam_learning_rates={",".join(FLAGS.adam_learning_rates)} must be '
                    'numbers, e.g. 1e-3,3e-3') from None
  if not rates or min(rates) <= 0:
    raise UserError('--adam_learning_rates must be positive numbers, e.g. 1e-3,3e-3')
  spec = FLAGS.optimizer
  if spec is None:
    if not pretrained.shipped_names():
      raise UserError('no learned optimizer is shipped in lo_tf/pretrained; pass '
                      '--optimizer=TRAIN_DIR (written by bin/train) or a checkpoint path')
    spec = pretrained.shipped_names()[0]
  if not FLAGS.output.endswith('.png'):
    raise UserError(f'--output={FLAGS.output!r} must name a .png file')
  io_utils.ensure_writable_dir(os.path.dirname(os.path.abspath(FLAGS.output)))
  LearnedOptimizer(spec)  # fails here, before any training, for a bad spec
  *data, data_spec, num_classes = _load(FLAGS.data, FLAGS.test_fraction, FLAGS.seed)
  print(f'data {data_spec}: {len(data[1])} train / {len(data[3])} test images '
        f'{data[0].shape[1:]}, {num_classes} classes; {FLAGS.steps} steps of batch '
        f'{FLAGS.batch_size}')
  learned = f'learned ({os.path.basename(os.path.normpath(spec))})'
  optimizers = {learned: lambda: LearnedOptimizer(spec)}
  optimizers.update({f'adam lr={r:g}': (lambda r=r: keras.optimizers.Adam(r)) for r in rates})
  runs = {}
  print(f'{"optimizer":<28} {"final train loss":>16} {"best test loss":>15} '
        f'{"final test acc":>15} {"seconds":>8}')
  for name, make in optimizers.items():
    run = runs[name] = _train(make(), data, num_classes)
    print(f'{name:<28} {run["train_loss"][-1]:>16.4f} {min(run["test_loss"]):>15.4f} '
          f'{run["test_accuracy"][-1]:>15.4f} {run["seconds"]:>8.1f}')
  tuned = min((n for n in runs if n != learned), key=lambda n: min(runs[n]['test_loss']))
  print(f'tuned Adam: {tuned}')
  _plot(runs, learned, tuned, f'{data_spec}: {len(data[1])} train images, batch '
        f'{FLAGS.batch_size}, same initial weights and batches for every optimizer',
        FLAGS.output)
  json_path = FLAGS.output[:-len('.png')] + '.json'
  io_utils.atomic_write_json(json_path, {
      'data': data_spec, 'optimizer': spec, 'tuned_adam': tuned, 'runs': runs,
      'flags': {f: FLAGS[f].value for f in ('steps', 'eval_every', 'batch_size', 'seed',
                                             'test_fraction', 'jit_compile')}})
  print(f'wrote {FLAGS.output} and {json_path}')


if __name__ == '__main__':
  app.run(main)

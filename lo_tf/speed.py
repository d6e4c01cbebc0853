"""Inner-training speed of optimizers in batches per second (paper App. F).

Each optimizer trains the paper's CNN on one fixed batch of random data (no input pipeline to
confound the timing) for `steps` steps inside one `tf.while_loop`. The optimizers run alternated
within one process, `repeats` times each in a rotating order, and the median rate is reported, so
slow drifts of a shared machine hit every optimizer alike.
"""

import platform
import time

import numpy as np
import tensorflow as tf
from absl import logging

from lo_tf.errors import UserError
from lo_tf.inner_training import inner_step
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.optimizers.hand_designed import SGDMomentum
from lo_tf.tasks.problems import ConvNet


def _sgd(learning_rate):
  return SGDMomentum(learning_rate, momentum=0.0)


def optimizer_families(learned=None):
  """{name: (family, opt_params)} benchmarked: plain SGD, Adam and a learned optimizer.

  Args:
    learned: (family, theta) of the learned optimizer; default: `MLPLOpt` at a random θ (the cost
      of a step does not depend on θ's values).
  """
  if learned is None:
    lopt = MLPLOpt()
    learned = (lopt.optimizer, lopt.init_theta(tf.constant([0, 0])))
  return {'sgd': (_sgd, tf.constant(1e-3)), 'adam': (Adam, tf.constant(1e-3)),
          'learned': learned}


def make_train_loop(problem, family, batch_size, steps):
  """A `tf.function(opt_params, x, y) -> final loss` running `steps` inner steps in-graph."""

  @tf.function
  def run(opt_params, x, y):
    opt = family(opt_params)
    params = problem.init(tf.constant([0, 0]))

    def body(i, params, state, _):
      loss, params, state = inner_step(problem.loss, opt, params, state, x, y)
      return i + 1, params, state, loss

    return tf.while_loop(lambda i, *_: i < steps, body,
                         (tf.constant(0), params, opt.init(params), tf.constant(0.0)),
                         parallel_iterations=1)[-1]

  return run


def benchmark(batch_size=128, image_size=(32, 32, 3), num_classes=10, steps=100, repeats=5,
              device='cpu', names=('sgd', 'adam', 'learned')):
  """Measures batches/s of each optimizer training the paper's 3-layer CNN (App. C.2, App. F).

  Args:
    batch_size: images per batch.
    image_size: (H, W, C) of the random images.
    num_classes: logits of the CNN.
    steps: inner steps per timed run.
    repeats: timed runs per optimizer (the median is reported).
    device: 'cpu' or 'gpu'.
    names: optimizers to run, from `optimizer_families()`.

  Returns:
    {"device", "batch_size", "image_size", "steps", "results": {name: {"batches_per_sec_median",
    "runs"}}, "ratios": {"a/b": ...}}; "runs" lists every run's batches/s in order.

  Raises:
    UserError: for non-positive sizes, an unknown device or optimizer, or no GPU for 'gpu'.
  """
  for label, value in (('batch_size', batch_size), ('steps', steps), ('repeats', repeats)):
    if value < 1:
      raise UserError(f'{label}={value} must be a positive integer')
  if len(image_size) != 3 or min(image_size) < 1:
    raise UserError(f'image_size={image_size} must be three positive sizes H,W,C')
  if device not in ('cpu', 'gpu'):
    raise UserError(f'device={device!r} is unknown; use cpu or gpu')
  if device == 'gpu' and not tf.config.list_physical_devices('GPU'):
    raise UserError('device=gpu but TensorFlow sees no GPU; install tensorflow[and-cuda] on a '
                    'GPU machine or use --device=cpu')
  families = optimizer_families()
  unknown = set(names) - set(families)
  if unknown:
    raise UserError(f'unknown optimizers {sorted(unknown)}; choose from {sorted(families)}')
  problem = ConvNet(image_size, num_classes)
  with tf.device('/GPU:0' if device == 'gpu' else '/CPU:0'):
    x = tf.random.stateless_normal((batch_size,) + tuple(image_size), [1, 2])
    y = tf.random.stateless_uniform([batch_size], [3, 4], 0, num_classes, tf.int32)
    loops = {n: make_train_loop(problem, families[n][0], batch_size, steps) for n in names}
    for n in names:  # trace and warm up outside the timed runs
      loops[n](families[n][1], x, y).numpy()
    runs = {n: [] for n in names}
    order = list(names)
    for r in range(repeats):
      for n in order:
        start = time.perf_counter()
        loops[n](families[n][1], x, y).numpy()
        runs[n].append(steps / (time.perf_counter() - start))
      logging.info('repeat %d/%d: %s', r + 1, repeats,
                   ', '.join(f'{n} {runs[n][-1]:.1f}/s' for n in names))
      order = order[1:] + order[:1]
  results = {n: {'batches_per_sec_median': float(np.median(v)), 'runs': v}
             for n, v in runs.items()}
  med = {n: v['batches_per_sec_median'] for n, v in results.items()}
  ratios = {f'{a}/{b}': med[a] / med[b] for a, b in
            (('adam', 'sgd'), ('learned', 'adam'), ('learned', 'sgd')) if a in med and b in med}
  return {'device': device, 'machine': platform.processor() or platform.machine(),
          'batch_size': batch_size, 'image_size': list(image_size), 'steps': steps,
          'results': results, 'ratios': ratios}


def run_benchmark_cli(batch_size, image_size, steps, repeats, device, names, json_out):
  """`bin/speed_benchmark`: validates flag values, runs `benchmark`, prints a table, writes JSON.

  Raises:
    UserError: for malformed sizes or an unwritable --json_out.
  """
  import os  # pylint: disable=g-import-not-at-top
  from lo_tf import io_utils  # pylint: disable=g-import-not-at-top
  try:
    shape = tuple(int(v) for v in image_size)
  except ValueError:
    raise UserError(f'--image_size={",".join(image_size)} must be three integers H,W,C') from None
  if not names:
    raise UserError('--optimizers is empty; name some of sgd, adam, learned')
  if json_out:
    if os.path.isdir(json_out):
      raise UserError(f'--json_out={json_out} is a directory; give a file path')
    io_utils.ensure_writable_dir(os.path.dirname(os.path.abspath(json_out)))
  result = benchmark(batch_size=batch_size, image_size=shape, steps=steps, repeats=repeats,
                     device=device, names=tuple(names))
  print(f'{"optimizer":<10} {"batches/s (median)":>19}  runs')
  for name, r in result['results'].items():
    runs = ' '.join(f'{v:.1f}' for v in r['runs'])
    print(f'{name:<10} {r["batches_per_sec_median"]:>19.1f}  {runs}')
  for name, ratio in result['ratios'].items():
    print(f'ratio {name}: {ratio:.3f}')
  if json_out:
    io_utils.atomic_write_json(json_out, result)
    print(f'wrote {json_out}')
  return result

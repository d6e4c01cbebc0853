"""Inner-training speed of optimizers in batches per second (paper App. F).

Each optimizer trains the paper's CNN on one fixed batch of random data (no input pipeline to
confound the timing) for `steps` steps inside one `tf.while_loop`. The optimizers run alternated
within one process, `repeats` times each in a rotating order, and the median rate is reported, so
slow drifts of a shared machine hit every optimizer alike. The learned optimizer runs as
`MLPLOpt(implementation='auto')` ('learned'), or pinned to one implementation of its step
('learned_xla', 'learned_custom_op'), so that implementations compare within one process.

With `problem=` (`bin/speed_benchmark --gin_file=...`: an experiment's own inner problem, batch
size and image shape) the same loop trains that problem instead, and 'sgd_packed' (plain SGD
behind the learned optimizer's flatten/concatenate/split of all tensors) separates that packing's
cost from the fused step's in the learned optimizer's time.

`core_benchmark` times the learned-optimizer step alone (forward, and forward + backward as in
outer training) for M trajectories at once, per implementation, alternated the same way.
"""

import math
import platform
import time

import numpy as np
import tensorflow as tf
from absl import logging

from lo_tf.errors import UserError
from lo_tf.inner_training import inner_step
from lo_tf.kernels import ops
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.optimizers.hand_designed import SGDMomentum
from lo_tf.tasks.problems import ConvNet


def _sgd(learning_rate):
  return SGDMomentum(learning_rate, momentum=0.0)


# The omniglot outer-training shape: the 14x14x1 5-way CNN's weight tensors (19k weights).
OMNIGLOT_CNN_SIZES = (288, 32, 9216, 32, 9216, 32, 160, 5)


def _implementations():
  """The learned-optimizer step implementations that run here."""
  return ('xla', 'custom_op') if ops.available() else ('xla',)


def optimizer_families(learned=None):
  """{name: (family, opt_params)} benchmarked: plain SGD, Adam and the learned optimizer.

  'learned' is `MLPLOpt` with implementation 'auto'; 'learned_xla' and (where the fused op is
  available) 'learned_custom_op' pin its step's implementation; 'sgd_packed' is `PackedSGD`.

  Args:
    learned: (family, theta) for 'learned'; default: `MLPLOpt` at a random θ (the cost of a step
      does not depend on θ's values).
  """
  theta = MLPLOpt().init_theta(tf.constant([0, 0]))
  families = {'sgd': (_sgd, tf.constant(1e-3)), 'adam': (Adam, tf.constant(1e-3)),
              'sgd_packed': (PackedSGD, tf.constant(1e-3)),
              'learned': learned or (MLPLOpt().optimizer, theta)}
  for impl in _implementations():
    families[f'learned_{impl}'] = (MLPLOpt(implementation=impl).optimizer, theta)
  return families


class PackedSGD(SGDMomentum):
  """Plain SGD routed through `LearnedOptimizer.update`'s packing: every tensor flattened and
  concatenated into one [1, N] row, the step taken on the row, split and reshaped back. Its time
  minus plain SGD's is what the packing costs a learned step (the fused op's own cost is the rest).
  """

  def __init__(self, learning_rate):
    super().__init__(learning_rate, momentum=0.0)

  def init(self, params):
    return tf.zeros([])

  def update(self, grads, state, params):
    sizes = [math.prod(p.shape) for p in params]
    flat = lambda xs: tf.concat([tf.reshape(x, [1, n]) for x, n in zip(xs, sizes)], 1)
    new_w = flat(params) - self.learning_rate * flat(grads)
    pieces = tf.split(new_w, sizes, axis=-1)
    return [tf.reshape(x, p.shape) for x, p in zip(pieces, params)], state


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
              device='cpu', names=('sgd', 'adam', 'learned'), problem=None):
  """Measures batches/s of each optimizer training the paper's 3-layer CNN (App. C.2, App. F).

  Args:
    batch_size: images per batch.
    image_size: (H, W, C) of the random images (ignored with `problem`: its input shape).
    num_classes: logits of the CNN (ignored with `problem`).
    steps: inner steps per timed run.
    repeats: timed runs per optimizer (the median is reported).
    device: 'cpu' or 'gpu'.
    names: optimizers to run, from `optimizer_families()`.
    problem: the `Problem` to train (default: `ConvNet(image_size, num_classes)`, the paper's).

  Returns:
    {"device", "machine", "problem" (class name and number of weights per tensor), "batch_size",
    "image_size", "steps", "learned_implementation" (what
    'learned' runs: `MLPLOpt().implementation`), "kernel" (`lo_tf.kernels.ops.describe()`),
    "results": {name: {"batches_per_sec_median", "runs", "batches_per_cpu_sec_median",
    "cpu_runs"}}, "ratios": {"a/b": ...}, "cpu_ratios"}; "runs" lists every run's batches/s in
    order, "cpu_runs" its batches per second of this process's CPU time (all threads), which other
    processes on a shared machine disturb less; ratios are adam/sgd, sgd_packed/sgd and each
    learned optimizer over adam and sgd (and over sgd_packed when run), of the wall-clock and of
    the CPU-time medians.

  Raises:
    UserError: for non-positive sizes, an unknown device or optimizer, or no GPU for 'gpu'.
  """
  for label, value in (('batch_size', batch_size), ('steps', steps), ('repeats', repeats)):
    if value < 1:
      raise UserError(f'{label}={value} must be a positive integer')
  if problem is not None:
    image_size, num_classes = problem.input_shape, problem.num_classes
  if len(image_size) != 3 or min(image_size) < 1:
    raise UserError(f'image_size={image_size} must be three positive sizes H,W,C')
  if device not in ('cpu', 'gpu'):
    raise UserError(f'device={device!r} is unknown; use cpu or gpu')
  if device == 'gpu' and not tf.config.list_physical_devices('GPU'):
    raise UserError('device=gpu but TensorFlow sees no GPU; install tensorflow[and-cuda] on a '
                    'GPU machine or use --device=cpu')
  families = optimizer_families()
  if 'learned_custom_op' in names and 'learned_custom_op' not in families:
    raise UserError(f'learned_custom_op cannot run: {ops.load_error()}')
  unknown = set(names) - set(families)
  if unknown:
    raise UserError(f'unknown optimizers {sorted(unknown)}; choose from {sorted(families)}')
  problem = problem or ConvNet(image_size, num_classes)
  with tf.device('/GPU:0' if device == 'gpu' else '/CPU:0'):
    x = tf.random.stateless_normal((batch_size,) + tuple(image_size), [1, 2])
    y = tf.random.stateless_uniform([batch_size], [3, 4], 0, num_classes, tf.int32)
    loops = {n: make_train_loop(problem, families[n][0], batch_size, steps) for n in names}
    for n in names:  # trace and warm up outside the timed runs
      loops[n](families[n][1], x, y).numpy()
    runs = {n: [] for n in names}
    cpu_runs = {n: [] for n in names}
    order = list(names)
    for r in range(repeats):
      for n in order:
        start, cpu_start = time.perf_counter(), time.process_time()
        loops[n](families[n][1], x, y).numpy()
        runs[n].append(steps / (time.perf_counter() - start))
        cpu_runs[n].append(steps / (time.process_time() - cpu_start))
      logging.info('repeat %d/%d: %s', r + 1, repeats,
                   ', '.join(f'{n} {runs[n][-1]:.1f}/s' for n in names))
      order = order[1:] + order[:1]
  results = {n: {'batches_per_sec_median': float(np.median(runs[n])), 'runs': runs[n],
                 'batches_per_cpu_sec_median': float(np.median(cpu_runs[n])),
                 'cpu_runs': cpu_runs[n]} for n in names}
  pairs = [('adam', 'sgd'), ('sgd_packed', 'sgd')] + [
      (n, b) for n in names if n.startswith('learned') for b in ('adam', 'sgd', 'sgd_packed')]
  pairs = [(a, b) for a, b in pairs if a in results and b in results]
  ratio = lambda key: {f'{a}/{b}': results[a][key] / results[b][key] for a, b in pairs}
  sizes = [math.prod(shape) for shape, _, _ in problem.param_shapes()]
  return {'device': device, 'machine': platform.processor() or platform.machine(),
          'problem': {'name': type(problem).__name__, 'sizes': sizes},
          'batch_size': batch_size, 'image_size': list(image_size), 'steps': steps,
          'learned_implementation': MLPLOpt().implementation, 'kernel': ops.describe(),
          'results': results, 'ratios': ratio('batches_per_sec_median'),
          'cpu_ratios': ratio('batches_per_cpu_sec_median')}


def core_benchmark(sizes=OMNIGLOT_CNN_SIZES, trajectories=32, repeats=7, device='cpu'):
  """Milliseconds of one learned-optimizer step (`MLPLOpt.core`) per implementation.

  Each implementation runs the step for M = `trajectories` trajectories of `sum(sizes)` weights
  (paper-default `MLPLOpt`, random inputs), forward only and forward + backward (gradients for
  θ, g, w, m, v as in outer training), each inside one `tf.function`; all run alternated in one
  process, `repeats` times, and the medians are reported.

  Args:
    sizes: element counts of the weight tensors.
    trajectories: M.
    repeats: timed runs per implementation and mode.
    device: 'cpu' or 'gpu'.

  Returns:
    {"device", "sizes", "trajectories", "kernel", "results": {"xla"|"custom_op": {"forward_ms",
    "forward_backward_ms", "runs": {"forward", "forward_backward"}}}, "speedups": {"forward",
    "forward_backward"} (xla time / custom_op time, where the op is available)}.

  Raises:
    UserError: for empty or non-positive sizes, or non-positive trajectories or repeats.
  """
  if not sizes or min(sizes) < 1 or trajectories < 1 or repeats < 1:
    raise UserError(f'core benchmark: sizes={list(sizes)}, trajectories={trajectories}, '
                    f'repeats={repeats} must be positive')
  sizes = tuple(int(s) for s in sizes)
  n, m = sum(sizes), trajectories
  lopts = {impl: MLPLOpt(implementation=impl) for impl in _implementations()}
  lopt = lopts['xla']
  with tf.device('/GPU:0' if device == 'gpu' else '/CPU:0'):
    normal = lambda shape, i: tf.random.stateless_normal(shape, [7, i])
    depth = lopt.depth
    inputs = (tf.stack([lopt.init_theta(tf.constant([0, i])) for i in range(m)]),
              1e-2 * normal([m, n], 1), normal([m, n], 2), tf.fill([m], 10.0),
              1e-2 * normal([m, n, depth], 3), 1e-4 * tf.abs(normal([m, n, depth], 4)))
    fns = {}
    for impl, lo in lopts.items():
      def forward(*args, lo=lo):
        return lo.core(*args, sizes)

      def forward_backward(*args, lo=lo):
        with tf.GradientTape() as tape:
          tape.watch(args)
          new_w, new_m, new_v = lo.core(*args, sizes)
          loss = tf.reduce_sum(new_w * args[2]) + tf.reduce_sum(new_m) + tf.reduce_sum(new_v)
        return tape.gradient(loss, [args[i] for i in (0, 1, 2, 4, 5)])

      fns[(impl, 'forward')] = tf.function(forward)
      fns[(impl, 'forward_backward')] = tf.function(forward_backward)
    run = lambda key: [x.numpy() for x in tf.nest.flatten(fns[key](*inputs))]
    for key in fns:  # trace and warm up outside the timed runs
      run(key)
    runs = {key: [] for key in fns}
    order = list(fns)
    for _ in range(repeats):
      for key in order:
        start = time.perf_counter()
        run(key)
        runs[key].append(1e3 * (time.perf_counter() - start))
      order = order[1:] + order[:1]
  results = {impl: {f'{mode}_ms': float(np.median(runs[(impl, mode)])) for mode in
                    ('forward', 'forward_backward')} for impl in lopts}
  for impl in lopts:
    results[impl]['runs'] = {mode: runs[(impl, mode)] for mode in ('forward', 'forward_backward')}
  speedups = {}
  if 'custom_op' in results:
    speedups = {mode: results['xla'][f'{mode}_ms'] / results['custom_op'][f'{mode}_ms']
                for mode in ('forward', 'forward_backward')}
  return {'device': device, 'sizes': list(sizes), 'trajectories': m, 'kernel': ops.describe(),
          'results': results, 'speedups': speedups}

"""Inner-training speed of optimizers in batches per second (paper App. F).

Each optimizer trains the paper's CNN on one fixed batch of random data (no input pipeline to
confound the timing) for `steps` steps inside one `tf.while_loop`, alternated with the others by
`harness.alternate`. The learned optimizer runs as `MLPLOpt(implementation='auto')` ('learned'), or
pinned to one implementation of its step ('learned_xla', 'learned_custom_op'), so that
implementations compare within one process.

With `problem=` (`bin/speed_benchmark --gin_file=...`: an experiment's own inner problem, batch
size and image shape) the same loop trains that problem instead, and 'sgd_packed' (plain SGD
behind the learned optimizer's flatten/concatenate/split of all tensors) separates that packing's
cost from the fused step's in the learned optimizer's time.
"""

import math

import numpy as np
import tensorflow as tf

from lo_tf.benchmarks import harness
from lo_tf.errors import UserError
from lo_tf.inner_training import train_steps
from lo_tf.kernels import ops
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.optimizers.hand_designed import SGDMomentum
from lo_tf.tasks.problems import ConvNet


def _sgd(learning_rate):
  return SGDMomentum(learning_rate, momentum=0.0)


def implementations():
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
  for impl in implementations():
    families[f'learned_{impl}'] = (MLPLOpt(implementation=impl).optimizer, theta)
  return families


class PackedSGD(SGDMomentum):
  """Plain SGD routed through `BoundMLPLOpt.update`'s packing: every tensor flattened and
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


def make_train_loop(problem, family, steps):
  """A `tf.function(opt_params, x, y) -> final loss` running `steps` inner steps on (x, y)."""

  @tf.function
  def run(opt_params, x, y):
    return train_steps(problem.loss, family(opt_params), problem.init(tf.constant([0, 0])), steps,
                       lambda i: (x, y))

  return run


def _check(batch_size, image_size, steps, repeats, names, families):
  """Raises UserError for non-positive sizes, a bad image shape or an unknown optimizer."""
  for label, value in (('batch_size', batch_size), ('steps', steps), ('repeats', repeats)):
    if value < 1:
      raise UserError(f'{label}={value} must be a positive integer')
  if len(image_size) != 3 or min(image_size) < 1:
    raise UserError(f'image_size={image_size} must be three positive sizes H,W,C')
  if 'learned_custom_op' in names and 'learned_custom_op' not in families:
    raise UserError(f'learned_custom_op cannot run: {ops.load_error()}')
  unknown = set(names) - set(families)
  if unknown:
    raise UserError(f'unknown optimizers {sorted(unknown)}; choose from {sorted(families)}')


def _ratios(results, names):
  """{"a/b": ratio} of the wall-clock and of the CPU-time medians, for the pairs compared."""
  pairs = [('adam', 'sgd'), ('sgd_packed', 'sgd')] + [
      (n, b) for n in names if n.startswith('learned') for b in ('adam', 'sgd', 'sgd_packed')]
  pairs = [(a, b) for a, b in pairs if a in results and b in results]
  ratio = lambda key: {f'{a}/{b}': results[a][key] / results[b][key] for a, b in pairs}
  return ratio('batches_per_sec_median'), ratio('batches_per_cpu_sec_median')


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
    {"device", "machine", "cpu_count", "problem" (class name and number of weights per tensor),
    "batch_size", "image_size", "steps", "learned_implementation" (what 'learned' runs:
    `MLPLOpt().implementation`), "kernel" (`lo_tf.kernels.ops.describe()`), "learned_kernel_path"
    (the fused op's CPU kernel that 'learned_custom_op' runs, e.g. under a gin binding of
    `MLPLOpt.cpu_isa`; None without the op), "results": {name:
    {"batches_per_sec_median", "runs", "batches_per_cpu_sec_median", "cpu_runs"}}, "ratios":
    {"a/b": ...}, "cpu_ratios"}; "runs" lists every run's batches/s in order, "cpu_runs" its
    batches per second of this process's CPU time; ratios are adam/sgd, sgd_packed/sgd and each
    learned optimizer over adam and sgd (and over sgd_packed when run).

  Raises:
    UserError: for non-positive sizes, an unknown device or optimizer, or no GPU for 'gpu'.
  """
  if problem is not None:
    image_size, num_classes = problem.input_shape, problem.num_classes
  families = optimizer_families()
  _check(batch_size, image_size, steps, repeats, names, families)
  problem = problem or ConvNet(image_size, num_classes)
  with harness.device_scope(device):
    x = tf.random.stateless_normal((batch_size,) + tuple(image_size), [1, 2])
    y = tf.random.stateless_uniform([batch_size], [3, 4], 0, num_classes, tf.int32)
    loops = {n: make_train_loop(problem, families[n][0], steps) for n in names}
    timings = harness.alternate(
        {n: lambda n=n: loops[n](families[n][1], x, y).numpy() for n in names}, repeats)
  results = {}
  for n in names:
    runs, cpu_runs = [steps / s for s in timings.wall[n]], [steps / s for s in timings.cpu[n]]
    results[n] = {'batches_per_sec_median': float(np.median(runs)), 'runs': runs,
                  'batches_per_cpu_sec_median': float(np.median(cpu_runs)), 'cpu_runs': cpu_runs}
  ratios, cpu_ratios = _ratios(results, names)
  sizes = [math.prod(shape) for shape, _, _ in problem.param_shapes()]
  return dict(harness.environment(device),
              problem={'name': type(problem).__name__, 'sizes': sizes},
              batch_size=batch_size, image_size=list(image_size), steps=steps,
              learned_implementation=MLPLOpt().implementation, kernel=ops.describe(),
              learned_kernel_path=MLPLOpt(implementation='custom_op').kernel_path
              if ops.available() else None,
              results=results, ratios=ratios, cpu_ratios=cpu_ratios)

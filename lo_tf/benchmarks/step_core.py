"""The learned-optimizer step alone, per implementation (paper App. F): `MLPLOpt.core`'s time.

Each implementation runs the step for M trajectories of `sum(sizes)` weights (paper-default
`MLPLOpt`, random inputs), forward only and forward + backward (gradients for θ, g, w, m, v as in
outer training), each inside one `tf.function`, alternated by `harness.alternate`.
"""

import numpy as np
import tensorflow as tf

from lo_tf.benchmarks import harness
from lo_tf.benchmarks.inner_speed import implementations
from lo_tf.errors import UserError
from lo_tf.kernels import ops
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt

# The omniglot outer-training shape: the 14x14x1 5-way CNN's weight tensors (19k weights).
OMNIGLOT_CNN_SIZES = (288, 32, 9216, 32, 9216, 32, 160, 5)
MODES = ('forward', 'forward_backward')


def _inputs(lopt, m, n):
  """Random (θ [M, P], g, w [M, N], t [M], m, v [M, N, D]) of the step."""
  normal = lambda shape, i: tf.random.stateless_normal(shape, [7, i])
  depth = lopt.depth
  return (tf.stack([lopt.init_theta(tf.constant([0, i])) for i in range(m)]),
          1e-2 * normal([m, n], 1), normal([m, n], 2), tf.fill([m], 10.0),
          1e-2 * normal([m, n, depth], 3), 1e-4 * tf.abs(normal([m, n, depth], 4)))


def _step_functions(lopt, sizes):
  """{mode: tf.function(*inputs)} of `lopt.core` alone and with its backward pass."""
  def forward(*args):
    return lopt.core(*args, sizes)

  def forward_backward(*args):
    with tf.GradientTape() as tape:
      tape.watch(args)
      new_w, new_m, new_v = lopt.core(*args, sizes)
      loss = tf.reduce_sum(new_w * args[2]) + tf.reduce_sum(new_m) + tf.reduce_sum(new_v)
    return tape.gradient(loss, [args[i] for i in (0, 1, 2, 4, 5)])

  return {'forward': tf.function(forward), 'forward_backward': tf.function(forward_backward)}


def benchmark(sizes=OMNIGLOT_CNN_SIZES, trajectories=32, repeats=7, device='cpu'):
  """Milliseconds of one learned-optimizer step (`MLPLOpt.core`) per implementation and mode.

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
  lopts = {impl: MLPLOpt(implementation=impl) for impl in implementations()}
  with harness.device_scope(device):
    inputs = _inputs(lopts['xla'], trajectories, sum(sizes))
    calls = {}
    for impl, lopt in lopts.items():
      for mode, fn in _step_functions(lopt, sizes).items():
        calls[(impl, mode)] = lambda fn=fn: [x.numpy() for x in tf.nest.flatten(fn(*inputs))]
    timings = harness.alternate(calls, repeats)
  results = {}
  for impl in lopts:
    runs = {mode: [1e3 * s for s in timings.wall[(impl, mode)]] for mode in MODES}
    results[impl] = {f'{mode}_ms': float(np.median(runs[mode])) for mode in MODES}
    results[impl]['runs'] = runs
  speedups = {}
  if 'custom_op' in results:
    speedups = {mode: results['xla'][f'{mode}_ms'] / results['custom_op'][f'{mode}_ms']
                for mode in MODES}
  return {'device': device, 'sizes': list(sizes), 'trajectories': trajectories,
          'kernel': ops.describe(), 'results': results, 'speedups': speedups}

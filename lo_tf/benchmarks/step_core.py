"""The learned-optimizer step alone, per implementation (paper App. F): `MLPLOpt.core`'s time.

Each implementation runs the step for M trajectories of `sum(sizes)` weights (paper-default
`MLPLOpt`, random inputs), forward only and forward + backward (gradients for θ, g, w, m, v as in
outer training). Every timed call is one `tf.function` running the step `loop_steps` times in a
`tf.while_loop` (each step's new w, m, v the next one's inputs), so a step's time is the op's and
not that of a Python call into TensorFlow; calls alternate by `harness.alternate`.

`breakdown` splits one call of the fused op per CPU kernel variant into its parts, from differences
of such loops (see its docstring).
"""

import re

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
# The breakdown's sizes (M = 1): the quickstart and Omniglot inner CNNs, then larger networks.
BREAKDOWN_WEIGHTS = (2531, 4970, 20000, 100000, 1000000)
# FLOP per cycle of one core's FMA units, per kernel variant: two FMA pipes of 4 (SSE2) or 8
# (AVX2) float lanes. AVX-512 counts as AVX2: Zen 4 splits a 512-bit FMA into two 256-bit halves,
# and the Xeons with two 512-bit FMA units reach twice this (their peak is then understated 2x).
FLOP_PER_CYCLE = {'generic': 16, 'avx2': 32, 'avx512': 32}


def _inputs(lopt, m, n):
  """Random (θ [M, P], g, w [M, N], t [M], m, v [M, N, D]) of the step."""
  normal = lambda shape, i: tf.random.stateless_normal(shape, [7, i])
  depth = lopt.depth
  return (tf.stack([lopt.init_theta(tf.constant([0, i])) for i in range(m)]),
          1e-2 * normal([m, n], 1), normal([m, n], 2), tf.fill([m], 10.0),
          1e-2 * normal([m, n, depth], 3), 1e-4 * tf.abs(normal([m, n, depth], 4)))


def _loop(core, steps, backward=False):
  """tf.function(θ, g, w, t, m, v) -> final w running `core` `steps` times in one while loop.

  With `backward`, each step also takes the gradients of a loss of its outputs for θ, g, w, m, v
  (as outer training does); they are carried through the loop so that none is pruned.
  """

  def step(theta, g, w, t, m, v):
    if not backward:
      return core(theta, g, w, t, m, v), ()
    with tf.GradientTape() as tape:
      tape.watch([theta, g, w, m, v])
      new_w, new_m, new_v = core(theta, g, w, t, m, v)
      loss = tf.reduce_sum(new_w * w) + tf.reduce_sum(new_m) + tf.reduce_sum(new_v)
    return (new_w, new_m, new_v), tuple(tape.gradient(loss, [theta, g, w, m, v]))

  @tf.function
  def run(theta, g, w, t, m, v):
    grads = tuple(tf.zeros_like(x) for x in (theta, g, w, m, v)) if backward else ()

    def body(i, w, m, v, grads):
      (w, m, v), grads = step(theta, g, w, t, m, v)
      return i + 1, w, m, v, grads

    return tf.while_loop(lambda i, *_: i < steps, body, (0, w, m, v, grads))[1]

  return run


def _time_loops(loops, inputs, steps, repeats):
  """({name: median wall ms per step}, {name: median CPU ms per step of this process}, {name:
  [wall ms per step of each run]}) of `loops` alternated."""
  calls = {name: lambda f=f, x=inputs[name]: f(*x).numpy() for name, f in loops.items()}
  timings = harness.alternate(calls, repeats)
  runs = {name: [1e3 * s / steps for s in timings.wall[name]] for name in loops}
  cpu = {name: 1e3 * timings.median_cpu(name) / steps for name in loops}
  return {name: float(np.median(r)) for name, r in runs.items()}, cpu, runs


def benchmark(sizes=OMNIGLOT_CNN_SIZES, trajectories=32, repeats=7, device='cpu', loop_steps=20):
  """Milliseconds of one learned-optimizer step (`MLPLOpt.core`) per implementation and mode.

  Args:
    sizes: element counts of the weight tensors.
    trajectories: M.
    repeats: timed runs per implementation and mode.
    device: 'cpu' or 'gpu'.
    loop_steps: steps per timed run, in one in-graph loop.

  Returns:
    {"device", "sizes", "trajectories", "loop_steps", "kernel", "results": {"xla"|"custom_op":
    {"forward_ms", "forward_backward_ms", "runs": {"forward", "forward_backward"}}}, "speedups":
    {"forward", "forward_backward"} (xla time / custom_op time, where the op is available)}; ms
    are per step.

  Raises:
    UserError: for empty or non-positive sizes, or non-positive trajectories, repeats or
      loop_steps.
  """
  if not sizes or min(sizes) < 1 or min(trajectories, repeats, loop_steps) < 1:
    raise UserError(f'core benchmark: sizes={list(sizes)}, trajectories={trajectories}, '
                    f'repeats={repeats}, loop_steps={loop_steps} must be positive')
  sizes = tuple(int(s) for s in sizes)
  lopts = {impl: MLPLOpt(implementation=impl) for impl in implementations()}
  with harness.device_scope(device):
    x = _inputs(lopts['xla'], trajectories, sum(sizes))
    loops, inputs = {}, {}
    for impl, lopt in lopts.items():
      for mode in MODES:
        core = lambda *args, lopt=lopt: lopt.core(*args, sizes)
        loops[(impl, mode)] = _loop(core, loop_steps, backward=mode == 'forward_backward')
        inputs[(impl, mode)] = x
    medians, _, all_runs = _time_loops(loops, inputs, loop_steps, repeats)
  results = {}
  for impl in lopts:
    results[impl] = {f'{mode}_ms': medians[(impl, mode)] for mode in MODES}
    results[impl]['runs'] = {mode: all_runs[(impl, mode)] for mode in MODES}
  speedups = {}
  if 'custom_op' in results:
    speedups = {mode: results['xla'][f'{mode}_ms'] / results['custom_op'][f'{mode}_ms']
                for mode in MODES}
  return {'device': device, 'sizes': list(sizes), 'trajectories': trajectories,
          'loop_steps': loop_steps, 'kernel': ops.describe(), 'results': results,
          'speedups': speedups}


def cpu_mhz():
  """This CPU's clock in MHz as /proc/cpuinfo reports it (first core), or None."""
  try:
    with open('/proc/cpuinfo') as f:
      found = re.search(r'^cpu MHz\s*:\s*([0-9.]+)', f.read(), re.MULTILINE)
  except OSError:
    return None
  return float(found.group(1)) if found else None


def breakdown(weights=BREAKDOWN_WEIGHTS, isas=None, repeats=7, work_per_run=2e6):
  """Where one forward call of the fused op goes (paper App. F), per CPU kernel variant and size.

  Every part is a difference of in-graph loops (M = 1, one tensor of n weights, paper-default
  `MLPLOpt`), all of one size alternated, in medians of this process's CPU time (on a shared
  machine other processes inflate it less than wall-clock; `*_wall_ms` give wall-clock too):
    loop: an empty loop step (w, m, v passed through), subtracted from the others;
    tf_op: the op on one weight, less `loop`: what a call costs whatever its size (TensorFlow's
      dispatch of a 6-input op, its allocations, the per-tensor statistics and the folding of the
      time features into the first-layer bias);
    dense: the two dense layers, 2 x the time that halving the hidden size saves (less the same
      difference at one weight), with its GFLOP/s and the fraction of one core's FMA peak
      (`FLOP_PER_CYCLE` x `cpu_mhz()`);
    features_and_normalization: the rest of a call on the calling thread (both passes' loads and
      features, the sums of squares, the stores of m' and v', the step's exp);
    pool_dispatch: the thread-pool passes' CPU time less the calling thread's (the pool's
      wake-ups and spinning; `pool_wall_ms` against `calling_thread_wall_ms` shows where the
      second core pays off);
    packing: flattening and concatenating g and w into one row and splitting new w (done by
      `BoundMLPLOpt.update`, outside the op), for 3 tensors of n/3 weights;
    default: the op as `MLPLOpt` runs it (the pool from `ops.POOL_MIN_WEIGHTS`).

  Args:
    weights: the sizes n.
    isas: CPU kernel variants (default: every one that runs here, 'auto' aside).
    repeats: timed runs per loop.
    work_per_run: weights x steps of each timed run (at least 3 steps).

  Returns:
    {"cpu_mhz", "flop_per_cycle", "pool_min_weights", "results": {isa: {n: {"<part>_ms", ...,
    "dense_gflops", "dense_fraction_of_peak", "flops_per_weight"}}}}, ms per call.

  Raises:
    UserError: where the op is unavailable, or for non-positive sizes.
  """
  if not ops.available():
    raise UserError(f'the breakdown times the fused op, which is unavailable: {ops.load_error()}')
  if not weights or min(weights) < 1:
    raise UserError(f'breakdown sizes {list(weights)} must be positive')
  isas = isas or [i for i in ops.supported_cpu_isas() if i != 'auto']
  lopt, half = MLPLOpt(implementation='custom_op'), MLPLOpt(implementation='custom_op',
                                                            hidden_size=16)
  # A multiply-add per weight feature and hidden unit, and per hidden unit and output.
  flops_per_weight = 2 * lopt.hidden_size * (lopt.num_weight_features + 2)
  mhz = cpu_mhz()
  results = {}
  for isa in isas:
    results[isa] = {}
    for n in weights:
      steps = max(3, int(work_per_run // n))
      thread = lambda fam, k, pool_min_weights=10**15: (
          lambda *a: ops.mlp_lopt_step(fam, *a, (k,), cpu_isa=isa,
                                       pool_min_weights=pool_min_weights))
      pieces = [n // 3, n // 3, n - 2 * (n // 3)]

      def packed(theta, g, w, t, m, v, pieces=pieces):
        split = lambda x: [tf.reshape(p, [1, k]) for p, k in zip(tf.split(x, pieces, 1), pieces)]
        new_w = tf.concat(split(w), 1) - 1e-3 * tf.concat(split(g), 1)
        return tf.concat(split(new_w), 1), m, v

      loops = {'loop': _loop(lambda theta, g, w, t, m, v: (w, m, v), steps),
               'one_weight': _loop(thread(lopt, 1), steps),
               'one_weight_half': _loop(thread(half, 1), steps),
               'thread': _loop(thread(lopt, n), steps),
               'thread_half': _loop(thread(half, n), steps),
               'pool': _loop(thread(lopt, n, 0), steps),
               'default': _loop(thread(lopt, n, None), steps),
               'packing': _loop(packed, steps)}
      big, small = _inputs(lopt, 1, n), _inputs(lopt, 1, 1)
      small_half = (_inputs(half, 1, 1)[0],) + small[1:]
      inputs = {name: big for name in loops}
      inputs.update(one_weight=small, one_weight_half=small_half,
                    thread_half=(_inputs(half, 1, n)[0],) + big[1:])
      wall, ms, _ = _time_loops(loops, inputs, steps, repeats)
      dense = 2 * ((ms['thread'] - ms['thread_half']) - (ms['one_weight'] - ms['one_weight_half']))
      gflops = flops_per_weight * n / dense / 1e6 if dense > 0 else None
      peak = FLOP_PER_CYCLE[isa] * mhz / 1e3 if mhz else None
      results[isa][n] = {
          'default_ms': ms['default'] - ms['loop'], 'calling_thread_ms': ms['thread'] - ms['loop'],
          'pool_ms': ms['pool'] - ms['loop'], 'tf_op_ms': ms['one_weight'] - ms['loop'],
          'dense_ms': dense,
          'features_and_normalization_ms': ms['thread'] - ms['one_weight'] - dense,
          'pool_dispatch_ms': ms['pool'] - ms['thread'], 'packing_ms': ms['packing'] - ms['loop'],
          'loop_ms': ms['loop'], 'default_wall_ms': wall['default'] - wall['loop'],
          'calling_thread_wall_ms': wall['thread'] - wall['loop'],
          'pool_wall_ms': wall['pool'] - wall['loop'], 'dense_gflops': gflops,
          'dense_fraction_of_peak': gflops / peak if gflops and peak else None,
          'flops_per_weight': flops_per_weight, 'steps': steps}
  return {'cpu_mhz': mhz, 'flop_per_cycle': FLOP_PER_CYCLE, 'pool_min_weights': ops.POOL_MIN_WEIGHTS,
          'results': results}

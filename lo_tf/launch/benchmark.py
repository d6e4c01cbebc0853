"""`bin/speed_benchmark`: inner-step speed (paper App. F) and outer-training throughput (App. B)."""

import json
import math
import os

import gin

from lo_tf import config
from lo_tf import io_utils
from lo_tf.benchmarks import inner_speed
from lo_tf.benchmarks import outer_throughput
from lo_tf.benchmarks import step_core
from lo_tf.errors import UserError
from lo_tf.experiment import build_experiment
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt


def _check_json_out(json_out):
  if json_out:
    if os.path.isdir(json_out):
      raise UserError(f'--json_out={json_out} is a directory; give a file path')
    io_utils.ensure_writable_dir(os.path.dirname(os.path.abspath(json_out)))


def _write(json_out, result):
  if json_out:
    io_utils.atomic_write_json(json_out, result)
    print(f'wrote {json_out}')


def inner_benchmark_from_flags(batch_size, image_size, steps, repeats, device, names, json_out,
                               core_trajectories=0, core_sizes=(), core_breakdown=(), gin_files=(),
                               gin_bindings=()):
  """Validates flag values, runs `inner_speed.benchmark` (and `step_core.benchmark` when
  core_trajectories > 0, under the JSON key "core"; core_sizes empty: the Omniglot CNN's sizes;
  and `step_core.breakdown` at the weights of core_breakdown, under "breakdown"), prints tables,
  writes JSON.

  With gin_files, the experiment they configure is timed instead of the paper's CNN: its inner
  problem, `InnerTrainer.batch_size` and image shape (batch_size and image_size are then unused;
  core_sizes empty: that problem's tensor sizes), and the result records the configuration.

  Raises:
    UserError: for malformed sizes, bad gin configuration or an unwritable --json_out.
  """
  try:
    shape = tuple(int(v) for v in image_size)
  except ValueError:
    raise UserError(f'--image_size={",".join(image_size)} must be three integers H,W,C') from None
  try:
    core_shape = tuple(int(v) for v in core_sizes) or step_core.OMNIGLOT_CNN_SIZES
  except ValueError:
    raise UserError(f'--core_sizes={",".join(core_sizes)} must be integers') from None
  try:
    breakdown_weights = tuple(int(v) for v in core_breakdown)
  except ValueError:
    raise UserError(f'--core_breakdown={",".join(core_breakdown)} must be integers') from None
  if not names:
    raise UserError('--optimizers is empty; name some of sgd, adam, learned')
  if core_trajectories < 0:
    raise UserError(f'--core_trajectories={core_trajectories} must be >= 0 (0: no core benchmark)')
  _check_json_out(json_out)
  problem = None
  if gin_files:
    config.parse_gin(gin_files, gin_bindings)
    experiment = config.build(build_experiment)
    problem, batch_size = experiment.problem, experiment.trainer.batch_size
    if not core_sizes:
      core_shape = tuple(math.prod(s) for s, _, _ in problem.param_shapes())
  result = inner_speed.benchmark(batch_size=batch_size, image_size=shape, steps=steps,
                                 repeats=repeats, device=device, names=tuple(names),
                                 problem=problem)
  if gin_files:
    result['config'] = gin.config_str()
  print(f'{result["problem"]["name"]} {"x".join(map(str, result["image_size"]))}, '
        f'{sum(result["problem"]["sizes"])} weights in {len(result["problem"]["sizes"])} tensors, '
        f'batch {result["batch_size"]}')
  print(f'learned optimizer step: {result["kernel"]}')
  print(f'{"optimizer":<17} {"batches/s (median)":>19}  runs')
  for name, r in result['results'].items():
    runs = ' '.join(f'{v:.1f}' for v in r['runs'])
    print(f'{name:<17} {r["batches_per_sec_median"]:>19.1f}  {runs}')
  for name, ratio in result['ratios'].items():
    print(f'ratio {name}: {ratio:.3f} (of CPU time: {result["cpu_ratios"][name]:.3f})')
  if core_trajectories:
    core = step_core.benchmark(sizes=core_shape, trajectories=core_trajectories, repeats=repeats,
                                device=device)
    result['core'] = core
    print(f'step of M={core_trajectories} x N={sum(core_shape)}: {"":<5} forward ms  '
          'forward+backward ms')
    for impl, r in core['results'].items():
      print(f'{impl:<31} {r["forward_ms"]:>10.2f}  {r["forward_backward_ms"]:>19.2f}')
    for mode, speedup in core['speedups'].items():
      print(f'speedup custom_op over xla, {mode}: {speedup:.2f}')
  if breakdown_weights:
    result['breakdown'] = step_core.breakdown(weights=breakdown_weights, repeats=repeats)
    _print_breakdown(result['breakdown'])
  _write(json_out, result)
  return result


def _print_breakdown(breakdown):
  parts = ('default', 'tf_op', 'dense', 'features_and_normalization', 'pool_dispatch', 'packing')
  print(f'one call of the fused op, µs of CPU time (dense GFLOP/s; fraction of '
        f'{breakdown["cpu_mhz"]} MHz x FLOP/cycle):')
  print(f'{"isa":<8} {"weights":>8} ' + ' '.join(f'{p:>12.12}' for p in parts) + '  GFLOP/s  peak')
  for isa, by_size in breakdown['results'].items():
    for n, r in by_size.items():
      gflops, fraction = r['dense_gflops'] or 0.0, r['dense_fraction_of_peak'] or 0.0
      print(f'{isa:<8} {n:>8} ' + ' '.join(f'{1e3 * r[p + "_ms"]:>12.1f}' for p in parts) +
            f'  {gflops:>7.1f}  {fraction:.2f}')


def outer_benchmark_from_flags(gin_files, gin_bindings, num_samples, unroll_length, repeats,
                               json_out):
  """Parses gin, times the estimator at S = num_samples, k = unroll_length, prints, writes JSON.

  Raises:
    UserError: for no or bad gin configuration or an unwritable --json_out.
  """
  if not gin_files:
    raise UserError('--outer needs --gin_file (the experiment to time), '
                    'e.g. --gin_file=gin/omniglot.gin')
  _check_json_out(json_out)
  config.parse_gin(gin_files, gin_bindings)
  experiment = config.build(build_experiment)
  family = config.build(MLPLOpt)
  result = {'outer': outer_throughput.benchmark(experiment, family, num_samples, unroll_length, repeats),
            'config': gin.config_str()}
  print(json.dumps(result['outer'], indent=2))
  _write(json_out, result)
  return result

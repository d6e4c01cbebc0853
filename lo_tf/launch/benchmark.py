"""`bin/speed_benchmark --outer`: outer-training throughput vs plain Adam (paper App. B, App. F)."""

import json
import os

import gin

from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.experiment import build_experiment
from lo_tf.launch import common
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.outer_trainers.benchmark import outer_benchmark


def outer_benchmark_from_flags(gin_files, gin_bindings, num_samples, unroll_length, repeats,
                               json_out):
  """Parses gin, times the estimator at S = num_samples, k = unroll_length, prints, writes JSON.

  Raises:
    UserError: for bad gin configuration or an unwritable --json_out.
  """
  if json_out:
    if os.path.isdir(json_out):
      raise UserError(f'--json_out={json_out} is a directory; give a file path')
    io_utils.ensure_writable_dir(os.path.dirname(os.path.abspath(json_out)))
  common.parse_gin(gin_files, gin_bindings)
  experiment = common.build(build_experiment)
  family = common.build(MLPLOpt)
  result = {'outer': outer_benchmark(experiment, family, num_samples, unroll_length, repeats),
            'config': gin.config_str()}
  print(json.dumps(result['outer'], indent=2))
  if json_out:
    io_utils.atomic_write_json(json_out, result)
    print(f'wrote {json_out}')
  return result

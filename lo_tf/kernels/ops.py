"""Python side of the fused learned-optimizer step op (paper §4.1, App. C.1, App. F).

`pip install` compiles the op library beside this file (see `setup.py` and `third_party/README.md`)
and records in `build_info.json` which TensorFlow it was built against. `available()` is True when
that library loads into the running TensorFlow (and, where TensorFlow sees a GPU, its CUDA kernels
too); otherwise `load_error()` says why and `MLPLOpt(implementation='auto')` falls back to the XLA
path with one warning (`warn_fallback`).

The op `MlpLoptStep` computes `MLPLOpt.reference_core` in one kernel; its gradient, registered here,
is the fused op `MlpLoptStepGrad`, so the op is differentiable once (enough for g_rp: the second-order
term reaches the inner gradient through the op's `g` input). The gradient op itself has no gradient.
"""

import json
import os

import numpy as np
import tensorflow as tf
from absl import logging
# No public API tells whether a graph is being built for XLA (the op has no XLA kernel).
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

from lo_tf.errors import UserError

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'build_info.json')
# Fixed-size arrays of the kernels' configuration (mlp_lopt.h).
MAX_DECAYS = 16
MAX_TIME_SCALES = 64
CPU_ISAS = ('auto', 'generic', 'avx2', 'avx512')
# The op's default pool_min_weights (mlp_lopt_ops.cc).
POOL_MIN_WEIGHTS = 16384
# mlp_lopt.MAX_LOG_STEP, repeated because mlp_lopt imports this module (tests check they agree).
MAX_LOG_STEP = 10.0

_state = {}  # 'module', 'error', 'info' once _load() ran
_warned = []


def _first_line(error):
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _load():
  """Loads the op libraries once; fills `_state`."""
  if _state:
    return _state
  _state.update(module=None, error=None, info=None)
  reinstall = 'reinstall with `pip install -e .` where a C++ compiler is found'
  try:
    with open(BUILD_INFO) as f:
      info = json.load(f)
  except FileNotFoundError:
    _state['error'] = f'the fused op is not built ({BUILD_INFO} is absent); {reinstall}'
    return _state
  except (OSError, ValueError) as e:
    _state['error'] = f'unreadable {BUILD_INFO} ({_first_line(e)}); {reinstall}'
    return _state
  _state['info'] = info
  here = os.path.dirname(BUILD_INFO)
  if info.get('error'):
    _state['error'] = f'the fused op failed to build ({info["error"]}); {reinstall}'
  elif info.get('tensorflow') != tf.__version__:
    # A custom-op library only loads into the TensorFlow whose headers and ABI it was built with.
    _state['error'] = (f'the fused op was built against TensorFlow {info.get("tensorflow")} but '
                       f'TensorFlow {tf.__version__} runs; rebuild it for this one with '
                       '`python third_party/tf_custom_op/build_kernels.py` or '
                       '`pip install --no-build-isolation -e .`')
  else:
    try:
      _state['module'] = tf.load_op_library(os.path.join(here, info['library']))
    except (tf.errors.OpError, OSError, KeyError) as e:
      _state['error'] = f'the fused op library does not load ({_first_line(e)}); {reinstall}'
      return _state
    if tf.config.list_physical_devices('GPU'):
      if not info.get('gpu_library'):
        _state['error'] = (f'TensorFlow sees a GPU but the fused op has no CUDA kernel '
                           f'({info.get("gpu_error") or "nvcc was not found at install"})')
      else:
        try:
          tf.load_library(os.path.join(here, info['gpu_library']))
          _state['error'] = _probe_gpu(_state['module'])
        except (tf.errors.OpError, OSError) as e:
          _state['error'] = f'the fused op\'s CUDA kernel does not load ({_first_line(e)})'
    if _state['error']:
      _state['module'] = None
  return _state


# A tiny step (2 tensors of 2 and 3 weights) that probes the kernels.
_PROBE_ATTRS = dict(sizes=[2, 3], hidden_size=3, decays=[0.5, 0.9], time_scales=[10.0],
                    lambda_exp=0.5, lambda_lin=0.5, rms_epsilon=1e-6, norm_epsilon=1e-5,
                    use_momentum=True, use_rms=True, use_time=True, max_log_step=MAX_LOG_STEP)


def _probe_inputs():
  """(theta, g, w, t, m, v) of the probe step."""
  num_params = (2 + 4 * 2 + 1) * 3 + 3 * 3 + 2
  wave = lambda shape, k: tf.sin(tf.reshape(tf.range(tf.reduce_prod(shape), dtype=tf.float32),
                                            shape) * k)
  return [wave([1, num_params], 0.7), wave([1, 5], 1.3), wave([1, 5], 2.1), tf.constant([3.0]),
          wave([1, 5, 2], 0.3), tf.abs(wave([1, 5, 2], 0.9))]


def _probe_gpu(module):
  """Why the CUDA kernels fail or disagree with the CPU kernels on a tiny step, or None."""
  inputs = _probe_inputs()
  results = []
  for device in ('/CPU:0', '/GPU:0'):
    with tf.device(device):
      outs = module.mlp_lopt_step(*inputs, **_PROBE_ATTRS)
      grads = module.mlp_lopt_step_grad(*inputs, *outs, **_PROBE_ATTRS)
      results.append([x.numpy() for x in (*outs, *grads)])
  for cpu, gpu in zip(*results):
    if not np.allclose(cpu, gpu, rtol=1e-4, atol=1e-6):
      return 'the fused op\'s CUDA kernel disagrees with its CPU kernel on a test step'
  return None


def available():
  """Whether the fused op runs here: built for this TensorFlow, loaded, with CUDA kernels if a GPU
  is visible."""
  return _load()['module'] is not None


def load_error():
  """Why the fused op is unavailable (one line), or None."""
  return _load()['error']


def build_info():
  """What `pip install` recorded about the build (dict: tensorflow, compiler, library, gpu_library,
  gpu_error, error, ...), or None when it recorded nothing."""
  return _load()['info']


def cpu_isa():
  """The CPU instruction-set variant ('generic', 'avx2' or 'avx512') the op runs, or None when the
  op is unavailable."""
  module = _load()['module']
  return None if module is None else module.mlp_lopt_cpu_isa().numpy().decode()


def supported_cpu_isas():
  """The CPU kernel variants the op runs here ('auto' first; the ones built that this CPU
  supports, tried on a tiny step), () when the op is unavailable."""
  if 'cpu_isas' not in _state:
    module = _load()['module']
    runs = []
    for isa in CPU_ISAS[1:] if module is not None else ():
      try:
        with tf.device('/CPU:0'):
          module.mlp_lopt_step(*_probe_inputs(), **_PROBE_ATTRS, cpu_isa=isa)
        runs.append(isa)
      except tf.errors.InvalidArgumentError:  # "cpu_isa=... is not supported by this CPU"
        pass
    _state['cpu_isas'] = ('auto',) + tuple(runs) if runs else ()
  return _state['cpu_isas']


def check_cpu_isa(name):
  """`name` if the op can run that CPU kernel variant here, else a UserError naming the choices."""
  if name not in CPU_ISAS:
    raise UserError(f'MLPLOpt.cpu_isa={name!r}; use one of {CPU_ISAS}')
  if name not in supported_cpu_isas():
    raise UserError(f'MLPLOpt.cpu_isa={name!r}: this CPU or build lacks that kernel; use one of '
                    f'{supported_cpu_isas()}')
  return name


def describe():
  """One line: which learned-optimizer step implementation `MLPLOpt(implementation='auto')` runs
  here and why, e.g. 'custom_op (cpu avx2)' or 'xla (the fused op is not built ...)'."""
  if not available():
    return f'xla ({load_error()})'
  gpu = ', gpu' if tf.config.list_physical_devices('GPU') else ''
  return f'custom_op (cpu {cpu_isa()}{gpu})'


def warn_fallback():
  """Logs once, in one line, that the XLA path serves instead of the fused op."""
  if not _warned:
    _warned.append(True)
    logging.warning('lo_tf: fused learned-optimizer op unavailable (%s); using the XLA path',
                    load_error())


def _attrs(lopt, sizes, cpu_isa_name):
  """The op attributes of an `MLPLOpt` (UserError for what the kernels do not support)."""
  if len(lopt.decays) > MAX_DECAYS:
    raise UserError(f'MLPLOpt.decays has {len(lopt.decays)} entries but the fused op takes at most '
                    f"{MAX_DECAYS}; use implementation='xla'")
  if lopt.use_time and len(lopt.time_scales) > MAX_TIME_SCALES:
    raise UserError(f'MLPLOpt.time_scales has {len(lopt.time_scales)} entries but the fused op '
                    f"takes at most {MAX_TIME_SCALES}; use implementation='xla'")
  if cpu_isa_name not in CPU_ISAS:
    raise UserError(f'cpu_isa={cpu_isa_name!r}; use one of {CPU_ISAS}')
  return dict(sizes=[int(s) for s in sizes], hidden_size=lopt.hidden_size,
              decays=list(lopt.decays), time_scales=list(lopt.time_scales),
              lambda_exp=lopt.lambda_exp, lambda_lin=lopt.lambda_lin,
              rms_epsilon=lopt.rms_epsilon, norm_epsilon=lopt.norm_epsilon,
              use_momentum=lopt.use_momentum, use_rms=lopt.use_rms, use_time=lopt.use_time,
              max_log_step=MAX_LOG_STEP, cpu_isa=cpu_isa_name)


# The attributes `_attrs` sets, which the gradient op shares with the op (mlp_lopt_ops.cc).
_ATTR_NAMES = ('sizes', 'hidden_size', 'decays', 'time_scales', 'lambda_exp', 'lambda_lin',
               'rms_epsilon', 'norm_epsilon', 'use_momentum', 'use_rms', 'use_time', 'max_log_step',
               'cpu_isa', 'pool_min_weights')


def mlp_lopt_step(lopt, theta, g, w, t, m, v, sizes, cpu_isa='auto', pool_min_weights=None):
  """The fused equivalent of `MLPLOpt.reference_core` (same arguments, results and gradients).

  Args:
    lopt: the `MLPLOpt` whose hyperparameters the step uses.
    theta, g, w, t, m, v, sizes: as in `MLPLOpt.core` (float32; m, v [M, N, 0] for a group that is
      switched off).
    cpu_isa: the CPU kernel variant: 'auto' (the best this CPU supports), 'generic', 'avx2' or
      'avx512' (an error where the CPU lacks it); for tests and benchmarks.
    pool_min_weights: M·N from which the CPU kernel spreads its passes over TensorFlow's thread
      pool; below it, every pass runs on the calling thread (App. F's fixed per-call cost on small
      networks). None: the op's default (`POOL_MIN_WEIGHTS`); 0 always uses the pool. The results
      do not depend on it. For tests and benchmarks.

  Returns:
    (new w [M, N], new m, new v), float32. Inside a function being compiled by XLA
    (`tf.function(jit_compile=True)`, e.g. `TruncatedStep(jit_compile=True)`), where the op cannot
    run, `lopt.reference_core` computes them instead and XLA fuses it.

  Raises:
    UserError: when the op is not available, for non-float32 inputs, or for hyperparameters the op
      does not support (more than MAX_DECAYS decays or MAX_TIME_SCALES time scales).
  """
  if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
    return lopt.reference_core(theta, g, w, t, m, v, tuple(sizes))
  # A zero-size weight tensor contributes no column to g and w, and the kernels take positive
  # sizes only: leave it out (with none left there is nothing to update).
  sizes = [int(s) for s in sizes if int(s) > 0]
  if not sizes:
    return tf.identity(w), tf.identity(m), tf.identity(v)
  module = _load()['module']
  if module is None:
    raise UserError(f'the fused learned-optimizer op is unavailable: {load_error()}')
  attrs = _attrs(lopt, sizes, cpu_isa)
  if pool_min_weights is not None:
    attrs['pool_min_weights'] = int(pool_min_weights)
  inputs = [tf.convert_to_tensor(x) for x in (theta, g, w, t, m, v)]
  for name, x in zip(('theta', 'g', 'w', 't', 'm', 'v'), inputs):
    if x.dtype != tf.float32:
      raise UserError(f'the fused learned-optimizer op computes float32 only, got {name} of '
                      f"{x.dtype.name}; use implementation='reference'")
  return tuple(module.mlp_lopt_step(*inputs, **attrs))


@tf.RegisterGradient('MlpLoptStep')
def _mlp_lopt_step_grad(op, d_new_w, d_new_m, d_new_v):
  """Gradients of MlpLoptStep for (theta, g, w, t, m, v) from the fused gradient op (t: none)."""
  upstream = [tf.zeros_like(out) if d is None else d
              for d, out in zip((d_new_w, d_new_m, d_new_v), op.outputs)]
  attrs = {name: op.get_attr(name) for name in _ATTR_NAMES}
  d_theta, d_g, d_w, d_m, d_v = _load()['module'].mlp_lopt_step_grad(*op.inputs, *upstream,
                                                                     **attrs)
  return d_theta, d_g, d_w, None, d_m, d_v

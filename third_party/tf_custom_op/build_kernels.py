"""Builds the fused learned-optimizer op libraries of lo_tf/kernels (see README.md beside this file).

`setup.py`'s build_ext calls `build`; it never raises for a missing compiler or a failed compile: the
returned build record (written as lo_tf/kernels/build_info.json) says what was built, against which
TensorFlow, and why anything was not, and lo_tf then falls back to its XLA path.

Run as a script, it rebuilds in place into lo_tf/kernels/ against the TensorFlow of the running
Python (what `pip install -e .` does, without reinstalling):

    python third_party/tf_custom_op/build_kernels.py
"""

import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), 'lo_tf', 'kernels')
INFO_NAME = 'build_info.json'
CPU_LIBRARY = '_mlp_lopt_ops'
GPU_LIBRARY = '_mlp_lopt_ops_gpu'

# The CPU compute units are compiled once per instruction set; mlp_lopt_ops.cc picks the variant
# the running CPU supports, so the library runs on any x86-64 (or other) CPU.
CPU_FLAGS = ['-O3', '-fPIC', '-std=c++17', '-fopenmp-simd', '-ffp-contract=fast',
             '-fno-math-errno']
X86_VARIANTS = {
    'avx2': ['-mavx2', '-mfma'],
    'avx512': ['-mavx512f', '-mavx512dq', '-mavx512bw', '-mavx512vl', '-mavx2', '-mfma',
               '-mprefer-vector-width=512'],
}
# TensorFlow's headers are noisy under GCC.
TF_HEADER_FLAGS = ['-O2', '-fPIC', '-Wno-deprecated-declarations', '-Wno-interference-size']
# Ampere and Hopper binaries plus Hopper PTX that later GPUs compile at load.
CUDA_ARCH_FLAGS = ['-gencode=arch=compute_80,code=sm_80',
                   '-gencode=arch=compute_90,code=[sm_90,compute_90]']


class BuildError(Exception):
  """A build step failed; the message is one line."""


def _run(cmd):
  """Runs a build command; returns its output; BuildError with its first error line."""
  result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
  if result.returncode:
    lines = result.stdout.splitlines()
    markers = ('error', 'cannot find', 'undefined reference', 'not found')
    first = next((l for l in lines if any(m in l.lower() for m in markers) and
                  'collect2' not in l), lines[0] if lines else '')
    raise BuildError(f'{os.path.basename(cmd[0])} failed: {first.strip()[:300]}')
  return result.stdout


def _run_all(cmds):
  with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
    for future in [pool.submit(_run, cmd) for cmd in cmds]:
      future.result()


def _source(name):
  return os.path.join(KERNELS, name)


def _is_x86_64():
  return platform.machine().lower() in ('x86_64', 'amd64')


def _find_nvcc():
  """The nvcc executable (PATH, else $CUDA_HOME/bin, else /usr/local/cuda/bin), or None."""
  found = shutil.which('nvcc')
  if found:
    return found
  for home in (os.environ.get('CUDA_HOME'), os.environ.get('CUDA_PATH'), '/usr/local/cuda'):
    if home and os.access(os.path.join(home, 'bin', 'nvcc'), os.X_OK):
      return os.path.join(home, 'bin', 'nvcc')
  return None


def _build_cpu(cxx, tf, tmp, out):
  variants = {'generic': []}
  if _is_x86_64():
    variants.update(X86_VARIANTS)
  objects = [os.path.join(tmp, f'cpu_{name}.o') for name in variants]
  cmds = [[cxx, *CPU_FLAGS, *flags, f'-DLO_TF_ISA={name}', '-c', _source('mlp_lopt_cpu.cc'),
           '-o', obj] for (name, flags), obj in zip(variants.items(), objects)]
  ops_object = os.path.join(tmp, 'ops.o')
  cmds.append([cxx, *TF_HEADER_FLAGS, *tf.sysconfig.get_compile_flags(), '-c',
               _source('mlp_lopt_ops.cc'), '-o', ops_object])
  _run_all(cmds)
  _run([cxx, '-shared', *objects, ops_object, '-o', out, *tf.sysconfig.get_link_flags()])
  return list(variants)


def _cuda_library_dirs(nvcc):
  """The -L flags nvcc itself links with (nvcc may be a wrapper script outside the toolkit)."""
  out = _run([nvcc, '-dryrun', '-x', 'cu', '-c', os.devnull, '-o', os.devnull])
  for line in out.splitlines():
    if 'LIBRARIES=' in line:
      return [f.strip('"') for f in line.split('LIBRARIES=', 1)[1].split()
              if f.strip('"').startswith('-L') and not f.strip('"').endswith('/stubs')]
  raise BuildError('nvcc -dryrun printed no LIBRARIES')


def _build_gpu(cxx, nvcc, tf, tmp, out):
  cuda_object, gpu_object = os.path.join(tmp, 'cuda.o'), os.path.join(tmp, 'gpu.o')
  _run_all([
      [nvcc, '-O3', '-std=c++17', '-Xcompiler', '-fPIC', *CUDA_ARCH_FLAGS, '-c',
       _source('mlp_lopt_cuda.cu'), '-o', cuda_object],
      [cxx, *TF_HEADER_FLAGS, *tf.sysconfig.get_compile_flags(), '-DGOOGLE_CUDA=1', '-c',
       _source('mlp_lopt_gpu.cc'), '-o', gpu_object]])
  # The CUDA runtime is linked statically and kept private: the kernels then never bind to
  # TensorFlow's own CUDA runtime stubs, whose CUDA version may differ from this nvcc's.
  _run([cxx, '-shared', gpu_object, cuda_object, '-o', out, *_cuda_library_dirs(nvcc),
        '-lcudart_static', '-ldl', '-lrt', '-lpthread', '-Wl,--exclude-libs,libcudart_static.a',
        *tf.sysconfig.get_link_flags()])


def _version(cmd):
  try:
    out = subprocess.run([cmd, '--version'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, check=False).stdout.strip().splitlines()
  except OSError:
    return None
  return out[-1 if 'nvcc' in cmd else 0] if out else None


def build(out_dir, suffix=None, log=print):
  """Compiles the CPU op library (and the CUDA one where nvcc is found) into `out_dir`.

  Args:
    out_dir: directory of the libraries (lo_tf/kernels of the build or of the source tree).
    suffix: file-name suffix of the libraries (default: this Python's extension-module suffix).
    log: callable taking one line of progress.

  Returns:
    The build record, a JSON-able dict: tensorflow (version built against, or None), library and
    gpu_library (file names in out_dir, or None), cpu_variants, compiler, nvcc, error (why the CPU
    library is missing, one line, or None), gpu_error (why the CUDA library is missing, or None).
  """
  suffix = suffix or sysconfig.get_config_var('EXT_SUFFIX') or '.so'
  info = {'tensorflow': None, 'library': None, 'gpu_library': None, 'cpu_variants': [],
          'compiler': None, 'nvcc': None, 'error': None, 'gpu_error': None,
          'python': platform.python_version(), 'machine': platform.machine()}
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    info['error'] = f'TensorFlow was not importable at build time ({e})'
    log(f'lo_tf: not building the fused op: {info["error"]}')
    return info
  info['tensorflow'] = tf.__version__
  cxx = os.environ.get('CXX', 'c++')
  if not shutil.which(cxx):
    info['error'] = f'no C++ compiler ({cxx}) found'
    log(f'lo_tf: not building the fused op: {info["error"]}')
    return info
  info['compiler'] = _version(cxx)
  os.makedirs(out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    log(f'lo_tf: building the fused op against TensorFlow {tf.__version__} with {cxx}')
    try:
      info['cpu_variants'] = _build_cpu(cxx, tf, tmp, os.path.join(out_dir, CPU_LIBRARY + suffix))
      info['library'] = CPU_LIBRARY + suffix
    except (BuildError, OSError) as e:
      info['error'] = str(e)
      log(f'lo_tf: the fused op failed to build ({e}); lo_tf will use its XLA path')
      return info
    nvcc = _find_nvcc()
    if not nvcc:
      info['gpu_error'] = 'nvcc was not found at build time'
      return info
    info['nvcc'] = _version(nvcc)
    log(f'lo_tf: building the fused op\'s CUDA kernels with {nvcc}')
    try:
      _build_gpu(cxx, nvcc, tf, tmp, os.path.join(out_dir, GPU_LIBRARY + suffix))
      info['gpu_library'] = GPU_LIBRARY + suffix
    except (BuildError, OSError) as e:
      info['gpu_error'] = str(e)
      log(f'lo_tf: the fused op\'s CUDA kernels failed to build ({e})')
  return info


def write_info(out_dir, info):
  """Writes the build record as out_dir/build_info.json (atomically); returns its path."""
  path = os.path.join(out_dir, INFO_NAME)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(info, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)
  return path


if __name__ == '__main__':
  record = build(KERNELS)
  print(write_info(KERNELS, record))
  print(json.dumps(record, indent=1, sort_keys=True))
  sys.exit(1 if record['error'] else 0)

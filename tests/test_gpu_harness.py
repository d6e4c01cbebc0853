"""The standalone check of the CUDA kernels (lo_tf/kernels/mlp_lopt_cuda_harness.cu and
third_party/tf_custom_op/gpu_check.sh), in its CPU-only build: compiled by c++ alone, the CUDA
kernels of mlp_lopt_cuda.cu run on emulated threads (cuda_emulation.h) against the CPU units on the
same inputs. The 10^7-weight shape is skipped under emulation (one std::thread per CUDA thread of
every block: hours); the GPU run of gpu_check.sh covers it. No TensorFlow needed.
"""

import json
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(REPO, 'lo_tf', 'kernels')
SCRIPT = os.path.join(REPO, 'third_party', 'tf_custom_op', 'gpu_check.sh')
CXX = os.environ.get('CXX', 'c++')
# As gpu_check.sh builds the CPU units (the op library's generic variant).
CPU_FLAGS = ['-O3', '-std=c++17', '-fopenmp-simd', '-ffp-contract=fast', '-fno-math-errno',
             '-DLO_TF_ISA=generic']
CNN = [864, 32, 9216, 32, 9216, 32, 320, 10]  # the paper's 3-layer CNN, 19,722 weights
DEPTH = {'new_m': 5, 'new_v': 5, 'd_m': 5, 'd_v': 5}  # floats per weight (5 decays)
OUTPUTS = {'forward': ['new_w', 'new_m', 'new_v', 'step'],
           'backward': ['d_theta', 'd_g', 'd_w', 'd_m', 'd_v']}


def _gpu_present():
  if not shutil.which('nvidia-smi'):
    return False
  result = subprocess.run(['nvidia-smi', '-L'], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, check=False)
  return any(line.startswith('GPU ') for line in result.stdout.splitlines())


@pytest.fixture(scope='module')
def harness(tmp_path_factory):
  if not shutil.which(CXX):
    pytest.skip(f'no C++ compiler ({CXX}) to build the harness')
  build = tmp_path_factory.mktemp('harness')
  cpu, exe = str(build / 'cpu.o'), str(build / 'harness')
  subprocess.run([CXX, *CPU_FLAGS, '-c', os.path.join(KERNELS, 'mlp_lopt_cpu.cc'), '-o', cpu],
                 check=True)
  subprocess.run([CXX, '-std=c++17', '-O2', '-pthread', '-x', 'c++',
                  os.path.join(KERNELS, 'mlp_lopt_cuda_harness.cu'), '-x', 'none', cpu, '-o', exe],
                 check=True)
  return exe


def _run(exe, tmp_path, *flags):
  path = str(tmp_path / 'out.json')
  result = subprocess.run([exe, '--json', path, *flags], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
  with open(path) as f:
    return result.returncode, result.stdout, json.load(f)


def test_emulated_cuda_kernels_agree_with_the_cpu_kernel(harness, tmp_path):
  # One timed run: under emulation the timings are host-clock times of CPU threads.
  code, out, record = _run(harness, tmp_path, '--runs', '1', '--warmup', '0', '--threads', '2')
  assert code == 0, out
  assert record['mode'] == 'emulated' and record['complete'] and record['ok'], out
  assert record['config']['theta_floats'] == 1090
  assert [s['weights'] for s in record['shapes']] == [1, 31, 1000, 19722]
  assert record['shapes'][-1]['tensor_sizes'] == CNN
  assert [s['weights'] for s in record['skipped']] == [10**7]
  assert record['copy']['gb_per_s'] > 0
  for shape in record['shapes']:
    n = shape['weights']
    assert shape['agree']
    for name, expected in OUTPUTS.items():
      result = shape[name]
      assert sorted(result['outputs']) == sorted(expected)
      for output, r in result['outputs'].items():
        size = 1090 if output == 'd_theta' else n * DEPTH.get(output, 1)
        assert r['size'] == size and r['scale'] > 0, (n, output, r)
        # The 1e-5 everywhere but the gradient of one weight, where the normalization's
        # two paths cancel to rounding (see kBackwardTolerance): the CPU tests' 1e-4 there.
        limit = 1e-4 if name == 'backward' and n == 1 else 1e-5
        # max_rel_error counts every element, also any at a ReLU kink.
        assert r['max_rel_error'] <= limit, (n, output, r)
        assert r['agree'] and r['outliers'] == 0, (n, output, r)
      assert result['bitwise_repeatable']
      assert result['bytes_per_weight'] == (92 if name == 'forward' else 140)
      assert result['median_ms'] > 0 and result['weights_per_s'] > 0
      assert result['fraction_of_copy_bandwidth'] == pytest.approx(
          result['gb_per_s'] / record['copy']['gb_per_s'], rel=1e-4)
      assert result['cpu_reference_ms'] > 0
    # The double-precision model behind the ReLU-kink check reproduces the CPU kernel's step.
    assert shape['forward']['kink_model_step_error'] < 1e-5
    assert shape['backward']['kink_model_ok']


def test_the_comparison_sees_one_wrong_element_in_every_output(harness, tmp_path):
  """--inject-error adds 3e-4 of each output's magnitude to one element of the CUDA results."""
  code, out, record = _run(harness, tmp_path, '--inject-error', '--shapes', '31,100+900',
                           '--runs', '1', '--warmup', '0', '--threads', '2')
  assert code == 1 and 'DISAGREE' in out, out
  assert record['complete'] and not record['ok']
  for shape in record['shapes']:
    assert not shape['agree']
    for name, expected in OUTPUTS.items():
      assert not shape[name]['agree']
      for output in expected:
        r = shape[name]['outputs'][output]
        assert not r['agree'] and r['outliers'] >= 1 and r['kink_outliers'] == 0, (output, r)
        assert 2e-4 < r['max_rel_error'] < 4e-4, (output, r)


def test_bad_arguments_are_one_line_errors(harness, tmp_path):
  result = subprocess.run([harness, '--shapes', '3+0'], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == 'mlp_lopt_cuda_harness: bad --shapes: 3+0'


@pytest.mark.skipif(_gpu_present(), reason='a GPU is present: gpu_check.sh takes its GPU path')
def test_gpu_check_script_runs_the_cpu_parts_without_a_gpu(tmp_path):
  if not shutil.which(CXX):
    pytest.skip(f'no C++ compiler ({CXX}) to build the harness')
  path = str(tmp_path / 'results' / 'check.json')
  env = dict(os.environ, HARNESS_FLAGS='--shapes 31,7+24 --runs 1')
  result = subprocess.run(['bash', SCRIPT, path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stdout
  first = result.stdout.splitlines()[0]
  assert first.startswith('gpu_check: no ') and 'running the CPU parts only' in first, first
  with open(path) as f:
    record = json.load(f)
  assert record['mode'] == 'emulated' and record['ok'] and record['complete']
  assert record['note'].startswith('gpu_check.sh: no ')
  assert [s['tensor_sizes'] for s in record['shapes']] == [[31], [7, 24]]
  assert os.path.exists(str(tmp_path / 'results' / 'check.log'))


@pytest.mark.slow
def test_harness_compiles_with_nvcc(tmp_path):
  """The GPU build (what gpu_check.sh compiles on a GPU machine); runs it only where a GPU is."""
  nvcc = shutil.which('nvcc') or next(
      (p for p in ('/usr/local/cuda/bin/nvcc',) if os.access(p, os.X_OK)), None)
  if not nvcc or not shutil.which(CXX):
    pytest.skip('needs nvcc and a C++ compiler')
  cpu, exe = str(tmp_path / 'cpu.o'), str(tmp_path / 'harness')
  subprocess.run([CXX, *CPU_FLAGS, '-c', os.path.join(KERNELS, 'mlp_lopt_cpu.cc'), '-o', cpu],
                 check=True)
  subprocess.run([nvcc, '-O3', '-std=c++17', '-gencode=arch=compute_90,code=[sm_90,compute_90]',
                  os.path.join(KERNELS, 'mlp_lopt_cuda_harness.cu'), cpu, '-o', exe], check=True)
  result = subprocess.run([exe, '--shapes', '31', '--runs', '1'], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
  if not _gpu_present():
    assert result.returncode == 3 and 'no CUDA device' in result.stdout, result.stdout
  else:
    assert result.returncode == 0, result.stdout

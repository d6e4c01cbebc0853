"""bin/eval and bin/speed_benchmark as subprocesses: exit status 2 with one 'error:' line.

Each subprocess pays ~5 s of TensorFlow import, so every case is started at once by one
module-scoped fixture and the tests only read their results.
"""

import json
import math
import os
import re
import subprocess
import sys

import gin
import pytest

from conftest import REPO
from lo_tf import config
from lo_tf.experiment import build_experiment

EVAL = os.path.join(REPO, 'bin', 'eval')
SPEED = os.path.join(REPO, 'bin', 'speed_benchmark')
QUICKSTART = os.path.join(REPO, 'gin', 'quickstart.gin')

# TensorFlow's C++ log lines (I0000 00:00:...), absl's Python log lines (I1130 01:02:43.78 ...)
# and absl's pre-init banner are not error lines.
_LOG_LINE = re.compile(r'^([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog)')


def _cases(tmp):

  def out(name):  # each eval case gets its own output directory
    return '--output_dir=' + os.path.join(tmp, 'out_' + name)

  a_file = os.path.join(tmp, 'regular_file')
  with open(a_file, 'w') as f:
    f.write('not a directory\n')
  quick = ['--gin_file=' + QUICKSTART]
  return {
      # name: (argv, substrings the error line must contain)
      'eval_missing_gin_file': (
          [EVAL, '--gin_file=' + os.path.join(tmp, 'nope.gin'), out('eval_missing_gin_file')],
          ['gin file', 'nope.gin', 'does not exist']),
      'eval_unknown_binding': (
          [EVAL, *quick, '--gin_bindings=Nope.x = 1', out('eval_unknown_binding')],
          ['bad gin configuration', "'Nope'"]),
      'eval_unknown_parameter': (
          [EVAL, *quick, '--gin_bindings=InnerTrainer.nope = 3', out('eval_unknown_parameter')],
          ['bad gin configuration', "'InnerTrainer'", "'nope'"]),
      'eval_unknown_source_kind': (
          [EVAL, *quick, '--test_source=foo:bar', out('eval_unknown_source_kind')],
          ["'foo:bar'", 'unknown source']),
      'eval_missing_source_folder': (
          [EVAL, *quick, '--test_source=folder:' + os.path.join(tmp, 'no_such_dir'),
           out('eval_missing_source_folder')],
          ['no_such_dir', 'does not exist']),
      'eval_unwritable_output_dir': (
          [EVAL, *quick, '--output_dir=' + os.path.join(a_file, 'sub')],
          ['output directory', 'regular_file', 'cannot be written']),
      'eval_missing_output_dir_flag': (
          [EVAL, *quick],
          ['output_dir']),
      'eval_positional_argument': (
          [EVAL, *quick, out('eval_positional_argument'), 'stray'],
          ['unexpected arguments', 'stray']),
      'speed_negative_batch_size': (
          [SPEED, '--batch_size=-4'],
          ['batch_size=-4', 'positive']),
      'speed_unknown_device': (
          [SPEED, '--device=tpu'],
          ['--device=tpu', 'cpu', 'gpu']),
      'speed_gin_file_and_batch_size': (
          [SPEED, *quick, '--batch_size=64'],
          ['--batch_size', 'InnerTrainer.batch_size']),
      'speed_gin_file': (
          [SPEED, *quick, '--steps=2', '--repeats=1', '--optimizers=sgd,sgd_packed,adam,learned',
           '--gin_bindings=InnerTrainer.batch_size=5',
           '--json_out=' + os.path.join(tmp, 'speed_gin', 'x.json')],
          None),
      'speed_happy_path': (
          [SPEED, '--steps=3', '--repeats=1', '--batch_size=4', '--image_size=8,8,1',
           '--json_out=' + os.path.join(tmp, 'speed', 'x.json')],
          None),
  }


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp('cli'))
  cases = _cases(tmp)
  procs = {name: subprocess.Popen([sys.executable] + argv, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
           for name, (argv, _) in cases.items()}
  results = {}
  try:
    for name, p in procs.items():
      out, err = p.communicate(timeout=240)
      results[name] = (p.returncode, out, err)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  return tmp, cases, results


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.strip() and not _LOG_LINE.match(l)]


ERROR_CASES = [
    'eval_missing_gin_file', 'eval_unknown_binding', 'eval_unknown_parameter',
    'eval_unknown_source_kind', 'eval_missing_source_folder', 'eval_unwritable_output_dir',
    'eval_missing_output_dir_flag', 'eval_positional_argument', 'speed_negative_batch_size',
    'speed_unknown_device', 'speed_gin_file_and_batch_size',
]


@pytest.mark.parametrize('case', ERROR_CASES)
def test_bad_input_exits_2_with_one_error_line(runs, case):
  _, cases, results = runs
  rc, _, err = results[case]
  lines = _error_lines(err)
  assert rc == 2, (rc, err[-2000:])
  assert 'Traceback' not in err, err[-2000:]
  assert len(lines) == 1, lines
  assert lines[0].startswith('error: '), lines
  for part in cases[case][1]:
    assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize('case', ['eval_missing_gin_file', 'eval_unknown_binding',
                                  'eval_unknown_parameter'])
def test_config_errors_write_nothing(runs, case):
  tmp, _, results = runs
  assert results[case][0] == 2
  # Gin is parsed before the output directory is created.
  assert not os.path.exists(os.path.join(tmp, 'out_' + case))


def test_speed_benchmark_times_the_experiments_problem(runs):
  tmp, _, results = runs
  rc, out, err = results['speed_gin_file']
  assert rc == 0, err[-2000:]
  with open(os.path.join(tmp, 'speed_gin', 'x.json')) as f:
    result = json.load(f)
  # The quickstart's problem on its 8x8x1 digits, the batch size from --gin_bindings.
  experiment = _quickstart_experiment()
  assert result['batch_size'] == 5
  assert result['image_size'] == list(experiment.tasks.image_shape)
  assert result['problem']['name'] == type(experiment.problem).__name__
  assert result['problem']['sizes'] == [math.prod(s) for s, _, _ in
                                        experiment.problem.param_shapes()]
  assert 'InnerTrainer.batch_size = 5' in result['config']
  assert set(result['results']) == {'sgd', 'sgd_packed', 'adam', 'learned'}
  assert set(result['ratios']) == {'adam/sgd', 'sgd_packed/sgd', 'learned/adam', 'learned/sgd',
                                   'learned/sgd_packed'}
  assert f'{sum(result["problem"]["sizes"])} weights' in out


def _quickstart_experiment():
  gin.clear_config()
  try:
    config.parse_gin([QUICKSTART], [])
    return build_experiment()
  finally:
    gin.clear_config()


def test_speed_benchmark_happy_path(runs):
  tmp, _, results = runs
  rc, out, err = results['speed_happy_path']
  assert rc == 0, err[-2000:]
  assert 'Traceback' not in err
  with open(os.path.join(tmp, 'speed', 'x.json')) as f:
    result = json.load(f)
  assert result['device'] == 'cpu'
  assert result['batch_size'] == 4
  assert result['image_size'] == [8, 8, 1]
  assert result['steps'] == 3
  assert set(result['results']) == {'sgd', 'adam', 'learned'}
  for name, r in result['results'].items():
    assert len(r['runs']) == 1 and r['runs'][0] > 0, name
    assert r['batches_per_sec_median'] == r['runs'][0]
  med = {n: r['batches_per_sec_median'] for n, r in result['results'].items()}
  assert set(result['ratios']) == {'adam/sgd', 'learned/adam', 'learned/sgd'}
  for key, ratio in result['ratios'].items():
    a, b = key.split('/')
    assert ratio == pytest.approx(med[a] / med[b])
  # The table on stdout names every optimizer and the file written.
  for name in ('sgd', 'adam', 'learned'):
    assert re.search(rf'^{name}\s+\d', out, re.M), out
  assert 'wrote ' in out
  # Atomic write: no temporary files left beside the JSON.
  assert os.listdir(os.path.join(tmp, 'speed')) == ['x.json']


# ------------------------------------------------------------------ flag errors of every tool

TOOLS = ('train', 'eval', 'export_optimizer', 'study', 'speed_benchmark')
HELP_TOOLS = ('train', 'study')  # bin/train's exit path is its own; the others share common.run
FLAG_CASES = {
    # name: (tool, flags, substrings the error line must contain)
    'train_negative_seed': ('train', ['--seed=-1'], ['--seed=-1', 'non-negative']),
    'train_seed_not_a_number': ('train', ['--seed=abc'], ['--seed=abc']),
    'train_negative_threads': ('train', ['--intra_op_threads=-1'], ['--intra_op_threads=-1']),
    **{f'{tool}_unknown_flag': (tool, ['--no_such_flag=1'], ["'no_such_flag'"])
       for tool in TOOLS},
}


def _run_pooled(commands, width=3):
  """{name: (returncode, stdout, stderr)} of `commands` ({name: argv}), `width` at a time."""
  results, pending, running = {}, list(commands.items()), {}
  while pending or running:
    while pending and len(running) < width:
      name, argv = pending.pop(0)
      running[name] = subprocess.Popen([sys.executable] + argv, cwd=REPO, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL)
    name = next(iter(running))
    out, err = running[name].communicate(timeout=240)
    results[name] = (running.pop(name).returncode, out, err)
  return results


@pytest.fixture(scope='module')
def flag_runs():
  commands = {name: [os.path.join(REPO, 'bin', tool), *argv]
              for name, (tool, argv, _) in FLAG_CASES.items()}
  commands.update({f'{tool}_help': [os.path.join(REPO, 'bin', tool), '--help']
                   for tool in HELP_TOOLS})
  return _run_pooled(commands)


@pytest.mark.parametrize('case', sorted(FLAG_CASES))
def test_every_flag_error_is_one_error_line_with_exit_status_2(flag_runs, case):
  rc, out, err = flag_runs[case]
  lines = _error_lines(err)
  assert rc == 2, (rc, err[-2000:])
  assert 'Traceback' not in err, err[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  for part in FLAG_CASES[case][2]:
    assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize('tool', HELP_TOOLS)
def test_help_prints_the_flags_without_a_traceback(flag_runs, tool):
  rc, out, err = flag_runs[f'{tool}_help']
  assert rc == 1, (rc, err[-2000:])  # absl's --help exits with status 1
  assert 'Traceback' not in err and not _error_lines(err), err[-2000:]
  assert f'bin/{tool}' in out or f'{tool}:' in out, out[:500]
  assert '--' in out

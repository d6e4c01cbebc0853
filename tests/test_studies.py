"""The studies of bin/study (lo_tf/studies): Fig. 3 toy, Fig. 4, Fig. 3d,e, Fig. 5, 7/15, App. E.

Each study runs at a tiny size through `study_from_flags` (bin/study's code path); its JSON is read
back strictly and checked against the study's schema, and its numbers against closed forms or an
independent computation where one exists.
"""

import json
import os
import re
import subprocess
import sys

import gin
import numpy as np
import pytest
import tensorflow as tf

from conftest import MNIST_TEST
from conftest import REPO
from conftest import require
from lo_tf.errors import UserError
from lo_tf.experiment import build_experiment
from lo_tf.kernels import ops
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.launch import study
from lo_tf.outer_trainers.loop import OuterTrainer
from lo_tf.studies import ablations
from lo_tf.studies import base
from lo_tf.studies import direction
from lo_tf.studies import landscape
from lo_tf.studies import spread
from lo_tf.studies import toy
from lo_tf.tasks.distribution import OUTER_TEST
from lo_tf.tasks.distribution import OUTER_TRAIN
from lo_tf.tasks.distribution import TaskDistribution

STUDY = os.path.join(REPO, 'bin', 'study')
# Tiny outer-training on digits for the runner tests: seconds per outer step.
TINY_TRAINING = ['InnerTrainer.num_steps = 8', 'InnerTrainer.eval_every = 4',
                 'OuterTrainer.num_slots = 2', 'OuterTrainer.num_outer_steps = 2',
                 'OuterTrainer.meta_eval_every = 1', 'OuterTrainer.meta_eval_tasks = 1',
                 'Curriculum.start = 3', 'Curriculum.end = 4', 'Curriculum.num_outer_steps = 2',
                 'MLP.hidden = (4,)', "MLPLOpt.implementation = 'reference'"]


@pytest.fixture(autouse=True)
def _fresh_gin():
  """Every study parses its own gin configuration; none may leak into the next test."""
  yield
  gin.clear_config()


def _strict_json(path):
  def refuse(token):
    raise ValueError(f'non-standard JSON token {token}')
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def _run_study(name, output_dir, bindings=(), **flags):
  results = study.study_from_flags(name, str(output_dir), gin_bindings=bindings, **flags)
  written = _strict_json(os.path.join(output_dir, name + '.json'))
  base.check_schema(written, study.STUDIES[name].schema, name)
  for path in written['plots'].values():
    assert os.path.getsize(path) > 5_000
  return results, written


def _data_root():
  return os.path.dirname(os.path.dirname(require(MNIST_TEST)))


# The framework.

def test_schema_check_names_the_first_mismatch():
  schema = {'a': [float], 'b': {'c': int}}
  base.check_schema({'a': [1, 2.5, None], 'b': {'c': 3}, 'extra': 'ok'}, schema, 'x')
  with pytest.raises(RuntimeError, match=r'x\.b: missing key .c.'):
    base.check_schema({'a': [], 'b': {}}, schema, 'x')
  with pytest.raises(RuntimeError, match=r'x\.a\[1\]: expected a number'):
    base.check_schema({'a': [1.0, 'no'], 'b': {'c': 1}}, schema, 'x')
  with pytest.raises(RuntimeError, match='expected an integer'):
    base.check_schema({'a': [], 'b': {'c': True}}, schema, 'x')


def test_parts_are_reused_by_key_and_a_damaged_one_is_recomputed(tmp_path):
  parts = base.Parts(str(tmp_path))
  calls = []
  compute = lambda: calls.append(1) or {'v': [1.0, float('nan')]}
  assert parts.get('p', {'k': 1}, compute) == {'v': [1.0, None]}  # JSON: NaN is null
  assert parts.get('p', {'k': 1}, compute) == {'v': [1.0, None]} and len(calls) == 1
  parts.get('p', {'k': 2}, compute)
  assert len(calls) == 2 and (parts.computed, parts.reused) == (2, 1)
  for path in tmp_path.glob('p-*.json'):
    path.write_text('{"truncated": ')
  parts.get('p', {'k': 1}, compute)
  assert len(calls) == 3


# Fig. 3a-c.

def _heavy_ball(momentum, lr, steps, w=toy.W0):
  """The reference: v <- m v - lr ℓ'(w); w <- w + v, in float64."""
  v = 0.0
  for _ in range(steps):
    v = momentum * v - lr * (4 * w**3 - 21 * w**2 + 24 * w)
    w += v
  return w


def test_toy_minima_are_the_roots_of_the_derivative():
  for w in (toy.LOCAL_MINIMUM, toy.GLOBAL_MINIMUM):
    assert abs(4 * w**3 - 21 * w**2 + 24 * w) < 1e-12
  assert toy.GLOBAL_MINIMUM == pytest.approx(3.5687, abs=1e-4)
  assert float(toy.toy_loss(tf.constant(toy.GLOBAL_MINIMUM))) < float(toy.toy_loss(
      tf.constant(toy.LOCAL_MINIMUM))) == 0.0


def test_toy_trajectories_follow_heavy_ball_momentum():
  ws = toy.trajectories([0.0, 0.6, 0.8], 0.02, 40)
  for row, m in zip(ws, (0.0, 0.6, 0.8)):
    assert row[0] == pytest.approx(toy.W0)
    np.testing.assert_allclose(row[[1, 5, 40]], [_heavy_ball(m, 0.02, t) for t in (1, 5, 40)],
                               rtol=1e-4, atol=1e-4)


def test_toy_momentum_zero_stays_local_and_a_larger_momentum_reaches_the_global_minimum():
  w_zero = toy.trajectories([0.0], 0.005, 3000)[0, -1]
  assert abs(w_zero - toy.LOCAL_MINIMUM) < 1e-3
  final = toy.trajectories(np.linspace(0.0, 0.95, 96), 0.02, 1000)[:, -1]
  assert np.min(np.abs(final - toy.GLOBAL_MINIMUM)) < 1e-3
  assert abs(final[0] - toy.LOCAL_MINIMUM) < 1e-3


def test_toy_study_json(tmp_path):
  _, written = _run_study('fig3_toy', tmp_path, ['ToyStudy.num_momenta = 50',
                                                 'ToyStudy.horizons = (10, 300)'])
  assert written['minima']['global'] == pytest.approx(toy.GLOBAL_MINIMUM)
  assert len(written['final_loss']['loss']) == 2 and len(written['final_loss']['loss'][0]) == 50
  low = written['global_momentum_range'][1]['low']
  assert 0.0 < low < 0.95  # some momentum, not zero, ends in the global minimum at T = 300
  assert written['final_loss']['basin'][1][0] == 'local'


# Fig. 4.

_TINY_FIG4 = ["TaskDistribution.train_source = 'digits'", 'InnerTrainer.num_steps = 20',
              'InnerTrainer.eval_every = 20', 'InnerTrainer.batch_size = 16',
              'TruncationStudy.truncation_lengths = (5, 20)', 'TruncationStudy.num_inits = 1',
              'TruncationStudy.grid = (1e-4, 1e-2, 10.0)', 'TruncationStudy.bias_truncation = 8',
              'TruncationStudy.num_loss_evaluations = 2', 'MLP.hidden = (8,)']


def test_truncation_study_json_and_rerun_reuses_parts(tmp_path):
  _, written = _run_study('fig4_truncation', tmp_path, _TINY_FIG4)
  lines = {line['length']: line for line in written['truncations']}
  assert len(lines[5]['outer_steps']) == 4 and len(lines[20]['outer_steps']) == 1
  assert written['bias']['inner_step'] == [0, 8, 16]  # the last truncation stops at T = 20
  np.testing.assert_allclose(written['bias']['cumulative'], np.cumsum(written['bias']['gradient']),
                             rtol=1e-6)
  assert written['parts']['reused'] == 0
  _, again = _run_study('fig4_truncation', tmp_path, _TINY_FIG4)
  assert again['parts']['computed'] == 0 and again['parts']['reused'] == written['parts'][
      'computed']
  assert again['truncations'] == written['truncations']


def test_truncation_grid_finds_an_optimum_strictly_inside_its_range(tmp_path):
  """Adam's learning rate on 10-way MNIST (the Fig. 4 config at T = 200)."""
  _, written = _run_study('fig4_truncation', tmp_path, [
      f"DATA_ROOT = '{_data_root()}'", 'InnerTrainer.num_steps = 200',
      'InnerTrainer.eval_every = 200', 'TruncationStudy.truncation_lengths = (100,)',
      'TruncationStudy.num_inits = 1', 'TruncationStudy.grid = (1e-5, 1e-3, 1e-2, 1e-1, 10.0)',
      'TruncationStudy.bias_truncation = 100', 'TruncationStudy.num_loss_evaluations = 1'])
  grid = written['grid']
  best = grid['learning_rates'].index(grid['best_learning_rate'])
  assert 0 < best < len(grid['learning_rates']) - 1 and grid['best_is_inside']
  losses = np.array([np.inf if v is None else v for v in grid['outer_loss']])
  assert losses[best] < losses[0] and losses[best] < losses[-1]


# Fig. 3d,e.

def test_landscape_slices_match_single_unrolls(tmp_path):
  _, written = _run_study('fig3_landscape', tmp_path, [
      'LandscapeStudy.unroll_lengths = (3, 6)', 'LandscapeStudy.num_points_1d = 5',
      'LandscapeStudy.num_points_2d = 3', 'LandscapeStudy.chunk = 4', 'MLP.hidden = (4,)',
      "MLPLOpt.implementation = 'reference'"])
  assert written['theta'].startswith('θ at initialization')
  for s in written['slices']:
    # α = 0 of the batched 1D slice and the centre of the 2D slice are θ0's own unroll.
    assert s['loss_1d'][2] == pytest.approx(s['loss_at_theta'], rel=1e-4)
    assert s['loss_2d'][1][1] == pytest.approx(s['loss_at_theta'], rel=1e-4)
    assert s['gradient_norm'] > 0


def test_roughness_of_a_line_is_zero_and_of_a_zigzag_is_large():
  assert landscape.roughness([1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.0)
  assert landscape.roughness([0.0, 1.0, 0.0, 1.0]) == pytest.approx(2.0)
  assert np.isnan(landscape.roughness([1.0, 1.0, 1.0]))


# The estimator-direction check.

_DIRECTION = ['InnerTrainer.num_steps = 12', 'InnerTrainer.eval_every = 6', 'MLP.hidden = (4,)',
              'Curriculum.start = 3', 'Curriculum.end = 6', "MLPLOpt.implementation = 'reference'",
              'EstimatorDirectionStudy.num_batches = 2', 'EstimatorDirectionStudy.num_slots = 2',
              'EstimatorDirectionStudy.num_tasks = 2', 'EstimatorDirectionStudy.step_sizes = (0.01,)']


def test_estimator_direction_scores_the_meta_loss_of_fixed_tasks_and_is_deterministic(tmp_path):
  files = ['gin/studies/fig3_landscape.gin']  # the embedded digits, no data download
  _, first = _run_study('estimator_direction', tmp_path / 'a', _DIRECTION, gin_files=files)
  _, again = _run_study('estimator_direction', tmp_path / 'b', _DIRECTION, gin_files=files)
  assert again['positions'] == first['positions']
  # The line search's objective: mean train loss over T of the fixed outer-train tasks at θ0.
  experiment, family = build_experiment(), MLPLOpt()
  theta0 = family.init_theta(tf.constant([0, 0]))
  losses = [np.mean(experiment.trainer.train(family, theta0, experiment.tasks.sample_task(
      OUTER_TRAIN, direction.TASK_SEED_OFFSET + i), seed=i).train_loss) for i in range(2)]
  assert first['loss_at_theta'] == pytest.approx(float(np.mean(losses)), rel=1e-6)
  position = first['positions'][0]
  assert position['num_samples'] == 4 and 0 < position['rp_weight'] < 1
  for mode in position['modes']:
    assert -1 <= mode['split_half_cosine'] <= 1
    assert mode['change'][0] == pytest.approx(mode['loss'][0] - first['loss_at_theta'])



@pytest.mark.parametrize('binding, message', [
    ({'outer_steps': ()}, 'outer_steps=()'), ({'outer_steps': 5}, 'outer_steps=5'),
    ({'outer_steps': (-1,)}, 'outer_steps=-1'), ({'num_batches': 3}, 'is odd'),
    ({'step_sizes': ()}, 'step_sizes=()'), ({'seed': 'x'}, "seed='x'"),
    ({'step_sizes': (1e30,)}, 'step_sizes=1e+30 must be a finite number in (0.0, 1.0]'),
    ({'step_sizes': 'abc'}, "step_sizes='abc'; give a non-empty tuple"),
    ({'step_sizes': ('abc',)}, "step_sizes='abc' must be a finite number"),
    ({'step_sizes': (0.01, 0.0)}, 'step_sizes=0.0 must be')])
def test_estimator_direction_refuses_bad_sizes_with_a_user_error(binding, message):
  with pytest.raises(UserError, match=re.escape(message)):
    direction.EstimatorDirectionStudy(**binding)


# Figs. 7, 15 and 5.

_NUM_FEATURES = {'full': 31, 'no_rms': 16, 'no_mom': 21, 'only_grads': 11, 'no_time': 22}


@pytest.mark.parametrize('name', ablations.ABLATIONS)
def test_every_ablation_config_builds_and_runs_one_outer_step(name, tmp_path):
  # The tiny curriculum bindings would override the fixed-length ablations: leave them out.
  tiny = [b for b in TINY_TRAINING if not b.startswith('Curriculum.')]
  base.parse_sub_config([study.default_gin_file('fig7_ablations'), ablations.ablation_file(name)],
                        tiny + ['InnerTrainer.num_steps = 40'])
  trainer = OuterTrainer(build_experiment(), str(tmp_path))
  theta0 = trainer.theta.numpy().copy()
  stats = trainer.outer_step()
  assert stats['applied'] == 1.0 and np.all(np.isfinite(trainer.theta.numpy()))
  assert not np.array_equal(trainer.theta.numpy(), theta0)
  assert trainer.family.num_features == _NUM_FEATURES.get(name, 31)
  expected_weight = {'gradients': 1.0, 'es': 0.0}
  if name in expected_weight:
    assert stats['rp_weight'] == expected_weight[name]
  if name.startswith('fixed_'):
    k = int(name.split('_')[1])
    assert trainer.estimator.curriculum.start == k
    assert trainer.estimator.curriculum.jitter == 0.0
    # A slot's first truncation is a fraction of k, never past T = 40.
    assert 1 <= stats['unroll_length'] <= min(k, 40)


@pytest.fixture(scope='module')
def ablation_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('ablations')
  results, written = _run_study(
      'fig7_ablations', out, TINY_TRAINING + ["AblationStudy.ablations = ('full', 'es')"],
      num_seeds=1)
  return out, results, written


def test_ablation_study_json(ablation_run):
  out, _, written = ablation_run
  assert [e['name'] for e in written['ablations']] == ['full', 'es']
  for entry in written['ablations']:
    run = entry['runs'][0]
    assert run['steps'] == [0, 1, 2]  # meta-evaluations at the start and after each step
    assert entry['final_score'][0] == pytest.approx(np.mean(run['score'][-2:]))
    assert os.path.exists(os.path.join(out, 'runs', entry['name'], 'seed_0', 'ckpt-2.index'))


def test_ablation_rerun_trains_nothing_new(ablation_run):
  out, _, written = ablation_run
  before = os.path.getmtime(os.path.join(out, 'runs', 'full', 'seed_0', 'ckpt-2.index'))
  _, again = _run_study('fig7_ablations', out,
                        TINY_TRAINING + ["AblationStudy.ablations = ('full', 'es')"], num_seeds=1)
  assert again['ablations'] == written['ablations']
  assert os.path.getmtime(os.path.join(out, 'runs', 'full', 'seed_0', 'ckpt-2.index')) == before


def test_outer_training_study_reads_a_bin_train_run(ablation_run, tmp_path):
  out, _, _ = ablation_run
  train_dir = os.path.join(out, 'runs', 'full', 'seed_0')
  _, written = _run_study('fig5_outer_training', tmp_path,
                          ['OuterTrainingStudy.adam_grid = (1e-3, 1e-1)'],
                          train_dirs=[train_dir])
  run = written['runs'][0]
  assert run['objective'] == 'train' and run['steps'] == [1, 2]
  assert all(v > 0 for v in run['var_rp'] + run['var_es'])
  adam = written['adam']['train']
  assert adam['learning_rate_outer_train'] in (1e-3, 1e-1) and adam['outer_train'] > 0
  with pytest.raises(UserError, match='bin/train'):
    study.study_from_flags('fig5_outer_training', str(tmp_path / 'bad'),
                           train_dirs=[str(tmp_path)])


# App. E.

def test_ood_study_json(tmp_path):
  _, written = _run_study('appe_ood', tmp_path, [
      f"DATA_ROOT = '{_data_root()}'", "OODStudy.configs = ('mlp_2x32_mnist14',)",
      'InnerTrainer.num_steps = 20', 'InnerTrainer.eval_every = 10',
      "MLPLOpt.implementation = 'reference'"])
  problem = written['problems'][0]
  assert problem['summary']['num_tasks'] == 1
  assert os.path.exists(problem['plots']['fig1ab_curves'])
  for key in ('adam_train', 'learned_valid'):
    assert problem['best'][key] > 0


def test_split_classes_false_puts_every_class_in_both_splits():
  tasks = TaskDistribution('digits', num_classes=10, split_classes=False)
  np.testing.assert_array_equal(tasks.classes(OUTER_TRAIN), np.arange(10))
  np.testing.assert_array_equal(tasks.classes(OUTER_TEST), np.arange(10))
  assert sorted(tasks.sample_task(OUTER_TEST, 3).classes.tolist()) == list(range(10))
  with pytest.raises(UserError, match='split_classes'):
    TaskDistribution('digits', test_source='folder:x', split_classes=False)


# Issue 25: the spread of outer-training over seeds and kernel paths.

_SPREAD = [b for b in TINY_TRAINING if not b.startswith(('MLP.', 'MLPLOpt.'))] + [
    'ConvNet.channels = (4,)', 'ConvNet.strides = (2,)', 'ThetaInit.step_sizes = (1e-2,)',
    'ThetaInit.num_tasks = 1', 'OuterTrainingSpreadStudy.seeds = (3,)',
    "OuterTrainingSpreadStudy.kernel_paths = ('generic', 'auto')",
    'OuterTrainingSpreadStudy.num_tasks = 1', 'OuterTrainingSpreadStudy.num_inits = 1',
    'OuterTrainingSpreadStudy.num_reevaluations = 2']


@pytest.fixture(scope='module')
def spread_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('spread')
  results, written = _run_study('outer_training_spread', out, _SPREAD)
  return out, results, written


@pytest.mark.slow  # two outer-training child processes and bin/eval: about 2 minutes
def test_spread_study_trains_each_cell_on_its_kernel_path_and_reports_the_spread(spread_run):
  out, _, written = spread_run
  runs = written['runs']
  assert [(r['seed'], r['kernel_path']) for r in runs] == [(3, 'generic'), (3, 'auto')]
  for run in runs:
    train_dir = os.path.join(out, 'runs', spread.run_name(run['seed'], run['kernel_path']))
    throughput = _strict_json(os.path.join(train_dir, 'throughput.json'))
    onednn = {'generic': 'SSE41', 'auto': None}[run['kernel_path']]
    assert throughput['onednn_max_cpu_isa'] == onednn
    if throughput['implementation'] == 'custom_op':
      isa = 'generic' if run['kernel_path'] == 'generic' else ops.cpu_isa()
      assert throughput['kernel_path'] == f'custom_op (cpu {isa})'
    log = _strict_json(os.path.join(train_dir, 'meta_eval.json'))
    assert run['steps'] == [0, 1, 2]
    assert run['selection_scores'] == [log[str(k)]['selection_score'] for k in (0, 1, 2)]
    assert run['best_selection_score'] == min(run['selection_scores'])
    # The held-out figures are bin/eval's of the run's best/ θ.
    evaluated = _strict_json(os.path.join(train_dir, 'eval_outer_test', 'results.json'))
    for measure, value in run['held_out'].items():
      assert value == evaluated['summary'][measure]
    assert 0.0 <= run['held_out']['win_rate_train'] <= 1.0
    # Other inits of the same meta-evaluation task give other scores of the same θ.
    assert len(run['best_reevaluated_scores']) == 2
    assert run['best_reevaluated_scores'][0] != run['best_reevaluated_scores'][1]
  finals = [r['final_selection_score'] for r in runs]
  summary = written['summary']
  assert summary['final_selection_score_spread'] == pytest.approx(max(finals) - min(finals))
  assert summary['num_runs_meeting_goals'] == sum(r['meets_goals'] for r in runs)
  lucks = [r['best_selection_score'] - np.mean(r['best_reevaluated_scores']) for r in runs]
  assert summary['best_pick_luck_median'] == pytest.approx(np.median(lucks))


@pytest.mark.slow  # two outer-training child processes and bin/eval: about 2 minutes
def test_spread_rerun_trains_nothing_and_another_config_is_refused(spread_run):
  out, _, written = spread_run
  index = os.path.join(out, 'runs', 'seed_3_generic', 'ckpt-2.index')
  before = os.path.getmtime(index)
  _, again = _run_study('outer_training_spread', out, _SPREAD)
  assert again['runs'] == written['runs'] and os.path.getmtime(index) == before
  listing = sorted(os.listdir(out))
  with pytest.raises(UserError, match='holds runs of another configuration'):
    study.study_from_flags('outer_training_spread', str(out),
                           gin_bindings=_SPREAD + ['OuterTrainer.num_slots = 4'])
  assert sorted(os.listdir(out)) == listing


@pytest.mark.parametrize('binding, message', [
    ('OuterTrainingSpreadStudy.seeds = ()', 'give a non-empty tuple of seeds'),
    ('OuterTrainingSpreadStudy.seeds = (1, 1)', 'repeats a seed'),
    ("OuterTrainingSpreadStudy.kernel_paths = ('avx9',)", "holds 'avx9'"),
    ('OuterTrainingSpreadStudy.kernel_paths = ()', 'non-empty tuple')])
def test_spread_study_refuses_bad_seeds_and_paths(binding, message, tmp_path):
  with pytest.raises(UserError, match=re.escape(message)):
    study.study_from_flags('outer_training_spread', str(tmp_path / 'out'),
                           gin_bindings=[binding])
  assert not (tmp_path / 'out').exists()


def test_spread_study_refuses_a_kernel_path_this_cpu_lacks(monkeypatch, tmp_path):
  if not ops.available():
    pytest.skip('the fused op is not built: no kernel path to check')
  monkeypatch.setitem(ops._state, 'cpu_isas', ('auto', 'generic'))
  with pytest.raises(UserError, match="holds 'avx512', which this CPU lacks"):
    study.study_from_flags('outer_training_spread', str(tmp_path / 'out'),
                           gin_bindings=["OuterTrainingSpreadStudy.kernel_paths = ('avx512',)"])


# bin/study as a subprocess: one-line errors with exit status 2 (started at once: each pays the
# TensorFlow import).

_CLI_CASES = {
    'unknown_study': (['nope'], 'unknown study'),
    'unused_flag': (['fig3_toy', '--checkpoint=x'], 'takes no --checkpoint'),
    'bad_size': (['fig3_toy', '--gin_bindings=ToyStudy.horizons = ()'], 'horizons'),
    'no_name': ([], 'give one study name'),
    'spread_no_seeds': (['outer_training_spread', '--gin_bindings=OuterTrainingSpreadStudy.seeds = ()'],
                        'non-empty tuple of seeds'),
}


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('study_cli')
  env = dict(os.environ, PYTHONPATH=REPO)
  procs = {name: subprocess.Popen([sys.executable, STUDY, *args, f'--output_dir={tmp / name}'],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
           for name, (args, _) in _CLI_CASES.items()}
  return tmp, {name: (p.wait(timeout=600), p.communicate()[1]) for name, p in procs.items()}


@pytest.mark.parametrize('name', sorted(_CLI_CASES))
def test_bin_study_errors(cli_runs, name):
  tmp, runs = cli_runs
  code, stderr = runs[name]
  errors = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert code == 2 and len(errors) == 1 and _CLI_CASES[name][1] in errors[0]
  assert not (tmp / name).exists()  # a refused run leaves no directory

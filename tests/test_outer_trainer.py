"""The outer-training loop: updates, rejected steps, checkpoints and resumption (paper App. B)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from conftest import one_line
from lo_tf import checkpointing
from lo_tf.errors import UserError
from lo_tf.experiment import Experiment
from lo_tf.inner_training import InnerTrainer
from lo_tf.learned_optimizers import pretrained
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.learning_curve import evaluate_checkpoints
from lo_tf.outer_trainers import estimators
from lo_tf.outer_trainers.learner import OuterLearner
from lo_tf.outer_trainers.loop import OuterTrainer
from lo_tf.outer_trainers.meta_eval import MetaEvaluator
from lo_tf.outer_trainers.theta_init import ThetaInit
from lo_tf.plotting import read_scalars
from lo_tf.tasks.distribution import TaskDistribution
from lo_tf.tasks.problems import ConvNet
from lo_tf.tasks.problems import MLP

_CURRICULUM = ['Curriculum.start = 3', 'Curriculum.end = 6', 'Curriculum.num_outer_steps = 4']


def _trainer(experiment, train_dir, steps=4, bindings=(), **kwargs):
  gin.clear_config()
  gin.parse_config(list(_CURRICULUM) + list(bindings))
  kwargs.setdefault('family', MLPLOpt(implementation='reference'))
  kwargs.setdefault('meta_eval_every', 1000)
  return OuterTrainer(experiment, str(train_dir), num_slots=2, num_outer_steps=steps,
                      checkpoint_every=2, meta_eval_tasks=1, **kwargs)


@pytest.fixture(scope='module')
def trained(experiment, tmp_path_factory):
  train_dir = tmp_path_factory.mktemp('outer')
  trainer = _trainer(experiment, train_dir)
  theta0 = trainer.theta.numpy().copy()
  result = trainer.train(config_str='# test\n')
  return train_dir, trainer, theta0, result


def test_training_updates_theta_and_writes_outputs(trained):
  train_dir, trainer, theta0, result = trained
  theta = trainer.theta.numpy()
  assert np.all(np.isfinite(theta)) and not np.allclose(theta, theta0)
  assert int(trainer.step) == 4 and result['outer_steps'] == 4
  assert os.path.basename(trainer.checkpoints.latest) == 'ckpt-4'
  with open(train_dir / 'throughput.json') as f:
    throughput = json.load(f)
  for key in ('unrolled_steps_per_sec', 'samples_per_minute', 'meta_eval_first',
              'meta_eval_last', 'git_revision', 'wall_seconds_total'):
    assert key in throughput
  assert throughput['unrolled_steps_per_sec'] > 0
  assert (train_dir / 'outer_training.png').stat().st_size > 10_000
  assert (train_dir / 'config.gin').read_text() == '# test\n'
  scalars = read_scalars(str(train_dir / 'summaries'))
  np.testing.assert_array_equal(scalars['outer_loss'][0], [1, 2, 3, 4])
  assert 'meta_eval/outer_train/mean_valid_loss' in scalars
  # Slots carry their inner state: inner steps advanced by the truncation lengths (<= 6 each).
  steps = trainer.sample_source.slots.inner_step.numpy()
  assert np.all((steps >= 1) & (steps <= 12))
  # The best θ by meta-evaluation loads on its own.
  _, _, best, meta = pretrained.load(str(train_dir / 'best'))
  assert best.shape == theta.shape and meta['objective'] == 'train'


def test_resume_continues_exactly_like_an_uninterrupted_run(experiment, trained, tmp_path):
  train_dir, trainer, _, _ = trained
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  resumed = _trainer(experiment, copy, steps=6)
  resumed.train()
  straight = _trainer(experiment, tmp_path / 'straight', steps=6)
  straight.train()
  assert int(resumed.step) == int(straight.step) == 6
  np.testing.assert_array_equal(resumed.theta.numpy(), straight.theta.numpy())
  for a, b in zip(tf.nest.flatten(resumed.sample_source.slots), tf.nest.flatten(straight.sample_source.slots)):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert int(resumed.learner.optimizer.iterations) == 6


def test_a_run_that_learns_nothing_stops_with_an_error(experiment, tmp_path):
  """An absurd outer learning rate: θ jumps to ~1e30, every later sample is non-finite.

  OuterTrainer refuses such a rate up front (tests/test_resume.py), so it is set behind its back.
  """
  trainer = _trainer(experiment, tmp_path, steps=8, bindings=['OuterLearner.clip_value = None'])
  trainer.learner.optimizer.learning_rate.assign(1e30)
  trainer.max_unusable_steps = 3
  with pytest.raises(UserError, match='3 consecutive outer steps with no usable update'):
    trainer.train()
  assert int(trainer.step) == 4
  for v in trainer.learner.variables():
    assert np.all(np.isfinite(np.asarray(v.numpy(), np.float64)))
  # ckpt-2 would hold the blown-up θ: no checkpoint is saved during the streak.
  assert not list(tmp_path.glob('ckpt-*'))


def test_a_step_that_would_overflow_theta_is_undone(experiment, tmp_path):
  learner = OuterLearner(tf.constant([3e38, -1.0]), estimators.merge, outer_learning_rate=3e38,
                         clip_value=None)
  zeros = tf.zeros([2])
  out = estimators.EstimatorOutput(g_rp=-tf.ones([2, 2]), g_es=-tf.ones([2, 2]), loss_pos=zeros,
                        loss_neg=zeros, finite=tf.constant([True, True]),
                        lengths=tf.zeros([2], tf.int32), train_loss=zeros,
                        reset=tf.zeros([2], tf.bool))
  before = [np.array(v.numpy()) for v in learner.variables()]
  stats = learner.apply(out)  # θ0 + 3e38 overflows to inf
  assert float(stats['applied']) == 0.0
  for v, b in zip(learner.variables(), before):
    np.testing.assert_array_equal(v.numpy(), b)


def _constant_output(gradient, num_samples=2):
  """An estimator batch whose merged gradient is `gradient` (float32 [P]) exactly."""
  g = tf.tile(tf.constant(gradient, tf.float32)[None], [num_samples, 1])
  zeros = tf.zeros([num_samples])
  return estimators.EstimatorOutput(g_rp=g, g_es=g, loss_pos=zeros, loss_neg=zeros,
                                    finite=tf.ones([num_samples], tf.bool),
                                    lengths=tf.zeros([num_samples], tf.int32), train_loss=zeros,
                                    reset=tf.zeros([num_samples], tf.bool))


def test_outer_lr_decays_by_a_cosine_and_the_average_is_an_ema_of_the_iterates():
  """With a constant gradient, Adam's bias-corrected step is the learning rate itself, so each
  step moves θ by the cosine schedule's rate; θ̄ is the EMA of the iterates (issue 25)."""
  lr, steps, fraction, decay = 1e-2, 6, 0.2, 0.7
  learner = OuterLearner(tf.zeros([3]), estimators.merge, outer_learning_rate=lr,
                         average_decay=decay, decay_steps=4, final_lr_fraction=fraction)
  learner.reset_average()
  iterates, average = [np.zeros(3)], np.zeros(3)
  for _ in range(steps):
    assert float(learner.apply(_constant_output([0.05, -0.05, 0.05]))['applied']) == 1.0
    iterates.append(learner.theta.numpy().astype(np.float64))
    average = decay * average + (1 - decay) * iterates[-1]
  moves = np.abs(np.diff(np.array(iterates)[:, 0]))
  expected = [lr * (fraction + (1 - fraction) * 0.5 * (1 + np.cos(np.pi * min(k, 4) / 4)))
              for k in range(steps)]
  np.testing.assert_allclose(moves, expected, rtol=1e-4)
  np.testing.assert_allclose(learner.evaluated_theta.numpy(), average, rtol=1e-5, atol=1e-9)
  assert 'theta_average' in learner.trackables()
  plain = OuterLearner(tf.zeros([3]), estimators.merge, outer_learning_rate=lr)
  assert plain.evaluated_theta is plain.theta and 'theta_average' not in plain.trackables()
  for binding, value in (('average_decay', 1.0), ('decay_steps', 0), ('final_lr_fraction', 2.0)):
    with pytest.raises(UserError, match=binding):
      OuterLearner(tf.zeros([3]), estimators.merge, **{binding: value})


@pytest.mark.parametrize('beta_2', [0.5, 0.999])
def test_outer_adam_beta_2_sets_how_fast_a_large_first_gradient_is_forgotten(beta_2):
  """Adam with β1 = 0: after a gradient g then g/4, the second step is lr (g/4) / sqrt(v̂) with
  v̂ = (β2 g² + g²/16) / (1 + β2) (issue 25's β2 lever)."""
  lr, g = 1e-2, 0.08
  learner = OuterLearner(tf.zeros([2]), estimators.merge, outer_learning_rate=lr, beta_1=0.0,
                         beta_2=beta_2)
  learner.apply(_constant_output([g, -g]))
  first = learner.theta.numpy().copy()
  learner.apply(_constant_output([g / 4, -g / 4]))
  second = first - learner.theta.numpy()
  v_hat = (beta_2 * g**2 + g**2 / 16) / (1 + beta_2)
  np.testing.assert_allclose(-first, [lr, -lr], rtol=1e-4)
  np.testing.assert_allclose(second, [lr * (g / 4) / np.sqrt(v_hat), -lr * (g / 4) / np.sqrt(v_hat)],
                             rtol=1e-4)
  for value in (0.0, 1.0):
    with pytest.raises(UserError, match='beta_2'):
      OuterLearner(tf.zeros([2]), estimators.merge, beta_2=value)


def test_with_averaging_meta_eval_and_best_see_the_average_and_a_resume_is_exact(experiment,
                                                                                  tmp_path):
  average = ['OuterLearner.average_decay = 0.5', 'OuterLearner.decay_steps = 4']
  trainer = _trainer(experiment, tmp_path / 'a', bindings=average, meta_eval_every=4)
  theta0 = trainer.theta.numpy().copy()
  trainer.train()
  theta_bar = trainer.learner.theta_average.numpy()
  assert not np.array_equal(theta_bar, trainer.theta.numpy())
  log = json.loads((tmp_path / 'a' / 'meta_eval.json').read_text())
  assert float(trainer.best_score) == min(v['selection_score'] for v in log.values())
  best_step = min(log, key=lambda k: log[k]['selection_score'])
  _, _, best, _ = pretrained.load(str(tmp_path / 'a' / 'best'))
  np.testing.assert_array_equal(best, theta_bar if best_step == '4' else theta0)
  assert trainer.meta_eval(theta_bar)['selection_score'] == log['4']['selection_score']
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  for name in os.listdir(tmp_path / 'b'):
    if name.startswith('ckpt-4'):
      os.remove(tmp_path / 'b' / name)
  (tmp_path / 'b' / 'checkpoint').unlink()
  resumed = _trainer(experiment, tmp_path / 'b', bindings=average, meta_eval_every=4)
  resumed.train()
  np.testing.assert_array_equal(resumed.learner.theta_average.numpy(), theta_bar)
  np.testing.assert_array_equal(resumed.theta.numpy(), trainer.theta.numpy())


def _flip_data(directory, prefix):
  for name in os.listdir(directory):
    if name.startswith(prefix) and '.data-' in name:
      with open(directory / name, 'r+b') as f:
        f.seek(0)
        f.write(b'\x00garbage' * 64)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(experiment, trained, tmp_path,
                                                                    caplog):
  """ckpt-4 corrupt: resume from ckpt-2, replay steps 3-4 exactly, one TensorBoard value a step."""
  from tensorboard.backend.event_processing import plugin_event_accumulator
  train_dir, trainer, _, _ = trained
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  _flip_data(copy, 'ckpt-4')
  resumed = _trainer(experiment, copy, steps=4)
  with caplog.at_level('WARNING'):
    resumed.train()
  assert 'ckpt-4' in caplog.text  # the skipped checkpoint is named
  np.testing.assert_array_equal(resumed.theta.numpy(), trainer.theta.numpy())
  acc = plugin_event_accumulator.EventAccumulator(str(copy / 'summaries'),
                                                  size_guidance={'tensors': 0})
  acc.Reload()
  assert [e.step for e in acc.Tensors('outer_loss')] == [1, 2, 3, 4]


def test_corrupt_checkpoints_are_an_error_not_a_fresh_start(experiment, trained, tmp_path):
  train_dir, _, _, _ = trained
  copy = tmp_path / 'copy'
  shutil.copytree(train_dir, copy)
  _flip_data(copy, 'ckpt-')
  with pytest.raises(UserError, match='corrupt'):
    _trainer(experiment, copy, steps=8).train()
  with pytest.raises(UserError, match='corrupt'):  # bin/eval's loader refuses it too
    pretrained.load(str(copy))
  for digest in copy.glob('*.sha256.json'):  # without digests, TensorFlow's reader must notice
    os.remove(digest)
  with pytest.raises(UserError, match='corrupt'):
    _trainer(experiment, copy, steps=8).train()


def test_checkpoint_of_another_configuration_is_refused_and_left_alone(experiment, trained):
  train_dir, _, _, _ = trained
  before = {p: p.read_bytes() for p in train_dir.iterdir() if p.is_file()}
  other = _trainer(experiment, train_dir, steps=8, family=MLPLOpt(hidden_size=16))
  with pytest.raises(UserError, match=r'MLPLOpt\.hidden_size \(32 vs 16\)'):
    other.train(config_str='# another configuration\n')
  assert {p: p.read_bytes() for p in train_dir.iterdir() if p.is_file()} == before


def test_an_unreadable_checkpoint_index_is_recovered_from_the_files(experiment, trained,
                                                                    tmp_path):
  train_dir, trainer, _, _ = trained
  copy = tmp_path / 'garbled_state'
  shutil.copytree(train_dir, copy)
  (copy / 'checkpoint').write_text('this is not a checkpoint state file')
  resumed = _trainer(experiment, copy, steps=4)
  assert resumed.train() is None  # ckpt-4 found by its files: nothing left to train
  np.testing.assert_array_equal(resumed.theta.numpy(), trainer.theta.numpy())


def _train_cmd(train_dir, steps):
  return [sys.executable, os.path.join(REPO, 'bin', 'train'),
          '--gin_file=' + os.path.join(REPO, 'gin', 'quickstart.gin'),
          f'--train_dir={train_dir}',
          f'--gin_bindings=OuterTrainer.num_outer_steps={steps}',
          '--gin_bindings=OuterTrainer.num_slots=2',
          '--gin_bindings=OuterTrainer.checkpoint_every=1',
          '--gin_bindings=OuterTrainer.meta_eval_every=1000',
          '--gin_bindings=OuterTrainer.meta_eval_tasks=1',
          '--gin_bindings=InnerTrainer.num_steps=20',
          "--gin_bindings=MLPLOpt.implementation='reference'",
          '--gin_bindings=build_experiment.problem=@MLP',
          "--gin_bindings=ThetaInit.kind='glorot'",
          '--gin_bindings=MLP.hidden=(8,)',
          '--gin_bindings=Curriculum.start=3', '--gin_bindings=Curriculum.end=5']


@pytest.mark.slow  # minutes on 2 cores: run with pytest -m slow tests
def test_sigkill_midway_then_resume(tmp_path):
  """A run killed with SIGKILL resumes from its last checkpoint (at most one interval lost)."""
  train_dir = tmp_path / 'run'
  proc = subprocess.Popen(_train_cmd(train_dir, 400), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  state = train_dir / 'checkpoint'
  deadline = time.time() + 240
  try:
    while time.time() < deadline:
      if state.exists() and 'ckpt-3' in state.read_text():
        break
      time.sleep(0.2)
    else:
      pytest.fail('no checkpoint 3 within 240 s')
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  saved = int(tf.train.latest_checkpoint(str(train_dir)).rsplit('-', 1)[1])
  assert saved >= 3
  done = subprocess.run(_train_cmd(train_dir, saved + 2), cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'resumed from {train_dir}/ckpt-{saved}' in done.stderr
  assert json.loads(done.stdout[:done.stdout.rindex('}') + 1])['outer_steps'] == saved + 2


@pytest.mark.parametrize('binding', ['GradientEstimator.sigma = 0.0',
                                     'GradientEstimator.sigma = 1e400',
                                     'OuterLearner.beta_1 = 1.0',
                                     "GradientEstimator.mode = 'both'",
                                     "TruncatedStep.objective = 'test'"])
def test_nonsense_settings_are_refused(experiment, tmp_path, binding):
  with pytest.raises(UserError):
    _trainer(experiment, tmp_path, bindings=[binding])
  gin.clear_config()


def test_nonsense_loop_settings_are_refused(experiment, tmp_path):
  with pytest.raises(UserError, match='num_slots'):
    OuterTrainer(experiment, str(tmp_path), num_slots=0)


def test_tuned_theta_init_picks_the_best_step_size_on_outer_train(experiment):
  tasks = experiment.tasks
  problem = MLP(tasks.image_shape, 3, hidden=(16,))
  mlp = Experiment(tasks, problem, InnerTrainer(problem, num_steps=30, batch_size=16,
                                                eval_every=10))
  family = MLPLOpt(implementation='reference')
  init = ThetaInit('tuned_adam', step_sizes=(1e-7, 3e-2, 0.3), num_tasks=2, decay=0.5)
  theta, record = init(mlp, family, 'train', seed=3)
  # 1e-7 leaves the MLP at its initial loss, 0.3 overshoots, 3e-2 trains it (mean loss 0.26).
  assert record['scores'][1] < min(record['scores'][0], record['scores'][2]) - 0.5
  assert record['chosen_step_size'] == 3e-2
  np.testing.assert_array_equal(
      theta.numpy(), family.hand_designed_theta(3e-2, tf.constant([3, 0]), decay=0.5).numpy())
  glorot, record = ThetaInit()(experiment, family, 'train', seed=3)
  assert record == {'kind': 'glorot'}
  np.testing.assert_array_equal(glorot.numpy(), family.init_theta(tf.constant([3, 0])).numpy())
  with pytest.raises(UserError, match='ThetaInit.kind'):
    ThetaInit('zeros')


def test_a_fresh_run_starts_from_theta_init_and_records_it(experiment, tmp_path):
  init = ThetaInit('tuned_adam', step_sizes=(1e-2,), num_tasks=1)
  trainer = _trainer(experiment, tmp_path, steps=1, theta_init=init)
  trainer.train()
  with open(tmp_path / 'theta_init.json') as f:
    assert json.load(f)['chosen_step_size'] == 1e-2
  # Resumed runs restore θ from the checkpoint: θ0 is not chosen again.
  os.remove(tmp_path / 'theta_init.json')
  resumed = _trainer(experiment, tmp_path, steps=2, theta_init=init)
  resumed.train()
  assert not (tmp_path / 'theta_init.json').exists()


def test_a_warm_start_takes_the_best_theta_of_a_run_and_its_outer_training_time(
    experiment, trained, tmp_path):
  source = str(trained[0])
  best = checkpointing.read_checkpoint(os.path.join(source, 'best'))[0].reader
  family = MLPLOpt(implementation='reference')
  theta, record = ThetaInit('checkpoint', checkpoint=source)(experiment, family, 'valid', seed=0)
  np.testing.assert_array_equal(theta.numpy(), best.get_tensor(checkpointing.THETA_KEY))
  source_seconds = float(best.get_tensor(checkpointing.WALL_SECONDS_KEY))
  assert source_seconds > 0 and record['wall_seconds'] == source_seconds
  assert (record['source_objective'], record['objective']) == ('train', 'valid')
  warm = _trainer(experiment, tmp_path, steps=1, theta_init=ThetaInit('checkpoint',
                                                                       checkpoint=source))
  result = warm.train()
  with open(tmp_path / 'theta_init.json') as f:
    assert json.load(f)['theta_digest'] == record['theta_digest']
  assert result['wall_seconds_total'] > source_seconds
  with pytest.raises(UserError, match='hidden_size 32 vs 8') as e:
    ThetaInit('checkpoint', checkpoint=source)(experiment, MLPLOpt(hidden_size=8), 'train', 0)
  one_line(e)
  for kind, checkpoint in (('checkpoint', None), ('glorot', source), ('checkpoint', ''),
                           ('checkpoint', 3)):
    with pytest.raises(UserError, match='ThetaInit.checkpoint'):
      ThetaInit(kind, checkpoint=checkpoint)
  # A run cannot start from what its own train_dir holds (a kill before its first checkpoint
  # leaves best/ behind): that θ would be replaced by the run's first save.
  own = tmp_path / 'own'
  shutil.copytree(source, own)
  for leftover in list(own.glob('ckpt-*')) + [own / 'checkpoint']:
    os.remove(leftover)
  with pytest.raises(UserError, match="lies in this run's own") as e:
    _trainer(experiment, own, steps=1,
             theta_init=ThetaInit('checkpoint', checkpoint=str(own))).train()
  one_line(e)


def test_a_warm_start_prefers_a_shipped_name_and_falls_back_from_an_empty_best(
    experiment, trained, tmp_path, monkeypatch):
  family = MLPLOpt(implementation='reference')
  monkeypatch.chdir(tmp_path)
  shutil.copytree(trained[0], tmp_path / 'quickstart_digits')
  theta, record = ThetaInit('checkpoint', checkpoint='quickstart_digits')(experiment, family,
                                                                         'train', 0)
  shipped = pretrained.load('quickstart_digits')
  np.testing.assert_array_equal(theta.numpy(), shipped[2].numpy())
  assert record['source'] == 'quickstart_digits'
  assert record['wall_seconds'] == shipped[3]['wall_seconds']
  # best/ without a checkpoint (no meta-evaluation yet): the newest checkpoint is taken.
  run = tmp_path / 'run'
  shutil.copytree(trained[0], run)
  shutil.rmtree(run / 'best')
  (run / 'best').mkdir()
  theta, record = ThetaInit('checkpoint', checkpoint=str(run))(experiment, family, 'train', 0)
  newest = checkpointing.read_checkpoint(str(run))[0]
  assert record['checkpoint'] == newest.prefix
  np.testing.assert_array_equal(theta.numpy(), newest.reader.get_tensor(checkpointing.THETA_KEY))


def test_meta_evaluation_selects_on_outer_valid_and_can_skip_outer_test():
  tasks = TaskDistribution('digits', num_classes=2, outer_train_fraction=0.7,
                           outer_valid_classes=2)
  problem = ConvNet(tasks.image_shape, 2, channels=(4,), strides=(2,))
  exp = Experiment(tasks, problem, InnerTrainer(problem, num_steps=6, batch_size=8, eval_every=3))
  family = MLPLOpt(implementation='reference')
  out = MetaEvaluator(exp, family, 'valid', num_tasks=1, outer_test=False)(
      family.hand_designed_theta(1e-2, tf.constant([0, 0])))
  assert {k.split('/')[0] for k in out if '/' in k} == {'outer_train', 'outer_valid'}
  assert out['selection_score'] == out['outer_valid/mean_valid_loss']
  assert out['outer_valid/mean_valid_loss'] != out['outer_train/mean_valid_loss']
  evaluate = MetaEvaluator(exp, family, 'valid', num_tasks=1, outer_test=False)
  theta = family.hand_designed_theta(1e-2, tf.constant([0, 0]))
  # init_seed 0 is the meta-evaluation of outer-training; another draws other initializations.
  assert evaluate(theta, init_seed=0) == out
  assert evaluate(theta, init_seed=1)['selection_score'] != out['selection_score']


def test_every_checkpoint_learning_curve_runs_each_baseline_once(experiment, trained, tmp_path):
  train_dir = trained[0]
  out = tmp_path / 'curve'
  curve = evaluate_checkpoints(experiment, str(train_dir), str(out), num_tasks=1, num_inits=1,
                               split='outer_test')
  kept = sorted(int(p.rsplit('-', 1)[1]) for p in checkpointing.kept_checkpoints(train_dir)[0])
  assert [p['outer_step'] for p in curve['points']] == kept and len(kept) >= 2
  assert len({p['theta_sha1'] for p in curve['points']}) == len(kept)
  # One task, 3 baselines x (11 tuning rates + at most 3 chosen rates at init 0, all shared), and
  # one learned run per checkpoint: the baselines ran once for all checkpoints.
  cached = os.listdir(out / 'cache')
  learned = [f for f in cached if '-learned_' in f]
  assert len(learned) == len(kept) and len(cached) - len(learned) == 3 * 11
  with open(out / 'learning_curve.json') as f:
    on_disk = json.load(f)
  assert on_disk['points'][0]['win_rate_train'] in (0.0, 1.0)
  assert (out / 'learning_curve.png').stat().st_size > 10_000
  for step in kept:
    assert (out / f'ckpt-{step}' / 'results.json').exists()

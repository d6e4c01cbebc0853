"""Evaluation against tuned baselines (paper §4.4, Fig. 1) and shipped optimizers."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_digits_experiment
from lo_tf import evaluation
from lo_tf import metrics
from lo_tf.errors import UserError
from lo_tf.evaluation import CurveCache
from lo_tf.evaluation import Evaluator
from lo_tf.experiment import Experiment
from lo_tf.inner_training import InnerCurves
from lo_tf.inner_training import InnerTrainer
from lo_tf.learned_optimizers import pretrained
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.metrics import Summary
from lo_tf.tasks.problems import ConvNet


def _summary(train, valid=None, seconds_per_step=1.0, eval_every=1):
  train = np.asarray(train, float)
  valid = np.asarray(train[::eval_every] if valid is None else valid, float)
  steps = np.arange(len(valid)) * eval_every
  secs = np.arange(1, len(train) + 1) * seconds_per_step
  return Summary(train=train, seconds=secs, valid=valid, eval_steps=steps,
                 eval_seconds=steps * seconds_per_step, diverged=not np.isfinite(train).all(),
                 band={'train': (train, train), 'valid': (valid, valid)})


def test_best_rate_selection_by_target_metric():
  curves = [
      _summary([2.0, 1.5, 1.2], valid=[2.0, 0.9, 1.4]),   # best valid (0.9), mediocre final train
      _summary([2.0, 1.0, 0.5], valid=[2.0, 1.1, 1.0]),   # best final train (0.5)
      _summary([2.0, np.nan, np.nan], valid=[2.0, np.nan, np.nan]),  # diverged
      _summary([2.0, 0.1, 0.6], valid=[2.0, 1.0, 1.2]),   # lowest train once, not at the end
  ]
  assert metrics.select_best(curves, 'train') == 1  # final-window train loss
  assert metrics.select_best(curves, 'valid') == 0  # lowest valid loss
  assert metrics.select_best([curves[2], curves[0]], 'train') == 1  # divergence never wins


def test_improvement_and_speedups_with_known_answers():
  baseline = _summary([1.0, 0.8, 0.6, 0.5, 0.4], seconds_per_step=1.0)  # best 0.4 at step 5
  learned = _summary([0.9, 0.4, 0.3, 0.2, 0.1], seconds_per_step=2.0)  # reaches 0.4 at step 2
  out = metrics.compare(baseline, learned, 'train')
  assert out['improvement'] == pytest.approx(0.3)
  assert out['speedup_steps'] == pytest.approx(5 / 2)
  assert out['speedup_wallclock'] == pytest.approx(5.0 / 4.0)
  worse = _summary([1.0, 0.9, 0.8, 0.7, 0.6])
  out = metrics.compare(baseline, worse, 'train')
  assert out['improvement'] == pytest.approx(-0.2) and out['speedup_steps'] == 0.0
  # Valid: eval points every 2 steps; baseline best 0.5 at step 4 (4 s), learned at step 2 (2 s).
  b = _summary([1] * 5, valid=[1.0, 0.7, 0.5], eval_every=2)
  l = _summary([1] * 5, valid=[1.0, 0.45, 0.3], eval_every=2)
  out = metrics.compare(b, l, 'valid')
  assert out['improvement'] == pytest.approx(0.2)
  assert out['speedup_wallclock'] == pytest.approx(2.0)


def test_win_rate_and_medians():
  records = []
  for imp, speed, name in ((0.1, 4.0, 'adam'), (-0.2, 0.0, 'sgdm'), (0.3, 2.0, 'adam'),
                           (0.05, 3.0, 'rmsprop')):
    rec = {f'best_baseline_{m}': {'name': name} for m in metrics.METRICS}
    for metric in metrics.METRICS:
      rec.update({f'improvement_{metric}': imp, f'speedup_steps_{metric}': speed,
                  f'speedup_wallclock_{metric}': speed / 2})
    records.append(rec)
  s = metrics.summarize_tasks(records, with_learned=True)
  assert s['num_tasks'] == 4 and s['win_rate_valid'] == 0.75 and s['win_rate_train'] == 0.75
  assert s['median_improvement_valid'] == pytest.approx(0.075)
  assert s['speedup_steps_train'] == pytest.approx(2.5)
  assert s['speedup_wallclock_valid'] == pytest.approx(1.25)
  assert s['best_baseline_counts_valid'] == {'adam': 2, 'rmsprop': 1, 'sgdm': 1}
  assert s['win_rate_valid_final'] == 0.75
  assert 'win_rate_valid' not in metrics.summarize_tasks(records, with_learned=False)


def test_final_valid_metric_compares_the_loss_at_step_t():
  # Baseline: best valid 0.5 at step 4 but 0.8 at T; learned: 0.6 at T (worse early-stopped).
  b = _summary([1] * 7, valid=[1.0, 0.7, 0.5, 0.8], eval_every=2)
  l = _summary([1] * 7, valid=[1.0, 0.9, 0.7, 0.6], eval_every=2)
  out = metrics.compare(b, l, 'valid_final')
  assert out['improvement'] == pytest.approx(0.2)
  assert out['speedup_steps'] == pytest.approx(2 / 4)  # 0.8 reached at step 2 vs 4
  assert metrics.compare(b, l, 'valid')['improvement'] == pytest.approx(-0.1)
  # Tuned by the loss at T, a rate that early-stops well but ends badly is not chosen.
  assert metrics.select_best([b, l], 'valid_final') == 1
  assert metrics.select_best([b, l], 'valid') == 0


def test_smoothed_train_loss():
  np.testing.assert_allclose(metrics.smoothed_train_loss([4.0, 2.0, 0.0, 2.0], 2),
                             [4.0, 3.0, 1.0, 1.0])


@pytest.fixture(scope='module')
def tiny_experiment():
  return tiny_digits_experiment(num_steps=20, eval_every=5)


@pytest.fixture(scope='module')
def evaluated(tiny_experiment, tmp_path_factory):
  out = tmp_path_factory.mktemp('eval')
  lopt = MLPLOpt()
  learned = ('learned', lopt, lopt.init_theta(tf.constant([0, 0])))
  ev = evaluation.Evaluator(tiny_experiment, str(out), num_tasks=2, num_inits=2,
                            learned=learned, grid=[1e-2, 1e-1], first_task=3, plot_tasks=2,
                            provenance={'spec': 'test'})
  return out, ev, ev.run(), learned


def test_results_json_schema_and_plots(evaluated):
  out, _, results, _ = evaluated
  with open(out / 'results.json') as f:
    on_disk = json.load(f)
  assert on_disk['summary'] == json.loads(json.dumps(results['summary']))
  s = on_disk['summary']
  for key in ('num_tasks', 'win_rate_valid', 'win_rate_train', 'win_rate_valid_final',
              'median_improvement_valid', 'median_improvement_train',
              'median_improvement_valid_final', 'speedup_steps_train', 'speedup_wallclock_train',
              'speedup_wallclock_valid', 'wall_seconds'):
    assert key in s, key
  assert s['num_tasks'] == 2 and 0.0 <= s['win_rate_valid'] <= 1.0
  assert [t['task_seed'] for t in on_disk['tasks']] == [3, 4]
  assert on_disk['config']['learned_optimizer_provenance'] == {'spec': 'test'}
  assert on_disk['config']['split'] == 'outer_test'
  assert sorted(on_disk['plots']) == ['fig1ab_curves', 'fig1ab_task4', 'fig1c_improvement']
  for task in on_disk['tasks']:
    assert len(task['classes']) == 3 and isinstance(task['task_seed'], int)
    for metric in metrics.METRICS:
      best = task[f'best_baseline_{metric}']
      assert best['name'] in ('adam', 'rmsprop', 'sgdm')
      assert best['learning_rate'] in (1e-2, 1e-1)
    for name in ('adam', 'rmsprop', 'sgdm', 'learned'):
      entry = task[name] if name == 'learned' else task[name]['at_best_lr_valid']
      for key in ('final_train', 'best_train', 'final_valid', 'best_valid', 'steps', 'seconds'):
        assert key in entry
    assert task['learned']['steps'] == 20 and task['learned']['seconds'] > 0
  for path in on_disk['plots'].values():
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_second_run_hits_the_cache(evaluated, tiny_experiment):
  out, first, results, learned = evaluated
  assert first.cache.hits < first._runs_done
  again = evaluation.Evaluator(tiny_experiment, str(out), num_tasks=2, num_inits=2,
                               learned=learned, grid=[1e-2, 1e-1], first_task=3)
  again_results = again.run()
  assert again.cache.misses == 0 and again.cache.hits == again._runs_done > 0
  assert again_results['summary']['win_rate_valid'] == results['summary']['win_rate_valid']


def test_shipped_optimizer_loads_by_name_and_steps():
  names = pretrained.shipped_names()
  assert 'quickstart_digits' in names
  for name in names:
    loaded, family, theta, meta = pretrained.load(name)
    assert loaded == name and theta.shape == (MLPLOpt(**meta['lopt']).num_meta_params,)
    for key in ('command', 'git_revision', 'outer_steps', 'wall_seconds', 'machine'):
      assert key in meta, key
    params = [tf.ones([3, 3]), tf.zeros([3])]
    opt = family(theta)
    new, state = opt.update([tf.ones([3, 3]) * 0.1, tf.ones([3]) * 0.1], opt.init(params), params)
    assert float(state.t) == 1.0
    assert all(np.all(np.isfinite(p.numpy())) for p in new)
    assert not np.allclose(new[0].numpy(), 1.0)


def test_bad_checkpoints(tmp_path):
  with pytest.raises(UserError, match='no checkpoint'):
    pretrained.load(str(tmp_path / 'missing'))
  with pytest.raises(UserError, match='no checkpoint'):
    pretrained.load('not_a_shipped_name')
  os.makedirs(tmp_path / 'd')
  with open(tmp_path / 'd' / 'ckpt-1.index', 'wb') as f:
    f.write(b'garbage')
  with open(tmp_path / 'd' / 'lopt.json', 'w') as f:
    json.dump({'lopt': {}}, f)
  with pytest.raises(UserError, match='corrupt or incompatible'):
    pretrained.load(str(tmp_path / 'd' / 'ckpt-1'))


def test_corrupt_cache_entries_are_recomputed(tiny_experiment, tmp_path):
  ev = evaluation.Evaluator(tiny_experiment, str(tmp_path), num_tasks=1, num_inits=1,
                            grid=[1e-2])
  ev.run()
  entries = sorted((tmp_path / 'cache').iterdir())
  entries[0].write_bytes(b'')  # zero bytes
  entries[1].write_bytes(entries[1].read_bytes()[:200])  # truncated archive
  again = evaluation.Evaluator(tiny_experiment, str(tmp_path), num_tasks=1, num_inits=1,
                               grid=[1e-2])
  again.run()
  assert again.cache.misses == 2 and again.cache.hits == again._runs_done - 2


def test_cache_follows_architecture_and_baseline_hyperparameters(tiny_experiment, tmp_path):
  tasks = tiny_experiment.tasks
  other = ConvNet(tasks.image_shape, 3, channels=(4,), strides=(1,))
  exp2 = Experiment(tasks, other, InnerTrainer(other, num_steps=20, batch_size=8, eval_every=5))
  assert exp2.fingerprint() != tiny_experiment.fingerprint()
  import gin
  before = tiny_experiment.fingerprint()
  with gin.unlock_config():
    gin.bind_parameter('Adam.beta_1', 0.5)
  try:
    assert tiny_experiment.fingerprint() != before
  finally:
    gin.clear_config()


# ------------------------------------------------------------------ evaluation cache


def _curves(num_steps, num_evals):
  e = np.linspace(1.0, 0.5, num_evals, dtype=np.float32)
  return InnerCurves(train_loss=np.linspace(1.0, 0.5, num_steps, dtype=np.float32),
                     seconds=np.arange(1, num_steps + 1, dtype=np.float64),
                     eval_steps=np.arange(num_evals, dtype=np.int32) * 6,
                     eval_seconds=np.arange(num_evals, dtype=np.float64), valid_loss=e,
                     valid_acc=e, train_eval_loss=e, train_eval_acc=e,
                     steps_completed=num_steps, diverged=False)


def test_a_cache_entry_with_arrays_of_the_wrong_length_is_recomputed(tmp_path):
  """A well-formed .npz of another run length (a baseline came back with 1 step) is a miss."""
  cache = CurveCache(str(tmp_path / 'cache'), num_steps=12, num_evals=3)
  for key, curves in (('good', _curves(12, 3)), ('one_step', _curves(1, 3)),
                      ('one_eval', _curves(12, 1))):
    cache.put(key, curves)
  np.testing.assert_array_equal(cache.get('good').train_loss, _curves(12, 3).train_loss)
  assert cache.get('one_step') is None and cache.get('one_eval') is None
  assert (cache.hits, cache.misses) == (1, 2)
  # The evaluator's cache expects its inner trainer's T and number of evaluations.
  experiment = tiny_digits_experiment()
  evaluator = Evaluator(experiment, str(tmp_path / 'eval'), num_tasks=1, num_inits=1)
  assert (evaluator.cache.num_steps, evaluator.cache.num_evals) == (12, 3)

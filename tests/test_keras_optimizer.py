"""lo_tf.keras.LearnedOptimizer: the learned optimizer (paper §4.1) as a Keras optimizer."""

import functools
import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from lo_tf.data.sources import load_source
from lo_tf.errors import UserError
from lo_tf.keras import LearnedOptimizer
from lo_tf.kernels import ops
from lo_tf.learned_optimizers import pretrained
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt

IMPLS = ['reference', 'xla'] + (['custom_op'] if ops.available() else [])
SHAPES = [(3, 4), (4,), (2, 2, 3)]


@functools.lru_cache(maxsize=None)
def _family(**kwargs):
  """One MLPLOpt per configuration for the whole module: its XLA core compiles once per shape."""
  return MLPLOpt(**kwargs)


def _fast_family(**kwargs):
  """Steps of O(0.05) (float32 cancellation stays far below the test tolerances)."""
  return _family(lambda_exp=0.3, lambda_lin=0.05, **kwargs)


def _random_theta(lopt, seed=0):
  """A generic θ: Glorot weights and non-zero biases, so every feature and t changes the step."""
  theta = lopt.init_theta(tf.constant([seed, 1]))
  return theta + 0.1 * tf.random.stateless_normal(theta.shape, [seed, 2])


def _descent_theta(lopt, scale=10.0, seed=0):
  """A θ that descends: step ≈ scale·λ_lin·normalized(r·m at β = 0.9), an Adam-like direction,
  plus a small generic part (every feature and the time features still count)."""
  f, h = lopt.num_features, lopt.hidden_size
  w1, w2 = np.zeros((f, h)), np.zeros((h, 2))
  j = 2 + 3 * lopt.depth + 1  # features g, w, m(D), v(D), r(D), r·m(D)
  w1[j, 0], w1[j, 1] = 1.0, -1.0
  w2[0, 1], w2[1, 1] = scale, -scale
  theta = np.concatenate([w1.ravel(), np.zeros(h), w2.ravel(), np.zeros(2)])
  return tf.constant(theta, tf.float32) + 0.01 * _random_theta(lopt, seed)


def _write_train_dir(directory, config, theta):
  """A train_dir as bin/train writes it: a checkpoint with θ and the outer step, and lopt.json."""
  os.makedirs(directory)
  ckpt = tf.train.Checkpoint(theta=tf.Variable(theta), step=tf.Variable(7, dtype=tf.int64))
  ckpt.save(os.path.join(directory, 'ckpt'))
  with open(os.path.join(directory, 'lopt.json'), 'w') as f:
    json.dump({'lopt': config, 'objective': 'valid'}, f)
  return directory


def _apply_steps(opt, variables, grad_steps, mode):
  apply = lambda grads: opt.apply_gradients(zip(grads, variables))
  if mode != 'eager':
    apply = tf.function(apply, jit_compile=mode == 'jit')
  out = []
  for grads in grad_steps:
    apply([tf.constant(g) for g in grads])
    out.append([v.numpy() for v in variables])
  return out


def _random_problem(seed, num_steps, shapes=SHAPES, grad_scale=1e-2):
  rng = np.random.default_rng(seed)
  params = [rng.normal(size=s).astype(np.float32) for s in shapes]
  grads = [[(grad_scale * rng.normal(size=s)).astype(np.float32) for s in shapes]
           for _ in range(num_steps)]
  return params, grads


@pytest.mark.parametrize('mode', ['eager', 'function', 'jit'])
@pytest.mark.parametrize('impl', IMPLS)
def test_same_updates_and_slots_as_mlp_lopt_optimizer(impl, mode):
  lopt = _fast_family(implementation=impl)
  theta = _random_theta(lopt)
  params, grad_steps = _random_problem(0, 4)
  reference = lopt.optimizer(theta)
  ref_params = [tf.constant(p) for p in params]
  state = reference.init(ref_params)
  opt = LearnedOptimizer(theta=theta, lopt=lopt)
  variables = [keras.Variable(p) for p in params]
  chosen = []
  core_implementation = opt.core_implementation
  opt.core_implementation = lambda: chosen.append(core_implementation()) or chosen[-1]
  before = params
  for grads, after in zip(grad_steps, _apply_steps(opt, variables, grad_steps, mode)):
    ref_params, state = reference.update([tf.constant(g) for g in grads], state, ref_params)
    for b, a, r in zip(before, after, ref_params):
      np.testing.assert_allclose(a - b, r.numpy() - b, rtol=1e-5, atol=1e-7)
    before = after
  assert set(chosen) == {'reference' if mode == 'jit' else impl}
  assert int(opt.iterations) == 4 == float(state.t)
  sizes = [int(np.prod(s)) for s in SHAPES]
  for suffix, ref in (('_momentum', state.m), ('_second_moment', state.v)):
    slots = [v for v in opt.variables if v.name.endswith(suffix)]
    np.testing.assert_allclose(np.concatenate([s.numpy() for s in slots]), ref.numpy(),
                               rtol=1e-6, atol=1e-9, err_msg=suffix)
    assert [s.shape for s in slots] == [(n, lopt.depth) for n in sizes]


def test_ablated_groups_have_no_slots_and_match_mlp_lopt():
  lopt = _family(use_rms=False, implementation='reference')
  theta = _random_theta(lopt)
  params, grad_steps = _random_problem(1, 2)
  opt = LearnedOptimizer(theta=theta, lopt=lopt)
  variables = [keras.Variable(p) for p in params]
  after = _apply_steps(opt, variables, grad_steps, 'function')[-1]
  reference = lopt.optimizer(theta)
  ref_params = [tf.constant(p) for p in params]
  state = reference.init(ref_params)
  for grads in grad_steps:
    ref_params, state = reference.update([tf.constant(g) for g in grads], state, ref_params)
  for a, r in zip(after, ref_params):
    np.testing.assert_allclose(a, r.numpy(), rtol=1e-6)
  assert [v.name for v in opt.variables] == ['iteration'] + [
      f'{v.name}_momentum' for v in variables]


@pytest.mark.parametrize('option,clip', [
    ('clipnorm', lambda gs: [tf.clip_by_norm(g, 0.05) for g in gs]),
    ('clipvalue', lambda gs: [tf.clip_by_value(g, -0.05, 0.05) for g in gs]),
    ('global_clipnorm', lambda gs: tf.clip_by_global_norm(gs, 0.05)[0]),
])
def test_gradient_clipping_equals_clipping_the_gradients(option, clip):
  lopt = _fast_family(implementation='reference')
  theta = _random_theta(lopt)
  params, grad_steps = _random_problem(2, 2, grad_scale=0.1)  # norms 0.2 ... 0.4 > 0.05
  clipped = [[g.numpy() for g in clip([tf.constant(g) for g in grads])] for grads in grad_steps]
  assert not np.allclose(clipped[0][0], grad_steps[0][0])
  runs = []
  for kwargs, steps in (({option: 0.05}, grad_steps), ({}, clipped)):
    variables = [keras.Variable(p) for p in params]
    runs.append(_apply_steps(LearnedOptimizer(theta=theta, lopt=lopt, **kwargs), variables,
                             steps, 'function')[-1])
  for a, b in zip(*runs):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_steps_averages_and_counts_updates():
  lopt = _fast_family(implementation='reference')
  theta = _random_theta(lopt)
  params, micro = _random_problem(3, 4)
  averaged = [[(a + b) / 2 for a, b in zip(micro[i], micro[i + 1])] for i in (0, 2)]
  opt = LearnedOptimizer(theta=theta, lopt=lopt, gradient_accumulation_steps=2)
  accumulated = _apply_steps(opt, [keras.Variable(p) for p in params], micro, 'function')[-1]
  assert int(opt.iterations) == 2  # t of the time features counts updates, not micro-batches
  plain = _apply_steps(LearnedOptimizer(theta=theta, lopt=lopt),
                       [keras.Variable(p) for p in params], averaged, 'function')[-1]
  for a, b in zip(accumulated, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_get_config_from_config_round_trip():
  lopt = MLPLOpt(use_time=False, hidden_size=8)
  theta = _random_theta(lopt)
  opt = LearnedOptimizer(theta=theta, lopt=lopt, global_clipnorm=2.0, name='lo')
  config = json.loads(json.dumps(opt.get_config()))  # JSON-able, as in a .keras file
  assert 'learning_rate' not in config and 'weight_decay' not in config
  again = LearnedOptimizer.from_config(config)
  assert again.get_config() == opt.get_config()
  np.testing.assert_array_equal(again.theta.numpy(), theta.numpy())
  assert again.lopt.config() == lopt.config() and again.global_clipnorm == 2.0
  assert again.name == 'lo'


def test_builds_from_train_dir_checkpoint_path_and_shipped_name(tmp_path, monkeypatch):
  lopt = MLPLOpt()
  theta = _random_theta(lopt)
  train_dir = _write_train_dir(str(tmp_path / 'run'), lopt.config(), theta)
  monkeypatch.setattr(pretrained, 'PRETRAINED_DIR', str(tmp_path / 'pretrained'))
  pretrained.export(train_dir, 'tiny', {'command': 'test'},
                                out_dir=pretrained.PRETRAINED_DIR)
  for spec in (train_dir, os.path.join(train_dir, 'ckpt-1'), 'tiny'):
    opt = LearnedOptimizer(spec)
    np.testing.assert_array_equal(opt.theta.numpy(), theta.numpy())
    assert opt.lopt.config() == lopt.config()


def _one_line_error(match, *args, **kwargs):
  with pytest.raises(UserError, match=match) as e:
    LearnedOptimizer(*args, **kwargs)
  assert '\n' not in str(e.value)


def test_bad_name_and_incompatible_checkpoint_are_one_line_errors(tmp_path):
  _one_line_error('no checkpoint at .nope.*shipped name', 'nope')
  lopt = MLPLOpt()
  small = MLPLOpt(hidden_size=16).config()  # θ of the paper's size, configuration of another
  train_dir = _write_train_dir(str(tmp_path / 'run'), small, _random_theta(lopt))
  _one_line_error(r'θ has shape \(1090,\) but its configuration needs \(546,\)', train_dir)
  _one_line_error(r'θ has shape \(3,\)', theta=[1.0, 2.0, 3.0], lopt=lopt)
  _one_line_error('non-finite', theta=np.full(1090, np.nan), lopt=lopt)


def test_unknown_configuration_key_is_a_one_line_error(tmp_path):
  lopt = MLPLOpt()
  train_dir = _write_train_dir(str(tmp_path / 'run'), dict(lopt.config(), nope=1),
                               _random_theta(lopt))
  _one_line_error('configuration is not understood', train_dir)
  _one_line_error('configuration is not understood', theta=_random_theta(lopt),
                  lopt=dict(lopt.config(), nope=1))


def test_misuse_is_rejected_with_one_line_errors():
  lopt = MLPLOpt()
  theta = _random_theta(lopt)
  _one_line_error('no learning_rate=0.001: the learned MLP outputs', theta=theta, lopt=lopt,
                  learning_rate=1e-3)
  _one_line_error('no weight_decay=0.01.*kernel_regularizer', theta=theta, lopt=lopt,
                  weight_decay=1e-2)
  _one_line_error('exactly one of checkpoint=')
  _one_line_error('exactly one of checkpoint=', 'a_name', theta=theta)
  _one_line_error('needs lopt=', theta=theta)
  _one_line_error('carries its MLPLOpt configuration', 'a_name', lopt=lopt)
  opt = LearnedOptimizer(theta=theta, lopt=lopt)
  assert opt.learning_rate == 1.0
  with pytest.raises(UserError, match='no learning rate to set'):
    opt.learning_rate = 0.1


@pytest.fixture(scope='module')
def digits():
  source = load_source('digits')
  return source.images.astype(np.float32) / 255.0, source.labels


def _cnn(seed):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((8, 8, 1)),
      keras.layers.Conv2D(8, 3, activation='relu'),
      keras.layers.Flatten(),
      keras.layers.Dense(10),
  ])


def _compiled(model, optimizer, **kwargs):
  model.compile(optimizer=optimizer, metrics=['accuracy'], **kwargs,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


def test_fit_lowers_digits_loss_same_with_jit_on_and_off(digits):
  x, y = digits
  lopt = _family()
  theta = _descent_theta(lopt)
  results = {}
  for jit in (False, True):
    opt = LearnedOptimizer(theta=theta, lopt=lopt)
    chosen = []
    core_implementation = opt.core_implementation
    opt.core_implementation = lambda: chosen.append(core_implementation()) or chosen[-1]
    model = _compiled(_cnn(0), opt, jit_compile=jit)
    initial = float(model.loss(y, model(x)))
    history = model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0).history
    results[jit] = history['loss'], model.get_weights()
    assert set(chosen) == {'reference' if jit else lopt.implementation}
    assert int(opt.iterations) == 2 * 29
  losses, weights = results[False]
  assert initial > 2.0 and losses[-1] < 0.5 * initial, (initial, losses)  # ln 10 = 2.3
  np.testing.assert_allclose(results[True][0], losses, rtol=1e-4)
  for a, b in zip(results[True][1], weights):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def _state(model):
  return model.get_weights() + [v.numpy() for v in model.optimizer.variables]


def test_model_save_load_continues_training_identically(digits, tmp_path):
  x, y = digits[0][:512], digits[1][:512]
  fit = lambda m: m.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
  lopt = _family()
  model = _compiled(_cnn(1), LearnedOptimizer(theta=_descent_theta(lopt), lopt=lopt))
  fit(model)
  path = str(tmp_path / 'model.keras')
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded.optimizer, LearnedOptimizer)
  assert int(loaded.optimizer.iterations) == 8
  for a, b in zip(_state(loaded), _state(model)):
    np.testing.assert_array_equal(a, b)
  fit(model)  # the uninterrupted run
  fit(loaded)
  for a, b in zip(_state(loaded), _state(model)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  # A model file whose θ does not fit its configuration: one line, not a half-loaded model.
  bad = str(tmp_path / 'bad.keras')
  with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, 'w') as zout:
    for item in zin.infolist():
      data = zin.read(item.filename)
      if item.filename == 'config.json':
        config = json.loads(data)
        config['compile_config']['optimizer']['config']['theta'] = [1.0, 2.0]
        data = json.dumps(config)
      zout.writestr(item, data)
  with pytest.raises(UserError, match=r'θ has shape \(2,\) but its configuration needs') as e:
    keras.models.load_model(bad)
  assert '\n' not in str(e.value)


def test_tf_train_checkpoint_restores_slots_and_iterations(digits, tmp_path):
  x, y = digits[0][:256], digits[1][:256]
  lopt = _family()
  theta = _random_theta(lopt)
  trained = _compiled(_cnn(2), LearnedOptimizer(theta=theta, lopt=lopt))
  trained.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
  path = tf.train.Checkpoint(model=trained, optimizer=trained.optimizer).save(
      str(tmp_path / 'ckpt'))
  restored = _compiled(_cnn(3), LearnedOptimizer(theta=theta, lopt=lopt))
  # Restored before the optimizer is built: its slots take their values when fit creates them.
  status = tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).restore(path)
  assert int(restored.optimizer.iterations) == 4
  for model in (trained, restored):
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
  status.assert_existing_objects_matched()
  for a, b in zip(_state(restored), _state(trained)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def mirrored_main():
  """Subprocess body: fit under MirroredStrategy over two logical CPUs and on one device.

  Prints JSON: the largest weight and slot differences between the two runs and between the
  replicas' copies of the slots, and the iteration counts.
  """
  cpu = tf.config.list_physical_devices('CPU')[0]
  tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  source = load_source('digits')
  x, y = source.images[:256].astype(np.float32) / 255.0, source.labels[:256]
  lopt = MLPLOpt()
  theta = _random_theta(lopt)
  strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  runs, report = {}, {}
  for name, scope in (('mirrored', strategy.scope), ('single', tf.distribute.get_strategy().scope)):
    with scope():
      model = _compiled(_cnn(4), LearnedOptimizer(theta=theta, lopt=lopt))
    model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    runs[name] = model.get_weights() + [v.numpy() for v in model.optimizer.variables]
    report[f'{name}_iterations'] = int(model.optimizer.iterations.numpy())
    if name == 'mirrored':
      slots = model.optimizer.variables[1:]
      report['replicas'] = len(slots[0].value.values)
      report['replica_diff'] = max(
          float(np.abs(s.value.values[0].numpy() - s.value.values[1].numpy()).max())
          for s in slots)
  report['max_diff'] = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
                           for a, b in zip(runs['mirrored'], runs['single']))
  print(json.dumps(report))


@pytest.fixture(scope='module', autouse=True)
def background(tmp_path_factory):
  """Processes started as the module starts, so that they run beside its other tests.

  * 'mirrored': `mirrored_main` (logical devices must be configured before TensorFlow initializes
    its devices, which this process has done already);
  * 'example': examples/keras_digits.py for a few steps, with a θ in a tmp train_dir.
  """
  tmp = tmp_path_factory.mktemp('background')
  lopt = MLPLOpt()
  train_dir = _write_train_dir(str(tmp / 'run'), lopt.config(), _descent_theta(lopt))
  code = ('import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; '
          'import test_keras_optimizer; test_keras_optimizer.mirrored_main()')
  env = dict(os.environ, PYTHONPATH=REPO)
  commands = {
      'mirrored': [sys.executable, '-c', code, REPO, os.path.join(REPO, 'tests')],
      'example': [sys.executable, os.path.join(REPO, 'examples', 'keras_digits.py'),
                  '--optimizer=' + train_dir, '--data=digits', '--steps=4', '--eval_every=2',
                  '--batch_size=32', '--adam_learning_rates=1e-3,1e-2',
                  '--output=' + str(tmp / 'out' / 'digits.png')],
  }
  procs = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for name, argv in commands.items()}
  yield procs, tmp
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


def _finished(background, name):
  proc = background[0][name]
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return out


def test_mirrored_strategy_two_cpus_matches_one_device(background):
  report = json.loads(_finished(background, 'mirrored').strip().splitlines()[-1])
  assert report['replicas'] == 2
  assert report['replica_diff'] == 0.0
  assert report['mirrored_iterations'] == report['single_iterations'] == 8
  assert report['max_diff'] < 1e-4, report


def test_example_writes_plot_and_curves(background):
  out = _finished(background, 'example')
  png = background[1] / 'out' / 'digits.png'
  assert 'tuned Adam: adam lr=' in out and f'wrote {png}' in out
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(background[1] / 'out' / 'digits.json') as f:
    result = json.load(f)
  assert sorted(result['runs']) == ['adam lr=0.001', 'adam lr=0.01', 'learned (run)']
  for run in result['runs'].values():
    assert run['steps'] == [2, 4] and np.all(np.isfinite(run['train_loss']))


@pytest.mark.parametrize('impl', IMPLS)
def test_a_zero_size_variable_is_left_alone_like_keras_adam_does(impl):
  """Issue 19: the fused op refused sizes of 0 ("sizes must be positive")."""
  lopt = _fast_family(implementation=impl)
  theta = _random_theta(lopt)
  shapes = [(0, 3), (4,), (2, 0)]
  params, grad_steps = _random_problem(2, 2, shapes)
  reference = lopt.optimizer(theta)
  ref_params = [tf.constant(p) for p in params]
  state = reference.init(ref_params)
  for grads in grad_steps:  # the learned optimizer's own update, every implementation
    ref_params, state = reference.update([tf.constant(g) for g in grads], state, ref_params)
  assert [tuple(p.shape) for p in ref_params] == shapes
  # Keras: the same updates; Adam takes such a variable too.
  opt = LearnedOptimizer(theta=theta, lopt=lopt)
  variables = [keras.Variable(p) for p in params]
  after = _apply_steps(opt, variables, grad_steps, 'function')[-1]
  assert [a.shape for a in after] == shapes
  expected = _family(lambda_exp=0.3, lambda_lin=0.05, implementation='reference')
  ref_state, ref = expected.optimizer(theta), [tf.constant(p) for p in params]
  ref_opt_state = ref_state.init(ref)
  for grads in grad_steps:
    ref, ref_opt_state = ref_state.update([tf.constant(g) for g in grads], ref_opt_state, ref)
  np.testing.assert_allclose(after[1], ref[1].numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ref_params[1].numpy(), ref[1].numpy(), rtol=1e-5, atol=1e-7)
  assert not np.allclose(after[1], params[1])
  adam_vars = [keras.Variable(p) for p in params]
  _apply_steps(keras.optimizers.Adam(), adam_vars, grad_steps, 'function')
  # The core itself takes a size of 0 among the sizes (the fused kernels see positive ones only).
  g, w = tf.constant(grad_steps[0][1])[None], tf.constant(params[1])[None]
  zeros = tf.zeros([1, 4, lopt.depth])
  args = (theta[None], g, w, tf.zeros([1]), zeros, zeros, (0, 4, 0))
  for got, want in zip(lopt.core(*args), lopt.reference_core(*args)):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-7)

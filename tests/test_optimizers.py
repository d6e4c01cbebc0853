"""lo_tf.optimizers.hand_designed: agreement with tf.keras.optimizers, the lr grid, baselines."""

import numpy as np
import pytest
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.optimizers.hand_designed import RMSProp
from lo_tf.optimizers.hand_designed import SGDMomentum
from lo_tf.optimizers.hand_designed import learning_rate_grid
from lo_tf.optimizers.hand_designed import make_baseline

SHAPES = [(3, 2), (4,), (2, 2, 2)]
NUM_STEPS = 7


def _initial_params():
  rng = np.random.default_rng(0)
  return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _gradient_sequence():
  """NUM_STEPS lists of gradients of varied scale and sign (fixed, independent of params)."""
  rng = np.random.default_rng(1)
  seq = []
  for step in range(NUM_STEPS):
    scale = 10.0 ** rng.uniform(-2, 1)
    seq.append([(scale * rng.normal(size=s)).astype(np.float32) for s in SHAPES])
  for grads in seq:  # tiny gradients for one tensor, so where epsilon enters matters
    grads[2] *= 1e-4 / scale
  seq[3][1][:] = 0.0  # a step with an all-zero gradient for one tensor
  return seq


def _run_ours(opt, grads_seq):
  params = [tf.constant(p) for p in _initial_params()]
  state = opt.init(params)
  trajectory = []
  for grads in grads_seq:
    new_params, new_state = opt.update([tf.constant(g) for g in grads], state, params)
    # The state keeps its structure and shapes (it is a tf.while_loop loop variable).
    tf.nest.assert_same_structure(state, new_state)
    for a, b in zip(tf.nest.flatten(state), tf.nest.flatten(new_state)):
      assert a.shape == b.shape
    params, state = new_params, new_state
    trajectory.append([p.numpy() for p in params])
  return trajectory


def _run_keras(opt, grads_seq):
  variables = [tf.Variable(p) for p in _initial_params()]
  trajectory = []
  for grads in grads_seq:
    opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))
    trajectory.append([v.numpy() for v in variables])
  return trajectory


CASES = {
    'adam': (lambda lr: Adam(lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7),
             lambda lr: tf.keras.optimizers.Adam(lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7)),
    'adam_b1_0.5': (lambda lr: Adam(lr, beta_1=0.5, beta_2=0.9, epsilon=1e-7),
                    lambda lr: tf.keras.optimizers.Adam(lr, beta_1=0.5, beta_2=0.9, epsilon=1e-7)),
    'rmsprop': (lambda lr: RMSProp(lr),
                lambda lr: tf.keras.optimizers.RMSprop(lr, rho=0.9, momentum=0.0, epsilon=1e-7)),
    'sgdm': (lambda lr: SGDMomentum(lr),
             lambda lr: tf.keras.optimizers.SGD(lr, momentum=0.9)),
}


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('lr', [0.01, 0.3])
def test_matches_keras(name, lr):
  ours, keras = CASES[name]
  grads_seq = _gradient_sequence()
  mine = _run_ours(ours(lr), grads_seq)
  ref = _run_keras(keras(lr), grads_seq)
  init = _initial_params()
  for step, (a, b) in enumerate(zip(mine, ref)):
    for pa, pb in zip(a, b):
      np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-6, err_msg=f'{name} step {step}')
  # The runs really moved the parameters (the comparison is not vacuous).
  moved = max(np.abs(p - q).max() for p, q in zip(mine[-1], init))
  assert moved > 0.5 * lr


@pytest.mark.parametrize('name', sorted(CASES))
def test_tensor_learning_rate_matches_float(name):
  ours, _ = CASES[name]
  grads_seq = _gradient_sequence()
  as_float = _run_ours(ours(0.05), grads_seq)
  as_tensor = _run_ours(ours(tf.constant(0.05, tf.float32)), grads_seq)
  for a, b in zip(as_float, as_tensor):
    for pa, pb in zip(a, b):
      np.testing.assert_allclose(pa, pb, rtol=1e-6)


def test_one_trace_serves_every_learning_rate():
  grads = [tf.ones([3])]

  @tf.function
  def step(lr, params):
    opt = Adam(lr)
    return opt.update(grads, opt.init(params), params)[0]

  p = [tf.zeros([3])]
  outs = [step(tf.constant(lr, tf.float32), p)[0].numpy() for lr in (0.1, 0.2, 0.4)]
  assert step.experimental_get_tracing_count() == 1
  # First Adam step moves each coordinate by about -lr.
  for lr, out in zip((0.1, 0.2, 0.4), outs):
    np.testing.assert_allclose(out, -lr * np.ones(3), rtol=1e-4)


def test_sgd_momentum_by_hand():
  opt = SGDMomentum(0.1, momentum=0.5)
  params, state = [tf.constant([1.0])], opt.init([tf.constant([1.0])])
  params, state = opt.update([tf.constant([2.0])], state, params)
  np.testing.assert_allclose(params[0].numpy(), [1.0 - 0.2])  # v = -0.2
  params, state = opt.update([tf.constant([2.0])], state, params)
  np.testing.assert_allclose(params[0].numpy(), [0.8 - 0.3])  # v = 0.5 * -0.2 - 0.2


def test_learning_rate_grid():
  grid = learning_rate_grid()
  assert grid.shape == (11,)
  np.testing.assert_allclose(grid[0], 1e-4)
  np.testing.assert_allclose(grid[-1], 10.0)
  np.testing.assert_allclose(grid[1:] / grid[:-1], np.full(10, np.sqrt(10.0)), rtol=1e-12)
  np.testing.assert_allclose(grid[::2], [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], rtol=1e-12)


def test_make_baseline():
  for name, cls in (('adam', Adam), ('rmsprop', RMSProp), ('sgdm', SGDMomentum)):
    opt = make_baseline(name, 0.25)
    assert type(opt) is cls and opt.learning_rate == 0.25
  with pytest.raises(UserError) as e:
    make_baseline('nope', 0.1)
  msg = str(e.value)
  assert "'nope'" in msg and 'adam' in msg and len(msg.splitlines()) == 1

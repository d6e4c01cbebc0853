"""lo_tf.tasks.problems: parameter counts, Glorot init, logits shapes and the loss."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lo_tf.tasks.problems import ConvNet
from lo_tf.tasks.problems import MLP

SEED = tf.constant([3, 4], tf.int64)


def _size(params):
  return sum(int(np.prod(p.shape)) for p in params)


def test_paper_convnet_has_19722_params():
  net = ConvNet((32, 32, 3), 10)
  # conv 3->32, 32->32, 32->32 (3x3, with bias) then a 32->10 linear layer.
  by_hand = (3 * 3 * 3 * 32 + 32) + 2 * (3 * 3 * 32 * 32 + 32) + (32 * 10 + 10)
  assert by_hand == 19722
  assert net.num_params == 19722
  params = net.init(SEED)
  assert _size(params) == 19722
  assert [tuple(p.shape) for p in params] == [
      (3, 3, 3, 32), (32,), (3, 3, 32, 32), (32,), (3, 3, 32, 32), (32,), (32, 10), (10,)]
  assert all(p.dtype == tf.float32 for p in params)


@pytest.mark.parametrize('hidden, expected', [
    ((32, 32), (196 * 32 + 32) + (32 * 32 + 32) + (32 * 10 + 10)),                   # 7,690
    ((128, 128, 128), (196 * 128 + 128) + 2 * (128 * 128 + 128) + (128 * 10 + 10)),  # 59,530
])
def test_mlp_param_counts(hidden, expected):
  net = MLP((14, 14, 1), 10, hidden=hidden)
  assert net.num_params == expected
  params = net.init(SEED)
  assert _size(params) == expected
  assert len(params) == 2 * (len(hidden) + 1)
  logits = net.logits(params, tf.zeros([3, 14, 14, 1]))
  assert logits.shape == (3, 10)


def test_six_layer_convnet_builds_and_gives_logits():
  net = ConvNet((28, 28, 1), 10, channels=(32,) * 6, strides=(2, 1, 2, 1, 1, 1))
  params = net.init(SEED)
  assert len(params) == 14
  expected = (9 * 1 * 32 + 32) + 5 * (9 * 32 * 32 + 32) + (32 * 10 + 10)
  assert net.num_params == expected == _size(params)
  x = tf.random.stateless_uniform([4, 28, 28, 1], [0, 1])
  logits = net.logits(params, x)
  assert logits.shape == (4, 10)
  assert np.all(np.isfinite(logits.numpy()))


def test_convnet_rejects_mismatched_strides():
  with pytest.raises(ValueError):
    ConvNet((8, 8, 1), 3, channels=(32, 32), strides=(2,))


def test_init_is_deterministic_per_seed():
  net = ConvNet((8, 8, 1), 3)
  a, b = net.init(SEED), net.init(tf.constant([3, 4], tf.int64))
  for pa, pb in zip(a, b):
    np.testing.assert_array_equal(pa.numpy(), pb.numpy())
  c = net.init(tf.constant([3, 5], tf.int64))
  assert not np.array_equal(a[0].numpy(), c[0].numpy())
  # Layers get different draws from one seed.
  assert not np.array_equal(a[2].numpy(), a[4].numpy())


def _glorot_limit(shape):
  if len(shape) == 4:  # conv kernel [k, k, c_in, c_out]
    receptive = shape[0] * shape[1]
    fan_in, fan_out = receptive * shape[2], receptive * shape[3]
  else:
    fan_in, fan_out = shape
  return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize('net', [
    ConvNet((32, 32, 3), 10),
    MLP((14, 14, 1), 10, hidden=(128, 128, 128)),
], ids=['convnet', 'mlp'])
def test_glorot_uniform_weights_and_zero_biases(net):
  params = net.init(SEED)
  for p in params:
    v = p.numpy()
    if v.ndim == 1:
      np.testing.assert_array_equal(v, np.zeros_like(v))
      continue
    limit = _glorot_limit(v.shape)
    assert np.abs(v).max() <= limit
    # Uniform on [-limit, limit]: the extremes are reached and the mean is near 0.
    assert np.abs(v).max() > 0.9 * limit
    assert abs(v.mean()) < 0.1 * limit
    # Variance of U(-a, a) is a^2 / 3.
    np.testing.assert_allclose(v.var(), limit**2 / 3, rtol=0.25)


def test_loss_is_cross_entropy_of_logits():
  net = ConvNet((8, 8, 1), 4)
  params = net.init(SEED)
  x = tf.random.stateless_uniform([6, 8, 8, 1], [5, 6])
  y = tf.constant([0, 1, 2, 3, 0, 2], tf.int32)
  logits = net.logits(params, x).numpy().astype(np.float64)
  log_z = np.log(np.exp(logits).sum(axis=1))
  by_hand = np.mean(log_z - logits[np.arange(6), y.numpy()])
  loss = float(net.loss(params, x, y))
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
  # Small Glorot weights: near-uniform predictions, loss near log(K).
  assert abs(loss - math.log(4)) < 0.5
  loss2, acc = net.loss_and_accuracy(params, x, y)
  np.testing.assert_allclose(float(loss2), loss, rtol=1e-6)
  np.testing.assert_allclose(float(acc), np.mean(logits.argmax(1) == y.numpy()), rtol=1e-6)


def test_mlp_logits_match_numpy():
  net = MLP((2, 3, 1), 3, hidden=(4,))
  params = net.init(SEED)
  params[1] = tf.constant([0.1, -0.2, 0.3, 0.0])
  x = tf.random.stateless_normal([5, 2, 3, 1], [7, 8])
  w1, b1, w2, b2 = [p.numpy().astype(np.float64) for p in params]
  h = np.maximum(x.numpy().reshape(5, 6) @ w1 + b1, 0)
  np.testing.assert_allclose(net.logits(params, x).numpy(), h @ w2 + b2, rtol=1e-5, atol=1e-6)

"""Inner problems: the networks a learned optimizer trains (paper App. C.2, App. E).

An inner problem is a pure function of a plain list of tensors (the inner parameters w), so unrolls
of inner training stay differentiable with respect to the optimizer's meta-parameters θ. Parameters
are float32; images are float32 [B, H, W, C]; labels int32 [B] in [0, num_classes).
"""

import math

import gin
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.errors import check_int


def _glorot_uniform(seed, shape, fan_in, fan_out):
  limit = math.sqrt(6.0 / (fan_in + fan_out))
  return tf.random.stateless_uniform(shape, seed, -limit, limit, dtype=tf.float32)


class Problem:
  """Base class: softmax cross-entropy classification of images by a parameter list.

  Subclasses define `param_shapes()` and `logits(params, x)`.
  """

  def __init__(self, input_shape, num_classes):
    self.input_shape = tuple(int(d) for d in input_shape)
    self.num_classes = int(num_classes)

  def param_shapes(self):
    """List of (shape, fan_in, fan_out); fan_in = 0 marks a zero-initialized bias."""
    raise NotImplementedError

  def logits(self, params, x):
    """float32 [B, num_classes] logits of images x float32 [B, H, W, C]."""
    raise NotImplementedError

  @property
  def num_params(self):
    """Total number of scalar inner parameters."""
    return sum(math.prod(s) for s, _, _ in self.param_shapes())

  def init(self, seed):
    """Glorot-uniform weights and zero biases (App. C.2) from an int32/int64 [2] stateless seed."""
    params = []
    for i, (shape, fan_in, fan_out) in enumerate(self.param_shapes()):
      if fan_in == 0:
        params.append(tf.zeros(shape, tf.float32))
      else:
        sub = tf.random.experimental.stateless_fold_in(seed, i)
        params.append(_glorot_uniform(sub, shape, fan_in, fan_out))
    return params

  def loss(self, params, x, y):
    """Mean softmax cross-entropy, float32 scalar."""
    logits = self.logits(params, x)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))

  def batched_logits(self, params, x):
    """float32 [M, B, num_classes] logits of M independent networks.

    Args:
      params: list like `init`'s, each with a leading axis of M trajectories.
      x: float32 [M, B, H, W, C] images, one batch per trajectory.
    """
    return tf.stack([self.logits([p[i] for p in params], x[i]) for i in range(x.shape[0])])

  def batched_loss(self, params, x, y, clip=None):
    """float32 [M] mean softmax cross-entropy of each of M networks (see `batched_logits`).

    Args:
      params, x: as in `batched_logits`.
      y: int32 [M, B] labels.
      clip: if given, each loss is min(loss, clip) (the authors' code clips inner and meta losses
        at 10, `base_arch.py`), so one diverging trajectory cannot dominate an outer gradient.
    """
    logits = self.batched_logits(params, x)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits), axis=-1)
    return loss if clip is None else tf.minimum(loss, clip)

  def loss_and_accuracy(self, params, x, y):
    """(mean cross-entropy, accuracy in [0, 1]), both float32 scalars."""
    logits = self.logits(params, x)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y),
                                 tf.float32))
    return loss, acc


# input_shape and num_classes come from the task distribution (`build_experiment`).
@gin.configurable(denylist=['input_shape', 'num_classes'])
class ConvNet(Problem):
  """Convolutional classifier of App. C.2: 3x3 convs, ReLU, global average pool, linear.

  Defaults are the paper's 3-layer network (32 channels, strides [2, 2, 1]): 19,722 parameters for
  32x32x3 inputs and 10 classes ("20k", §4.2). App. E's 6-layer network is
  channels=(32,)*6, strides=(2, 1, 2, 1, 1, 1).
  """

  def __init__(self, input_shape, num_classes, channels=(32, 32, 32), strides=(2, 2, 1),
               kernel_size=3, batched_conv='loop'):
    super().__init__(input_shape, num_classes)
    if batched_conv not in ('loop', 'patches'):
      raise UserError(f"ConvNet.batched_conv={batched_conv!r}; use 'loop' or 'patches'")
    self.batched_conv = batched_conv
    if not isinstance(channels, (tuple, list)) or not isinstance(strides, (tuple, list)):
      raise UserError(f'ConvNet.channels={channels!r} and strides={strides!r} must be tuples')
    if len(channels) != len(strides) or not channels:
      raise UserError(f'ConvNet: {len(channels)} channels but {len(strides)} strides; '
                      'give one stride per layer, at least one layer')
    self.channels = tuple(check_int('ConvNet', 'channels', c) for c in channels)
    self.strides = tuple(check_int('ConvNet', 'strides', c) for c in strides)
    self.kernel_size = check_int('ConvNet', 'kernel_size', kernel_size)

  def param_shapes(self):
    shapes, c_in, k = [], self.input_shape[-1], self.kernel_size
    for c_out in self.channels:
      shapes += [((k, k, c_in, c_out), k * k * c_in, k * k * c_out), ((c_out,), 0, 0)]
      c_in = c_out
    shapes += [((c_in, self.num_classes), c_in, self.num_classes), ((self.num_classes,), 0, 0)]
    return shapes

  def logits(self, params, x):
    h = x
    for i, stride in enumerate(self.strides):
      h = tf.nn.relu(tf.nn.conv2d(h, params[2 * i], stride, 'SAME') + params[2 * i + 1])
    h = tf.reduce_mean(h, axis=[1, 2])
    return tf.matmul(h, params[-2]) + params[-1]

  def batched_logits(self, params, x):
    """M networks at once (see `Problem.batched_logits`).

    `batched_conv='loop'` runs one convolution per network; 'patches' turns every layer into one
    batched matrix product over extracted image patches (TensorFlow has no CPU gradient for
    grouped convolutions, the other way to batch convolutions with different filters).
    """
    if self.batched_conv == 'loop':
      return super().batched_logits(params, x)
    h, k = x, self.kernel_size
    for i, stride in enumerate(self.strides):
      m, size = h.shape[0], h.shape[2:]
      patches = tf.image.extract_patches(tf.reshape(h, [-1, *size]), [1, k, k, 1],
                                         [1, stride, stride, 1], [1, 1, 1, 1], 'SAME')
      out_hw = patches.shape[1:3]
      filters = tf.reshape(params[2 * i], [m, k * k * size[-1], -1])
      h = tf.matmul(tf.reshape(patches, [m, -1, k * k * size[-1]]), filters)
      h = tf.reshape(h, [m, -1, *out_hw, filters.shape[-1]])
      h = tf.nn.relu(h + params[2 * i + 1][:, None, None, None, :])
    h = tf.reduce_mean(h, axis=[2, 3])
    return tf.matmul(h, params[-2]) + params[-1][:, None, :]


@gin.configurable(denylist=['input_shape', 'num_classes'])
class MLP(Problem):
  """Fully connected ReLU classifier of App. E (2x32 and 3x128 hidden units on 14x14 MNIST)."""

  def __init__(self, input_shape, num_classes, hidden=(32, 32)):
    super().__init__(input_shape, num_classes)
    if not isinstance(hidden, (tuple, list)):
      raise UserError(f'MLP.hidden={hidden!r} must be a tuple of layer widths')
    self.hidden = tuple(check_int('MLP', 'hidden', h) for h in hidden)

  def param_shapes(self):
    shapes, n_in = [], math.prod(self.input_shape)
    for n_out in self.hidden + (self.num_classes,):
      shapes += [((n_in, n_out), n_in, n_out), ((n_out,), 0, 0)]
      n_in = n_out
    return shapes

  def logits(self, params, x):
    h = tf.reshape(x, [tf.shape(x)[0], -1])
    for i in range(len(self.hidden)):
      h = tf.nn.relu(tf.matmul(h, params[2 * i]) + params[2 * i + 1])
    return tf.matmul(h, params[-2]) + params[-1]

  def batched_logits(self, params, x):
    # Fully connected layers batch natively: one batched matmul per layer for all M networks.
    h = tf.reshape(x, [x.shape[0], tf.shape(x)[1], -1])
    for i in range(len(self.hidden)):
      h = tf.nn.relu(tf.matmul(h, params[2 * i]) + params[2 * i + 1][:, None, :])
    return tf.matmul(h, params[-2]) + params[-1][:, None, :]

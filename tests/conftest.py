"""Shared fixtures: paths to ../shared data, the tiny digits experiment, a synthetic train_dir."""

import os
import shutil
import sys

import numpy as np
import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
OMNIGLOT = os.path.join(SHARED, 'data', 'omniglot')
MNIST_TEST = os.path.join(SHARED, 'data', 'mnist', 'mnist_test.npz')
sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position  (after the path and TensorFlow's log level are set)
import tensorflow as tf  # noqa: E402

from lo_tf import checkpointing  # noqa: E402
from lo_tf import io_utils  # noqa: E402
from lo_tf.experiment import Experiment  # noqa: E402
from lo_tf.inner_training import InnerTrainer  # noqa: E402
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt  # noqa: E402
from lo_tf.tasks.distribution import TaskDistribution  # noqa: E402
from lo_tf.tasks.problems import ConvNet  # noqa: E402


def require(path):
  """Skips the calling test, naming the missing path, when ../shared data is absent."""
  if not os.path.exists(path):
    pytest.skip(f'{path} is absent (the ../shared data beside the checkout)')
  return path


@pytest.fixture
def omniglot_small1():
  return require(os.path.join(OMNIGLOT, 'images_background_small1'))


@pytest.fixture
def omniglot_small2():
  return require(os.path.join(OMNIGLOT, 'images_background_small2'))


def one_line(excinfo):
  """The message of a raised UserError, asserted to be one line."""
  message = str(excinfo.value)
  assert message and '\n' not in message, repr(message)
  return message


def tiny_digits_experiment(num_steps=12, eval_every=6):
  """The tests' tiny experiment: 3-way digits tasks, a one-layer 4-channel CNN, batch 8."""
  tasks = TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5)
  problem = ConvNet(tasks.image_shape, 3, channels=(4,), strides=(2,))
  return Experiment(tasks, problem, InnerTrainer(problem, num_steps=num_steps, batch_size=8,
                                                 eval_every=eval_every))


@pytest.fixture(scope='module')
def experiment():
  return tiny_digits_experiment()


# A train_dir as bin/train writes it, for the checkpoint and loading tests.

STEPS = (2, 4, 6)


def theta_at(step):
  """θ of the synthetic run at outer step `step`."""
  return np.full(MLPLOpt().num_meta_params, 0.01 * step, np.float32)


def checkpoint_objects():
  """(tf.train.Checkpoint of θ, step and an extra variable, θ, step, extra) as bin/train saves."""
  lopt = MLPLOpt()
  theta = tf.Variable(tf.zeros([lopt.num_meta_params]), name='theta')
  step = tf.Variable(0, dtype=tf.int64)
  extra = tf.Variable(tf.zeros([3, 5]))
  return tf.train.Checkpoint(theta=theta, step=step, extra=extra), theta, step, extra


def write_train_dir(directory, steps=STEPS, nan_at=None):
  """A train_dir as bin/train writes it: kept checkpoints with digests, and lopt.json."""
  ckpt, theta, step, extra = checkpoint_objects()
  manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=len(steps))
  for s in steps:
    theta.assign(theta_at(s) * (np.nan if s == nan_at else 1.0))
    step.assign(s)
    extra.assign(tf.fill([3, 5], float(s)))
    checkpointing.write_digest(manager.save(checkpoint_number=s))
  io_utils.atomic_write_json(os.path.join(directory, 'lopt.json'),
                             {'lopt': MLPLOpt().config(), 'objective': 'train'})
  return str(directory)


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
  return write_train_dir(tmp_path_factory.mktemp('pristine'))


@pytest.fixture
def train_dir(pristine, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(pristine, copy)
  return copy



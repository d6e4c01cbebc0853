"""lo_tf.inner_training.InnerTrainer: in-graph inner training curves, determinism, divergence."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lo_tf.inner_training import InnerTrainer
from lo_tf.inner_training import batch_indices
from lo_tf.optimizers.hand_designed import Adam
from lo_tf.optimizers.hand_designed import SGDMomentum
from lo_tf.tasks.distribution import OUTER_TRAIN
from lo_tf.tasks.distribution import TaskDistribution
from lo_tf.tasks.problems import ConvNet

T, M = 100, 25  # inner steps, eval_every


@pytest.fixture(scope='module')
def task():
  dist = TaskDistribution('digits', num_classes=3, outer_train_fraction=0.5)
  return dist.sample_task(OUTER_TRAIN, 0)


@pytest.fixture(scope='module')
def trainer():
  # One trainer for the module: one traced graph per optimizer family.
  return InnerTrainer(ConvNet((8, 8, 1), 3), num_steps=T, batch_size=16, eval_every=M)


@pytest.fixture(scope='module')
def adam_curves(trainer, task):
  return trainer.train(Adam, 1e-2, task, seed=0)


def test_adam_lowers_train_and_valid_loss(adam_curves):
  c = adam_curves
  assert not c.diverged and c.steps_completed == T
  assert np.all(np.isfinite(c.train_loss))
  # Fresh init on 3 classes: near-uniform predictions.
  assert abs(c.train_loss[0] - math.log(3)) < 0.3
  assert c.train_loss[-20:].mean() < 0.5 * c.train_loss[0]
  assert c.valid_loss[-1] < 0.5 * c.valid_loss[0]
  assert c.valid_acc[-1] > 0.8 and c.valid_acc[0] < 0.7
  assert c.train_eval_loss[-1] < 0.5 * c.train_eval_loss[0]


def test_curve_shapes(adam_curves):
  c = adam_curves
  assert c.train_loss.shape == (T,) and c.seconds.shape == (T,)
  np.testing.assert_array_equal(c.eval_steps, np.arange(0, T + 1, M))
  num_evals = T // M + 1
  for curve in (c.eval_seconds, c.valid_loss, c.valid_acc, c.train_eval_loss, c.train_eval_acc):
    assert curve.shape == (num_evals,)
    assert np.all(np.isfinite(curve))
  assert np.all(np.diff(c.seconds) >= 0) and c.seconds[0] > 0
  # eval_seconds are the training seconds at the evaluated steps (evaluation time excluded).
  assert c.eval_seconds[0] == 0.0
  np.testing.assert_array_equal(c.eval_seconds[1:], c.seconds[c.eval_steps[1:] - 1])
  for acc in (c.valid_acc, c.train_eval_acc):
    assert np.all((acc >= 0) & (acc <= 1))


def test_same_seed_same_curves(trainer, task, adam_curves):
  again = trainer.train(Adam, 1e-2, task, seed=0)
  np.testing.assert_array_equal(again.train_loss, adam_curves.train_loss)
  np.testing.assert_array_equal(again.valid_loss, adam_curves.valid_loss)
  other = trainer.train(Adam, 1e-2, task, seed=1)
  assert not np.array_equal(other.train_loss, adam_curves.train_loss)


def test_learning_rate_changes_the_run(trainer, task, adam_curves):
  slow = trainer.train(Adam, tf.constant(1e-4), task, seed=0)
  # Same init and minibatches: the first loss is identical, then the runs separate.
  assert slow.train_loss[0] == adam_curves.train_loss[0]
  assert slow.train_loss[-20:].mean() > 2 * adam_curves.train_loss[-20:].mean()


def test_huge_learning_rate_diverges_without_exception(trainer, task):
  c = trainer.train(SGDMomentum, 1e8, task, seed=0)
  assert c.diverged is True
  n = c.steps_completed
  assert 0 < n < T
  # The step whose loss became non-finite is the last one run; the ones before were finite.
  assert not np.isfinite(c.train_loss[n - 1])
  assert np.all(np.isfinite(c.train_loss[:n - 1]))
  assert np.all(np.isnan(c.train_loss[n:]))
  assert np.all(np.isnan(c.seconds[n:]))
  assert np.isfinite(c.valid_loss[0])  # the step-0 evaluation ran before the blow-up
  assert np.all(np.isnan(c.valid_loss[c.eval_steps >= n]))
  assert c.train_loss.shape == (T,) and c.valid_loss.shape == (T // M + 1,)


def test_eval_every_not_dividing_num_steps(task):
  tr = InnerTrainer(ConvNet((8, 8, 1), 3, channels=(4,), strides=(2,)), num_steps=10,
                    batch_size=8, eval_every=4)
  c = tr.train(SGDMomentum, 0.1, task, seed=0)
  np.testing.assert_array_equal(c.eval_steps, [0, 4, 8])
  assert c.train_loss.shape == (10,) and c.valid_loss.shape == (3,)
  assert np.all(np.isfinite(c.valid_loss)) and c.steps_completed == 10


@pytest.mark.parametrize('field', ['num_steps', 'batch_size', 'eval_every'])
def test_non_positive_sizes(field):
  with pytest.raises(ValueError) as e:
    InnerTrainer(ConvNet((8, 8, 1), 3), **{field: 0})
  assert field in str(e.value)


def test_batch_indices_are_seeded_and_in_range():
  seed = tf.constant([1, 2], tf.int64)
  a = batch_indices(seed, 3, 64, 10).numpy()
  assert a.shape == (64,) and a.min() >= 0 and a.max() < 10
  np.testing.assert_array_equal(a, batch_indices(seed, 3, 64, 10).numpy())
  assert not np.array_equal(a, batch_indices(seed, 4, 64, 10).numpy())


class _NaNOnLastStep:
  """Optimizer family for tests: plain SGD whose update at step `last` makes params NaN.

  Every minibatch loss it sees is finite (a loss is computed before its step's update); only the
  parameters after the final update are non-finite.
  """

  def __init__(self, last):
    self.last = last

  def __call__(self, learning_rate):
    last = self.last

    class _Opt:

      def init(self, params):
        return tf.constant(0)

      def update(self, grads, t, params):
        bad = tf.where(t >= last, float('nan'), 0.0)
        return [p - learning_rate * g + bad for p, g in zip(params, grads)], t + 1

    return _Opt()


def test_non_finite_final_parameters_count_as_divergence(task):
  tr = InnerTrainer(ConvNet((8, 8, 1), 3, channels=(4,), strides=(2,)), num_steps=3,
                    batch_size=8, eval_every=1)
  c = tr.train(_NaNOnLastStep(last=2), 0.1, task, seed=0)
  assert np.all(np.isfinite(c.train_loss))  # the premise: every loss it computed was finite
  assert np.isnan(c.valid_loss[-1])  # the premise: the final parameters are NaN
  assert c.diverged, (c.diverged, c.steps_completed, c.valid_loss)

"""Shared fixtures: paths to ../shared data and small experiments."""

import os
import sys

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
OMNIGLOT = os.path.join(SHARED, 'data', 'omniglot')
MNIST_TEST = os.path.join(SHARED, 'data', 'mnist', 'mnist_test.npz')
sys.path.insert(0, REPO)


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

"""The gin configuration owner: a registry that cannot go stale, gin files found from anywhere."""

import glob
import os
import re

import gin
import pytest

from conftest import REPO
from lo_tf import config
from lo_tf.errors import UserError


def test_every_declared_configurable_is_registered():
  """Every `@gin.configurable` written in lo_tf (outside launch/) is in the derived registry."""
  declared = set()
  for path in glob.glob(os.path.join(REPO, 'lo_tf', '**', '*.py'), recursive=True):
    if os.sep + 'launch' + os.sep in path:
      continue
    text = open(path).read()
    declared |= set(re.findall(r'^@gin\.configurable(?:\([^@]*?\))?\n(?:class|def) (\w+)', text,
                               re.M | re.S))
  assert declared and declared == set(config.configurables())
  assert {'LearnedLearningRate', 'ToyStudy', 'GradientEstimator'} <= declared


def test_gin_files_are_found_from_another_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert config.find_gin_file('gin/quickstart.gin') == os.path.join(REPO, 'gin', 'quickstart.gin')
  gin.clear_config()
  try:
    config.parse_gin(['gin/studies/ablations/es.gin'], [])  # includes fig7_ablations.gin
    assert gin.query_parameter('GradientEstimator.mode') == 'es'
  finally:
    gin.clear_config()


def test_a_constructor_passed_argument_cannot_be_bound():
  for binding in ('OuterLearner.objective = "valid"', 'OuterTrainer.seed = 3',
                  'GradientEstimator.truncated_step = None'):
    with pytest.raises(UserError, match='bad gin configuration'):
      config.parse_gin([os.path.join(REPO, 'gin', 'quickstart.gin')], [binding])
    gin.clear_config()


@pytest.mark.parametrize('binding, message', [
    ('OuterTrainer.num_workers = 8', 'OuterTrainer.num_workers was renamed OuterTrainer.num_slots'),
    ("MergedEstimator.estimator = 'es'",
     'MergedEstimator.estimator was renamed GradientEstimator.mode'),
    ('MergedEstimator.sigma = 0.2', 'MergedEstimator.sigma was renamed GradientEstimator.sigma'),
    ('a/OuterTrainer.num_workers = 8', 'OuterTrainer.num_workers was renamed'),
    ('OuterTrainer.nope = 8', "doesn't have a parameter named 'nope'"),
    ('OuterTrainer.estimator = @MergedEstimator()',
     '@MergedEstimator() was renamed @GradientEstimator()'),
    ('OuterTrainer.estimator = @a/lo_tf.MergedEstimator',
     '@MergedEstimator was renamed @GradientEstimator;'),
    ('OuterTrainer.estimator = @Nope()', "No configurable matching reference '@Nope()'")])
def test_a_renamed_binding_is_refused_with_its_new_name(binding, message):
  try:
    with pytest.raises(UserError, match=re.escape(message)):
      config.parse_gin([os.path.join(REPO, 'gin', 'quickstart.gin')], [binding])
  finally:
    gin.clear_config()


@pytest.mark.parametrize('a, b, same', [
    ('[0.5, 0.9]', '(0.5, 0.9)', True), ('0.001', '1e-3', True), ("'digits'", "'digits'", True),
    ('@ConvNet', '@ConvNet', True), ('[0.5, 0.9]', '(0.5,)', False), ('True', '1', False),
    ('@ConvNet', '@MLP', False), ('None', '0', False), ('(unset)', '[0.5]', False)])
def test_configuration_values_are_compared_as_values(a, b, same):
  assert config.same_value(a, b) is same
  assert (config.config_differences({'X.y': a}, {'X.y': b}) == []) is same

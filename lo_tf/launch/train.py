"""`bin/train`: outer-trains a learned optimizer (paper §3, App. B)."""

import json
import os

import gin

from lo_tf import all_configurables  # pylint: disable=unused-import
from lo_tf import io_utils
from lo_tf.experiment import build_experiment
from lo_tf.launch import common
from lo_tf.outer_trainers import loop


def train_from_flags(gin_files, gin_bindings, train_dir, train_source=None, test_source=None,
                     seed=0):
  """Parses gin, builds the experiment and `OuterTrainer`, outer-trains, prints where things went.

  Nothing is written into train_dir before the configuration is built, the directory lock is held
  and a resumed run's configuration is checked.

  Raises:
    UserError: for bad gin configuration, sources, train_dir or checkpoints.
  """
  extra = []
  if train_source:
    extra.append(f'TaskDistribution.train_source = {train_source!r}')
  if test_source:
    extra.append(f'TaskDistribution.test_source = {test_source!r}')
  common.parse_gin(gin_files, gin_bindings, extra)
  trainer = common.build(lambda: loop.OuterTrainer(build_experiment(), train_dir, seed=seed))
  with io_utils.remove_created_dirs_on_error(train_dir):  # a refused run leaves no empty dir
    result = trainer.train(config_str=gin.config_str())
  if result is None:
    print(f'{train_dir} is already trained for {trainer.num_outer_steps} outer steps; raise '
          'OuterTrainer.num_outer_steps to train on')
    return None
  print(json.dumps(io_utils.json_safe(result), indent=2))
  print(f'throughput: {os.path.join(train_dir, loop.THROUGHPUT)}')
  print(f'outer-training curves: {os.path.join(train_dir, loop.OUTER_TRAINING_PNG)}')
  print(f'TensorBoard summaries: {os.path.join(train_dir, "summaries")} '
        f'(tensorboard --logdir {train_dir})')
  print(f'checkpoints: {train_dir}; best θ by outer-train meta-loss: '
        f'{os.path.join(train_dir, loop.BEST)}  (evaluate with bin/eval --checkpoint=...)')
  return result

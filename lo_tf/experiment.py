"""An experiment: task distribution + inner problem + inner-training settings, built from gin.

`build_experiment()` is what every binary calls after parsing gin files; the pieces are configured
through their own gin names (`TaskDistribution.*`, `ConvNet.*`/`MLP.*`, `InnerTrainer.*`).
"""

import dataclasses
import hashlib
import json

import gin

from lo_tf.inner_training import InnerTrainer
from lo_tf.optimizers.hand_designed import BASELINES
from lo_tf.tasks.distribution import TaskDistribution
from lo_tf.tasks.problems import ConvNet


@dataclasses.dataclass
class Experiment:
  """The task distribution, the inner problem built for its image shape and K, and the trainer."""
  tasks: TaskDistribution
  problem: object
  trainer: InnerTrainer

  def fingerprint(self):
    """Short hash of the settings that shape inner-training curves (for result caches).

    Covers the sources and split, the problem's architecture, the baselines' hyperparameters and
    the inner-training settings; the data itself is hashed per task by the evaluator.
    """
    desc = {
        'sources': [self.tasks.train_spec, self.tasks.test_spec],
        'tasks': [self.tasks.num_classes, self.tasks.image_shape, self.tasks.examples_per_class,
                  self.tasks.n_valid],
        'split': [self.tasks.classes(s).tolist() for s in self.tasks.splits],
        'problem': [type(self.problem).__name__, sorted(vars(self.problem).items())],
        # The baselines' gin-configured hyperparameters (β1, momentum, ...) shape their curves.
        'baselines': {name: sorted(vars(cls(1.0)).items()) for name, cls in BASELINES.items()},
        'trainer': [self.trainer.num_steps, self.trainer.batch_size, self.trainer.eval_every,
                    self.trainer.eval_max_examples],
    }
    return hashlib.sha1(json.dumps(desc, default=str).encode()).hexdigest()[:16]


@gin.configurable
def build_experiment(problem=ConvNet):
  """Builds the configured `Experiment`.

  Args:
    problem: inner problem class (`ConvNet` or `MLP`, gin: `build_experiment.problem = @MLP`),
      constructed with the task distribution's image shape and K.
  """
  tasks = TaskDistribution()
  prob = problem(input_shape=tasks.image_shape, num_classes=tasks.num_classes)
  return Experiment(tasks=tasks, problem=prob, trainer=InnerTrainer(prob))

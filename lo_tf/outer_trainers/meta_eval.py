"""Performance of θ over outer-training on fixed tasks (paper §4.3, Fig. 5b,c) and model selection.

The paper tracks the learned optimizer "averaged over 40 randomly sampled outer-train and outer-test
inner-problems" while it outer-trains, and "use[s] outer-training loss to select the best model".
`MetaEvaluator` inner-trains freshly initialized networks for T steps with the current θ on fixed
tasks of each split. The selection score is the outer objective on outer-valid tasks where the task
distribution has that split (classes outer-training never sees, so selection does not reward
memorizing outer-train classes), else on outer-train tasks. Outer-test tasks are reported only when
asked for, and never used to select.
"""

import numpy as np

from lo_tf.errors import check_int
from lo_tf.tasks.distribution import OUTER_TEST
from lo_tf.tasks.distribution import OUTER_TRAIN
from lo_tf.tasks.distribution import OUTER_VALID

# Task seeds of the meta-evaluation: far from the seeds workers draw (uniform over [0, 2^62)) only
# by chance, and disjoint from bin/eval's seeds 0, 1, ... by offset (on splits with few distinct
# tasks, seeds enumerate every task, so both see all of them).
SEED_OFFSET = 10**6
# Init seeds of the re-evaluations at `init_seed` > 0: past any task count.
INIT_SEED_STRIDE = 10**4


class MetaEvaluator:
  """Inner-trains with θ on `num_tasks` fixed tasks per split (task seeds SEED_OFFSET + i).

  Args:
    experiment: `lo_tf.experiment.Experiment` (its InnerTrainer sets T, batch size, eval points).
    family: the learned optimizer family (θ -> Optimizer).
    objective: 'train' or 'valid': the selection score is L_train (mean minibatch train loss over
      the T steps) or L_valid (mean inner-valid loss over the evaluation points).
    num_tasks: tasks per split (paper: 40; the headline issue asks for at least 20).
    outer_test: also report outer-test tasks (Fig. 5b,c plots them; a recipe that must not look
      at outer-test while it is being chosen turns this off).
  """

  def __init__(self, experiment, family, objective, num_tasks=20, outer_test=True):
    self.exp, self.family, self.objective = experiment, family, objective
    self.num_tasks = check_int('MetaEvaluator', 'num_tasks', num_tasks)
    splits = experiment.tasks.splits
    self.splits = tuple(s for s in splits if s != OUTER_TEST or outer_test)
    self.selection_split = OUTER_VALID if OUTER_VALID in splits else OUTER_TRAIN

  def __call__(self, theta, init_seed=0):
    """Returns {'<split>/mean_train_loss', '<split>/mean_valid_loss', '<split>/final_valid_loss'}
    (means over tasks; inf for a diverged run) and 'selection_score'.

    `init_seed` > 0 draws other initializations of the same tasks (task i starts from init seed
    i + INIT_SEED_STRIDE * init_seed): the spread of the score over them is the meta-evaluation's
    own noise."""
    out = {}
    for split in self.splits:
      rows = []
      for i in range(self.num_tasks):
        task = self.exp.tasks.sample_task(split, SEED_OFFSET + i)
        curves = self.exp.trainer.train(self.family, theta, task,
                                        seed=i + INIT_SEED_STRIDE * init_seed)
        if curves.diverged:
          rows.append((np.inf, np.inf, np.inf))
        else:
          rows.append((np.mean(curves.train_loss), np.mean(curves.valid_loss),
                       curves.valid_loss[-1]))
      means = np.mean(np.asarray(rows, np.float64), 0)
      for name, value in zip(('mean_train_loss', 'mean_valid_loss', 'final_valid_loss'), means):
        out[f'{split}/{name}'] = float(value)
    key = 'mean_train_loss' if self.objective == 'train' else 'mean_valid_loss'
    out['selection_score'] = out[f'{self.selection_split}/{key}']
    return out

"""Imports every module that registers gin configurables, so gin files can name them all."""

# pylint: disable=unused-import
from lo_tf import experiment
from lo_tf import inner_training
from lo_tf.data import sources
from lo_tf.learned_optimizers import hyperparameters
from lo_tf.learned_optimizers import mlp_lopt
from lo_tf.optimizers import hand_designed
from lo_tf.tasks import distribution
from lo_tf.tasks import problems
from lo_tf.outer_trainers import curriculum
from lo_tf.outer_trainers import distributed
from lo_tf.outer_trainers import estimators
from lo_tf.outer_trainers import learner
from lo_tf.outer_trainers import loop
from lo_tf.outer_trainers import theta_init
from lo_tf.outer_trainers import truncated_step

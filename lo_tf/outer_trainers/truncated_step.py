"""Slots' inner problems and their truncated unrolls (paper §2.2, App. B, Algorithm 1).

A *slot* holds one inner problem carried across outer steps (what each of Algorithm 1's workers
carries): a task sampled from the outer-train distribution, its inner weights w and the learned
optimizer's state, and the inner step t it has reached. All S slots live in one `SlotState` of
[S, ...] tensors. `TruncatedStep` (learned_optimization's `TruncatedStep`: initial state, unroll,
meta-loss) resets slots in the graph (a new task and fresh weights once t reaches T, or after a
non-finite sample) and unrolls M
trajectories for k inner steps from such states, returning each trajectory's truncation outer loss:

  L_train = mean over the k new iterates w_{t+1..t+k} of ℓ(x; w) on inner-train minibatches,
  L_valid = the same on inner-valid minibatches (Fig. 2),

each averaged over `meta_loss_batches` minibatches per iterate (5 in the authors' code,
`common_trainer.py`; 0 reuses the next inner step's train minibatch, L_train only). Losses are
clipped at `loss_clip` (10 in the authors' `base_arch.py`).

Everything runs in TensorFlow: task images are gathered in the graph from the uint8 pixels of the
task distribution, minibatches are drawn in the graph, and lengths may differ per trajectory (a
trajectory past its own k is masked), so one traced graph serves every outer step.
"""

import collections

import gin
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.inner_training import inner_step
from lo_tf.tasks.distribution import OUTER_TRAIN

OBJECTIVES = ('train', 'valid')

SlotState = collections.namedtuple(
    'SlotState', ['params', 'opt_state', 'inner_step', 'task_seed', 'train_idx', 'valid_idx'])
SlotState.__doc__ = """Every slot's inner problem, as tensors with a leading axis of S slots.

Fields:
  params: list of float32 [S, *shape], the inner weights w (the problem's shapes).
  opt_state: the inner optimizer's state nest, each leaf [S, ...].
  inner_step: int32 [S], inner steps taken on the current task (t).
  task_seed: int64 [S], the task's seed (`TaskDistribution.task_indices`); -1 asks for a new task.
  train_idx: int32 [S, K * n_train], the task's inner-train images (indices into the pixels).
  valid_idx: int32 [S, K * n_valid], its inner-valid images.
"""


def tile_state(state, times):
  """Repeats every leaf of a nest `times` times along axis 0 ([S, ...] -> [times * S, ...])."""
  return tf.nest.map_structure(lambda x: tf.tile(x, [times] + [1] * (x.shape.rank - 1)), state)


def select(mask, new, old):
  """Per-trajectory choice between two nests of [M, ...] tensors by a bool [M] mask."""
  def pick(a, b):
    m = tf.reshape(mask, [-1] + [1] * (a.shape.rank - 1))
    return tf.where(m, a, b)
  return tf.nest.map_structure(pick, new, old)


@gin.configurable(denylist=['tasks', 'problem', 'family', 'num_inner_steps', 'batch_size'])
class TruncatedStep:
  """Resets and truncated unrolls of the slots' inner problems for a learned-optimizer family.

  Args:
    tasks: `lo_tf.tasks.distribution.TaskDistribution`; slots train on its outer-train split.
    problem: `lo_tf.tasks.problems.Problem` built for the tasks' image shape and K.
    family: a `lo_tf.learned_optimizers.base.LearnedOptimizerFamily` (e.g. `MLPLOpt`).
    num_inner_steps: T, the length of a slot's inner training before it starts a new task.
    batch_size: inner minibatch size.
    objective: 'train' (L_train) or 'valid' (L_valid); the one check of the run's objective.
    meta_loss_batches: minibatches the outer loss is averaged over at each new iterate (the
      authors' code: 5, `common_trainer.py`; 0: reuse the next step's inner-train minibatch, which
      costs no extra forward pass; L_train only).
    loss_clip: clip inner and outer losses at this value (None: no clipping).

  Raises:
    UserError: for an unknown objective or inconsistent settings.
  """

  def __init__(self, tasks, problem, family, num_inner_steps, batch_size, objective='train',
               meta_loss_batches=5, loss_clip=10.0):
    if objective not in OBJECTIVES:
      raise UserError(f'TruncatedStep.objective={objective!r}; use "train" or "valid"')
    check_int('TruncatedStep', 'meta_loss_batches', meta_loss_batches, minimum=0)
    if meta_loss_batches == 0 and objective != 'train':
      raise UserError('meta_loss_batches=0 reuses inner-train minibatches, which only L_train '
                      'can; use meta_loss_batches >= 1 for objective="valid"')
    self.tasks, self.problem, self.family = tasks, problem, family
    self.num_inner_steps = check_int('TruncatedStep', 'num_inner_steps', num_inner_steps)
    self.batch_size = check_int('TruncatedStep', 'batch_size', batch_size)
    self.objective, self.meta_loss_batches = objective, int(meta_loss_batches)
    self.loss_clip = loss_clip

  def init_slot_state(self, num_slots):
    """A `SlotState` of `num_slots` slots that all ask for a new task (task_seed = -1)."""
    params = [tf.zeros([num_slots, *shape]) for shape, _, _ in self.problem.param_shapes()]
    theta = tf.zeros([num_slots, self.family.num_meta_params])
    opt_state = self.family.batched_optimizer(theta).init(params)
    n_train = self.tasks.num_classes * self.tasks.n_train
    n_valid = self.tasks.num_classes * self.tasks.n_valid
    return SlotState(params=params, opt_state=opt_state,
                     inner_step=tf.zeros([num_slots], tf.int32),
                     task_seed=-tf.ones([num_slots], tf.int64),
                     train_idx=tf.zeros([num_slots, n_train], tf.int32),
                     valid_idx=tf.zeros([num_slots, n_valid], tf.int32))

  def reset(self, state, seed):
    """Starts a new task with fresh weights for every slot that has reached T or asks for one.

    Args:
      state: `SlotState` of S slots.
      seed: int64 [2] stateless seed; the new task seeds and initializations derive from it.

    Returns:
      (new `SlotState`, bool [S] which slots were reset).
    """
    s = state.inner_step.shape[0]
    done = tf.logical_or(state.task_seed < 0, state.inner_step >= self.num_inner_steps)
    new_seeds = tf.random.stateless_uniform([s], seed, 0, 2**62, tf.int64)
    task_seed = tf.where(done, new_seeds, state.task_seed)
    tasks = tf.map_fn(lambda ts: self.tasks.task_indices(OUTER_TRAIN, ts)[:2], task_seed,
                      fn_output_signature=(tf.int32, tf.int32))
    fresh = tf.map_fn(lambda ts: self.problem.init(tf.stack([ts, tf.constant(1, tf.int64)])),
                      task_seed, fn_output_signature=[tf.float32] * len(state.params))
    theta = tf.zeros([s, self.family.num_meta_params])
    fresh_opt = self.family.batched_optimizer(theta).init(fresh)
    new = SlotState(params=fresh, opt_state=fresh_opt, inner_step=tf.zeros_like(state.inner_step),
                    task_seed=task_seed, train_idx=tasks[0], valid_idx=tasks[1])
    return select(done, new, state), done

  def minibatches(self, idx, seed, n_per_class, count):
    """`count` minibatches per trajectory from its image indices idx int32 [M, n].

    Returns:
      (x float32 [count, M, B, *image_shape], y int32 [count, M, B]); the draws follow `seed`.
    """
    pos = tf.random.stateless_uniform([count, idx.shape[0], self.batch_size], seed, 0,
                                      idx.shape[1], tf.int32)
    chosen = tf.gather(idx, tf.transpose(pos, [1, 0, 2]), batch_dims=1)  # [M, count, B]
    x = self.tasks.images(tf.transpose(chosen, [1, 0, 2]))
    return x, pos // n_per_class

  def unroll(self, thetas, state, lengths, seed, pairs=1):
    """Unrolls M trajectories for their own number of inner steps (App. B).

    Trajectory m runs `lengths[m]` steps of u(·; thetas[m]) from its state; the `pairs` copies of
    a slot (M = pairs * S, copy-major: trajectory j * S + s is slot s) see the same minibatches,
    as antithetic samples must.

    Args:
      thetas: float32 [M, P].
      state: `SlotState` with M entries (see `tile_state`).
      lengths: int32 [M], k per trajectory, each in [0, T - inner_step].
      seed: int64 [2], seeds the minibatches.
      pairs: copies per slot.

    Returns:
      (outer loss float32 [M] (the truncation's L, 0 for k = 0), end `SlotState`, mean inner train
      loss float32 [M] over the truncation).
    """
    opt = self.family.batched_optimizer(thetas)
    m_count = lengths.shape[0]  # static: the trajectories are traced one by one (`batched_loss`)
    slots = m_count // pairs
    clip = self.loss_clip
    num_meta = self.meta_loss_batches
    n_tr, n_va = self.tasks.n_train, self.tasks.n_valid
    max_len = tf.reduce_max(lengths)

    def draw(idx, step_seed, n_per_class, count):
      x, y = self.minibatches(idx[:slots], step_seed, n_per_class, count)
      tile = lambda a: tf.tile(a, [1, pairs] + [1] * (a.shape.rank - 2))
      return tile(x), tile(y)

    def loss_fn(params, x, y):
      return self.problem.batched_loss(params, x, y, clip=clip)

    def meta_loss(params, i):
      if num_meta == 0:
        x, y = draw(state.train_idx, tf.random.experimental.stateless_fold_in(seed, 2 * i), n_tr, 1)
        return loss_fn(params, x[0], y[0])
      idx, n = (state.train_idx, n_tr) if self.objective == 'train' else (state.valid_idx, n_va)
      x, y = draw(idx, tf.random.experimental.stateless_fold_in(seed, 2 * i + 1), n, num_meta)
      return tf.add_n([loss_fn(params, x[j], y[j]) for j in range(num_meta)]) / num_meta

    def body(i, params, opt_state, total, train_total):
      x, y = draw(state.train_idx, tf.random.experimental.stateless_fold_in(seed, 2 * i), n_tr, 1)
      loss, new_params, new_opt = inner_step(loss_fn, opt, params, opt_state, x[0], y[0])
      active = i < lengths
      params, opt_state = select(active, (new_params, new_opt), (params, opt_state))
      # With meta_loss_batches = 0 the meta-loss of iterate i is the loss at step i + 1's batch.
      meta = meta_loss(params, i + 1 if num_meta == 0 else i)
      zero = tf.zeros_like(total)
      return (i + 1, params, opt_state, total + tf.where(active, meta, zero),
              train_total + tf.where(active, loss, zero))

    zeros = tf.zeros([m_count])
    _, params, opt_state, total, train_total = tf.while_loop(
        lambda i, *_: i < max_len, body, (tf.constant(0), state.params, state.opt_state, zeros,
                                          zeros),
        parallel_iterations=1)
    k = tf.maximum(tf.cast(lengths, tf.float32), 1.0)
    end = state._replace(params=params, opt_state=opt_state,
                         inner_step=state.inner_step + lengths)
    return total / k, end, train_total / k

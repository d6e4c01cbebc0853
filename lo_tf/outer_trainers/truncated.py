"""Truncated unrolls of inner training and the antithetic RP/ES sample (paper §2.2, §3, App. B).

`TruncatedStep` builds one `tf.function` that, from a carried inner state, unrolls k inner steps of
the optimizer at θ + e and at θ - e (same start, same batches), forms the truncation's outer losses
L⁺ and L⁻, backpropagates ½(L⁺ + L⁻) to θ through both unrolls (second order through the inner
gradients), and returns both estimator samples with the + trajectory's end state. Lengths, seeds and
positions are tensors, so nothing retraces across outer steps.

Outer objectives (Fig. 2): over a truncation from inner step t0 to t0 + k,
L_train = mean over t in (t0, t0 + k] of ℓ(x_t; w_t) on inner-train minibatches, and L_valid the
same on inner-valid minibatches.
"""

import tensorflow as tf

from lo_tf.inner_training import batch_indices

OBJECTIVES = ('train', 'valid')


class TruncatedStep:
  """Antithetic truncation samples for a problem and an optimizer family.

  The inner state is (params, opt_state): the inner weights (list of float32 tensors, the
  problem's shapes) and the optimizer state nest that `family(theta).init(params)` builds.

  Args:
    problem: `lo_tf.tasks.problems.Problem`.
    family: callable θ (float32 [P]) -> `Optimizer`, e.g. `MLPLOpt().optimizer`.
    batch_size: inner minibatch size.
    objective: 'train' (L_train) or 'valid' (L_valid).
    sigma: standard deviation of the perturbation e (paper: σ² = 0.01, σ = 0.1).
    with_rp: backpropagate for g_rp (False for the ES-only ablation, which skips the backward).
    max_length: the longest truncation (inner steps) that will be asked for.
    jit_compile: compile the whole sample (both unrolls and the backward pass) with XLA; this
      removes the per-op overhead that dominates small inner problems. XLA needs `max_length` to
      bound the unroll loops, and `family` must then not hold XLA-compiled functions itself.

  Raises:
    ValueError: for an unknown objective, or jit_compile without max_length.
  """

  def __init__(self, problem, family, batch_size, objective='train', sigma=0.1, with_rp=True,
               max_length=None, jit_compile=False):
    if objective not in OBJECTIVES:
      raise ValueError(f'unknown objective {objective!r}; choose one of {OBJECTIVES}')
    if jit_compile and not max_length:
      raise ValueError('TruncatedStep(jit_compile=True) needs max_length')
    self.problem, self.family, self.batch_size = problem, family, int(batch_size)
    self.objective, self.sigma, self.with_rp = objective, float(sigma), with_rp
    self.max_length = max_length
    self.sample = tf.function(self._sample, jit_compile=jit_compile)

  def unroll(self, theta, params, opt_state, data, t0, length, seed):
    """k = `length` inner steps from (params, opt_state) with the optimizer at `theta`.

    Args:
      theta: float32 [P].
      params: list of float32 tensors, the inner weights at inner step t0.
      opt_state: the optimizer state nest at t0.
      data: (x_train, y_train, x_valid, y_valid) task tensors.
      t0: int32 scalar, inner step the truncation starts at (indexes the minibatches).
      length: int32 scalar k >= 1.
      seed: int64 [2], the task's minibatch seed.

    Returns:
      (outer loss L float32 scalar, end params, end opt_state, last inner train loss,
      mean |Δw| per step).
    """
    problem, bs = self.problem, self.batch_size
    x_tr, y_tr, x_va, y_va = data
    n_tr, n_va = tf.shape(x_tr)[0], tf.shape(x_va)[0]
    valid_seed = tf.random.experimental.stateless_fold_in(seed, 7)
    opt = self.family(theta)
    params0 = params

    def batch(x, y, idx):
      # The data is constant: stopping gradients inside the loop body keeps the backward pass from
      # scattering a gradient into the whole image tensor at every inner step.
      return tf.stop_gradient(tf.gather(x, idx)), tf.gather(y, idx)

    def train_loss(params, step):
      return problem.loss(params, *batch(x_tr, y_tr, batch_indices(seed, step, bs, n_tr)))

    def body(i, params, opt_state, total, last):
      with tf.GradientTape() as tape:
        tape.watch(params)
        loss = train_loss(params, t0 + i)
      grads = tape.gradient(loss, params)
      if self.objective == 'train':
        # ℓ(x_t; w_t) at the truncation's first step does not depend on this θ: skip it.
        total += tf.where(i > 0, loss, 0.0)
      params, opt_state = opt.update(grads, opt_state, params)
      if self.objective == 'valid':
        total += problem.loss(params,
                              *batch(x_va, y_va, batch_indices(valid_seed, t0 + i, bs, n_va)))
      return i + 1, params, opt_state, total, loss

    _, params, opt_state, total, last = tf.while_loop(
        lambda i, *_: i < length, body,
        (tf.constant(0), params, opt_state, tf.constant(0.0), tf.constant(0.0)),
        parallel_iterations=1, maximum_iterations=self.max_length)
    if self.objective == 'train':
      last = train_loss(params, t0 + length)
      total += last
    size = sum(tf.size(p, tf.float32) for p in params)
    moved = tf.add_n([tf.reduce_sum(tf.abs(p - q)) for p, q in zip(params, params0)])
    k = tf.cast(length, tf.float32)
    return total / k, params, opt_state, last, moved / size / k

  def _sample(self, theta, params, opt_state, x_tr, y_tr, x_va, y_va, t0, length, seed,
              noise_seed):
    """One antithetic sample (App. B); arguments as in `unroll`, noise_seed int64 [2].

    Returns:
      dict: loss_pos, loss_neg (float32 scalars), g_rp, g_es (float32 [P]), the + trajectory's end
      state (params, opt_state), last_loss, mean_step.
    """
    noise = self.sigma * tf.random.stateless_normal(tf.shape(theta), noise_seed)
    data = (x_tr, y_tr, x_va, y_va)
    with tf.GradientTape() as tape:
      tape.watch(theta)
      loss_pos, params_pos, state_pos, last, mean_step = self.unroll(
          theta + noise, params, opt_state, data, t0, length, seed)
      loss_neg = self.unroll(theta - noise, params, opt_state, data, t0, length, seed)[0]
      mean_loss = 0.5 * (loss_pos + loss_neg)
    g_rp = tape.gradient(mean_loss, theta) if self.with_rp else tf.zeros_like(theta)
    g_es = 0.5 * (loss_pos - loss_neg) * noise / self.sigma**2
    return {'loss_pos': loss_pos, 'loss_neg': loss_neg, 'g_rp': g_rp, 'g_es': g_es,
            'state': (params_pos, state_pos), 'last_loss': last, 'mean_step': mean_step}

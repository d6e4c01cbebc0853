"""Figure 3d,e: slices of L_train(θ) around a learned optimizer's θ, several unroll lengths (§2.3).

For one fixed task and initialization of the configured inner problem (gin/studies/
fig3_landscape.gin: an MLP), L_k(θ) is the truncation outer loss L_train of k inner steps of the
learned optimizer u(·; θ) from the fresh weights, every θ seeing the same minibatches
(`TruncatedStep.unroll` with all trajectories as copies of one worker), so L_k is a deterministic
function of θ. Around θ0 (`--checkpoint`, or θ at initialization without one) the study evaluates

* Fig. 3d: L_k(θ0 + α ĝ_k), ĝ_k = ∇L_k(θ0) / ‖∇L_k(θ0)‖, for α in [−radius, radius];
* Fig. 3e: L_k(θ0 + α ĝ_k + β r̂_k) on a grid, r̂_k a random direction orthogonal to ĝ_k.

The paper's observation: the slices are smooth for short unrolls and grow high-frequency,
near-discontinuous structure as k grows. `roughness` (mean |second difference| of the 1D slice
over its range) condenses that into one number per k.
"""

import gin
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.errors import check_number
from lo_tf.experiment import build_experiment
from lo_tf.io_utils import array_digest
from lo_tf.outer_trainers.truncated_step import TruncatedStep
from lo_tf.outer_trainers.truncated_step import tile_state
from lo_tf.studies import base


def roughness(values):
  """Mean |second difference| of a 1D slice divided by its range (0 for a straight line).

  Args:
    values: float [n >= 3] losses at evenly spaced points.

  Returns:
    float; NaN when the slice holds non-finite values or is constant.
  """
  v = np.asarray(values, np.float64)
  spread = np.ptp(v) if np.all(np.isfinite(v)) else np.nan
  if not spread > 0:
    return float('nan')
  return float(np.mean(np.abs(np.diff(v, 2))) / spread)


@gin.configurable
class LandscapeStudy(base.Study):
  """Fig. 3d,e (see the module docstring).

  Args:
    unroll_lengths: the k's (inner steps per unroll).
    radius: half-width of the slices in θ units (‖θ0‖ of a trained optimizer is ~10).
    num_points_1d: points of each 1D slice.
    num_points_2d: points per side of each 2D slice.
    chunk: θ's unrolled at once (memory: chunk × inner weights × 31 features floats).
    task_seed: the task and initialization.
    seed: the minibatches and the random direction.

  Raises:
    UserError: for out-of-range settings.
  """

  name = 'fig3_landscape'
  accepts = ('checkpoint',)
  schema = {'theta': str, 'theta_norm': float, 'radius': float, 'unroll_lengths': [int],
            'alphas_1d': [float], 'alphas_2d': [float],
            'slices': [{'length': int, 'gradient_norm': float, 'loss_at_theta': float,
                        'loss_1d': [float], 'loss_2d': [[float]], 'roughness_1d': float}],
            'summary': dict}

  def __init__(self, unroll_lengths=(10, 100, 300), radius=2.0, num_points_1d=41,
               num_points_2d=15, chunk=64, task_seed=0, seed=0):
    if not unroll_lengths:
      raise UserError('LandscapeStudy.unroll_lengths is empty; give at least one k')
    self.lengths = sorted(check_int('LandscapeStudy', 'unroll_lengths', k)
                          for k in unroll_lengths)
    self.radius = check_number('LandscapeStudy', 'radius', radius, 0.0, low_open=True)
    self.n1 = check_int('LandscapeStudy', 'num_points_1d', num_points_1d, minimum=3)
    self.n2 = check_int('LandscapeStudy', 'num_points_2d', num_points_2d, minimum=2)
    self.chunk = check_int('LandscapeStudy', 'chunk', chunk)
    self.task_seed = check_int('LandscapeStudy', 'task_seed', task_seed, minimum=0)
    self.seed = check_int('LandscapeStudy', 'seed', seed, minimum=0)
    self.experiment = build_experiment()

  def compute(self, output_dir, options, parts):
    del output_dir
    label, family, theta0 = base.load_theta(options.checkpoint)
    theta0 = tf.convert_to_tensor(theta0, tf.float32)
    trainer = self.experiment.trainer
    step = TruncatedStep(self.experiment.tasks, self.experiment.problem, family,
                         self.lengths[-1], trainer.batch_size)
    state, _ = step.reset(step.init_slot_state(1), tf.constant([self.task_seed, 0], tf.int64))
    seed = tf.constant([self.seed, 1], tf.int64)

    @tf.function
    def losses(thetas, length):
      m = thetas.shape[0]
      return step.unroll(thetas, tile_state(state, m), tf.fill([m], length), seed, pairs=m)[0]

    @tf.function
    def gradient(theta, length):
      with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = step.unroll(theta[None], state, length[None], seed)[0][0]
      return loss, tape.gradient(loss, theta)

    def evaluate(thetas, length):
      out = []
      for start in range(0, len(thetas), self.chunk):
        part = thetas[start:start + self.chunk]
        padded = np.concatenate([part, np.repeat(part[-1:], self.chunk - len(part), 0)])
        out.append(losses(tf.constant(padded, tf.float32), tf.constant(length)).numpy()[
            :len(part)])
      return np.concatenate(out)

    alphas_1d = np.linspace(-self.radius, self.radius, self.n1)
    alphas_2d = np.linspace(-self.radius, self.radius, self.n2)
    rng = np.random.default_rng(self.seed)
    random = rng.normal(size=theta0.shape[0])
    key = dict(theta=array_digest(theta0), lopt=family.config(), radius=self.radius,
               n1=self.n1, n2=self.n2, task_seed=self.task_seed, seed=self.seed,
               fingerprint=self.experiment.fingerprint())
    slices = []
    bar = base.progress(len(self.lengths), 'fig3 landscape slices')
    th = theta0.numpy().astype(np.float64)
    for k in self.lengths:

      def compute_slice(k=k):
        loss0, g = gradient(theta0, tf.constant(k))
        g = g.numpy().astype(np.float64)
        norm = float(np.linalg.norm(g))
        if not norm > 0:
          raise UserError(f'∇L_{k}(θ) is zero or non-finite at this θ; use another checkpoint')
        d = g / norm
        r = random - np.dot(random, d) * d
        r /= np.linalg.norm(r)
        line = evaluate(th + alphas_1d[:, None] * d, k)
        a, b = np.meshgrid(alphas_2d, alphas_2d, indexing='ij')
        plane = evaluate(th + a.reshape(-1, 1) * d + b.reshape(-1, 1) * r, k)
        return {'length': k, 'gradient_norm': norm, 'loss_at_theta': float(loss0),
                'loss_1d': line.tolist(), 'loss_2d': plane.reshape(self.n2, self.n2).tolist(),
                'roughness_1d': roughness(line)}

      slices.append(parts.get('slice', dict(key, k=k), compute_slice))
      bar.update(1)
    bar.close()
    summary = {'roughness_1d': {str(s['length']): s['roughness_1d'] for s in slices},
               'theta': label}
    results = {'theta': label, 'theta_norm': float(np.linalg.norm(th)), 'radius': self.radius,
               'unroll_lengths': self.lengths, 'alphas_1d': alphas_1d.tolist(),
               'alphas_2d': alphas_2d.tolist(), 'slices': slices, 'summary': summary}
    return results, {self.name: self._figure(results)}

  def _figure(self, r):
    n = len(r['slices'])
    fig, axes = plt.subplots(1, n + 1, figsize=(4.3 * (n + 1), 4))
    colors = plt.cm.plasma(np.linspace(0.0, 0.8, n))
    ax = axes[0]
    for s, color in zip(r['slices'], colors):
      ax.plot(r['alphas_1d'], s['loss_1d'], color=color, marker='.', ms=3,
              label=f'k = {s["length"]} (roughness {s["roughness_1d"]:.2g})')
    ax.set(xlabel='α along ∇L_k(θ0)/‖∇L_k(θ0)‖', ylabel='L_train(θ0 + α ĝ)', yscale='log',
           title='(d) 1D slices along the outer-gradient')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    extent = [-r['radius'], r['radius'], -r['radius'], r['radius']]
    for ax, s in zip(axes[1:], r['slices']):
      image = ax.imshow(np.log(base.floats(s['loss_2d'])).T, origin='lower', extent=extent,
                        cmap='viridis', aspect='auto')
      fig.colorbar(image, ax=ax, label='log L_train')
      ax.plot([0], [0], marker='+', color='w', ms=10)
      ax.set(xlabel='α (gradient direction)', ylabel='β (random direction)',
             title=f'(e) k = {s["length"]} inner steps')
    fig.suptitle(f'L_train slices around {r["theta"]}, ‖θ0‖ = {r["theta_norm"]:.3g}',
                 fontsize=10)
    fig.tight_layout()
    return fig

"""Figure 3a-c: a toy loss whose outer landscape over the momentum turns near-discontinuous (§2.3).

Inner problem ℓ(w) = (w − 4)(w − 3)w² from w0 = −1.2, trained by SGD+momentum (heavy ball,
`lo_tf.optimizers.hand_designed.SGDMomentum`) whose momentum is the meta-parameter θ. ℓ as written
has its local minimum at w = 0 (ℓ = 0), a maximum at w = (21 − √57)/8 ≈ 1.68 and its global
minimum at w = (21 + √57)/8 ≈ 3.569 (ℓ ≈ −3.12); the paper's caption puts the global minimum at
"w ≈ .5", which does not hold for ℓ as written (it must refer to other units): this study
reproduces ℓ as written.

The paper gives no learning rate. At 0.02 (the default) the two basins show as the paper describes
them: momenta below ~0.68 stop in the local minimum, ~0.68-0.91 cross the maximum into the global
one, and larger momenta oscillate before settling in either, so ℓ(w(T)) as a function of the
momentum is smooth for small T and has near-jumps between the basins for large T.
"""

import math

import gin
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.errors import check_int
from lo_tf.errors import check_number
from lo_tf.inner_training import inner_step
from lo_tf.optimizers.hand_designed import SGDMomentum
from lo_tf.studies import base

W0 = -1.2
LOCAL_MINIMUM = 0.0
GLOBAL_MINIMUM = (21.0 + math.sqrt(57.0)) / 8.0  # roots of ℓ'(w) = w(4w² − 21w + 24)


def toy_loss(w):
  """ℓ(w) = (w − 4)(w − 3)w², elementwise (float32 tensor in, same shape out)."""
  return (w - 4.0) * (w - 3.0) * tf.square(w)


@tf.function
def _run(momenta, learning_rate, w0, num_steps):
  opt = SGDMomentum(learning_rate, momentum=momenta)
  params = [tf.fill(tf.shape(momenta), w0)]
  state = opt.init(params)
  ws = tf.TensorArray(tf.float32, size=num_steps + 1).write(0, params[0])

  def body(i, params, state, ws):
    _, params, state = inner_step(lambda p: toy_loss(p[0]), opt, params, state)
    return i + 1, params, state, ws.write(i + 1, params[0])

  _, _, _, ws = tf.while_loop(lambda i, *_: i < num_steps, body,
                              (tf.constant(0), params, state, ws))
  return ws.stack()


def trajectories(momenta, learning_rate, num_steps, w0=W0):
  """w(t), t = 0..T, of SGD+momentum on ℓ from w0, one trajectory per momentum.

  Args:
    momenta: float [M], the momentum of each trajectory (θ).
    learning_rate: SGD's learning rate.
    num_steps: T.
    w0: the initial iterate.

  Returns:
    float32 [M, T + 1] (a diverged trajectory holds inf/NaN from its divergence on).
  """
  ws = _run(tf.constant(momenta, tf.float32), tf.constant(learning_rate, tf.float32),
            tf.constant(w0, tf.float32), tf.constant(int(num_steps)))
  return ws.numpy().T


@gin.configurable
class ToyStudy(base.Study):
  """Fig. 3a-c (see the module docstring).

  Args:
    learning_rate: SGD's learning rate (not given in the paper; 0.02 shows the two basins).
    trajectory_momenta: the momenta whose w(t) Fig. 3b draws.
    num_momenta: momenta, evenly spaced in [0, max_momentum], of Fig. 3c.
    max_momentum: the largest momentum of Fig. 3c.
    horizons: the T's of Fig. 3c (the largest is also Fig. 3b's length).

  Raises:
    UserError: for out-of-range sizes.
  """

  name = 'fig3_toy'
  schema = {'learning_rate': float, 'w0': float,
            'minima': {'local': float, 'global': float, 'loss_local': float,
                       'loss_global': float},
            'trajectories': {'momenta': [float], 'w': [[float]]},
            'final_loss': {'momenta': [float], 'horizons': [int], 'loss': [[float]],
                           'basin': [[str]]},
            'global_momentum_range': [{'horizon': int, 'low': float, 'high': float}],
            'summary': dict}

  def __init__(self, learning_rate=0.02, trajectory_momenta=(0.0, 0.5, 0.7, 0.8, 0.9, 0.95),
               num_momenta=400, max_momentum=0.99, horizons=(10, 30, 100, 300, 1000)):
    self.learning_rate = check_number('ToyStudy', 'learning_rate', learning_rate, 0.0,
                                      low_open=True)
    self.trajectory_momenta = [check_number('ToyStudy', 'trajectory_momenta', m, 0.0, 1.0,
                                            high_open=True) for m in trajectory_momenta]
    self.num_momenta = check_int('ToyStudy', 'num_momenta', num_momenta, minimum=2)
    self.max_momentum = check_number('ToyStudy', 'max_momentum', max_momentum, 0.0, 1.0,
                                     low_open=True, high_open=True)
    if not horizons:
      raise UserError('ToyStudy.horizons is empty; give at least one T')
    self.horizons = sorted(check_int('ToyStudy', 'horizons', t) for t in horizons)

  def compute(self, output_dir, options, parts):
    del output_dir, options, parts  # seconds of compute: nothing worth caching
    t_max = self.horizons[-1]
    traj = trajectories(self.trajectory_momenta, self.learning_rate, t_max)
    momenta = np.linspace(0.0, self.max_momentum, self.num_momenta)
    ws = trajectories(momenta, self.learning_rate, t_max)
    finals = ws[:, self.horizons]  # [num_momenta, len(horizons)]
    loss = toy_loss(tf.constant(finals)).numpy().T
    basin = [[basin_of(w) for w in row] for row in finals.T]
    ranges = []
    for t, row in zip(self.horizons, basin):
      hit = momenta[np.array(row) == 'global']
      ranges.append({'horizon': t, 'low': float(hit.min()) if hit.size else None,
                     'high': float(hit.max()) if hit.size else None})
    minima = {'local': LOCAL_MINIMUM, 'global': GLOBAL_MINIMUM,
              'loss_local': float(toy_loss(tf.constant(LOCAL_MINIMUM))),
              'loss_global': float(toy_loss(tf.constant(GLOBAL_MINIMUM)))}
    results = {'learning_rate': self.learning_rate, 'w0': W0, 'minima': minima,
               'trajectories': {'momenta': self.trajectory_momenta, 'w': traj.tolist()},
               'final_loss': {'momenta': momenta.tolist(), 'horizons': self.horizons,
                              'loss': loss.tolist(), 'basin': basin},
               'global_momentum_range': ranges,
               'summary': {'learning_rate': self.learning_rate, 'global_minimum': GLOBAL_MINIMUM,
                           'momenta_ending_in_global_minimum': ranges}}
    return results, {self.name: self._figure(traj, momenta, loss, minima)}

  def _figure(self, traj, momenta, loss, minima):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    w = np.linspace(-1.5, 4.5, 400)
    ax.plot(w, toy_loss(tf.constant(w)).numpy(), color='k')
    ax.plot([W0], [float(toy_loss(tf.constant(W0)))], marker='*', ms=14, color='tab:red',
            label=f'w0 = {W0}')
    for key, marker in (('local', 'o'), ('global', 's')):
      ax.plot([minima[key]], [minima['loss_' + key]], marker=marker, color='tab:blue', ls='',
              label=f'{key} minimum w = {minima[key]:.3f}')
    ax.set_ylim(-6, 35)
    ax.set(xlabel='w', ylabel='ℓ(w)', title='(a) ℓ(w) = (w−4)(w−3)w²')
    ax.legend(fontsize=8)
    ax = axes[1]
    colors = plt.cm.viridis_r(np.linspace(0.0, 1.0, len(self.trajectory_momenta)))
    steps = np.arange(traj.shape[1])
    for m, row, color in zip(self.trajectory_momenta, traj, colors):
      ax.plot(steps, row, color=color, label=f'momentum {m:g}')
    for key in ('local', 'global'):
      ax.axhline(minima[key], color='gray', ls=':', lw=0.8)
    ax.set_xscale('symlog', linthresh=10)
    ax.set_xlim(0, steps[-1])
    ax.set_ylim(-2, 6)
    ax.set(xlabel='inner steps T', ylabel='w(T)',
           title=f'(b) w(T) of SGD+momentum, lr {self.learning_rate:g}')
    ax.legend(fontsize=8)
    ax = axes[2]
    colors = plt.cm.plasma(np.linspace(0.0, 0.85, len(self.horizons)))
    for t, row, color in zip(self.horizons, loss, colors):
      ax.plot(momenta, row, color=color, lw=1, label=f'T = {t}')
    ax.set_ylim(-4, 10)
    ax.set(xlabel='momentum θ', ylabel='ℓ(w(T))', title='(c) final loss vs momentum')
    ax.legend(fontsize=8)
    for ax in axes:
      ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def basin_of(w, tolerance=0.05):
  """'local', 'global', 'diverged' or 'between' for an iterate w."""
  if not np.isfinite(w) or abs(w) > 1e3:
    return 'diverged'
  if abs(w - LOCAL_MINIMUM) < tolerance:
    return 'local'
  if abs(w - GLOBAL_MINIMUM) < tolerance:
    return 'global'
  return 'between'

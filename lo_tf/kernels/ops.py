"""Python side of the fused learned-optimizer step op (paper App. F).

Loads the compiled kernel library built by `pip install` (see `setup.py`); when it is absent,
`available()` is False and `MLPLOpt(implementation='auto')` falls back to the XLA path.
"""

from absl import logging

_LOAD_ERROR = 'the fused kernel is not implemented yet'


def available():
  """Whether the compiled kernel library loaded."""
  return False


def load_error():
  """Why the library did not load (one line), or None."""
  return _LOAD_ERROR


_warned = []


def warn_fallback():
  """Logs once that the XLA path serves instead of the fused op."""
  if not _warned:
    _warned.append(True)
    logging.warning('lo_tf: fused learned-optimizer op unavailable (%s); using the XLA path',
                    _LOAD_ERROR)


def mlp_lopt_step(lopt, theta, g, w, t, m, v, sizes):
  """The fused equivalent of `MLPLOpt.reference_core` (same arguments and results)."""
  raise NotImplementedError(_LOAD_ERROR)

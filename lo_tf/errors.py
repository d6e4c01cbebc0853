"""User-facing errors.

`UserError` is raised for bad input (a missing dataset, an unknown name, a wrong shape, a corrupt
checkpoint). Its message is one line that names the problem and the fix; `bin/` tools print it and
exit with status 2 (see `lo_tf.launch.common`).
"""


import math
import numbers


class UserError(ValueError):
  """Bad input from the user: the message is one line naming the problem and the fix."""


def one_line(e, limit=160):
  """The first line of an exception's message (its type's name when empty), `limit` chars at most."""
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def check_int(owner, name, value, minimum=1):
  """Returns `value` if it is an integer >= minimum, else raises UserError naming `owner.name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise UserError(f'{owner}.{name}={value!r} must be an integer >= {minimum}; fix the gin '
                    'binding or flag')
  return int(value)


def check_number(owner, name, value, low=None, high=None, low_open=False, high_open=False):
  """Returns float(value) if it is a real number within the bounds, else raises UserError."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if ok:
    value = float(value)
    ok = math.isfinite(value)
    if low is not None:
      ok = ok and (value > low if low_open else value >= low)
    if high is not None:
      ok = ok and (value < high if high_open else value <= high)
  if not ok:
    lo = '' if low is None else ('(' if low_open else '[') + str(low)
    hi = '' if high is None else str(high) + (')' if high_open else ']')
    raise UserError(f'{owner}.{name}={value!r} must be a finite number in {lo or "(-inf"}, '
                    f'{hi or "inf)"}; fix the gin binding or flag')
  return value

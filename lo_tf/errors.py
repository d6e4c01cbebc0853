"""User-facing errors.

`UserError` is raised for bad input (a missing dataset, an unknown name, a wrong shape, a corrupt
checkpoint). Its message is one line that names the problem and the fix; `bin/` tools print it and
exit with status 2 (see `lo_tf.cli`).
"""


class UserError(ValueError):
  """Bad input from the user: the message is one line naming the problem and the fix."""

"""Atomic file writes: results are either complete or absent, never half-written."""

import json
import os
import tempfile

from lo_tf.errors import UserError


def ensure_writable_dir(path):
  """Creates `path` if needed and checks it is writable.

  Raises:
    UserError: if the directory cannot be created or written.
  """
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test_'):
      pass
  except OSError as e:
    raise UserError(f'output directory {path!r} cannot be written ({e.strerror}); '
                    'pass a writable directory') from None
  return path


def atomic_write_bytes(path, data):
  """Writes `data` (bytes) to `path` through a temporary file and `os.replace`."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.')
  try:
    # mkstemp makes the file private (0600); give it the mode an ordinary open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_json(path, obj):
  """Writes `obj` as indented JSON to `path` atomically."""
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode())


def atomic_savefig(fig, path):
  """Saves a matplotlib figure to `path` (PNG) atomically."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
  atomic_write_bytes(path, buf.getvalue())

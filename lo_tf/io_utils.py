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


class DirectoryLock:
  """An exclusive lock on a directory for one process (`<dir>/.lock` holding the pid).

  Use as a context manager, or call `release()`.

  A lock left by a process that no longer runs (killed with SIGKILL) is taken over.

  Raises:
    UserError: if a live process holds the lock.
  """

  def __init__(self, directory):
    self.path = os.path.join(directory, '.lock')
    while True:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          with open(self.path) as f:
            pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
          pid = 0
        if pid and pid != os.getpid() and _alive(pid):
          raise UserError(f'{directory} is in use by another process (pid {pid}); wait for it '
                          'or use another directory') from None
        os.remove(self.path)  # stale: its process is gone
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(str(os.getpid()))
      return

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()

  def release(self):
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True

"""File plumbing: atomic writes, strict JSON, a per-directory process lock, cleanup of refused runs.

Results are either complete or absent, never half-written; JSON that lo_tf reads back is checked
for its type so that an empty, truncated or foreign file is a one-line `UserError`.
"""

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import tempfile

import numpy as np

from lo_tf.errors import UserError

# How a message names the top-level value of a JSON file.
_JSON_NAMES = {dict: 'an object', list: 'an array', str: 'a string', int: 'a number',
               float: 'a number', bool: 'a boolean', type(None): 'null'}


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


@contextlib.contextmanager
def remove_created_dirs_on_error(path):
  """Context manager: if its body raises, removes the directories of `path` that it created.

  Enter it before anything creates `path` (e.g. before `ensure_writable_dir`). The directories
  missing on entry (`path` and any missing parents) are removed deepest first when the body raises
  (a refused run, Ctrl-C) and they are still empty; `os.rmdir` refuses a non-empty directory, so
  nothing written into them is ever deleted. The exception propagates unchanged.
  """
  missing = []
  head = os.path.abspath(path)
  while not os.path.exists(head):
    missing.append(head)
    head = os.path.dirname(head)
  try:
    yield path
  except BaseException:
    for directory in missing:  # deepest first
      try:
        os.rmdir(directory)
      except OSError:  # not empty (or never created): keep it and its parents
        break
    raise


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
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None:  # a failed write names no file
      e.filename = path
    raise


def json_safe(obj):
  """`obj` with every non-finite float replaced by None, numpy scalars/arrays made Python values.

  JSON has no NaN or Infinity (Python's `json` writes tokens that strict parsers reject), so
  lo_tf's outputs write a non-finite number as null: a reader of a lo_tf JSON file takes null
  where a number is expected as "not a finite number" (a diverged loss, an undefined ratio).
  Dict keys are kept; tuples become lists.
  """
  if isinstance(obj, np.ndarray):
    obj = obj.tolist()
  elif isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  return obj


def atomic_write_json(path, obj):
  """Writes `obj` as indented, sorted JSON to `path` atomically; NaN and ±inf become null.

  See `json_safe` for the mapping. Raises TypeError for values JSON cannot hold.
  """
  text = json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False)
  atomic_write_bytes(path, (text + '\n').encode())


def read_json(path, expected_type, what, fix='re-create it with the lo_tf tool that wrote it'):
  """Reads a JSON file that lo_tf wrote, refusing anything else with a one-line error.

  Args:
    path: the file.
    expected_type: the type (or tuple of types) the top-level value must have, e.g. dict.
    what: what the file is, for the message (e.g. 'learned-optimizer configuration').
    fix: what the user should do, for the message.

  Returns:
    The parsed value (an instance of `expected_type`).

  Raises:
    UserError: the file is missing or unreadable, empty, truncated or not JSON, or its top-level
      value has another type.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise UserError(f'{what} {path} cannot be read ({e.strerror}); {fix}') from None
  if not data.strip():
    raise UserError(f'{what} {path} is empty; {fix}')
  try:
    value = json.loads(data)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
    reason = str(e).splitlines()[0][:120]
    raise UserError(f'{what} {path} is truncated or not JSON ({reason}); {fix}') from None
  if not isinstance(value, expected_type):
    expected = expected_type if isinstance(expected_type, tuple) else (expected_type,)
    raise UserError(f'{what} {path} holds JSON {_JSON_NAMES[type(value)]}, not '
                    f'{" or ".join(_JSON_NAMES[t] for t in expected)}; {fix}')
  return value


def array_digest(x):
  """Short SHA-1 (12 hex digits) of an array's float32 bytes: θ's name in caches and results."""
  return hashlib.sha1(np.asarray(x, np.float32).tobytes()).hexdigest()[:12]


def atomic_savefig(fig, path):
  """Saves a matplotlib figure to `path` (PNG) atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
  atomic_write_bytes(path, buf.getvalue())


class DirectoryLock:
  """An exclusive lock on a directory for one process: `fcntl.flock` on `<dir>/.lock`.

  The lock is the kernel's: it is held as long as the file descriptor is open, so a process that
  dies (even by SIGKILL) releases it, and two processes never hold it at once. The file holds the
  holder's pid for the error message only. `release()` (or leaving the `with` block) removes the
  file and closes the descriptor. A second `DirectoryLock` on the same directory fails even in the
  same process; a child made by `fork` shares the descriptor and so the lock.

  Use as a context manager, or call `release()`.

  Raises:
    UserError: if another process (or another lock of this one) holds it, or the file cannot be
      created.
  """

  def __init__(self, directory):
    self.path = os.path.join(directory, '.lock')
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      except OSError as e:
        raise UserError(f'cannot create the lock file {self.path} ({e.strerror}); pass a '
                        'writable directory') from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 32).decode(errors='replace').strip() or 'unknown'
        os.close(fd)
        raise UserError(f'{directory} is in use by another process (pid {holder}); wait for it '
                        'or use another directory') from None
      except OSError as e:
        os.close(fd)
        raise UserError(f'cannot lock {self.path} ({e.strerror}); use a directory on a local '
                        'file system') from None
      # The previous holder may have removed the file between our open and flock: then we locked
      # an orphaned inode, and a third process may lock the new file. Retry on the current one.
      try:
        current = os.stat(self.path)
      except FileNotFoundError:
        current = None
      held = os.fstat(fd)
      if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    self._fd = fd

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()

  def release(self):
    """Removes the lock file and releases the lock; calling it again does nothing."""
    if self._fd is None:
      return
    try:
      os.remove(self.path)  # while still holding it, see the inode check in __init__
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

"""The flag plumbing of every `bin/` tool: flag parsing, gin flags, one-line errors with exit 2.

Gin parsing and building are `lo_tf.config`'s.
"""

import errno
import logging as std_logging
import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import tensorflow as tf

from lo_tf.errors import UserError
from lo_tf.learned_optimizers import pretrained

EXIT_USAGE = 2


def _fail(message):
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def op_error_line(e):
  """The first line of a TensorFlow OpError's message without the op's decorations.

  An eager op's error reads '{{function_node __wrapped__SaveV2_...}} <what> [Op:SaveV2]'; only
  <what> (e.g. '<path>; No space left on device') names the problem.
  """
  text = re.sub(r'\{\{function_node [^}]*\}\}', '', e.message or '')
  text = re.sub(r'\s*\[Op:[^\]]*\](\s*name:.*)?$', '', text.strip().split('\n')[0]).strip()
  return text or type(e).__name__


def absolute_path(path):
  """`path` made absolute, as every entry point does once with the directories it is given.

  From there on every path has one form: a relative one would resolve differently once a path
  is written relative to another directory (TensorFlow's checkpoint index does that) or read by
  a process in another working directory (a cluster's tasks). None and '' stay as they are.
  """
  return os.path.abspath(path) if path else path


def absolute_spec(spec):
  """A `--checkpoint` spec (shipped name, train_dir or checkpoint path) with its path absolute."""
  return spec if not spec or spec in pretrained.shipped_names() else absolute_path(spec)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{str(e).splitlines()[0]}; see --help')


def check_no_arguments(argv):
  """Raises UserError for positional arguments (every bin/ tool takes --name=value flags only)."""
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}; flags are --name=value')


def define_gin_flags():
  """Defines --gin_file and --gin_bindings (binaries adopt them to list them in --help)."""
  flags.DEFINE_multi_string('gin_file', [], 'Gin config file(s), parsed in order.')
  flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings, e.g. "InnerTrainer.num_steps=100".')


def run(main):
  """Runs `main(argv)` as an absl app; `UserError` and flag errors exit 2 with one line."""

  def wrapped(argv):
    try:
      logging.set_verbosity(logging.INFO)
      # TensorFlow's own INFO lines (some log through absl, e.g. its checkpoint saver) are noise.
      tf.get_logger().setLevel('ERROR')
      logging.get_absl_handler().addFilter(
          lambda record: record.levelno >= std_logging.WARNING or
          f'{os.sep}tensorflow{os.sep}' not in record.pathname)
      try:
        main(argv)
      except tf.errors.OpError as e:  # file-system failures surface as OpErrors from TF's I/O
        raise UserError(f'{op_error_line(e)}; check that the paths exist and are writable and '
                        'that the disk is not full') from None
    except UserError as e:
      _fail(str(e).strip().splitlines()[0])
    except OSError as e:
      where = f' {e.filename!r}' if e.filename else ''
      if e.errno == errno.ENOSPC:
        _fail(f'cannot write{where}: {e.strerror}; free space on that disk and re-run the same '
              'command')
      _fail(f'cannot access{where}: {e.strerror or e}; check the path and its permissions')
    except KeyboardInterrupt:
      _fail('interrupted (bin/train resumes from its last checkpoint when re-run)')

  app.run(wrapped, flags_parser=_parse_flags)

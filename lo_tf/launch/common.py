"""The flag plumbing of every `bin/` tool: flag and gin parsing, one-line errors with exit 2."""

import logging as std_logging
import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import gin
import tensorflow as tf

from lo_tf import all_configurables  # pylint: disable=unused-import  (every gin name is known)
from lo_tf.errors import UserError

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


def parse_gin(gin_files, gin_bindings, extra_bindings=()):
  """Parses gin files and bindings after importing every configurable.

  Raises:
    UserError: for a missing gin file, an unknown configurable or parameter, or a syntax error.
  """
  if not gin_files:
    raise UserError('no --gin_file given; pass a config, e.g. --gin_file=gin/quickstart.gin')
  for f in gin_files:
    if not os.path.isfile(f):
      what = 'is a directory' if os.path.isdir(f) else 'does not exist'
      raise UserError(f'gin file {f!r} {what}; pass an existing file to --gin_file')
  try:
    gin.parse_config_files_and_bindings(gin_files, list(gin_bindings) + list(extra_bindings),
                                        finalize_config=False)
  except Exception as e:  # gin raises ValueError, SyntaxError, KeyError... for config errors
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'bad gin configuration: {first}; check --gin_file/--gin_bindings') from None


def build(constructor, *args, **kwargs):
  """Calls a gin-configured constructor; a bad configured value becomes a one-line UserError.

  Gin evaluates macros and references only when the constructor is called, so type errors of the
  configuration (an undefined macro, a reference to the wrong class) surface here.
  """
  try:
    return constructor(*args, **kwargs)
  except TypeError as e:
    first = str(e).strip().splitlines()[0]
    raise UserError(f'bad gin configuration: {first}; check --gin_file/--gin_bindings') from None


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
      _fail(f'cannot access{where}: {e.strerror or e}; check the path and its permissions')
    except KeyboardInterrupt:
      _fail('interrupted (bin/train resumes from its last checkpoint when re-run)')

  app.run(wrapped, flags_parser=_parse_flags)

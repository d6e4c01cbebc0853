"""Gin configuration: parsing, building, the registry of configurables and the operative record.

Every configurable lives in the module that declares it (`@gin.configurable`); `load_configurables`
imports every lo_tf module below the command-line layer (`lo_tf.launch`), so a gin file can name
any of them, and `configurables()` lists what gin registered from those modules: derived from the
code, never a hand-kept list. `parse_gin` and `build` turn configuration errors into one-line
`UserError`s. The rest reads and compares operative configurations (`operative_config.gin`), by
which a resumed run is checked against the one that wrote its train_dir.
"""

import ast
import functools
import importlib
import inspect
import os
import pkgutil
import re

import gin

import lo_tf
from lo_tf.errors import UserError

_COMMAND_LINE_LAYER = 'lo_tf.launch'


@functools.cache
def load_configurables():
  """Imports every lo_tf module outside `lo_tf.launch`; returns their names, sorted.

  Importing a module registers its configurables with gin. Modules are found by walking the
  package, so a new module is included without being listed anywhere.
  """
  names = []
  for info in pkgutil.walk_packages(lo_tf.__path__, 'lo_tf.'):
    if (info.name == _COMMAND_LINE_LAYER or info.name.startswith(_COMMAND_LINE_LAYER + '.') or
        info.name.rsplit('.', 1)[-1].startswith('_')):  # private: the op libraries (.so)
      continue
    importlib.import_module(info.name)
    names.append(info.name)
  return sorted(names)


def configurables():
  """{gin name: module} of every configurable that lo_tf declares (after `load_configurables`)."""
  found = {}
  for module_name in load_configurables():
    module = importlib.import_module(module_name)
    for name, obj in vars(module).items():
      if getattr(obj, '__module__', None) != module_name or not (
          inspect.isclass(obj) or inspect.isfunction(obj)):
        continue
      try:
        gin.get_configurable(obj)
      except ValueError:  # not registered with gin
        continue
      found[name] = module_name
  return dict(sorted(found.items()))


def find_gin_file(path, search_root=None):
  """`path` as given when it exists or is absolute, else relative to `search_root`.

  Gin files live in the checkout's `gin/` folder, not in the installed package: relative paths are
  read from the working directory first, then from `search_root` (default: the folder above the
  lo_tf package, the checkout root when lo_tf runs from a checkout, however it was installed).
  """
  if os.path.isabs(path) or os.path.exists(path):
    return path
  root = search_root or os.path.dirname(os.path.dirname(os.path.abspath(lo_tf.__file__)))
  candidate = os.path.join(root, path)
  return candidate if os.path.exists(candidate) else path


@functools.cache
def _add_search_path(directory):
  """Lets gin `include`s name files relative to `directory` (once per directory)."""
  gin.add_config_file_search_path(directory)


# Gin names renamed since an earlier release (configurable or configurable.parameter): an old
# binding is refused with its new name.
RENAMED = {
    'OuterTrainer.num_workers': 'OuterTrainer.num_slots',
    'MergedEstimator.estimator': 'GradientEstimator.mode',
    'MergedEstimator': 'GradientEstimator',
}


def _renamed_binding(message):
  """(old, new) of a `RENAMED` binding that gin's error `message` refuses, else None.

  Gin names an unknown configurable or parameter on the first line of its message and quotes the
  binding (`[scope/][module.]Configurable.parameter = value`) on the last; an unknown reference
  (`@[scope/][module.]Configurable[()]`) it names on the first line alone.
  """
  reference = re.match(r"No configurable matching reference '@(?:.*/)?([\w.]+?)(\(\))?'",
                       message.strip())
  if reference:
    configurable = reference.group(1).rsplit('.', 1)[-1]
    if configurable in RENAMED:
      call = reference.group(2) or ''
      return f'@{configurable}{call}', f'@{RENAMED[configurable]}{call}'
    return None
  lines = message.strip().splitlines()
  if len(lines) < 2 or not re.match(r"(No configurable matching|Configurable '.*' doesn't have a "
                                    'parameter named)', lines[0]):
    return None
  key = lines[-1].split('=', 1)[0].strip().rsplit('/', 1)[-1]
  configurable, _, parameter = key.rpartition('.')
  old = f'{configurable.rsplit(".", 1)[-1]}.{parameter}'
  new = renamed_binding(old)
  return (old, new) if new else None


def renamed_binding(binding):
  """The new name of a 'Configurable.parameter' binding that `RENAMED` renamed, else None."""
  configurable, _, parameter = binding.rpartition('.')
  if binding in RENAMED:
    return RENAMED[binding]
  if configurable in RENAMED:
    return f'{RENAMED[configurable]}.{parameter}'
  return None


def parse_gin(gin_files, gin_bindings, extra_bindings=()):
  """Parses gin files and bindings after importing every configurable.

  Relative files and `include`s are found as `find_gin_file` finds them.

  Raises:
    UserError: for a missing gin file, an unknown configurable or parameter, or a syntax error.
  """
  load_configurables()
  if not gin_files:
    raise UserError('no --gin_file given; pass a config, e.g. --gin_file=gin/quickstart.gin')
  gin_files = [find_gin_file(f) for f in gin_files]
  for f in gin_files:
    if not os.path.isfile(f):
      what = 'is a directory' if os.path.isdir(f) else 'does not exist'
      raise UserError(f'gin file {f!r} {what}; pass an existing file to --gin_file')
  _add_search_path(os.path.dirname(find_gin_file('gin')) or '.')
  try:
    gin.parse_config_files_and_bindings(gin_files, list(gin_bindings) + list(extra_bindings),
                                        finalize_config=False)
  except Exception as e:  # gin raises ValueError, SyntaxError, KeyError... for config errors
    renamed = _renamed_binding(str(e))
    if renamed:
      raise UserError(f'bad gin configuration: {renamed[0]} was renamed {renamed[1]}; update '
                      '--gin_file/--gin_bindings') from None
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


def parse_bindings(text):
  """{binding: value text} of a gin config string (as `gin.operative_config_str()` writes it).

  Comments, blank lines and imports are skipped; a value continued on indented lines (gin's
  `key = \\` form) is joined with single spaces.
  """
  bindings, key = {}, None
  for line in text.splitlines():
    stripped = line.strip()
    if not stripped or stripped.startswith('#'):
      continue
    if line[0].isspace() and key is not None:  # a continuation line
      bindings[key] = (bindings[key] + ' ' + stripped).strip()
      continue
    if ' = ' not in line or stripped.startswith(('import ', 'from ')):
      key = None
      continue
    key, value = line.split(' = ', 1)
    key, value = key.strip(), value.strip()
    bindings[key] = '' if value == '\\' else value
  return bindings


def operative_config_text(values):
  """The run's operative configuration as gin text: gin's operative config (every parameter of
  every configurable called so far, defaults included) updated by `values` ({binding: value}: what
  a caller passed explicitly, which gin does not record)."""
  bindings = parse_bindings(gin.operative_config_str())
  bindings.update({k: repr(v) for k, v in values.items()})
  return ''.join(f'{k} = {v}\n' for k, v in sorted(bindings.items()))


def default_text(binding):
  """`repr` of the code's default for a 'Name.parameter' binding, or None (no such default)."""
  name, _, parameter = binding.rpartition('.')
  module = configurables().get(name)
  if module is None:
    return None
  target = getattr(importlib.import_module(module), name)
  try:
    signature = inspect.signature(target.__init__ if inspect.isclass(target) else target)
  except (TypeError, ValueError):
    return None
  found = signature.parameters.get(parameter)
  if found is None or found.default is inspect.Parameter.empty:
    return None
  return repr(found.default)


def _canonical(value):
  """A Python value in a form where equal configurations compare equal: lists and tuples alike
  (gin and JSON give either), numbers by value (1e-3 and 0.001), booleans apart from numbers."""
  if isinstance(value, (list, tuple)):
    return ('sequence', tuple(_canonical(v) for v in value))
  if isinstance(value, dict):
    return ('dict', tuple(sorted((repr(k), _canonical(v)) for k, v in value.items())))
  if isinstance(value, bool):
    return ('bool', value)
  if isinstance(value, (int, float)):
    return ('number', value)
  return (type(value).__name__, value)


def same_value(a, b):
  """Whether two gin value texts give the same value (compared as Python literals where both are
  ones, e.g. '[0.5, 0.9]' and '(0.5, 0.9)'; else as texts, e.g. '@ConvNet')."""
  if a == b:
    return True
  if a is None or b is None:
    return False
  try:
    return _canonical(ast.literal_eval(a)) == _canonical(ast.literal_eval(b))
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # not a literal
    return False


def config_differences(saved, current, ignore=()):
  """[(binding, saved value, current value)] of two `parse_bindings` dicts, `ignore` left out.

  Values are compared as values (`same_value`), not as texts."""
  return [(k, saved.get(k, '(unset)'), current.get(k, '(unset)'))
          for k in sorted(set(saved) | set(current))
          if k not in ignore and not same_value(saved.get(k), current.get(k))]


def describe_differences(differences, limit=4, width=40):
  """One short phrase naming the differing bindings: 'A (x vs y), B (u vs v) and 3 more'."""
  clip = lambda v: v if len(v) <= width else v[:width - 3] + '...'
  parts = [f'{k} ({clip(a)} vs {clip(b)})' for k, a, b in differences[:limit]]
  more = len(differences) - limit
  return ', '.join(parts) + (f' and {more} more' if more > 0 else '')

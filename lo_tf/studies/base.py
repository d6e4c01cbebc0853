"""What every study of `bin/study` shares: options, cached parts, progress, checked output.

A study (one module per figure of the paper in `lo_tf.studies`) is a gin-configurable class whose
constructor takes its sizes (defaults sized for 2 CPU cores; gin bindings scale them to the paper's)
and whose `compute(output_dir, options, parts)` returns the numbers as a JSON-able dict and its
figures. `run` does the rest the same way for all: the output directory is locked for one process,
finished parts are reused on a rerun, the figures are written as PNGs and the numbers, checked
against the study's schema, are written last as `<study name>.json`: every file appears whole or
not at all.
"""

import dataclasses
import hashlib
import json
import os
import sys

import gin
import matplotlib.pyplot as plt
import numpy as np
import tqdm

from lo_tf import config
from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.experiment import build_experiment
from lo_tf.learned_optimizers import pretrained
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt
from lo_tf.outer_trainers.loop import OuterTrainer

PARTS_DIR = 'parts'


@dataclasses.dataclass(frozen=True)
class Options:
  """What `bin/study` passes to a study besides its gin-configured sizes.

  Attributes:
    gin_files: the gin files the study was configured from (studies that build sub-runs, e.g. the
      ablations, parse them again under each sub-run's own config).
    gin_bindings: the --gin_bindings, applied after every config file, sub-runs' included.
    checkpoint: a learned optimizer (shipped name, train_dir or checkpoint path), or None.
    num_seeds: seeds of θ per configuration for the studies that outer-train, or None (the
      study's default).
    train_dirs: existing bin/train runs to read instead of training new ones.
  """
  gin_files: tuple = ()
  gin_bindings: tuple = ()
  checkpoint: str | None = None
  num_seeds: int | None = None
  train_dirs: tuple = ()


class Study:
  """Base class of the studies. Subclasses set `name`, `accepts`, `schema` and `compute`.

  `accepts` names the `Options` fields besides the gin ones that the study uses; `bin/study`
  refuses the others so that a flag is never silently ignored.
  """

  name = None
  accepts = ()
  schema = None

  def compute(self, output_dir, options, parts):
    """Returns (results: JSON-able dict, figures: {png file stem: matplotlib figure})."""
    raise NotImplementedError


def run(study, output_dir, options):
  """Runs `study` into `output_dir` (locked while it runs); returns the results dict.

  The figures go to `<output_dir>/<stem>.png`, the results (with 'study' and 'plots' added, checked
  against `study.schema`) to `<output_dir>/<study.name>.json`.

  Raises:
    UserError: for a directory in use or unwritable, or bad input found by the study.
    RuntimeError: if the results do not match the study's schema (a bug, not bad input).
  """
  io_utils.ensure_writable_dir(output_dir)
  with io_utils.DirectoryLock(output_dir):
    parts = Parts(os.path.join(output_dir, PARTS_DIR))
    results, figures = study.compute(output_dir, options, parts)
    plots = {stem: os.path.join(output_dir, stem + '.png') for stem in figures}
    results = dict(results, study=study.name, plots=plots,
                   parts={'computed': parts.computed, 'reused': parts.reused})
    check_schema(io_utils.json_safe(results), study.schema, study.name)
    for stem, fig in figures.items():
      io_utils.atomic_savefig(fig, plots[stem])
      plt.close(fig)
    io_utils.atomic_write_json(os.path.join(output_dir, study.name + '.json'), results)
  return results


def check_schema(value, schema, where):
  """Checks a JSON-able value against a schema; raises RuntimeError naming the first mismatch.

  A schema is a type (`float` also takes ints and None, JSON's non-finite number; `int` takes
  ints; `str`, `bool`, `dict`, `list` as is), a dict {key: schema} (those keys must be present,
  others are allowed), or a one-element list [schema] (a list whose every item matches).
  """
  if isinstance(schema, dict):
    if not isinstance(value, dict):
      raise RuntimeError(f'{where}: expected an object, got {type(value).__name__}')
    for key, sub in schema.items():
      if key not in value:
        raise RuntimeError(f'{where}: missing key {key!r}')
      check_schema(value[key], sub, f'{where}.{key}')
  elif isinstance(schema, list):
    if not isinstance(value, list):
      raise RuntimeError(f'{where}: expected a list, got {type(value).__name__}')
    for i, item in enumerate(value):
      check_schema(item, schema[0], f'{where}[{i}]')
  elif schema is float:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise RuntimeError(f'{where}: expected a number, got {value!r}')
  elif schema is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise RuntimeError(f'{where}: expected an integer, got {value!r}')
  elif not isinstance(value, schema):
    raise RuntimeError(f'{where}: expected {schema.__name__}, got {type(value).__name__}')


def key_digest(key):
  """Short SHA-1 of a JSON-able description (sorted keys): the name of a cached part."""
  text = json.dumps(io_utils.json_safe(key), sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:16]


class Parts:
  """Finished parts of a study, one JSON file each in `directory`, so a rerun reuses them.

  A part is named by `name` and a digest of everything its numbers depend on (`key`), so a rerun
  with other sizes or another θ computes it afresh. Unreadable entries are recomputed.
  """

  def __init__(self, directory):
    self.directory = directory
    self.computed = self.reused = 0

  def get(self, name, key, compute):
    """The part's dict: read back when present, else `compute()` (a JSON-able dict), stored."""
    path = os.path.join(self.directory, f'{name}-{key_digest(key)}.json')
    if os.path.exists(path):
      try:
        value = io_utils.read_json(path, dict, 'study part')
        self.reused += 1
        return value
      except UserError:
        pass  # a damaged entry is recomputed, not trusted
    value = io_utils.json_safe(compute())
    io_utils.ensure_writable_dir(self.directory)
    io_utils.atomic_write_json(path, value)
    self.computed += 1
    return value


def floats(values):
  """float64 array of JSON numbers (None, JSON's non-finite number, reads as NaN)."""
  return np.array(values, dtype=np.float64)


def progress(total, desc):
  """A tqdm progress bar on stderr (the same look as bin/train's)."""
  return tqdm.tqdm(total=total, desc=desc, file=sys.stderr, mininterval=2.0, dynamic_ncols=True)


def load_theta(checkpoint):
  """(label, learned-optimizer family, θ float32 [P]) of `--checkpoint`, or θ at initialization.

  Args:
    checkpoint: a shipped name, train_dir or checkpoint path (`pretrained.load`),
      or None: then the gin-configured `MLPLOpt()` and its θ0 of seed (0, 0).

  Raises:
    UserError: for a checkpoint that cannot be loaded.
  """
  if checkpoint:
    name, family, theta, _ = pretrained.load(checkpoint)
    return f'{name} ({checkpoint})', family, theta
  family = MLPLOpt()
  return 'θ at initialization (no --checkpoint)', family, family.init_theta(np.array([0, 0]))


def parse_sub_config(gin_files, gin_bindings):
  """Replaces the gin configuration by `gin_files` then `gin_bindings` (a study's sub-run).

  Relative `include`s and files are found from the working directory first, then the checkout
  root (`config.find_gin_file`).

  Raises:
    UserError: for a missing file or a bad configuration.
  """
  gin.clear_config()
  config.parse_gin(gin_files, gin_bindings)


def outer_train(gin_files, gin_bindings, train_dir, seed):
  """Outer-trains one configuration into `train_dir` as bin/train does (a study's sub-run).

  An unfinished run there is resumed from its checkpoint and a finished one is left as it is, so
  a rerun of the study trains only what is missing.

  Returns:
    The `OuterTrainer` (its experiment and meta-evaluator describe the run).

  Raises:
    UserError: for a bad configuration, or a train_dir of another configuration.
  """
  parse_sub_config(gin_files, gin_bindings)
  trainer = config.build(lambda: OuterTrainer(build_experiment(), train_dir, seed=seed))
  trainer.train(config_str=gin.config_str())
  return trainer

"""`bin/study NAME`: one of the paper's analyses with its plots (see `lo_tf.studies`)."""

import json
import os


from lo_tf import config
from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.launch import common
from lo_tf.studies import ablations
from lo_tf.studies import base
from lo_tf.studies import direction
from lo_tf.studies import landscape
from lo_tf.studies import ood
from lo_tf.studies import outer_training
from lo_tf.studies import spread
from lo_tf.studies import toy
from lo_tf.studies import truncation

STUDIES = {cls.name: cls for cls in (toy.ToyStudy, landscape.LandscapeStudy,
                                     truncation.TruncationStudy,
                                     outer_training.OuterTrainingStudy, ablations.AblationStudy,
                                     ood.OODStudy, direction.EstimatorDirectionStudy,
                                     spread.OuterTrainingSpreadStudy)}

_FLAGS = {'checkpoint': '--checkpoint', 'num_seeds': '--num_seeds', 'train_dirs': '--train_dir'}


def default_gin_file(name):
  """gin/studies/<name>.gin, the config a study runs with by default (`config.find_gin_file`)."""
  return f'gin/studies/{name}.gin'


def study_from_flags(name, output_dir, gin_files=(), gin_bindings=(), checkpoint=None,
                     num_seeds=None, train_dirs=()):
  """Parses gin, builds study `name`, runs it into `output_dir`, prints where the outputs went.

  Args:
    name: a key of `STUDIES`.
    output_dir: where `<name>.json`, the PNGs and the parts cache go.
    gin_files: config files (default: gin/studies/<name>.gin); relative includes are also found
      from the repository root.
    gin_bindings: bindings applied after the files (to the study's sub-runs too).
    checkpoint, num_seeds, train_dirs: see `lo_tf.studies.base.Options`; a study that does not
      use one refuses it.

  Returns:
    The results dict written to `<output_dir>/<name>.json`.

  Raises:
    UserError: for an unknown study, an option it does not take, bad gin configuration or input.
  """
  if name not in STUDIES:
    raise UserError(f'unknown study {name!r}; use one of {sorted(STUDIES)}')
  cls = STUDIES[name]
  output_dir = common.absolute_path(output_dir)
  checkpoint = common.absolute_spec(checkpoint)
  train_dirs = [common.absolute_path(d) for d in train_dirs]
  options = base.Options(gin_files=tuple(gin_files) or (default_gin_file(name),),
                         gin_bindings=tuple(gin_bindings), checkpoint=checkpoint or None,
                         num_seeds=num_seeds, train_dirs=tuple(train_dirs))
  for option, flag in _FLAGS.items():
    if getattr(options, option) not in (None, ()) and option not in cls.accepts:
      accepted = ', '.join(_FLAGS[a] for a in cls.accepts) or 'none of them'
      raise UserError(f'study {name} takes no {flag}; of {", ".join(_FLAGS.values())} it '
                      f'accepts {accepted}')
  if options.num_seeds is not None and options.num_seeds < 1:
    raise UserError(f'--num_seeds={options.num_seeds} must be >= 1')
  base.parse_sub_config(options.gin_files, options.gin_bindings)
  study = config.build(cls)
  with io_utils.remove_created_dirs_on_error(output_dir):  # a refused run leaves no empty dir
    results = base.run(study, output_dir, options)
  print(json.dumps(io_utils.json_safe(results.get('summary', {})), indent=2))
  print(f'results: {os.path.join(output_dir, name + ".json")}')
  for stem, path in results['plots'].items():
    print(f'{stem}: {path}')
  return results

"""Loading learned optimizers by spec and shipping them (`lo_tf.learned_optimizers.pretrained`,
`bin/export_optimizer`): damaged files are one-line errors, names and rankings are checked.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from conftest import one_line
from conftest import theta_at
from conftest import write_train_dir
from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.launch import export
from lo_tf.learned_optimizers import pretrained
from lo_tf.learned_optimizers.mlp_lopt import MLPLOpt


@pytest.mark.parametrize('content,fragment', [
    (b'', 'is empty'), (b'{"lopt": ', 'truncated'), (b'[]', 'an array'),
    (b'{"objective": "train"}', 'no learned-optimizer configuration'),
    (b'{"lopt": {"hidden_size": "big"}}', 'not understood'),
    (b'{"lopt": {"no_such_option": 1}}', 'not understood'),
])
def test_damaged_lopt_json_is_one_line_error(train_dir, content, fragment):
  with open(os.path.join(train_dir, 'lopt.json'), 'wb') as f:
    f.write(content)
  with pytest.raises(UserError) as e:
    pretrained.load(train_dir)
  assert fragment in one_line(e)


def test_damaged_provenance_files_are_one_line_errors(train_dir, tmp_path):
  out = str(tmp_path / 'pretrained')
  with open(os.path.join(train_dir, 'throughput.json'), 'w') as f:
    f.write('{"wall_seconds_total": 12')
  with pytest.raises(UserError) as e:
    export.export_from_flags(train_dir, 'x', 'cmd', git_revision='abc', out_dir=out)
  assert 'throughput record' in one_line(e)
  os.remove(os.path.join(train_dir, 'throughput.json'))
  results = tmp_path / 'results.json'
  results.write_text('[]')
  with pytest.raises(UserError) as e:
    export.export_from_flags(train_dir, 'x', 'cmd', str(results), 'abc', out_dir=out)
  assert 'evaluation results' in one_line(e)


# ------------------------------------------------------------------ export


def test_export_refuses_an_existing_name_unless_overwrite(train_dir, tmp_path, monkeypatch):
  out = str(tmp_path / 'pretrained')
  first = export.export_from_flags(train_dir, 'my_opt_1', 'cmd', git_revision='abc',
                                        out_dir=out)
  assert first == os.path.join(out, 'my_opt_1.json')
  with pytest.raises(UserError) as e:
    export.export_from_flags(train_dir, 'my_opt_1', 'other', git_revision='abc', out_dir=out)
  assert '--overwrite' in one_line(e) and 'my_opt_1' in str(e.value)
  assert json.load(open(first))['command'] == 'cmd'  # untouched
  export.export_from_flags(os.path.join(train_dir, 'ckpt-2'), 'my_opt_1', 'other',
                                git_revision='abc', overwrite=True, out_dir=out)
  meta = json.load(open(first))
  assert meta['command'] == 'other' and meta['outer_steps'] == 2
  # The shipped files load back by name.
  monkeypatch.setattr(pretrained, 'PRETRAINED_DIR', out)
  name, _, theta, _ = pretrained.load('my_opt_1')
  assert name == 'my_opt_1'
  np.testing.assert_array_equal(theta.numpy(), theta_at(2))


@pytest.mark.parametrize('name', ['', 'Omniglot', 'ö_opt', 'ｆｕｌｌ', 'a-b', 'a b', 'a/b',
                                  '..'])
def test_export_names_are_ascii_lowercase_digits_underscores(name, tmp_path):
  with pytest.raises(UserError) as e:  # refused before the (missing) checkpoint is even read
    pretrained.export(str(tmp_path / 'missing'), name, {}, out_dir=str(tmp_path))
  assert '[a-z0-9_]+' in one_line(e)


def test_damaged_shipped_files_are_one_line_errors(tmp_path, monkeypatch):
  monkeypatch.setattr(pretrained, 'PRETRAINED_DIR', str(tmp_path))
  (tmp_path / 'a.json').write_text('["not", "an", "object"]')
  (tmp_path / 'b.json').write_text(json.dumps({'lopt': MLPLOpt().config()}))
  (tmp_path / 'b.npz').write_bytes(b'truncated')
  for name, fragment in (('a', 'an array'), ('b', 'unreadable')):
    with pytest.raises(UserError) as e:
      pretrained.load(name)
    assert fragment in one_line(e)


def test_bin_export_optimizer_refuses_a_non_ascii_name(tmp_path):
  # PYTHONPATH: this checkout's lo_tf, not the one an editable install may point at.
  done = subprocess.run([sys.executable, os.path.join(REPO, 'bin', 'export_optimizer'),
                         f'--checkpoint={tmp_path}', '--name=ömni'], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 2 and 'Traceback' not in done.stderr, done.stderr[-2000:]
  assert 'error: ' in done.stderr and '[a-z0-9_]+' in done.stderr
  assert not any(n.startswith('ömni') for n in os.listdir(pretrained.PRETRAINED_DIR))


def test_export_of_several_runs_ships_the_best_by_outer_train_meta_loss(tmp_path):
  """Paper §4.3: θ seeds are compared by outer-training loss; each run stands for its best θ."""
  runs = []
  for i, score in enumerate((0.9, 0.4, 0.7)):
    run = tmp_path / f'seed{i}'
    write_train_dir(str(run / 'best'), steps=(i + 1,))
    io_utils.atomic_write_json(str(run / 'throughput.json'),
                               {'best_meta_eval_score': score, 'git_revision': 'abc'})
    runs.append(str(run))
  out = str(tmp_path / 'pretrained')
  meta = json.load(open(export.export_from_flags(runs, 'best_of_3', 'cmd', out_dir=out)))
  assert meta['selected'] == runs[1] and meta['outer_steps'] == 2
  assert [c['best_meta_eval_score'] for c in meta['selection']] == [0.9, 0.4, 0.7]
  with pytest.raises(UserError, match='finished train_dirs'):
    export.export_from_flags(runs + [os.path.join(runs[0], 'best', 'ckpt-1')], 'x', 'cmd',
                             out_dir=out)


def _export_candidate(tmp_path, name, score, config_file, config_text):
  run = tmp_path / name
  write_train_dir(str(run / 'best'), steps=(1,))
  io_utils.atomic_write_json(str(run / 'throughput.json'), {'best_meta_eval_score': score})
  (run / config_file).write_text(config_text)
  return str(run)


@pytest.mark.parametrize('config_file', ['operative_config.gin', 'config.gin'])
def test_export_refuses_to_rank_runs_of_different_task_distributions(tmp_path, config_file):
  three = "TaskDistribution.num_classes = 3\nTaskDistribution.train_source = 'digits'\n"
  four = "TaskDistribution.num_classes = 4\nTaskDistribution.train_source = 'digits'\n"
  runs = [_export_candidate(tmp_path, 'three_way', 0.9, config_file, three),
          _export_candidate(tmp_path, 'four_way', 0.4, config_file, four)]
  out = str(tmp_path / 'pretrained')
  with pytest.raises(UserError) as e:
    export.export_from_flags(runs, 'mixed', 'cmd', out_dir=out)
  message = one_line(e)
  assert 'TaskDistribution.num_classes (3 vs 4)' in message and 'not comparable' in message
  assert not os.path.exists(out)
  # Runs of one task distribution (the other bindings may differ) are ranked.
  runs.append(_export_candidate(tmp_path, 'three_way_again', 0.5, config_file,
                                three + 'OuterLearner.outer_learning_rate = 0.001\n'))
  meta = json.load(open(export.export_from_flags([runs[0], runs[2]], 'same', 'cmd',
                                                 out_dir=out)))
  assert meta['selected'] == runs[2]

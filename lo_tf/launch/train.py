"""`bin/train`: outer-trains a learned optimizer (paper §3, App. B), in one process or a cluster."""

import functools
import json
import os
import sys

import gin
import tensorflow as tf
from absl import logging

from lo_tf import config
from lo_tf import io_utils
from lo_tf.errors import UserError
from lo_tf.experiment import build_experiment
from lo_tf.launch import cluster as cluster_lib
from lo_tf.launch import common
from lo_tf.outer_trainers import distributed
from lo_tf.outer_trainers import loop
from lo_tf.outer_trainers import run_checkpoints


def train_from_flags(gin_files, gin_bindings, train_dir, train_source=None, test_source=None,
                     seed=0, cluster=None, intra_op_threads=0, command=None):
  """Parses gin, builds the experiment and `OuterTrainer`, outer-trains, prints where things went.

  Nothing is written into train_dir before the configuration is built, the directory lock is held
  and a resumed run's configuration is checked.

  Args:
    gin_files, gin_bindings, train_dir, train_source, test_source, seed: bin/train's flags
      (train_dir is made absolute here, once).
    cluster: None (one process), 'local:N' (a loopback cluster of 1 parameter server and N
      workers, this process the chief) or 'tf_config' (this process is the task of $TF_CONFIG: a
      ps or worker task serves until stopped, the chief trains); see `lo_tf.launch.cluster`.
    intra_op_threads: a ps or worker task's threads per op (0: TensorFlow's default; the tasks of
      local:N use 1).
    command: bin/train's command line, recorded in throughput.json.

  Returns:
    The throughput record, or None (already trained, or a ps/worker task that was stopped).

  Raises:
    UserError: for bad gin configuration, sources, train_dir, checkpoints or cluster, a worker of
      another configuration, or a parameter server lost mid-run (re-run the same command).
  """
  kind = cluster_lib.parse(cluster)
  train_dir = common.absolute_path(train_dir)
  extra = []
  if train_source:
    extra.append(f'TaskDistribution.train_source = {train_source!r}')
  if test_source:
    extra.append(f'TaskDistribution.test_source = {test_source!r}')
  config.parse_gin(gin_files, gin_bindings, extra)
  if kind is None:
    return _train(config.build(lambda: loop.OuterTrainer(build_experiment(), train_dir,
                                                         seed=seed)), train_dir, command)
  if kind[0] == cluster_lib.TF_CONFIG:
    resolver = cluster_lib.tf_config_resolver()
    if resolver.task_type != 'chief':
      cluster_lib.serve(resolver, distributed.task_manifest(), intra_op_threads)
      return None
    return _train_chief(resolver, cluster_lib.task_dir(), train_dir, seed, command)
  # The tasks run the binary that started this process (bin/train), wherever lo_tf is installed.
  task = [sys.executable, os.path.abspath(sys.argv[0]), '--cluster=tf_config',
          '--intra_op_threads=1', f'--train_dir={train_dir}', f'--seed={seed}']
  task += [f'--gin_file={f}' for f in gin_files] + [f'--gin_bindings={b}' for b in gin_bindings]
  task += [f'--{name}={value}' for name, value in (('train_source', train_source),
                                                   ('test_source', test_source)) if value]
  with cluster_lib.LocalCluster(kind[1], task) as local:
    return _train_chief(local.resolver, local.task_dir, train_dir, seed, command, local.connected,
                        local.lost_workers)


def _train_chief(resolver, task_dir, train_dir, seed, command, on_connected=None,
                 lost_workers=None):
  """The chief of a cluster: connects, checks the workers' configurations, outer-trains.

  `lost_workers` (a local cluster's) lets it stop once no worker is left rather than wait."""
  experiment = config.build(build_experiment)
  coordinator = cluster_lib.connect(resolver)
  if on_connected:
    on_connected()
  manifest = distributed.task_manifest()
  paths = distributed.worker_manifest_paths(resolver.cluster_spec(), task_dir)
  distributed.check_workers(paths, manifest)
  source = functools.partial(distributed.ClusterSamples, coordinator, manifest=manifest,
                             manifest_paths=paths, cluster_workers=len(paths),
                             lost_workers=lost_workers)
  trainer = config.build(lambda: loop.OuterTrainer(experiment, train_dir, seed=seed,
                                                   sample_source=source))
  try:
    return _train(trainer, train_dir, command)
  except tf.errors.OpError as e:
    # ClusterCoordinator retries a worker's closures elsewhere; an UnavailableError that reaches
    # us is a lost parameter server, whose variables are gone. Lost together with a worker, it
    # can surface as another error (an invalid device of a resource), so that is probed.
    if not isinstance(e, tf.errors.UnavailableError) and _answers(trainer.theta):
      raise
    servers = ', '.join(resolver.cluster_spec().job_tasks('ps'))
    raise UserError(f'lost the parameter server {servers} ({type(e).__name__}); restart the '
                    'cluster and re-run the same command: training resumes from the last '
                    'checkpoint') from None


def _answers(variable):
  """Whether the parameter server holding `variable` still answers a read."""
  try:
    variable.read_value()
    return True
  except tf.errors.OpError:
    return False


def _train(trainer, train_dir, command):
  with io_utils.remove_created_dirs_on_error(train_dir):  # a refused run leaves no empty dir
    result = trainer.train(config_str=gin.config_str(), command=command)
  if result is None:
    print(f'{train_dir} is already trained for {trainer.num_outer_steps} outer steps; raise '
          'OuterTrainer.num_outer_steps to train on')
    return None
  print(json.dumps(io_utils.json_safe(result), indent=2))
  print(f'throughput: {os.path.join(train_dir, loop.THROUGHPUT)}')
  print(f'outer-training curves: {os.path.join(train_dir, loop.OUTER_TRAINING_PNG)}')
  print(f'TensorBoard summaries: {os.path.join(train_dir, "summaries")} '
        f'(tensorboard --logdir {train_dir})')
  print(f'checkpoints: {train_dir}; best θ by meta-evaluation (outer-valid where the config has it): '
        f'{os.path.join(train_dir, run_checkpoints.BEST)}  (evaluate with bin/eval --checkpoint=...)')
  return result


def is_local_chief(cluster):
  """Whether --cluster=`cluster` makes this process the chief of a loopback cluster."""
  try:
    return (cluster_lib.parse(cluster) or (None,))[0] == cluster_lib.LOCAL
  except UserError:
    return False


def exit_local_chief(code):
  """Ends the chief of a loopback cluster without the interpreter's clean-up.

  By then its tasks are stopped and everything it wrote is closed; the clean-up would only make
  TensorFlow's eager context try to remove every traced function from the stopped tasks and log
  an error for each. Standard streams and log handlers are flushed first.
  """
  if isinstance(code, str):  # sys.exit(message)
    print(code, file=sys.stderr)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code if isinstance(code, int) else int(code is not None))

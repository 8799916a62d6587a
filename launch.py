r"""Train and evaluate a long-tailed classifier (or, with ``task="regression"``, a DIR model) from a config file.

  python launch.py --config=configs/fashion_mnist_lt.py --workdir=/tmp/fmnist_lt
  python launch.py --config=configs/cifar_lt.py:dataset=cifar100,ir=50,loss=la \
      --workdir=/tmp/c100 --config.optim.lr=0.05
  python launch.py --config=configs/fashion_mnist_dir.py:method=lds_fds --workdir=/tmp/fmnist_dir

Multi-host (README "Running on a pod / several hosts"): every process runs the same
command. ``--config.multihost=true`` calls ``jax.distributed.initialize()``, which finds
the coordinator, process count and process id itself on TPU pods, Slurm (``srun``),
Open MPI and GKE. Elsewhere (e.g. several processes on localhost) pass them explicitly:

  python launch.py --config=configs/fashion_mnist_lt.py:smoke --workdir=/tmp/mh \
      --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=0   # and =1

or set ``LT_JAX_COORDINATOR_ADDRESS``, ``LT_JAX_NUM_PROCESSES``, ``LT_JAX_PROCESS_ID``
(any of these implies a multi-process run; ``LT_JAX_DISTRIBUTED=1`` forces one).
"""

import errno
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # tfds imports TensorFlow: keep its C++ logs quiet

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator for jax.distributed "
    "(env LT_JAX_COORDINATOR_ADDRESS); leave unset on TPU pods / Slurm, where JAX finds it.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (env LT_JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) "
                                   "(env LT_JAX_PROCESS_ID).")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for every process to join.")
flags.mark_flags_as_required(["config", "workdir"])


def distributed_kwargs(multihost: bool, coordinator_address=None, num_processes=None, process_id=None,
                       env=None) -> dict | None:
  """Arguments for ``jax.distributed.initialize``, or ``None`` for a single-process run.

  Explicit values (flags, else ``LT_JAX_*`` environment variables) must come as a full set
  (address, count, id) and imply a multi-process run; with none of them and
  ``multihost`` true, JAX's own cluster detection (TPU pod, Slurm, MPI, GKE) supplies them.
  """
  env = os.environ if env is None else env
  address = coordinator_address or env.get("LT_JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else env.get("LT_JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else env.get("LT_JAX_PROCESS_ID")
  given = {"coordinator_address": address, "num_processes": count, "process_id": pid}
  if not any(v is not None for v in given.values()):
    return {} if multihost or env.get("LT_JAX_DISTRIBUTED") == "1" else None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"multi-process run: also pass --{', --'.join(missing)} (or LT_JAX_"
                     f"{', LT_JAX_'.join(m.upper() for m in missing)}); got {given}")
  count, pid = int(count), int(pid)
  if count < 1 or not 0 <= pid < count:
    raise ValueError(f"need num_processes >= 1 and 0 <= process_id < num_processes, got {count} and {pid}")
  return {"coordinator_address": address, "num_processes": count, "process_id": pid}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)  # orbax/tfds INFO lines would drown the progress bar
  import jax
  try:
    dist = distributed_kwargs(config.multihost, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if dist is not None:
    _initialize_distributed(jax, dist, _INIT_TIMEOUT.value)
    if jax.process_index() == 0:
      print(f"lt_jax: jax.distributed with {jax.process_count()} processes, {jax.device_count()} devices "
            f"({jax.local_device_count()} per process)", flush=True)
  from lt_jax.data.prepare import DataUnavailableError, DatasetFormatError
  from lt_jax.train.checkpoint import ResumeError
  from lt_jax.train.config import ConfigError
  from lt_jax.train.loop import CheckpointWriteError, Interrupted, NonFiniteLossError
  from lt_jax.train.workdir import WorkdirInUseError
  signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM stops like Ctrl-C: finish the save, resumable
  try:
    if config.get("task", "classification") == "regression":  # deep imbalanced regression (DIR)
      from lt_jax.train.regression_trainer import train_and_evaluate_regression
      train_and_evaluate_regression(config, _WORKDIR.value)
    else:
      from lt_jax.train.trainer import train_and_evaluate
      train_and_evaluate(config, _WORKDIR.value)
  except (ConfigError, DataUnavailableError, DatasetFormatError, ResumeError, NonFiniteLossError,
          WorkdirInUseError, CheckpointWriteError) as e:  # user errors and stopped runs: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a full disk outside checkpointing (metrics, plots, summary)
    if e.errno != errno.ENOSPC:
      raise
    print(f"error: no space left on device writing {e.filename or _WORKDIR.value}; the last checkpoint is intact: "
          "free space and rerun the same command to resume", file=sys.stderr)
    return 2
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    return 130
  except KeyboardInterrupt:  # outside the training loop (start-up, evaluation): nothing half-written
    print("interrupted; rerun the same command to resume", file=sys.stderr)
    return 130


def _initialize_distributed(jax, dist: dict, timeout_s: int) -> None:
  """``jax.distributed.initialize`` saying what it waits for; a process that never joins ends the
  run after ``timeout_s`` with one ``error:`` line (exit 2) instead of the coordinator's C++ abort."""
  import threading  # pylint: disable=g-import-not-at-top
  if dist:
    what = (f"{dist['num_processes']} processes at {dist['coordinator_address']} (this is process "
            f"{dist['process_id']})")
  else:
    what = "the processes of this cluster (found by JAX: TPU pod, Slurm, MPI or GKE)"
  print(f"lt_jax: waiting up to {timeout_s} s for {what}", file=sys.stderr, flush=True)
  done = threading.Event()

  def watchdog():
    if not done.wait(timeout_s):
      print(f"error: jax.distributed: not every process joined within {timeout_s} s (waiting for {what}); "
            "start the same command with each --process_id, or raise --distributed_timeout",
            file=sys.stderr, flush=True)
      os._exit(2)  # pylint: disable=protected-access  (the coordination service threads cannot be joined)

  threading.Thread(target=watchdog, daemon=True).start()
  try:  # JAX's own deadline comes later: the watchdog's line is what the user sees
    jax.distributed.initialize(**dist, initialization_timeout=timeout_s + 60)
  finally:
    done.set()


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def _cause(e: BaseException):
  return e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def _innermost(e: BaseException) -> str:
  """The deepest cause's message on one line (absl wraps config-file and override errors)."""
  while _cause(e) is not None:
    e = _cause(e)
  return " ".join(str(e).split()).strip("'\"") or type(e).__name__


def _unknown_key_message(argv, key: str) -> str | None:
  """``--config.a.b=v`` naming a key the config does not have: the valid keys at that level."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    if key not in path:
      continue
    try:
      from ml_collections import config_flags as cf  # pylint: disable=g-import-not-at-top
      spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
      file, _, variant = spec.partition(":")
      node = cf.config_flags._LoadConfigModule("lt_jax_config", file).get_config(variant or None)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      return None
    parent = path[:path.index(key)]
    for p in parent:
      node = node[p]
    where = ".".join(["config", *parent])
    return f"unknown config key {'.'.join(path)!r}: {where} has no {key!r}; valid keys: {', '.join(sorted(node.keys()))}"
  return None


def parse_flags(argv):
  """absl's flag parsing with one ``error:`` line (exit 2) instead of a traceback: unknown config
  keys (with the valid ones), bad variants, a missing config file, bad values."""
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS["config"].present:
      _CONFIG.value.to_dict()  # the config file loads lazily: surface its errors here
    return rest
  except Exception as e:  # pylint: disable=broad-except  (flag, config-file and variant errors alike)
    inner = e
    while _cause(inner) is not None:
      inner = _cause(inner)
    msg = _unknown_key_message(argv, inner.args[0]) if isinstance(inner, KeyError) and inner.args else None
    print(f"error: {msg or _innermost(e)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=parse_flags))

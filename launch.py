r"""Train and evaluate a long-tailed classifier from a config file.

  python launch.py --config=configs/fashion_mnist_lt.py --workdir=/tmp/fmnist_lt
  python launch.py --config=configs/cifar_lt.py:dataset=cifar100,ir=50,loss=la \
      --workdir=/tmp/c100 --config.optim.lr=0.05

Multi-host: pass --config.multihost=true (or run where the platform sets up
jax.distributed, e.g. TPU pods); every process runs this same command.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # tfds imports TensorFlow: keep its C++ logs quiet

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)  # orbax/tfds INFO lines would drown the progress bar
  import jax
  if config.multihost or os.environ.get("LT_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  from lt_jax.data.prepare import DataUnavailableError
  from lt_jax.train.checkpoint import ResumeError
  from lt_jax.train.config import ConfigError
  from lt_jax.train.trainer import train_and_evaluate
  try:
    train_and_evaluate(config, _WORKDIR.value)
  except (ConfigError, DataUnavailableError, ResumeError) as e:  # the user's to fix: no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(app.run(main))

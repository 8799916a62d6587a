"""Test session setup: two emulated CPU devices (PLATFORM.md: at most 2, block on each step).

The suite runs on ``-n auto`` pytest-xdist workers (``pyproject.toml``; capped at 4 below). All
of them, and every process a test starts (``launch.py`` smoke runs, notebook kernels), share one
persistent XLA compilation cache: the same small steps are compiled once per session, not once
per process. The environment variables below are how child processes inherit it.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Set once by the first process (the xdist controller, or a plain pytest run); workers and
# subprocesses inherit it.
os.environ.setdefault("LT_JAX_TEST_XLA_CACHE",
                      os.path.join(tempfile.gettempdir(), f"lt_jax_test_xla_cache_{os.getpid()}"))
_CACHE = os.environ["LT_JAX_TEST_XLA_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_xdist_auto_num_workers(config):
  """``-n auto``: one worker per core, at most 4 (each holds a JAX runtime and TensorFlow)."""
  del config
  return max(1, min(4, len(os.sched_getaffinity(0))))


# Seconds per file in a quiet run on the 2-core machine (`--durations=0`, 2026-12-06). xdist hands
# whole files to the workers in collection order (`--dist loadfile --no-loadscope-reorder` in
# pyproject.toml), so the longest files start first and the run ends on short ones instead of one
# worker finishing a long file alone. Only the order depends on these numbers; a file not listed
# runs after them in its usual order.
FILE_SECONDS = {
    "test_train.py": 97, "test_notebooks.py": 79, "test_population.py": 77, "test_stages.py": 64,
    "test_contrastive.py": 49, "test_multihost.py": 49, "test_models.py": 47, "test_regression_train.py": 46,
    "test_experts.py": 45, "test_meta_weight.py": 37, "test_samplers.py": 34, "test_losses.py": 32,
    "test_streaming.py": 26, "test_regression.py": 22, "test_feature_stages.py": 21, "test_decoupled.py": 20,
    "test_mixing.py": 18, "test_metrics.py": 16, "test_meta_sampler.py": 16, "test_data.py": 15,
    "test_vocabulary.py": 15, "test_heads.py": 14, "test_loop.py": 11,
}


def pytest_collection_modifyitems(session, config, items):
  """Longest files first (a stable sort: the order inside a file is kept)."""
  del session, config
  items.sort(key=lambda item: -FILE_SECONDS.get(os.path.basename(str(item.path)), 0))


def pytest_sessionfinish(session, exitstatus):
  if hasattr(session.config, "workerinput"):  # an xdist worker: the controller cleans up
    return
  import shutil
  shutil.rmtree(_CACHE, ignore_errors=True)

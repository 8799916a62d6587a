"""Test session setup: two emulated CPU devices (PLATFORM.md: at most 2, block on each step)."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)

# The trainer tests build the same small steps many times: share compiled executables
# through a persistent cache (one per session, so stale entries never matter).
_CACHE = os.path.join(tempfile.gettempdir(), f"lt_jax_test_xla_cache_{os.getpid()}")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_sessionfinish(session, exitstatus):
  import shutil
  shutil.rmtree(_CACHE, ignore_errors=True)

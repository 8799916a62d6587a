"""Test session setup: two emulated CPU devices (PLATFORM.md: at most 2, block on each step)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)

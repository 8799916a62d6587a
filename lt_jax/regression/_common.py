"""Shared array helpers of the DIR modules (dtype, concreteness and size checks, bin ids, safe division)."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from lt_jax import metrics


Array = jax.Array


def _f32(x) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def _concrete(x) -> np.ndarray | None:
  """NumPy value of ``x`` when it is known outside ``jit``, else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_num(name: str, n) -> int:
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"{name} must be a static positive int, got {n!r}")
  return int(n)


def _ids(bin_ids, num_bins: int, mask) -> tuple[Array, Array]:
  """Integer bin ids with invalid entries (masked, or outside ``[0, B)``) sent to ``B`` (dropped)."""
  b = jnp.asarray(bin_ids)
  if b.ndim != 1 or not jnp.issubdtype(b.dtype, jnp.integer):
    raise ValueError(f"bin_ids must be a 1-D integer array, got shape {b.shape} dtype {b.dtype}")
  b = b.astype(jnp.int32)
  ok = metrics.as_mask(mask, b.shape[0]) & (b >= 0) & (b < num_bins)
  return jnp.where(ok, b, num_bins), ok


def _safe_div(num: Array, den: Array, fill: float = 0.0) -> Array:
  """``num / den`` where ``den != 0``, else ``fill``; no inf/NaN in values or gradients."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), fill)

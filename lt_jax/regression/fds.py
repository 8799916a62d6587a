"""Feature distribution smoothing (FDS, Yang et al., ICML 2021): explicit state, per-bin sums, update, calibration."""

from __future__ import annotations

from typing import NamedTuple
import jax
import jax.numpy as jnp
from lt_jax import metrics
from lt_jax.regression._common import Array, _check_num, _f32, _ids, _safe_div
from lt_jax.regression.lds import _resolve_kernel, _windows


class FDSState(NamedTuple):
  """Explicit FDS state (a pytree; checkpoint it with the train state).

  ``running_mean`` / ``running_var``: ``(B, D)`` momentum averages of the per-bin feature mean
  and variance (``mu_b``, ``sigma_b^2``; initial 0 / 1 as the reference buffers).
  ``smoothed_mean`` / ``smoothed_var``: ``(B, D)`` the same smoothed over bins (``mu~_b``,
  ``sigma~_b^2``). ``num_samples``: ``(B,)`` float32 examples seen per bin over all updates (the
  reference's ``num_samples_tracked``, used by ``momentum=None``). ``num_updates``: int32 scalar,
  number of :func:`fds_update` calls so far (0 = not initialised; the first update uses factor 0).
  """
  running_mean: Array
  running_var: Array
  smoothed_mean: Array
  smoothed_var: Array
  num_samples: Array
  num_updates: Array


class FDSSums(NamedTuple):
  """Per-bin feature sums: ``count`` (int32 ``(B,)``), ``sum`` = ``sum z``, ``sum_sq`` = ``sum z^2``.

  ``sum`` and ``sum_sq`` are float32 ``(B, D)``.
  ``a + b`` adds field-wise, so batches accumulate with ``+`` / ``sum(...)`` and devices with
  ``psum`` (or automatically under ``jit`` over a sharded batch).
  """
  count: Array
  sum: Array
  sum_sq: Array

  __add__ = metrics.tuple_add
  __radd__ = metrics.tuple_radd


def fds_init(num_bins: int, feature_dim: int) -> FDSState:
  """Initial :class:`FDSState`: means 0, variances 1 (running and smoothed), no samples, 0 updates."""
  B = _check_num("num_bins", num_bins)
  D = _check_num("feature_dim", feature_dim)
  zeros, ones = jnp.zeros((B, D), jnp.float32), jnp.ones((B, D), jnp.float32)
  return FDSState(zeros, ones, zeros, ones, jnp.zeros((B,), jnp.float32), jnp.zeros((), jnp.int32))


def fds_batch_stats(features: Array, bin_ids: Array, num_bins: int, mask: Array | None = None,
                    center: Array | None = None) -> FDSSums:
  """Per-bin sums ``(n_b, sum_{i in b} (z_i - c_b), sum_{i in b} (z_i - c_b)^2)`` of a batch of features.

  ``features`` ``(N, D)`` (any float dtype, summed in float32, gradients stopped: statistics
  are collected without gradients, as the reference's ``torch.no_grad()`` feature pass);
  ``bin_ids`` ``(N,)`` from :func:`bin_index` (edge clipping as the reference's
  ``labels <= bucket_start`` / ``labels >= bucket_num - 1`` groups). Rows with ``mask`` false or
  an id outside ``[0, B)`` are dropped. Sums over disjoint batches add up to the sums of their
  union, so the epoch statistics are exact under any batching and device sharding (a scatter-add:
  under ``jit`` with the batch sharded over a mesh, XLA all-reduces the partial sums).

  ``center`` (optional ``(B, D)``, e.g. ``state.running_mean``) shifts each bin before summing, to
  avoid float32 cancellation in ``var = (S2 - S1^2 / n) / (n - 1)`` when ``|mean| >> std``; pass
  the same ``center`` to :func:`fds_update`, and keep it fixed over the epoch.
  """
  B = _check_num("num_bins", num_bins)
  z = jax.lax.stop_gradient(_f32(features))
  if z.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {z.shape}")
  ids, ok = _ids(bin_ids, B, mask)
  if ids.shape[0] != z.shape[0]:
    raise ValueError(f"features and bin_ids disagree in length: {z.shape[0]} vs {ids.shape[0]}")
  if center is not None:
    c = jax.lax.stop_gradient(_f32(center))
    if c.shape != (B, z.shape[1]):
      raise ValueError(f"center must have shape {(B, z.shape[1])}, got {c.shape}")
    z = z - c[jnp.clip(ids, 0, B - 1)]
  z = jnp.where(ok[:, None], z, 0.0)
  zeros = jnp.zeros((B, z.shape[1]), jnp.float32)
  return FDSSums(jnp.zeros((B,), jnp.int32).at[ids].add(ok.astype(jnp.int32), mode="drop"),
                 zeros.at[ids].add(z, mode="drop"), zeros.at[ids].add(z * z, mode="drop"))


def fds_smooth(stats: Array, kernel: Array) -> Array:
  """Smooth per-bin statistics over bins: ``s~_b = sum_k w_k s_{b - h + k}``, reflect padding, ``(B, D)``.

  ``torch.nn.functional.conv1d`` of ``F.pad(..., mode='reflect')`` as the reference FDS: a
  cross-correlation (no flip; the windows are symmetric) with the edge bin *not* repeated
  (``[a, b, c]`` padded by 2 is ``[c, b, a, b, c, b, a]``, equal to ``numpy.pad(mode='reflect')``).
  Pads wider than ``B - 1`` (which torch rejects) reflect repeatedly as NumPy does.
  """
  s = _f32(stats)
  k = _f32(kernel)
  if k.ndim != 1 or k.shape[0] % 2 == 0:
    raise ValueError(f"fds_smooth: kernel must be 1-D of odd length, got shape {k.shape}")
  squeeze = s.ndim == 1
  if squeeze:
    s = s[:, None]
  h = (k.shape[0] - 1) // 2
  padded = jnp.pad(s, ((h, h), (0, 0)), mode="reflect")
  out = jnp.einsum("bkd,k->bd", _windows(padded, k.shape[0]), k)
  return out[:, 0] if squeeze else out


def fds_update(state: FDSState, sums: FDSSums, momentum: float | None = 0.9,
               kernel: str | Array = "gaussian", ks: int = 5, sigma: float = 1.0,
               center: Array | None = None, reference_lag: bool = False) -> FDSState:
  """Once-per-epoch FDS update from the summed statistics of the whole training set (DIR, ICML 2021).

  For each bin with ``n_b > 0`` in ``sums``: ``mean_b = S1_b / n_b`` and the unbiased variance
  ``var_b = (S2_b - S1_b^2 / n_b) / (n_b - 1)`` (``torch.var``; a single example gives 0, as the
  reference's ``unbiased=False`` for one sample). A centred sum of squares at or below
  ``1e-6 * S2_b`` is below the float32 resolution of the sums and is taken as exactly 0, so a
  constant feature dimension (e.g. a dead ReLU unit) gets variance 0 as with ``torch.var``'s
  two-pass computation, and :func:`fds_calibrate` leaves it unchanged as the reference does. For
  features with ``|mean| >> std``, pass ``center`` to both functions. Then, as the reference's
  ``update_running_stats``:

  ``running <- (1 - f) * current + f * running``, with ``f = momentum`` (0.9), or for
  ``momentum=None`` the cumulative average ``f = 1 - n_b / N_b`` (``N_b`` = examples tracked so
  far), and ``f = 0`` in the first update (``state.num_updates == 0``, the reference's
  ``epoch == start_update``). Bins absent from ``sums`` keep their running statistics; a bin first
  seen after the first update is blended with the initial 0 / 1 (as the reference). Finally
  ``smoothed = fds_smooth(running, kernel)`` with a *sum-normalised* window
  (``lds_kernel(kernel, ks, sigma, normalize='sum')``; argparse default sigma=1, README uses 2;
  an explicit window is used as given).

  ``reference_lag=True`` reproduces the reference's timing instead: its ``_update_last_epoch_stats``
  smooths the running statistics *before* the epoch's update (from the second update on), while
  the normalising ``running_*_last_epoch`` buffers alias ``running_*`` and so see the update. Then
  ``smoothed`` lags ``running`` by one epoch. After the first update ``smoothed = running`` (the
  reference's buffers are still the initial 0 / 1 then), so :func:`fds_calibrate` is the identity
  in the following epoch exactly as the reference's first smoothing epoch, and the same
  ``start_smooth`` reproduces the reference run. The DIR trainer's default is
  ``fds.reference_lag=True`` (the reference's timing); ``False`` smooths the just-updated
  statistics (no lag, the paper's description). ``center`` must be the one given to
  :func:`fds_batch_stats`.
  """
  if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
    raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum}")
  B, D = state.running_mean.shape
  if sums.sum.shape != (B, D) or sums.count.shape != (B,):
    raise ValueError(f"sums have shapes {sums.count.shape}, {sums.sum.shape}; state has (B, D) = {(B, D)}")
  k = _resolve_kernel(kernel, ks, sigma, "sum")
  n = _f32(sums.count)
  seen = n > 0
  s1, s2 = _f32(sums.sum), _f32(sums.sum_sq)
  n_ = jnp.where(seen, n, 1.0)[:, None]
  shift = jnp.zeros((B, D), jnp.float32) if center is None else _f32(center)
  mean = shift + s1 / n_
  ss = s2 - s1 * s1 / n_  # centred sum of squares
  var = jnp.where((n_ > 1) & (ss > 1e-6 * s2), ss / jnp.maximum(n_ - 1.0, 1.0), 0.0)
  tracked = state.num_samples + n
  if momentum is None:
    f = 1.0 - _safe_div(n, tracked)
  else:
    f = jnp.full((B,), float(momentum), jnp.float32)
  first = state.num_updates == 0
  f = jnp.where(first, 0.0, f)[:, None]
  upd = seen[:, None]
  run_mean = jnp.where(upd, (1.0 - f) * mean + f * state.running_mean, state.running_mean)
  run_var = jnp.where(upd, (1.0 - f) * var + f * state.running_var, state.running_var)
  if reference_lag:
    # First update: smoothed = running, so the next epoch's recalibration is the identity, as the
    # reference's (its *_last_epoch buffers still hold the initial 0 / 1 then).
    sm_mean = jnp.where(first, run_mean, fds_smooth(state.running_mean, k))
    sm_var = jnp.where(first, run_var, fds_smooth(state.running_var, k))
  else:
    sm_mean, sm_var = fds_smooth(run_mean, k), fds_smooth(run_var, k)
  return FDSState(run_mean, run_var, sm_mean, sm_var, tracked, state.num_updates + 1)


def fds_calibrate(features: Array, bin_ids: Array, state: FDSState,
                  clip: tuple[float, float] = (0.1, 10.0), mask: Array | None = None) -> Array:
  """Feature recalibration ``z' = (z - mu_b) sqrt(clip(sigma~_b^2 / sigma_b^2, lo, hi)) + mu~_b``.

  DIR FDS (Yang et al., ICML 2021; diagonal covariance, as the reference ``calibrate_mean_var``):
  ``mu, sigma^2`` = ``state.running_*``, ``mu~, sigma~^2`` = ``state.smoothed_*`` of each
  example's bin, ``clip=(0.1, 10)``. As the reference, a bin whose variances sum below ``1e-10``
  is left unchanged, and so is every feature dimension with ``sigma_b^2 = 0``. Rows with ``mask``
  false or a bin id outside ``[0, B)`` are returned unchanged. Gradients flow to ``features``
  (scaled by the factor), not to the state. Returns the features' shape and dtype.

  Apply only in the training forward pass, before the regressor, from epoch ``start_smooth``
  (reference: 1) on; never at evaluation (the reference's ``if self.training`` guard).
  """
  z = jnp.asarray(features)
  dtype = z.dtype
  z = z.astype(jnp.float32)
  B, D = state.running_mean.shape
  if z.ndim != 2 or z.shape[1] != D:
    raise ValueError(f"features must be (N, {D}), got shape {z.shape}")
  ids, ok = _ids(bin_ids, B, mask)
  if ids.shape[0] != z.shape[0]:
    raise ValueError(f"features and bin_ids disagree in length: {z.shape[0]} vs {ids.shape[0]}")
  lo, hi = float(clip[0]), float(clip[1])
  if not 0 < lo <= hi:
    raise ValueError(f"clip must be (lo, hi) with 0 < lo <= hi, got {clip}")
  st = jax.tree.map(jax.lax.stop_gradient, state)
  b = jnp.clip(ids, 0, B - 1)
  m1, v1 = st.running_mean[b], st.running_var[b]
  m2, v2 = st.smoothed_mean[b], st.smoothed_var[b]
  active = (jnp.sum(st.running_var, axis=1) >= 1e-10)[b] & ok  # (N,)
  dim_ok = active[:, None] & (v1 != 0)
  factor = jnp.clip(_safe_div(v2, v1, 1.0), lo, hi)
  out = jnp.where(dim_ok, (z - m1) * jnp.sqrt(factor) + m2, z)
  return out.astype(dtype)

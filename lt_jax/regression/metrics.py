"""DIR metrics from per-bin sums: MAE / MSE / geometric mean, overall and many / medium / few-shot."""

from __future__ import annotations

from typing import NamedTuple
import jax.numpy as jnp
from lt_jax import metrics
from lt_jax.priors import shot_groups
from lt_jax.regression._common import Array, _check_num, _ids
from lt_jax.regression.losses import _pair


REGRESSION_KEYS = ("mae", "mse", "gm")


class RegressionSums(NamedTuple):
  """Per-bin error sums ``count`` (int32), ``sum_abs`` = ``sum |e|``, ``sum_sq`` = ``sum e^2``,
  ``sum_log`` = ``sum log(|e| + eps)`` (float32), each ``(B,)``. ``a + b`` adds field-wise."""
  count: Array
  sum_abs: Array
  sum_sq: Array
  sum_log: Array

  __add__ = metrics.tuple_add
  __radd__ = metrics.tuple_radd


def regression_sums(pred: Array, target: Array, bin_ids: Array, num_bins: int,
                    mask: Array | None = None, eps: float = 1e-8) -> RegressionSums:
  """Per-bin sufficient statistics of MAE, MSE and the geometric-mean error, one scatter-add each.

  ``e_i = yhat_i - y_i`` (``pred``, ``target`` ``(N,)`` or ``(N, 1)``), binned by ``bin_ids`` (the
  bins of the *evaluation* targets, :func:`bin_index`). Rows with ``mask`` false or an id outside
  ``[0, B)`` are dropped. Accumulate over batches with ``+`` and over devices with ``psum`` (or a
  jitted call on a sharded batch); finish with :func:`regression_summary`.

  The geometric mean uses ``log(|e| + eps)``. The reference computes ``scipy.stats.gmean(|e|)``
  with no epsilon, so one exact-zero error makes its GM 0 (a ``log(0) = -inf``); ``eps=1e-8``
  keeps the sums finite and leaves ``log|e|`` unchanged in float32 for ``|e| >= 0.25``; ``eps=0`` reproduces
  SciPy exactly, zeros included (the ``-inf`` then gives GM 0).
  """
  B = _check_num("num_bins", num_bins)
  p, t = _pair(pred, target)
  e = (p - t).reshape(p.shape[0], -1)
  if e.shape[1] != 1:
    raise ValueError(f"regression_sums takes scalar targets (N,) or (N, 1), got {p.shape}")
  a = jnp.abs(e[:, 0])
  ids, ok = _ids(bin_ids, B, mask)
  if ids.shape[0] != a.shape[0]:
    raise ValueError(f"pred and bin_ids disagree in length: {a.shape[0]} vs {ids.shape[0]}")
  a = jnp.where(ok, a, 1.0)
  zeros = jnp.zeros((B,), jnp.float32)
  return RegressionSums(jnp.zeros((B,), jnp.int32).at[ids].add(ok.astype(jnp.int32), mode="drop"),
                        zeros.at[ids].add(jnp.where(ok, a, 0.0), mode="drop"),
                        zeros.at[ids].add(jnp.where(ok, a * a, 0.0), mode="drop"),
                        zeros.at[ids].add(jnp.where(ok, jnp.log(a + eps), 0.0), mode="drop"))


def _region(s: RegressionSums, keep: Array) -> dict[str, Array]:
  n = jnp.sum(jnp.where(keep, s.count, 0)).astype(jnp.float32)

  def avg(x):
    return jnp.where(n > 0, jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(n, 1.0), jnp.nan)

  return {"mae": avg(s.sum_abs), "mse": avg(s.sum_sq), "gm": jnp.exp(avg(s.sum_log))}


def regression_summary(sums: RegressionSums, train_bin_counts: Array | None = None,
                       many: int = 100, few: int = 20) -> dict[str, Array]:
  """MAE, MSE and geometric mean error, overall and per shot region, float32 scalars (jit-safe).

  ``mae = sum |e| / N``, ``mse = sum e^2 / N``, ``gm = exp(sum log(|e| + eps) / N)`` over all
  examples (keys ``mae``, ``mse``, ``gm``). With ``train_bin_counts`` (the *training*
  :func:`label_histogram` over the same bins) also ``many_*``, ``medium_*``, ``few_*`` for each
  metric: regions of bins with ``> many`` (100), ``< few`` (20) and the rest of training
  examples (:func:`lt_jax.priors.shot_groups`), averaged over the *examples* of the region, as
  DIR ``shot_metrics`` (sum of errors over the region's test examples / their count; its GM is
  ``gmean`` of the region's errors). Empty region: NaN. With unit integer bins this equals the
  reference, which looks up the training count of each exact test label.
  """
  s = RegressionSums(*sums)
  out = _region(s, jnp.ones(s.count.shape, bool))
  if train_bin_counts is not None:
    tc = jnp.asarray(train_bin_counts)
    if tc.shape != s.count.shape:
      raise ValueError(f"train_bin_counts must have shape {s.count.shape}, got {tc.shape}")
    for g, keep in shot_groups(tc, many, few).items():
      out.update({f"{g}_{k}": v for k, v in _region(s, keep).items()})
  return out

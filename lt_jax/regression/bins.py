"""Target bins: edges for integer or float targets, bin ids, histograms (Yang et al., ICML 2021)."""

from __future__ import annotations

import math
import numpy as np
import jax.numpy as jnp
from lt_jax.regression._common import Array, _f32, _ids


def make_bins(start: float, stop: float, width: float = 1.0) -> Array:
  """Equal-width bin edges ``start, start + w, ..., start + B w`` with ``B = ceil((stop - start) / w)``.

  Host-side (static configuration), returns float32 edges ``(B + 1,)``; the last edge is ``>= stop``.
  ``make_bins(0, 121, 1)`` gives the reference's 121 per-year bins of IMDB-WIKI-DIR / AgeDB-DIR
  (``max_target = 121``); ``make_bins(0, 5, 0.1)`` gives 50 bins of width 0.1 for STS-B-style
  float labels. Any increasing edge vector works with :func:`bin_index` (non-uniform bins too).
  """
  start, stop, width = float(start), float(stop), float(width)
  if not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(width)):
    raise ValueError(f"make_bins: start, stop and width must be finite, got {start}, {stop}, {width}")
  if width <= 0:
    raise ValueError(f"make_bins: width must be > 0, got {width}")
  if stop <= start:
    raise ValueError(f"make_bins: stop must be > start, got start={start}, stop={stop}")
  n = max(1, int(math.ceil((stop - start) / width - 1e-9)))
  return jnp.asarray(start + width * np.arange(n + 1, dtype=np.float64), jnp.float32)


def _check_edges(bins) -> Array:
  e = jnp.asarray(bins)
  if e.ndim != 1 or e.shape[0] < 2:
    raise ValueError(f"bins must be a 1-D vector of >= 2 increasing edges (see make_bins), "
                     f"got shape {e.shape}")
  return e.astype(jnp.float32)


def bin_index(targets: Array, bins: Array) -> Array:
  """Bin of each target: ``b = clip(#{k : e_k <= y} - 1, 0, B - 1)``, int32 of the targets' shape.

  Bin ``b`` is ``[e_b, e_{b+1})``; targets below ``e_0`` go to bin 0 and targets ``>= e_B`` to
  bin ``B - 1`` (clipping into the edge bins). With unit integer bins from 0 this is the
  reference's ``min(max_target - 1, int(y))`` for ``y >= 0`` (DIR ``_prepare_weights``), and it
  works unchanged for float labels (the reference's per-integer histogram does not; issue #15).
  Targets are compared in float32, exact for integers below ``2^24``.
  """
  e = _check_edges(bins)
  y = _f32(targets)
  b = jnp.searchsorted(e, y.reshape(-1), side="right").reshape(y.shape) - 1
  return jnp.clip(b, 0, e.shape[0] - 2).astype(jnp.int32)


def label_histogram(targets: Array, bins: Array, mask: Array | None = None) -> Array:
  """Empirical label counts per bin, ``n_b = #{i : bin(y_i) = b}``, int32 ``(B,)``.

  ``targets`` is ``(N,)`` (or ``(N, 1)``); rows with ``mask`` false are not counted. This is the
  reference's ``value_dict`` of ``_prepare_weights`` and the *training* counts that define the
  many / medium / few-shot regions of :func:`regression_summary`.
  """
  e = _check_edges(bins)
  y = _f32(targets).reshape(-1)
  ids, ok = _ids(bin_index(y, e), e.shape[0] - 1, mask)
  return jnp.zeros((e.shape[0] - 1,), jnp.int32).at[ids].add(ok.astype(jnp.int32), mode="drop")

"""Deep imbalanced regression: binning, LDS, FDS, regression losses and shot metrics.

Yang, Zha, Chen, Wang & Katabi, "Delving into Deep Imbalanced Regression", ICML 2021 (DIR), and
Ren, Zhang, Liu & Yi, "Balanced MSE for Imbalanced Visual Regression", CVPR 2022. Behaviour
follows the reference code described in ``../shared/REFERENCE.md`` section 3 ("DIR: LDS",
"DIR: FDS"); every deviation is stated in the function that makes it.

Pieces (all pure ``jax.numpy`` functions unless marked host-side; jit/vmap/grad-safe):

* **Bins**: :func:`make_bins` (host-side edges) and :func:`bin_index` map integer *or float*
  targets to ``B`` bins (the reference only handles integer labels, issue #15); targets outside
  the edges are clipped into the first / last bin (the reference puts ``y >= max_target - 1``
  into the last bin).
* **LDS** (label distribution smoothing): :func:`label_histogram`, :func:`lds_kernel`,
  :func:`smooth_density`, :func:`lds_bin_weights` (a ``(B,)`` weight table) and
  :func:`lds_weights` (per-example weights, mean 1 over the training set).
* **FDS** (feature distribution smoothing): explicit state :class:`FDSState`, per-bin *sums*
  :func:`fds_batch_stats` (accumulate with ``+`` over batches, ``psum`` / a jitted sum over a
  sharded batch across devices), the once-per-epoch :func:`fds_update`, the bin smoother
  :func:`fds_smooth` and the training-time recalibration :func:`fds_calibrate`.
* **Losses**, per example ``(B,)`` float32: :func:`mse`, :func:`l1`, :func:`huber`,
  :func:`focal_r`, :func:`balanced_mse`; :func:`weighted` is the reference's LDS reduction.
* **Metrics** from per-bin sums: :func:`regression_sums` and :func:`regression_summary`
  (MAE / MSE / geometric mean, overall and many / medium / few-shot by *training* counts).

Conventions: ``pred`` and ``target`` are ``(B,)`` or ``(B, 1)`` (a ``(B, 1)`` vs ``(B,)`` pair is
reconciled instead of broadcasting to ``(B, B)``); dense ``(B, ...)`` targets reduce to one value
per example by a mean over the non-batch axes. A padding row is excluded with ``mask`` (or, for
bin ids, an id outside ``[0, B)``): it contributes nothing to any histogram, sum or statistic.

Trainer wiring (see the functions for the details):

1. LDS: once, before training, ``w_bin = lds_bin_weights(label_histogram(y_train, bins), ...)``;
   in the step, ``w = w_bin[bin_index(y, bins)]`` and ``loss = weighted(per_example, w, mask)``.
2. FDS: keep an :class:`FDSState` (``fds_init``) beside the train state and checkpoint it. In the
   training forward pass, for ``epoch >= start_smooth`` (reference: 1), replace the features by
   ``fds_calibrate(z, bin_ids, state)`` before the regressor; never at evaluation. After each
   epoch ``>= start_update`` (reference: 0), run the training set once more without gradients,
   sum ``fds_batch_stats`` of the *uncalibrated* features over all batches and call
   ``fds_update`` once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from lt_jax import metrics
from lt_jax.priors import shot_groups

Array = jax.Array

KERNELS = ("gaussian", "triang", "laplace")
KERNEL_NORMS = ("max", "sum")
REWEIGHTS = ("none", "inverse", "sqrt_inv")
FOCAL_KINDS = ("l1", "mse")
FOCAL_ACTIVATIONS = ("sigmoid", "tanh")
REGRESSION_KEYS = ("mae", "mse", "gm")

__all__ = [
    "KERNELS", "REWEIGHTS", "REGRESSION_KEYS",
    "make_bins", "bin_index", "label_histogram",
    "lds_kernel", "smooth_density", "lds_bin_weights", "lds_weights",
    "FDSState", "FDSSums", "fds_init", "fds_batch_stats", "fds_smooth", "fds_update", "fds_calibrate",
    "mse", "l1", "huber", "focal_r", "balanced_mse", "weighted",
    "RegressionSums", "regression_sums", "regression_summary",
]


# ============================================================================ helpers


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


# ============================================================================ bins


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


# ============================================================================ LDS


def _gaussian_delta_response(size: int, sigma: float) -> np.ndarray:
  """``scipy.ndimage.gaussian_filter1d`` of a centred delta of length ``size`` (mode='reflect', truncate=4).

  The Gaussian is sampled on ``[-r, r]`` with ``r = int(4 sigma + 0.5)`` and normalised to sum 1;
  the input is extended half-sample symmetrically (``d c b a | a b c d | d c b a``, period ``2L``),
  which is why the result is not a plain sampled Gaussian when ``r >= size``.
  """
  r = int(4.0 * sigma + 0.5)
  k = np.arange(-r, r + 1)
  phi = np.exp(-0.5 * (k / sigma) ** 2)
  phi /= phi.sum()
  L, c = size, size // 2
  j = (np.arange(L)[:, None] + k[None, :]) % (2 * L)  # source index in one period
  j = np.where(j >= L, 2 * L - 1 - j, j)
  return np.sum(np.where(j == c, phi[None, :], 0.0), axis=1)


def lds_kernel(kind: str = "gaussian", size: int = 5, sigma: float = 2.0, normalize: str = "max") -> Array:
  """Symmetric smoothing window of odd length ``size`` (DIR ``get_lds_kernel_window``), float32.

  With ``h = (size - 1) / 2`` and ``x = -h..h``:

  * ``'gaussian'``: ``gaussian_filter1d(delta, sigma)`` of a centred delta (SciPy's default
    ``mode='reflect'``, ``truncate=4``), *not* a plain sampled Gaussian;
  * ``'triang'``: ``scipy.signal.windows.triang(size)`` = ``1 - |x| / (h + 1)``;
  * ``'laplace'``: ``exp(-|x| / sigma) / (2 sigma)``.

  ``normalize='max'`` divides by the peak (peak 1), as LDS does; ``normalize='sum'`` divides by
  the sum (sum 1), as FDS does. Host-side: the window is static configuration (NumPy, float64,
  then float32). ``sigma`` is ignored by ``'triang'``. Odd sizes only (the reference's
  ``half_ks = (ks - 1) // 2`` makes even sizes inconsistent across kinds).
  """
  if kind not in KERNELS:
    raise ValueError(f"lds_kernel: kind must be one of {KERNELS}, got {kind!r}")
  if normalize not in KERNEL_NORMS:
    raise ValueError(f"lds_kernel: normalize must be one of {KERNEL_NORMS}, got {normalize!r}")
  if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
    raise ValueError(f"lds_kernel: size must be an odd positive int (e.g. 5), got {size!r}")
  sigma = float(sigma)
  if kind != "triang" and not sigma > 0:
    raise ValueError(f"lds_kernel: sigma must be > 0 for kind={kind!r}, got {sigma}")
  h = (size - 1) // 2
  x = np.arange(-h, h + 1, dtype=np.float64)
  if kind == "gaussian":
    w = _gaussian_delta_response(int(size), sigma)
  elif kind == "triang":
    w = 1.0 - np.abs(x) / (h + 1.0)
  else:
    w = np.exp(-np.abs(x) / sigma) / (2.0 * sigma)
  w = w / (w.max() if normalize == "max" else w.sum())
  return jnp.asarray(w, jnp.float32)


def _resolve_kernel(kernel, size: int, sigma: float, normalize: str) -> Array:
  if isinstance(kernel, str):
    return lds_kernel(kernel, size, sigma, normalize)
  k = _f32(kernel)
  if k.ndim != 1 or k.shape[0] % 2 == 0:
    raise ValueError(f"kernel must be one of {KERNELS} or a 1-D window of odd length, got shape {k.shape}")
  return k


def _windows(x: Array, size: int) -> Array:
  """Sliding windows ``out[i, k] = x[i + k]`` of a padded array: ``(L - size + 1, size, ...)``."""
  n = x.shape[0] - size + 1
  idx = jnp.arange(n)[:, None] + jnp.arange(size)[None, :]
  return x[idx]


def smooth_density(counts: Array, kernel: Array) -> Array:
  """Zero-padded 1-D convolution of a per-bin vector with a window, float32 ``(B,)``.

  ``q_b = sum_j k_j n_{b + h - j}`` with ``h = (K - 1) / 2`` and ``n`` outside ``[0, B)`` taken as
  0: ``scipy.ndimage.convolve1d(counts, kernel, mode='constant')``, the LDS step of DIR (the
  empirical density ``p(y')`` convolved with a symmetric kernel, ``q(y) = int k(y, y') p(y') dy'``).
  Works for windows longer than ``counts``.
  """
  n = _f32(counts)
  k = _f32(kernel)
  if n.ndim != 1 or k.ndim != 1 or k.shape[0] % 2 == 0:
    raise ValueError(f"smooth_density: counts must be 1-D and kernel 1-D of odd length, got "
                     f"{n.shape} and {k.shape}")
  h = (k.shape[0] - 1) // 2
  padded = jnp.pad(n, (h, h))
  return _windows(padded, k.shape[0]) @ k[::-1]


def _truncated_smooth(d: Array, kernel, ks: int, sigma: float) -> Array:
  """The reference's ``convolve1d(int64 density, window, mode='constant')`` (int64 output: floor).

  Concrete densities: SciPy on the host with the window built as the reference builds it (float64
  ``gaussian_filter1d`` / ``signal.windows.triang`` / Laplace, peak 1), so values that are exact
  integers in the reference's float64 arithmetic are not truncated one below. Traced: float32
  ``floor(smooth_density(d, window))``.
  """
  try:
    dn = np.asarray(d, np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return jnp.floor(smooth_density(d, _resolve_kernel(kernel, ks, sigma, "max")))
  from scipy import ndimage, signal  # host-side reproduction only
  if isinstance(kernel, str):
    h = (ks - 1) // 2
    if kernel == "gaussian":
      base = np.zeros(ks)
      base[h] = 1.0
      k = ndimage.gaussian_filter1d(base, sigma=sigma)
      k = k / k.max()
    elif kernel == "triang":
      k = signal.windows.triang(ks)
    else:
      k = np.exp(-np.abs(np.arange(-h, h + 1)) / sigma) / (2.0 * sigma)
      k = k / k.max()
  else:
    k = np.asarray(kernel, np.float64)
  out = ndimage.convolve1d(np.rint(dn).astype(np.int64), k, mode="constant")
  return jnp.asarray(out, jnp.float32)


def lds_bin_weights(counts: Array, reweight: str = "sqrt_inv", lds: bool = True,
                    kernel: str | Array = "gaussian", ks: int = 5, sigma: float = 2.0,
                    clip: tuple[float, float] | None = (5.0, 1000.0),
                    truncate_density: bool = False) -> Array:
  """Per-bin LDS / inverse-frequency weights ``(B,)``, scaled to mean 1 over the training examples.

  DIR ``_prepare_weights`` (Yang et al., ICML 2021), from the per-bin training counts ``n_b``:

  1. ``'sqrt_inv'``: ``d_b = sqrt(n_b)``; ``'inverse'``: ``d_b = clip(n_b, lo, hi)`` with
     ``clip=(5, 1000)`` as the reference (an unexplained constant, see REFERENCE.md section 4,
     "DIR": it caps the weight of bins with fewer than 5 examples at that of a 5-example bin and
     floors the weight of bins above 1000; ``clip=None`` turns it off); ``'none'``: weight 1.
  2. LDS (``lds=True``): ``d = smooth_density(d, lds_kernel(kernel, ks, sigma))`` (peak-1 window,
     zero padding), i.e. the reference convolves the *sqrt / clipped* counts.
  3. ``w_b = s / d_b`` with ``s = N / sum_b n_b / d_b`` (``N = sum_b n_b``), so the mean per-example
     weight over the training set is 1 (the reference's ``scaling = len(w) / sum(w)``).

  Zero-density rule: a bin with ``d_b = 0`` (no training mass within the kernel's reach, or
  ``'inverse'`` with ``clip=None`` and ``n_b = 0``) gets weight 0, never inf/NaN. Such a bin holds
  no training example, so the training weights and their scaling are unaffected. The reference
  rejects ``lds=True`` with ``reweight='none'``; so does this function. ``kernel`` may also be an
  explicit odd-length window (used as given).

  Integer truncation (``'inverse'`` + LDS): the reference smooths the clipped counts as an
  ``int64`` array, and ``scipy.ndimage.convolve1d`` returns the input's dtype, so the smoothed
  density is truncated to integers (``floor``; e.g. 1.5 -> 1). ``'sqrt_inv'`` densities are
  floats there and are not truncated. lt_jax keeps the real-valued density by default (the
  formula of the paper; truncation is an artefact of the dtype and changes weights by up to
  1/d_b relative). ``truncate_density=True`` reproduces the reference: the smoothing is done in
  float64 on the host for concrete counts with SciPy and the reference's window construction
  (so sums that are exact integers there stay exact) and ``floor``-ed; traced counts floor a
  float32 smoothing. A bin truncated to 0 gets weight 0 (the
  zero-density rule; the reference would divide by zero). Config: ``lds.truncate``.
  """
  if reweight not in REWEIGHTS:
    raise ValueError(f"reweight must be one of {REWEIGHTS}, got {reweight!r}")
  if lds and reweight == "none":
    raise ValueError("LDS needs reweight='sqrt_inv' (default) or 'inverse', got reweight='none'")
  n = _f32(counts)
  if n.ndim != 1:
    raise ValueError(f"counts must be a 1-D per-bin vector, got shape {n.shape}")
  if reweight == "none":
    return jnp.ones_like(n)
  if reweight == "sqrt_inv":
    d = jnp.sqrt(n)
  else:
    if clip is not None:
      lo, hi = float(clip[0]), float(clip[1])
      if not 0 <= lo <= hi:
        raise ValueError(f"clip must be (lo, hi) with 0 <= lo <= hi, or None, got {clip}")
      d = jnp.clip(n, lo, hi)
    else:
      d = n
  if lds:
    if truncate_density and reweight == "inverse":
      d = _truncated_smooth(d, kernel, ks, sigma)
    else:
      d = smooth_density(d, _resolve_kernel(kernel, ks, sigma, "max"))
  inv = _safe_div(1.0, d)  # zero-density rule: weight 0
  total = jnp.sum(n * inv)
  return inv * _safe_div(jnp.sum(n), total, 1.0)


def lds_weights(targets: Array, bins: Array, reweight: str = "sqrt_inv", lds: bool = True,
                kernel: str | Array = "gaussian", ks: int = 5, sigma: float = 2.0,
                clip: tuple[float, float] | None = (5.0, 1000.0), mask: Array | None = None,
                truncate_density: bool = False) -> Array:
  """Per-example LDS weights ``w_i = w_{bin(y_i)}`` of a training set, float32 ``(N,)``, mean 1.

  ``lds_bin_weights(label_histogram(targets, bins, mask), ...)[bin_index(targets, bins)]``: the
  reference's per-sample ``weights`` list (DIR ``_prepare_weights``; Yang et al., ICML 2021), for
  integer or float labels and any bin width. Masked rows get weight 0 and are not counted.
  ``truncate_density``: the reference's integer truncation of the ``'inverse'`` LDS density (see
  :func:`lds_bin_weights`; default off). In a
  train step, keep the ``(B,)`` table of :func:`lds_bin_weights` and look weights up per batch.
  """
  y = _f32(targets).reshape(-1)
  m = metrics.as_mask(mask, y.shape[0])
  table = lds_bin_weights(label_histogram(y, bins, m), reweight, lds, kernel, ks, sigma, clip,
                          truncate_density)
  return jnp.where(m, table[bin_index(y, bins)], 0.0)


# ============================================================================ FDS


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


# ============================================================================ losses


def _squeeze_tail(shape: tuple) -> tuple:
  while len(shape) > 1 and shape[-1] == 1:
    shape = shape[:-1]
  return shape


def _pair(pred, target) -> tuple[Array, Array]:
  """Float32 ``(pred, target)`` of one shape; ``(B, 1)`` vs ``(B,)`` is reconciled, not broadcast."""
  p, t = _f32(pred), _f32(target)
  if p.ndim == 0 or t.ndim == 0:
    raise ValueError(f"pred and target must have a batch axis, got shapes {p.shape} and {t.shape}")
  if p.shape != t.shape:
    if _squeeze_tail(p.shape) != _squeeze_tail(t.shape):
      raise ValueError(f"pred and target must have the same shape (up to trailing 1s, e.g. (B,) and "
                       f"(B, 1)), got {p.shape} and {t.shape}")
    t = t.reshape(p.shape)
  return p, t


def _per_example(x: Array) -> Array:
  return x if x.ndim == 1 else jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def mse(pred: Array, target: Array) -> Array:
  """Squared error ``(yhat - y)^2`` per example ``(B,)`` (mean over non-batch axes)."""
  p, t = _pair(pred, target)
  return _per_example((p - t) ** 2)


def l1(pred: Array, target: Array) -> Array:
  """Absolute error ``|yhat - y|`` per example ``(B,)`` (mean over non-batch axes)."""
  p, t = _pair(pred, target)
  return _per_example(jnp.abs(p - t))


def huber(pred: Array, target: Array, beta: float = 1.0) -> Array:
  """Huber loss in the reference's (smooth-L1) scaling, per example ``(B,)``.

  ``0.5 e^2 / beta`` if ``|e| < beta`` else ``|e| - 0.5 beta`` (DIR ``weighted_huber_loss``; equal to
  ``torch.nn.functional.smooth_l1_loss(beta=beta)``, Girshick, ICCV 2015), i.e. Huber's (1964)
  loss with threshold ``beta`` divided by ``beta``. ``beta > 0``.
  """
  b = _concrete(beta)
  if b is not None and not float(b) > 0:
    raise ValueError(f"huber: beta must be > 0, got {beta}")
  p, t = _pair(pred, target)
  a = jnp.abs(p - t)
  return _per_example(jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta))


def focal_r(pred: Array, target: Array, kind: str = "l1", beta: float = 0.2, gamma: float = 1.0,
            activation: str = "sigmoid") -> Array:
  """Focal-R (DIR, Yang et al., ICML 2021, appendix), per example ``(B,)``.

  ``L = l(e) * s(|e|)^gamma`` with ``l = |e|`` (``kind='l1'``) or ``e^2`` (``'mse'``) and, as the
  reference ``weighted_focal_{l1,mse}_loss``: ``s = 2 sigmoid(beta |e|) - 1`` for
  ``activation='sigmoid'`` (computed as the identical ``tanh(beta |e| / 2)``, free of cancellation
  near 0) or ``s = tanh(beta |e|)`` for ``'tanh'``. The paper writes ``sigma(|beta e|)^gamma``; the
  code's ``2 sigma - 1`` maps to ``[0, 1)`` so that a perfect prediction has weight 0. Defaults
  ``beta=0.2, gamma=1`` (age datasets). Value and gradient are finite (0 at ``e = 0``) for any
  ``gamma > 0``.
  """
  if kind not in FOCAL_KINDS:
    raise ValueError(f"focal_r: kind must be one of {FOCAL_KINDS}, got {kind!r}")
  if activation not in FOCAL_ACTIVATIONS:
    raise ValueError(f"focal_r: activation must be one of {FOCAL_ACTIVATIONS}, got {activation!r}")
  p, t = _pair(pred, target)
  a = jnp.abs(p - t)
  base = a if kind == "l1" else a * a
  s = jnp.tanh((0.5 * beta if activation == "sigmoid" else beta) * a)
  pos = s > 0
  mod = jnp.where(pos, jnp.where(pos, s, 1.0) ** gamma, 0.0)  # double where: no inf * 0 in grad
  return _per_example(base * mod)


def balanced_mse(pred: Array, target: Array, noise_var: Array | float,
                 mask: Array | None = None) -> Array:
  """Balanced MSE, batch-based Monte Carlo (BMC) form (Ren et al., CVPR 2022), per example ``(B,)``.

  ``L_i = -log softmax_j(-||yhat_i - y_j||^2 / (2 sigma^2))_{j = i} * stopgrad(2 sigma^2)``: a
  contrastive cross-entropy whose negatives are the other targets of the batch, so the label
  prior of the batch is divided out. The factor ``2 sigma^2`` (gradient stopped) is the
  reference's ``loss * (2 * noise_var).detach()``, restoring the MSE scale; the batch mean of
  ``L_i`` is the reference's ``bmc_loss``. ``noise_var = sigma^2`` is either fixed or learnable:
  pass ``params['noise_sigma'] ** 2`` (the reference learns ``sigma``, init e.g. 1, with its own
  learning rate) and the gradient reaches it through the logits. ``(B,)``, ``(B, 1)`` and
  ``(B, D)`` targets (squared Euclidean distance; Ren et al.'s multi-dimensional form with
  ``sigma^2 I``) are accepted. Rows with ``mask`` false get loss 0 and are not negatives of the
  others. Under ``jit`` with a sharded batch the softmax runs over the *global* batch.
  """
  p, t = _pair(pred, target)
  B = p.shape[0]
  p2, t2 = p.reshape(B, -1), t.reshape(B, -1)
  v = _f32(noise_var)
  m = metrics.as_mask(mask, B)
  d2 = jnp.sum((p2[:, None, :] - t2[None, :, :]) ** 2, axis=-1)  # (B, B)
  logits = jnp.where(m[None, :], -d2 / (2.0 * v), -1e30)
  ce = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
  return jnp.where(m, ce * jax.lax.stop_gradient(2.0 * v), 0.0)


def weighted(per_example: Array, weights: Array, mask: Array | None = None) -> Array:
  """The reference's weighted reduction ``sum_i m_i w_i l_i / sum_i m_i`` (mean of ``w * l``).

  DIR's ``weighted_*_loss`` multiply by the LDS weights and take ``torch.mean``: the weights are
  *not* renormalised per batch (they have mean 1 over the training set, :func:`lds_weights`).
  Use :func:`lt_jax.losses.reduce_weighted_mean` for ``sum w l / sum w``. Empty mask gives 0.
  """
  x, w = _f32(per_example), _f32(weights)
  if x.shape != w.shape or x.ndim != 1:
    raise ValueError(f"per_example and weights must both be (B,), got {x.shape} and {w.shape}")
  m = metrics.as_mask(mask, x.shape[0]).astype(jnp.float32)
  num = jnp.sum(jnp.where(m > 0, w * x, 0.0))
  return _safe_div(num, jnp.sum(m))


# ============================================================================ metrics


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

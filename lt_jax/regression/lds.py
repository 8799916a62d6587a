"""Label distribution smoothing (LDS, Yang et al., ICML 2021): kernels, smoothed density, re-weighting tables."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from lt_jax import metrics
from lt_jax.regression._common import Array, _f32, _safe_div
from lt_jax.regression.bins import bin_index, label_histogram


KERNELS = ("gaussian", "triang", "laplace")


KERNEL_NORMS = ("max", "sum")


REWEIGHTS = ("none", "inverse", "sqrt_inv")


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

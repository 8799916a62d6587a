"""Per-example DIR losses: MSE, L1, Huber, Focal-R (Yang et al. 2021), Balanced MSE (Ren et al., CVPR 2022:
batch Monte-Carlo BMC, GMM-based GAI, bin-based BNI)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from lt_jax import metrics
from lt_jax.regression._common import Array, _concrete, _f32, _safe_div


FOCAL_KINDS = ("l1", "mse")


FOCAL_ACTIVATIONS = ("sigmoid", "tanh")


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


# ------------------------------------------------------------------ Balanced MSE: GAI and BNI

class GMM(NamedTuple):
  """A 1-D Gaussian mixture of the training label distribution, ``p(y) = sum_k phi_k N(y; mu_k, v_k)``."""
  weights: Array    # (K,) phi_k, sum 1
  means: Array      # (K,) mu_k
  variances: Array  # (K,) v_k


def fit_gmm(targets, num_components: int = 8, seed: int = 0) -> GMM:
  """The GMM of Balanced MSE's GAI, fitted once, offline, on the training targets (host-side).

  Ren et al., "Balanced MSE for Imbalanced Visual Regression", CVPR 2022: the reference's
  ``preprocess_gmm.py`` fits ``sklearn.mixture.GaussianMixture(n_components=K, random_state=0)``
  (defaults: full covariance, k-means initialisation, EM to ``tol=1e-3``) to all training labels
  before training and stores ``weights_``, ``means_`` and ``covariances_``; lt_jax does the same
  (scikit-learn, float64; ``K = 8`` and ``seed = 0`` are the reference's defaults) and returns
  float32 arrays. ``targets`` are in the units the loss sees (lt_jax: target units).
  """
  from sklearn.mixture import GaussianMixture  # host-side, once per run (the reference's fit)
  y = np.asarray(targets, np.float64).reshape(-1, 1)
  k = int(num_components)
  if k < 1 or y.shape[0] < k:
    raise ValueError(f"fit_gmm: need 1 <= num_components <= number of targets, got {k} and {y.shape[0]}")
  g = GaussianMixture(n_components=k, random_state=int(seed)).fit(y)
  return GMM(jnp.asarray(g.weights_.reshape(-1), jnp.float32), jnp.asarray(g.means_.reshape(-1), jnp.float32),
             jnp.asarray(g.covariances_.reshape(-1), jnp.float32))


def bni_buckets(counts, edges, kernel=None) -> tuple[Array, Array]:
  """``(centres, weights)`` of the training label histogram for Balanced MSE's BNI (host-side).

  Ren et al., CVPR 2022, reference ``get_bucket_info``: one bucket per label value with its
  training count, optionally smoothed with the LDS window (``convolve1d(..., mode='constant')``),
  buckets of weight 0 dropped, weights normalised to sum 1. lt_jax's buckets are its target bins
  (``edges``, :func:`~lt_jax.regression.make_bins`) with the bin *midpoints* as centres: the
  reference's buckets are integer ages whose value is both the label and the centre; for float
  targets uniform in a bin the midpoint is the bucket's mean. ``kernel``: ``None`` or a 1-D
  odd-length window (e.g. :func:`~lt_jax.regression.lds_kernel`), applied to the counts as the
  reference's ``lds=True`` path. Returns float32 ``(M,)`` arrays, ``M`` = number of non-empty buckets.
  """
  n = np.asarray(counts, np.float64).reshape(-1)
  e = np.asarray(edges, np.float64).reshape(-1)
  if e.shape[0] != n.shape[0] + 1:
    raise ValueError(f"bni_buckets: need len(edges) == len(counts) + 1, got {e.shape[0]} and {n.shape[0]}")
  if kernel is not None:
    k = np.asarray(kernel, np.float64)
    if k.ndim != 1 or k.shape[0] % 2 == 0:
      raise ValueError(f"bni_buckets: kernel must be a 1-D window of odd length, got shape {k.shape}")
    h = (k.shape[0] - 1) // 2
    n = np.convolve(np.pad(n, (h, h)), k, mode="valid")  # = scipy.ndimage.convolve1d(n, k, mode="constant")
  keep = n > 0
  if not keep.any():
    raise ValueError("bni_buckets: the training histogram is empty")
  centres = (e[:-1] + e[1:]) / 2
  return jnp.asarray(centres[keep], jnp.float32), jnp.asarray(n[keep] / n[keep].sum(), jnp.float32)


def _pair_1d(pred, target) -> tuple[Array, Array]:
  p, t = _pair(pred, target)
  if p.ndim > 1 and int(np.prod(p.shape[1:])) != 1:
    raise ValueError(f"GAI / BNI take one target per example ((B,) or (B, 1)), got shape {p.shape}")
  return p.reshape(-1), t.reshape(-1)


def balanced_mse_gai(pred: Array, target: Array, noise_var: Array | float, gmm: GMM) -> Array:
  """Balanced MSE, GMM-based analytic integration (GAI) (Ren et al., CVPR 2022), per example ``(B,)``.

  With the training label density a GMM ``p(y) = sum_k phi_k N(y; mu_k, v_k)`` (:func:`fit_gmm`) and
  Gaussian noise ``sigma^2`` the balanced likelihood's normaliser integrates in closed form,
  ``int N(y; yhat, sigma^2) p(y) dy = sum_k phi_k N(yhat; mu_k, v_k + sigma^2)``, so (up to constants)::

      L_i = [ (yhat_i - y_i)^2 / (2 sigma^2) + log(sigma^2) / 2
              + logsumexp_k( log phi_k - log(v_k + sigma^2) / 2 - (yhat_i - mu_k)^2 / (2 (v_k + sigma^2)) ) ]
            * stopgrad(2 sigma^2)

  the reference's 1-D ``gai_loss`` term by term (its batch mean is the reference loss). ``noise_var``
  is ``sigma^2``, fixed or learnable (``params['noise_sigma'] ** 2``, as :func:`balanced_mse`).
  ``(B,)`` or ``(B, 1)`` predictions and targets.
  """
  p, t = _pair_1d(pred, target)
  v = _f32(noise_var)
  phi, mu, var = (_f32(a).reshape(-1) for a in gmm)
  mse_term = (p - t) ** 2 / (2.0 * v) + 0.5 * jnp.log(v)
  s = var[None, :] + v
  comp = jnp.log(phi)[None, :] - 0.5 * jnp.log(s) - (p[:, None] - mu[None, :]) ** 2 / (2.0 * s)
  return (mse_term + jax.nn.logsumexp(comp, axis=1)) * jax.lax.stop_gradient(2.0 * v)


def balanced_mse_bni(pred: Array, target: Array, noise_var: Array | float, centres: Array,
                     weights: Array) -> Array:
  """Balanced MSE, bin-based numerical integration (BNI) (Ren et al., CVPR 2022), per example ``(B,)``.

  The normaliser ``int N(y; yhat, sigma^2) p(y) dy`` as a sum over the training histogram's buckets
  ``(c_b, w_b)`` (:func:`bni_buckets`, ``sum_b w_b = 1``)::

      L_i = [ (yhat_i - y_i)^2 / (2 sigma^2) + logsumexp_b( log w_b - (yhat_i - c_b)^2 / (2 sigma^2) ) ]
            * stopgrad(2 sigma^2)

  the reference's ``bni_loss`` (the ``log(sigma^2) / 2`` of the likelihood and of every bucket's
  Gaussian cancel, so neither appears). ``noise_var`` fixed or learnable, as :func:`balanced_mse`.
  """
  p, t = _pair_1d(pred, target)
  v = _f32(noise_var)
  c, w = _f32(centres).reshape(-1), _f32(weights).reshape(-1)
  mse_term = (p - t) ** 2 / (2.0 * v)
  comp = jnp.log(w)[None, :] - (p[:, None] - c[None, :]) ** 2 / (2.0 * v)
  return (mse_term + jax.nn.logsumexp(comp, axis=1)) * jax.lax.stop_gradient(2.0 * v)

"""Per-example DIR losses: MSE, L1, Huber, Focal-R (Yang et al. 2021), Balanced MSE (Ren et al., CVPR 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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

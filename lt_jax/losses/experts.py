"""Multi-expert losses: RIDE and SADE. Pure functions of the experts' logits ``(B, E, C)``.

The models of :mod:`lt_jax.models.experts` return these logits with ``experts=True``; the
registry entries ``ride`` and ``sade`` (:data:`lt_jax.losses.EXPERT_LOSSES`) take them in
place of ``(B, C)`` logits, and the train step asks the model for them when the configured
loss is one of these. Each returns the per-example loss ``(B,)`` summed over the experts, so
that ``reduce_mean`` gives the reference's sum over experts of batch means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lt_jax import priors
from lt_jax.losses.functions import Array, _f32, _valid, as_targets, ldam_margins


_CLIP = 1e6  # |logits| bound of RIDE's tempered KL (see ride_loss)


def check_expert_logits(expert_logits, num_experts: int | None = None) -> Array:
  """float32 ``(B, E, C)`` expert logits (``ValueError`` on any other shape)."""
  z = _f32(expert_logits)
  if z.ndim != 3:
    raise ValueError(f"multi-expert losses take expert logits of shape (batch, experts, classes), got {z.shape}; "
                     "the model must be a multi-expert model (e.g. 'cnn_experts') called with experts=True")
  if num_experts is not None and z.shape[1] != num_experts:
    raise ValueError(f"this loss needs exactly {num_experts} experts, got {z.shape[1]}")
  return z


def _log_softmax_ce(z: Array, t: Array) -> Array:
  """``-sum_c t_c log softmax(z)_c`` over the last axis, ``t`` broadcast over the expert axis."""
  return -jnp.sum(t[:, None, :] * jax.nn.log_softmax(z, axis=-1), axis=-1)


def ride_diversity_weights(prior_or_counts: Array, reweight_factor: float = 0.05) -> Array:
  """RIDE's per-class temperature factors ``w_c = (C pi_c f + 1 - f) / max_k (C pi_k f + 1 - f)``.

  ``f = reweight_factor`` (0.05); the head class gets 1, rarer classes less (a sharper softmax in
  the diversity term). As ``RIDELoss.per_cls_weights_enabled_diversity``.
  """
  p = priors.prior(prior_or_counts)
  w = p.shape[0] * p * reweight_factor + 1.0 - reweight_factor
  return w / jnp.max(w)


def ride_loss(expert_logits: Array, labels: Array, prior_or_counts: Array, *, max_m: float = 0.5,
              s: float = 30.0, diversity_factor: float = -0.45, diversity_temperature: float = 1.0,
              reweight_factor: float = 0.05, example_weights: Array | None = None,
              reweighted: bool | Array = False) -> Array:
  """RIDE loss (Wang et al., "Long-tailed Recognition by Routing Diverse Distribution-Aware
  Experts", ICLR 2021), per example, summed over the E experts::

    sum_i [ w_y CE(z_i - s m_y e_y, y) + lambda T^2 KL( softmax(zbar / T) || softmax(z_i / T) ) ]

  ``z_i`` are expert i's logits, already scaled (``s cos``, the reference's ``NormedLinear`` times
  ``s = 30``), so the LDAM margin ``m_y`` (``ldam_margins(counts, max_m)``) is subtracted as
  ``s m_y`` on the true class; ``zbar = mean_i z_i`` (the model's output) enters the KL without
  gradient (``torch.no_grad()`` in the reference); ``lambda = diversity_factor`` (-0.45 in the
  CIFAR configs: a *negative* factor rewards divergence from the ensemble).

  Following ``frank-xwang/RIDE-LongTailRecognition`` ``model/loss.py::RIDELoss`` exactly, quirks included:

  * The KL is ``F.kl_div(log_softmax(z_i/T), softmax(zbar/T))``, i.e. ``KL(p_mean || p_i)`` (the
    mean distribution is the *target* of ``kl_div``), ``reduction='batchmean'``: one term per example.
  * Before re-weighting (``reweighted`` false) ``T = diversity_temperature`` (a scalar) and the CE is
    unweighted. Once re-weighted (``epoch > reweight_epoch`` there, DRW here: the registry's
    ``drw_start`` step), ``example_weights`` (``w_y``, the Class-Balanced weights normalised
    over the batch: ``F.cross_entropy(weight=w)``) weight the CE but *not* the KL, and ``T`` becomes
    the per-class vector ``diversity_temperature * ride_diversity_weights(prior, reweight_factor)``
    dividing logit column c by ``T_c``, with the ``T^2`` factor its mean (a constant).
  * ``diversity_factor == 0`` trains every expert's CE on the *mean* logits (``ride_loss_logits =
    output_logits if additional_diversity_factor == 0``), not on its own.

  Padding rows (label -1 / all-zero soft row) give 0. Soft targets: margin ``s m_c y_c``,
  target-weighted CE (lt_jax's convention). ``reweighted`` may be a traced bool. The KL term
  reads the logits clipped to +-1e6 (finite under jit for |z| up to 1e30; expert logits are
  ``s cos``, so real inputs are never clipped).
  """
  z = check_expert_logits(expert_logits)
  C = z.shape[-1]
  t = as_targets(labels, C)
  zbar = jnp.mean(z, axis=1)
  base = jnp.broadcast_to(zbar[:, None, :], z.shape) if diversity_factor == 0 else z
  margins = ldam_margins(prior_or_counts, max_m)
  ce = _log_softmax_ce(base - (s * t * margins[None, :])[:, None, :], t)          # (B, E)
  if example_weights is not None:
    ce = ce * _f32(example_weights)[:, None]
  per_class = diversity_temperature * ride_diversity_weights(prior_or_counts, reweight_factor)
  on = jnp.asarray(reweighted, bool)
  temp = jnp.where(on, per_class, jnp.full((C,), diversity_temperature, jnp.float32))
  temp_mean = jnp.where(on, jnp.mean(per_class), jnp.float32(diversity_temperature))
  # Under jit XLA computes ``z / T_c`` twice (for the row max and for the shifted logits) as a
  # multiply-add whose unrounded residual overflows ``exp`` once |z| ~ 1e9 (per-class T cannot be
  # applied after the shift, as ldam_loss does with its scalar s). Clipping at 1e6 keeps the residual
  # < 0.1; expert logits are s * cos (|z| <= 30), so this changes nothing but extreme inputs.
  zc = jnp.clip(z, -_CLIP, _CLIP)
  log_p = jax.nn.log_softmax(zc / temp, axis=-1)
  log_q = jax.nn.log_softmax(jax.lax.stop_gradient(jnp.mean(zc, axis=1)) / temp, axis=-1)[:, None, :]
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)                          # (B, E)
  per_expert = ce + diversity_factor * temp_mean ** 2 * kl * _valid(t)[:, None]
  return jnp.sum(per_expert, axis=1)


def inverse_prior(prior_or_counts: Array) -> Array:
  """The prior "reversed by rank": the class with the k-th largest prior gets the k-th smallest.

  ``pi_inv[c] = sort(pi)[C - 1 - rank(c)]`` with ``rank`` the ascending rank, as SADE's
  ``DiverseExpertLoss.inverse_prior`` (``torch.sort`` twice). Ties are broken by class index (a
  stable sort; ``torch.sort`` does not promise an order for ties). Zero-count rule applied.
  """
  p = priors.prior(prior_or_counts)
  order = jnp.argsort(p, stable=True)
  rank = jnp.argsort(order, stable=True)
  return p[order][p.shape[0] - 1 - rank]


def sade_logit_adjustments(prior_or_counts: Array, tau: float = 2.0) -> Array:
  """``(3, C)`` additive adjustments of SADE's three experts: ``0``, ``log pi``, ``log pi - tau log pi_inv``."""
  lp = priors.log_prior(prior_or_counts)
  lpi = jnp.log(inverse_prior(prior_or_counts))
  return jnp.stack([jnp.zeros_like(lp), lp, lp - tau * lpi])


def sade_loss(expert_logits: Array, labels: Array, prior_or_counts: Array, *, tau: float = 2.0,
              example_weights: Array | None = None) -> Array:
  """SADE's diverse-expert loss (Zhang et al., "Self-Supervised Aggregation of Diverse Experts for
  Test-Agnostic Long-Tailed Recognition", NeurIPS 2022), per example::

    CE(z_1, y) + CE(z_2 + log pi, y) + CE(z_3 + log pi - tau log pi_inv, y)

  Expert 1 fits the long-tailed training prior (plain softmax), expert 2 the uniform one
  (Balanced Softmax, Ren et al. 2020), expert 3 the inversely long-tailed one (``pi_inv`` =
  :func:`inverse_prior`, ``tau = 2``), as ``Vanint/SADE-AgnosticLT`` ``model/loss.py::DiverseExpertLoss``.
  The reference adds ``log(pi + 1e-9)``; lt_jax uses ``priors.log_prior`` (zero-count rule),
  the same for observed classes up to 1e-9 relative. Needs exactly 3 experts.
  """
  z = check_expert_logits(expert_logits, num_experts=3)
  t = as_targets(labels, z.shape[-1])
  ce = _log_softmax_ce(z + sade_logit_adjustments(prior_or_counts, tau)[None], t)  # (B, 3)
  if example_weights is not None:
    ce = ce * _f32(example_weights)[:, None]
  return jnp.sum(ce, axis=1)

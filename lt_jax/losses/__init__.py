"""Per-example losses for long-tailed classification, logit transforms, reductions, registry.

Every loss maps ``(logits, labels, prior_or_counts, **hparams)`` to a per-example vector
``(B,)`` in float32. Three kinds of pieces compose by ordinary function composition:

* **logit transforms** (functions of logits): :func:`logit_adjust` (``z + tau log pi``),
  :func:`apply_margin` with :func:`ldam_margins` (``z - m * y``);
* **base losses**: :func:`softmax_cross_entropy`, :func:`sigmoid_binary_cross_entropy`, focal, ...;
* **weighting and reduction**: :func:`class_weighting` (``w_y * loss``), :func:`reduce_mean`,
  :func:`reduce_weighted_mean` (PyTorch ``cross_entropy(weight=)`` semantics).

So ``softmax_cross_entropy(logit_adjust(z, pi, tau), y)`` *is* the logit-adjusted loss, and
``class_weighting(softmax_cross_entropy(30 * apply_margin(z, y, ldam_margins(n)), y), y, w)`` is
LDAM with class weights. :func:`make_loss` packages them behind the contract of
``docs/DESIGN.md`` (``Loss(name, init, apply)``).

Conventions (shared by every function here)

* ``logits`` (B, C), float32 or bfloat16; computed in float32 internally, returned float32.
  All softmax/sigmoid terms use ``log_softmax`` / ``logsumexp`` / ``log_sigmoid`` forms, so values
  and gradients stay finite (also under ``jit``) for float32 ``|logits|`` up to 1e30;
  logits holding ±inf give NaN (the train step's finiteness check stops such a run).
* ``labels``: int (B,) class indices or float (B, C) soft targets (rows sum to 1, e.g. Mixup).
  Softmax-family losses are *target-weighted*: ``-sum_c y_c log p_c`` (for pairwise losses,
  Seesaw and the generalised LA loss, the exact mixture ``sum_c y_c L(z, c)``).
* **Padding rows**: an int label outside ``[0, C)`` (e.g. ``-1``) or an all-zero soft row has no
  target mass; its loss is exactly 0 and it contributes nothing to running statistics (Seesaw
  counts, EQL v2 gradients) nor to ``weight_norm='batch'`` sums. Use it for padded batches.
* Multi-expert losses (:data:`EXPERT_LOSSES`: ``ride``, ``sade``; :mod:`lt_jax.losses.experts`) take
  the experts' logits ``(B, E, C)`` instead of ``(B, C)``; everything else above holds for them.
* Zero-count classes follow the rule of :mod:`lt_jax.priors` (``safe_counts``): every log-prior,
  margin and weight is finite.
"""

from __future__ import annotations

from lt_jax.losses.functions import (
    as_targets, softmax_cross_entropy, sigmoid_binary_cross_entropy, logit_adjust, ldam_margins,
    apply_margin, la_pairwise_delta, resolve_class_weights, label_weights, class_weighting, reduce_mean,
    reduce_weighted_mean, weighted_cross_entropy, label_smoothing_cross_entropy, focal_modulate,
    focal_loss, ldam_loss, logit_adjusted_loss, balanced_softmax_loss, generalized_logit_adjusted_loss,
    softmax_equalization_loss, seesaw_loss, sigmoid_cross_entropy, sigmoid_focal_loss,
    class_balanced_loss, softmax_bce_loss, equalization_loss, eqlv2_class_weights, eqlv2_loss, eqlv2_grad_stats,
    FOCAL_FORMS)
from lt_jax.losses.experts import (
    check_expert_logits, inverse_prior, ride_diversity_weights, ride_loss, sade_logit_adjustments, sade_loss)
from lt_jax.losses.registry import (
    EXPERT_LOSSES, LOSSES, Loss, default_hparams, make_loss)

__all__ = [
    "Loss", "LOSSES", "make_loss", "as_targets", "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy", "logit_adjust", "ldam_margins", "apply_margin", "la_pairwise_delta",
    "resolve_class_weights", "label_weights", "class_weighting", "reduce_mean", "reduce_weighted_mean",
    "weighted_cross_entropy", "label_smoothing_cross_entropy", "focal_loss", "focal_modulate",
    "FOCAL_FORMS", "sigmoid_cross_entropy", "softmax_bce_loss", "sigmoid_focal_loss", "class_balanced_loss",
    "ldam_loss",
    "logit_adjusted_loss", "balanced_softmax_loss", "generalized_logit_adjusted_loss",
    "equalization_loss", "softmax_equalization_loss", "eqlv2_class_weights", "eqlv2_loss",
    "eqlv2_grad_stats", "seesaw_loss", "default_hparams", "EXPERT_LOSSES", "check_expert_logits",
    "inverse_prior", "ride_diversity_weights", "ride_loss", "sade_logit_adjustments", "sade_loss"
]

from lt_jax.losses.contrastive import (  # noqa: E402  (contrastive losses: projections, not logits)
    Queue, balanced_contrastive_loss, nt_xent_loss, paco_loss, queue_init, queue_push, supcon_loss)

__all__ += ["Queue", "balanced_contrastive_loss", "nt_xent_loss", "paco_loss", "queue_init", "queue_push",
            "supcon_loss"]

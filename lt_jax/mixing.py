"""Mixing augmentations as pure batch functions: Mixup, CutMix, Remix.

Every function takes an explicit ``jax.random.key`` and a whole batch, and returns
``(mixed_images, soft_targets, lam, perm)``:

* ``mixed_images``: float32, shape of ``images``;
* ``soft_targets``: float32 ``(B, C)``, rows sum to 1 (padding rows: see below), ready for
  any softmax-family loss of :mod:`lt_jax.losses` (``-sum_c t_c log softmax(z)_c``), which
  is exactly the reference's mixed loss ``w CE(z, y_i) + (1 - w) CE(z, y_perm[i])``;
* ``lam``: float32 scalar, the image mixing coefficient (one per batch);
* ``perm``: int32 ``(B,)``, example ``i`` is mixed with example ``perm[i]``.

As the BagofTricks-LT combiner (``lib/core/combiner.py``, REFERENCE.md §3), one ``lam`` is
drawn per batch and the partner of every example comes from one whole-batch permutation
(``torch.randperm``). Applying the augmentation with some probability, or only in some
epochs, is the trainer's decision (e.g. ``jax.lax.cond`` on a Bernoulli draw).

Labels: int ``(B,)`` class indices, or (Mixup / CutMix only) float ``(B, C)`` soft targets.
An int label outside ``[0, C)`` (padding) has an all-zero one-hot row, so a mixed row whose
both parents are padding has no target mass (loss 0, see :mod:`lt_jax.losses`); mixing a
real example with a padding example leaves a row summing to ``w`` (or ``1 - w``). Pad with
whole padded batches only after mixing, or mask those rows out.

Images are ``(B, H, W, ...)`` (NHWC); Mixup accepts any ``(B, ...)``. Every function is
jit-safe with ``num_classes`` static; ``alpha``, ``kappa`` and ``tau`` may be traced
(``alpha = 0`` "no mixing" and the ``alpha = 1`` uniform fast path are recognised only for
Python numbers, so a traced ``alpha = 1`` draws a different, equally distributed ``lam``).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from lt_jax import losses, priors

Array = jax.Array

__all__ = ["mixup", "cutmix", "cutmix_box", "remix_weights", "remix_targets", "remix", "remix_batch_mean_loss"]


# ---------------------------------------------------------------------------------------
# Helpers.


def _check_alpha(alpha) -> None:
  if isinstance(alpha, numbers.Number) and not alpha >= 0:
    raise ValueError(f"alpha (Beta(alpha, alpha) concentration) must be >= 0, got {alpha}")


def _sample_lam(key: Array, alpha) -> Array:
  """``lam ~ Beta(alpha, alpha)``; ``alpha = 0`` (a Python number) gives ``lam = 1``.

  As Zhang et al.'s reference ``mixup_data`` (``lam = 1`` when ``alpha <= 0``). For a
  Python ``alpha == 1`` (the long-tail default) ``Beta(1, 1)`` is drawn as the uniform
  distribution it is, which avoids compiling ``jax.random.beta``'s rejection sampler
  (seconds per compilation on CPU); the distribution is identical.
  """
  _check_alpha(alpha)
  if isinstance(alpha, numbers.Number) and alpha == 0:
    return jnp.float32(1.0)
  if isinstance(alpha, numbers.Number) and alpha == 1:
    return jax.random.uniform(key, (), jnp.float32)
  a = jnp.asarray(alpha, jnp.float32)
  return jax.random.beta(key, a, a).astype(jnp.float32)


def _check_batch(images: Array, labels: Array) -> tuple[Array, int]:
  x = jnp.asarray(images)
  if x.ndim < 2:
    raise ValueError(f"images must have shape (batch, ...), got {x.shape}")
  y = jnp.asarray(labels)
  if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
    raise ValueError(f"labels must be (batch,) ints or (batch, num_classes) soft targets with "
                     f"batch {x.shape[0]}, got shape {y.shape}")
  return x.astype(jnp.float32), x.shape[0]


def _int_labels(labels: Array, who: str) -> Array:
  y = jnp.asarray(labels)
  if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"{who} needs int class indices of shape (batch,) (it reads per-class "
                     f"counts), got shape {y.shape} dtype {y.dtype}")
  return y


def _mix_targets(t: Array, perm: Array, w: Array) -> Array:
  """``w_i t_i + (1 - w_i) t_perm[i]`` with ``w`` scalar or ``(B,)``."""
  w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), t.shape[:1])[:, None]
  return w * t + (1.0 - w) * t[perm]


# ---------------------------------------------------------------------------------------
# Mixup.


def mixup(key: Array, images: Array, labels: Array, num_classes: int,
          alpha: float | Array = 1.0) -> tuple[Array, Array, Array, Array]:
  """Input Mixup: ``x~ = lam x_i + (1 - lam) x_perm[i]``, ``t~ = lam e_{y_i} + (1 - lam) e_{y_perm[i]}``.

  Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018, with
  ``lam ~ Beta(alpha, alpha)``. As the BagofTricks-LT combiner (``mix_up``; REFERENCE.md §3,
  ``alpha = 1``, 400-epoch schedule): one ``lam`` per batch and one whole-batch permutation;
  the reference loss ``lam CE(z, y_i) + (1 - lam) CE(z, y_perm[i])`` equals softmax
  cross-entropy against the returned soft targets (CE is linear in the target).

  Args:
    key: ``jax.random.key``; split internally for ``lam`` and the permutation.
    images: ``(B, ...)`` any float or int dtype.
    labels: int ``(B,)`` or soft ``(B, C)`` targets.
    num_classes: ``C`` (static).
    alpha: Beta concentration (``0``: no mixing, ``lam = 1``).

  Returns:
    ``(mixed float32 (B, ...), targets float32 (B, C), lam float32 (), perm int32 (B,))``.
  """
  x, B = _check_batch(images, labels)
  t = losses.as_targets(labels, num_classes)
  k_lam, k_perm = jax.random.split(key)
  lam = _sample_lam(k_lam, alpha)
  perm = jax.random.permutation(k_perm, B).astype(jnp.int32)
  mixed = lam * x + (1.0 - lam) * x[perm]
  return mixed, _mix_targets(t, perm, lam), lam, perm


# ---------------------------------------------------------------------------------------
# CutMix.


def cutmix_box(key: Array, height: int, width: int, lam: float | Array) -> tuple[Array, Array]:
  """Random CutMix box as an ``(H, W)`` bool mask, and the exact kept fraction.

  Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
  Localizable Features", ICCV 2019 (``rand_bbox``): cut size ``cut_h = floor(H sqrt(1 - lam))``,
  ``cut_w = floor(W sqrt(1 - lam))``; centre ``(c_y, c_x)`` uniform over pixels; box rows
  ``[clip(c_y - cut_h // 2), clip(c_y + cut_h // 2))`` and likewise columns, clipped to the
  image (so a box near the border is smaller). Built by comparing ``arange(H)`` and
  ``arange(W)`` with the bounds (no loop, jit-safe with traced ``lam``).

  Returns:
    ``(mask (H, W) bool, True inside the pasted box; lam_adj = 1 - mean(mask))``, the
    fraction of each image that is *kept*, which CutMix uses as the label weight.
  """
  if height < 1 or width < 1:
    raise ValueError(f"cutmix_box: height and width must be >= 1, got {height}x{width}")
  lam = jnp.asarray(lam, jnp.float32)
  cut_rat = jnp.sqrt(jnp.clip(1.0 - lam, 0.0, 1.0))
  cut_h = jnp.floor(height * cut_rat).astype(jnp.int32)
  cut_w = jnp.floor(width * cut_rat).astype(jnp.int32)
  k_y, k_x = jax.random.split(key)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y1, y2 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x1, x2 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  mask = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
  lam_adj = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / jnp.float32(height * width)
  return mask, lam_adj


def cutmix(key: Array, images: Array, labels: Array, num_classes: int,
           alpha: float | Array = 1.0) -> tuple[Array, Array, Array, Array]:
  """CutMix: paste a box of ``x_perm[i]`` into ``x_i``; targets weighted by the kept area.

  Yun et al., ICCV 2019: ``lam ~ Beta(alpha, alpha)``, a box of area ratio about
  ``1 - lam`` (:func:`cutmix_box`, one box for the whole batch as the reference
  ``train.py``) is cut from the permuted batch and pasted, ``x~ = M * x_perm + (1 - M) * x``;
  then ``lam`` is *adjusted to the exact pasted area*, ``lam = 1 - |box| / (H W)``, and
  ``t~ = lam e_{y_i} + (1 - lam) e_{y_perm[i]}``. The mask is one ``(H, W)`` array broadcast
  over the batch and channels (no Python loop over examples). CutMix-based long-tail
  methods (CMO, Park et al., CVPR 2022) change which images are pasted, not this operation.

  Args:
    key: ``jax.random.key``.
    images: ``(B, H, W)`` or ``(B, H, W, ...)`` (NHWC).
    labels: int ``(B,)`` or soft ``(B, C)``.
    num_classes: ``C`` (static).
    alpha: Beta concentration (``0``: ``lam = 1``, empty box, no mixing).

  Returns:
    ``(mixed float32, targets (B, C), lam_adj (), perm (B,))``.
  """
  x, B = _check_batch(images, labels)
  if x.ndim < 3:
    raise ValueError(f"cutmix needs images of shape (batch, H, W[, channels]), got {x.shape}")
  t = losses.as_targets(labels, num_classes)
  k_lam, k_perm, k_box = jax.random.split(key, 3)
  lam = _sample_lam(k_lam, alpha)
  perm = jax.random.permutation(k_perm, B).astype(jnp.int32)
  mask, lam_adj = cutmix_box(k_box, x.shape[1], x.shape[2], lam)
  m = mask.reshape((1,) + mask.shape + (1,) * (x.ndim - 3))
  mixed = jnp.where(m, x[perm], x)
  return mixed, _mix_targets(t, perm, lam_adj), lam_adj, perm


# ---------------------------------------------------------------------------------------
# Remix.


def remix_weights(labels: Array, perm: Array, lam: float | Array, counts: Array,
                  kappa: float | Array = 3.0, tau: float | Array = 0.5) -> Array:
  """Remix label weight ``w_i`` of example ``i`` (its partner is ``j = perm[i]``), shape ``(B,)``.

  Chou et al., "Remix: Rebalanced Mixup", ECCV Workshops 2020, Eq. (10), exactly as the
  BagofTricks-LT combiner (``remix``; REFERENCE.md §3), with ``n = counts``::

      w_i = lam                     by default;
      w_i = 0   if lam < tau      and n_{y_i} / n_{y_j} >= kappa      (rule 1);
      w_i = 1   if 1 - lam < tau  and n_{y_i} * kappa / n_{y_j} <= 1  (rule 2).

  The label then goes to the minority class when its image share is not too small.
  Rule 2 is rule 1 seen from the partner (swap ``i <-> j`` and ``lam <-> 1 - lam``:
  ``n_j / n_i >= kappa``), so the rule is symmetric in the pair; the only asymmetry is in
  the comparisons, as in the reference: the share condition is strict (``lam < tau``)
  while the ratio condition is not (``>= kappa``, ``<= 1``). With ``tau <= 0.5`` the two
  share conditions exclude each other; were both rules ever true (``tau > 0.5`` and
  ``kappa < 1``), rule 2 wins, as in the reference, which applies it second.

  Counts go through :func:`lt_jax.priors.safe_counts` (zero-count rule), so ratios are
  finite; counts or a normalised prior give the same weights (only ratios are used).

  Args:
    labels: int ``(B,)`` class indices (soft labels have no class count).
    perm: int ``(B,)`` partner indices.
    lam: scalar image mixing coefficient.
    counts: ``(C,)`` training counts (or prior).
    kappa: count-ratio threshold (3).
    tau: share threshold (0.5).
  """
  y = _int_labels(labels, "remix_weights")
  if isinstance(kappa, numbers.Number) and not kappa > 0:
    raise ValueError(f"remix: kappa must be > 0, got {kappa}")
  n = priors.safe_counts(counts)
  C = n.shape[0]
  n_i = n[jnp.clip(y, 0, C - 1)]
  n_j = n_i[jnp.asarray(perm)]
  lam = jnp.asarray(lam, jnp.float32)
  kappa = jnp.asarray(kappa, jnp.float32)
  tau = jnp.asarray(tau, jnp.float32)
  w = jnp.broadcast_to(lam, y.shape)
  w = jnp.where((lam < tau) & (n_i / n_j >= kappa), 0.0, w)
  w = jnp.where((1.0 - lam < tau) & (n_i * kappa / n_j <= 1.0), 1.0, w)
  return w.astype(jnp.float32)


def remix_targets(labels: Array, perm: Array, lam: float | Array, counts: Array, num_classes: int,
                  kappa: float | Array = 3.0, tau: float | Array = 0.5) -> Array:
  """Remix soft targets ``t_i = w_i e_{y_i} + (1 - w_i) e_{y_perm[i]}``, ``(B, C)`` float32.

  ``w`` from :func:`remix_weights` (Chou et al., ECCV-W 2020). Softmax cross-entropy
  against these targets is the paper's per-example rule ``w_i CE(z_i, y_i) + (1 - w_i)
  CE(z_i, y_perm[i])``, averaged over the batch (lt_jax's convention, also the train step's).

  This is *not* BagofTricks-LT's loss: its ``combiner.remix`` calls a criterion that already
  mean-reduces over the batch, ``mean_i(w_i * meanCE(y) + (1 - w_i) * meanCE(y_perm))``, i.e.
  ``mean(w) meanCE(z, y) + (1 - mean(w)) meanCE(z, y_perm)``: every example's two CE terms get
  the *batch-average* weight, so the per-example rebalancing survives only through ``mean(w)``.
  The two agree when all ``w_i`` are equal (e.g. plain Mixup). That form is
  :func:`remix_batch_mean_loss`.
  """
  y = _int_labels(labels, "remix_targets")
  w = remix_weights(y, perm, lam, counts, kappa, tau)
  return _mix_targets(losses.as_targets(y, num_classes), jnp.asarray(perm), w)


def remix(key: Array, images: Array, labels: Array, counts: Array, num_classes: int,
          alpha: float | Array = 1.0, kappa: float | Array = 3.0,
          tau: float | Array = 0.5) -> tuple[Array, Array, Array, Array]:
  """Remix: Mixup images with rebalanced label weights (Chou et al., ECCV-W 2020).

  Images ``x~ = lam x_i + (1 - lam) x_perm[i]`` exactly as :func:`mixup` (same key gives
  the same ``lam``, ``perm`` and images); targets from :func:`remix_targets`. BagofTricks-LT
  recipe: ``alpha = 1, kappa = 3, tau = 0.5``, 400 epochs (REFERENCE.md §1b).

  Returns:
    ``(mixed float32 (B, ...), targets (B, C), lam (), perm (B,))``; ``lam`` is the image
    coefficient (the per-example label weights are :func:`remix_weights`).
  """
  y = _int_labels(labels, "remix")
  mixed, _, lam, perm = mixup(key, images, y, num_classes, alpha)
  return mixed, remix_targets(y, perm, lam, counts, num_classes, kappa, tau), lam, perm


def remix_batch_mean_loss(logits: Array, labels: Array, perm: Array, weights: Array) -> Array:
  """BagofTricks-LT's Remix loss ``mean(w) meanCE(z, y) + (1 - mean(w)) meanCE(z, y_perm)``, scalar.

  ``zhangyongshun/BagofTricks-LT`` ``lib/core/combiner.py`` (``remix``) with its mean-reducing
  ``CrossEntropy`` criterion: the label weights ``w`` (:func:`remix_weights`) are averaged before
  they mix the two batch-mean cross-entropies. For reproducing that code only; lt_jax's default is
  the per-example rule of Chou et al. (ECCV-W 2020), :func:`remix_targets`.
  """
  y = _int_labels(labels, "remix_batch_mean_loss")
  w = jnp.mean(jnp.asarray(weights, jnp.float32))
  ce_a = jnp.mean(losses.softmax_cross_entropy(logits, y))
  ce_b = jnp.mean(losses.softmax_cross_entropy(logits, y[jnp.asarray(perm)]))
  return w * ce_a + (1.0 - w) * ce_b

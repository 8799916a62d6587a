"""Classifier heads and decoupled / post-hoc classifier adjustments.

Flax ``linen`` heads map features ``f`` of shape ``(B, D)`` to logits ``(B, C)``;
features may be float32 or bfloat16, every head computes and returns float32.

* :class:`LinearHead`  ``z = W^T f + b`` (joint training and cRT).
* :class:`CosineHead`  ``z = s * cos(f, w_c)`` (LDAM ``NormedLinear``, cosine classifiers).
* :class:`LWSHead`     ``z = (W^T f + b) * s`` with learnable per-class ``scales``.

Pure functions (``jax.numpy``; jit-, vmap- and grad-safe):

* :func:`weight_norms`, :func:`tau_normalize`, :func:`tau_norm_logits`  (tau-normalisation)
* :func:`posthoc_adjust`, :func:`posterior_recalibrate`                  (logit adjustment)
* :func:`class_means`, :func:`ncm_centroids`, :func:`ncm_logits`          (NCM classifier)
* :func:`lws_from_linear`                                                 (LWS stage set-up)
* :func:`prior_bias_init`, :func:`sigmoid_prior_bias_init`                (bias initialisers)

Parameter layout (what a trainer labels to freeze a stage). Each head declares its
parameters directly in its own scope, so inside a model whose head submodule is
called ``head`` the leaves are::

    LinearHead:  params['head'] = {'kernel': (D, C), 'bias': (C,)}
    CosineHead:  params['head'] = {'kernel': (D, C)}
    LWSHead:     params['head'] = {'kernel': (D, C), 'bias': (C,), 'scales': (C,)}

``scales`` is a name no other lt_jax module uses (BatchNorm's leaf is ``scale``), so
the LWS stage of Kang et al. (backbone and linear classifier frozen, only the scales
trained) trains exactly the leaves whose last path key is ``scales``; the trainer builds
that partition with :func:`lt_jax.decoupled.param_labels`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from lt_jax import priors

Array = jax.Array
Initializer = Callable[..., Array]

_EPS = 1e-12  # as torch.nn.functional.normalize: x / max(||x||, eps)


# ---------------------------------------------------------------------------------------
# Small helpers.


def _l2_normalize(x: Array, axis: int, eps: float = _EPS) -> Array:
  """``x / max(||x||_2, eps)`` along ``axis`` (``F.normalize``); finite value and grad at 0.

  ``rsqrt(max(sum x^2, eps^2))`` takes the constant branch at ``x = 0``, so the
  gradient there is finite (plain ``jnp.linalg.norm`` gives NaN through ``sqrt(0)``).
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _safe_norm(x: Array, axis: int, eps: float = _EPS) -> Array:
  """``max(||x||_2, eps)`` along ``axis`` with a finite gradient at ``x = 0``."""
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis), eps * eps))


def _check_features(features: Array) -> Array:
  if features.ndim != 2:
    raise ValueError(f"features must have shape (batch, dim), got {features.shape}")
  return features.astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# Bias initialisers.


def prior_bias_init(prior_or_counts: Array, tau: float = 1.0) -> Initializer:
  """Bias initialiser ``b_c = tau * log pi_c`` (logit-adjusted / prior-matched init).

  With ``b = log pi`` an untrained network (``W^T f`` near 0) predicts the training
  label prior, the softmax analogue of Cui et al.'s prior bias; it is the bias a
  logit-adjusted head starts from (Menon et al., "Long-tail learning via logit
  adjustment", ICLR 2021). ``log pi`` goes through :func:`lt_jax.priors.log_prior`
  (zero-count rule).
  """
  value = tau * priors.log_prior(prior_or_counts)

  def init(key, shape, dtype=jnp.float32):
    del key
    if tuple(shape) != value.shape:
      raise ValueError(f"prior_bias_init: prior has shape {value.shape}, bias wants {tuple(shape)}")
    return value.astype(dtype)

  return init


def sigmoid_prior_bias_init(pi: float | None = None) -> Initializer:
  """Bias initialiser ``b = -log((1 - pi) / pi)`` for sigmoid / focal heads.

  Lin et al. ("Focal Loss for Dense Object Detection", ICCV 2017) start every sigmoid
  at probability ``pi``; Cui et al. ("Class-Balanced Loss Based on Effective Number of
  Samples", CVPR 2019, ``src/model_base.py``) use ``pi = 1/C``, i.e. ``b = -log(C - 1)``,
  which is the default here (``C`` read from the bias shape).
  """
  if pi is not None and not 0.0 < pi < 1.0:
    raise ValueError(f"sigmoid_prior_bias_init: pi must be in (0, 1), got {pi}")

  def init(key, shape, dtype=jnp.float32):
    del key
    p = pi
    if p is None:
      num_classes = shape[-1]
      if num_classes < 2:
        raise ValueError("sigmoid_prior_bias_init with pi=None needs >= 2 classes (b = -log(C-1))")
      p = 1.0 / num_classes
    return jnp.full(shape, -jnp.log((1.0 - p) / p), dtype)

  return init


# ---------------------------------------------------------------------------------------
# Heads.


def _affine(head: nn.Module, f: Array) -> Array:
  """``f W + b`` with ``kernel`` (D, C) / ``bias`` (C,) declared on ``head`` itself (float32)."""
  kernel = head.param("kernel", head.kernel_init, (f.shape[-1], head.num_classes), jnp.float32)
  z = f @ kernel
  if head.use_bias:
    z = z + head.param("bias", head.bias_init, (head.num_classes,), jnp.float32)
  return z


class LinearHead(nn.Module):
  """Linear classifier ``z = W^T f + b``, ``W: (D, C)``, ``b: (C,)``.

  The standard softmax classifier; re-initialised and trained on a frozen backbone
  with class-balanced sampling it is cRT (Kang et al., "Decoupling Representation and
  Classifier for Long-Tailed Recognition", ICLR 2020). Parameters are ``kernel``
  ``(D, C)`` and ``bias`` ``(C,)`` (same layout as ``nn.Dense``). ``bias_init`` takes
  :func:`sigmoid_prior_bias_init` (``-log(C-1)``, Cui et al. 2019) or
  :func:`prior_bias_init` (``tau * log pi``, Menon et al. 2021).

  Attributes:
    num_classes: number of outputs ``C``.
    use_bias: add the bias ``b``.
    kernel_init: initialiser of ``kernel`` (default LeCun normal, as ``nn.Dense``).
    bias_init: initialiser of ``bias`` (default zeros).
  """

  num_classes: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, features: Array) -> Array:
    return _affine(self, _check_features(features))


def _uniform_pm1(key, shape, dtype=jnp.float32):
  """Uniform on ``[-1, 1]`` (the ``NormedLinear`` initial draw before re-normalising)."""
  return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


class CosineHead(nn.Module):
  """Cosine classifier ``z_c = scale * (f / ||f||) . (w_c / ||w_c||)``.

  With ``scale=1`` this is LDAM's ``NormedLinear`` (Cao et al., "Learning Imbalanced
  Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019): the logits are
  cosines in ``[-1, 1]`` and the LDAM loss applies its own scale ``s`` (30) after
  subtracting the margin. For plain cross-entropy use a scale such as 16. Norms are
  ``max(||x||, eps)`` as ``F.normalize``, so zero features give zero logits and finite
  gradients. Parameter ``kernel`` ``(D, C)`` (columns are class weights).

  Attributes:
    num_classes: number of outputs ``C``.
    scale: multiplier of the cosines (``z`` lies in ``[-scale, scale]``).
    eps: norm floor.
    kernel_init: initialiser of ``kernel``; the default is uniform on ``[-1, 1]``
      (the reference re-normalises columns at init; the cosine is scale-invariant).
  """

  num_classes: int
  scale: float = 1.0
  eps: float = _EPS
  kernel_init: Initializer = _uniform_pm1

  @nn.compact
  def __call__(self, features: Array) -> Array:
    f = _check_features(features)
    kernel = self.param("kernel", self.kernel_init, (f.shape[-1], self.num_classes), jnp.float32)
    f_n = _l2_normalize(f, axis=-1, eps=self.eps)
    w_n = _l2_normalize(kernel.astype(jnp.float32), axis=0, eps=self.eps)
    return self.scale * (f_n @ w_n)


class LWSHead(LinearHead):
  """Learnable Weight Scaling ``z = (W^T f + b) * s``, ``s: (C,)`` initialised to 1.

  Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
  ICLR 2020 (``TauNormClassifier.py``): the trained linear classifier (``kernel``,
  ``bias``) is frozen and only the per-class ``scales`` are learnt, on a frozen
  backbone with class-balanced sampling. The head itself trains everything; freezing
  is the trainer's job (:func:`lt_jax.decoupled.param_labels` partitions the parameters, frozen
  leaves get ``optax.set_to_zero()``). Start from a trained :class:`LinearHead` with
  :func:`lws_from_linear`.

  Attributes:
    num_classes: number of outputs ``C``.
    use_bias: include ``b`` (match the :class:`LinearHead` it is built from).
    kernel_init, bias_init: as :class:`LinearHead` (unused when loading a trained head).
  """

  @nn.compact
  def __call__(self, features: Array) -> Array:
    z = _affine(self, _check_features(features))
    scales = self.param("scales", nn.initializers.ones_init(), (self.num_classes,), jnp.float32)
    return z * scales.astype(jnp.float32)


def lws_from_linear(linear_params: Mapping[str, Any]) -> dict:
  """LWS parameters that reproduce a trained :class:`LinearHead` exactly (``s = 1``).

  Accepts the head's variables ``{'params': {'kernel', 'bias'?}}`` or the inner dict
  ``{'kernel', 'bias'?}`` and returns the same nesting with ``scales = ones(C)`` added;
  the input is not modified (arrays are shared, not copied). Without a ``bias`` build
  the head as ``LWSHead(C, use_bias=False)``. Kang et al., ICLR 2020.
  """
  wrapped = "params" in linear_params
  inner = linear_params["params"] if wrapped else linear_params
  if "kernel" not in inner:
    raise ValueError(f"lws_from_linear expects LinearHead params with 'kernel' (and 'bias'); "
                     f"got keys {sorted(inner)}")
  if "scales" in inner:
    raise ValueError("lws_from_linear: params already contain 'scales' (already an LWS head?)")
  kernel = inner["kernel"]
  out = dict(inner)
  out["scales"] = jnp.ones((kernel.shape[-1],), jnp.asarray(kernel).dtype)
  return {**linear_params, "params": out} if wrapped else out


# ---------------------------------------------------------------------------------------
# tau-normalisation.


def weight_norms(kernel: Array) -> Array:
  """Per-class classifier norms ``||w_c||_2`` of a ``(D, C)`` kernel, shape ``(C,)``.

  Kang et al. (ICLR 2020) observe ``||w_c||`` growing with the class size ``n_c``
  after instance-balanced training; tau-normalisation divides this out.
  """
  k = jnp.asarray(kernel, jnp.float32)
  if k.ndim != 2:
    raise ValueError(f"kernel must have shape (dim, num_classes), got {k.shape}")
  return jnp.sqrt(jnp.sum(jnp.square(k), axis=0))


def tau_normalize(kernel: Array, tau: float | Array) -> Array:
  """tau-normalised classifier ``w_c <- w_c / ||w_c||_2^tau`` per column of ``(D, C)``.

  Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition",
  ICLR 2020 (``classifier-balancing/tau_norm.py``): tau = 0 is the identity (exactly),
  tau = 1 gives unit-norm columns; the reference grid is ``linspace(0, 2, 21)`` chosen
  on validation data. As in ``tau_norm.py`` the bias is dropped: score with
  ``features @ tau_normalize(kernel, tau)`` (:func:`tau_norm_logits`). A zero column
  stays zero (its norm is floored at ``eps``). ``tau`` may be traced (vmap over a grid).
  """
  k = jnp.asarray(kernel, jnp.float32)
  if k.ndim != 2:
    raise ValueError(f"kernel must have shape (dim, num_classes), got {k.shape}")
  norms = _safe_norm(k, axis=0)
  return k / jnp.power(norms, jnp.asarray(tau, jnp.float32))


def tau_norm_logits(features: Array, kernel: Array, tau: float | Array) -> Array:
  """Logits of the tau-normalised classifier ``z = f @ (w_c / ||w_c||^tau)`` (no bias).

  Kang et al., ICLR 2020, ``tau_norm.py``. ``vmap`` over ``tau`` evaluates a grid.
  """
  return _check_features(features) @ tau_normalize(kernel, tau)


# ---------------------------------------------------------------------------------------
# Post-hoc logit adjustment.


def posthoc_adjust(logits: Array, prior: Array, tau: float | Array = 1.0,
                   target_prior: Array | None = None) -> Array:
  """Post-hoc logit adjustment ``z - tau * (log pi - log pi^t)``.

  Menon et al., "Long-tail learning via logit adjustment", ICLR 2021. With training
  label distribution ``P(y) = pi`` and a target distribution with the same
  class-conditionals, ``P^t(x|y) = P(x|y)``, and label distribution ``P^t(y) = pi^t``::

      P^t(y|x) ∝ P^t(x|y) P^t(y) = P(x|y) pi^t_y = P(y|x) P(x) pi^t_y / pi_y
               ∝ P(y|x) pi^t_y / pi_y,

  so with ``P(y|x) = softmax(z)_y`` the target posterior is ``softmax(z - log pi +
  log pi^t)``; the temperature ``tau`` (Menon et al. Sec. 4) scales the correction:
  ``z - tau * (log pi - log pi^t)``. ``target_prior=None`` is the balanced target,
  returned as ``z - tau * log pi`` (the uniform ``log pi^t = -log C`` is a constant
  that changes neither argmax nor softmax). ``target_prior = prior`` returns ``z``.

  The reference (``logit_adjustment/main.py``) scores ``argmax(z - log(pi^tau + 1e-12))``;
  here ``log pi`` comes from :func:`lt_jax.priors.log_prior` (zero-count rule instead of
  ``1e-12``). ``prior`` and ``target_prior`` accept counts or normalised priors.
  Broadcasts over leading axes; ``vmap`` over ``tau`` or over a batch of target priors.

  Args:
    logits: ``(..., C)`` float32 or bfloat16.
    prior: training counts or prior, ``(C,)``.
    tau: scalar temperature (may be traced).
    target_prior: counts or prior of the target label distribution ``(C,)``, or None.

  Returns:
    float32 adjusted logits, shape of ``logits``.
  """
  z = jnp.asarray(logits, jnp.float32)
  shift = priors.log_prior(prior)
  if target_prior is not None:
    shift = shift - priors.log_prior(target_prior)
  if shift.shape[-1] != z.shape[-1]:
    raise ValueError(f"prior has {shift.shape[-1]} classes but logits have {z.shape[-1]}")
  return z - jnp.asarray(tau, jnp.float32) * shift


def posterior_recalibrate(logits: Array, prior: Array, beta: float | Array = 1.0,
                          target_prior: Array | None = None) -> Array:
  """Posterior re-calibration, ``p_out ∝ p^(1-beta) (p pi^t / pi)^beta``, as logits.

  Tian, Liu, Glaser, Hsu & Kira, "Posterior Re-calibration for Imbalanced Datasets", NeurIPS
  2020 (reference ``GT-RIPL/UNO-IC`` ``classification/rebalancing.py::prior_recbalancing``):
  with ``p = softmax(z)``, source (training) prior ``pi`` and target prior ``pi^t`` (uniform
  when ``None``), ``p_r ∝ p pi^t / pi`` and the output ``∝ p^(1-beta) p_r^beta``. In log space::

      log p_out = (1 - beta) log p + beta (log p + log pi^t - log pi) + const
                = z - beta (log pi - log pi^t) + const,

  which *is* post-hoc logit adjustment (Menon et al., ICLR 2021) with ``tau = beta`` and a
  target prior: this function is :func:`posthoc_adjust` under the paper's name, and
  ``softmax`` of its output is the reference's normalised ``outputs``. ``beta`` is chosen on
  the validation split (the reference README; lt_jax's ``posterior_recal`` stage), any
  ``beta >= 0`` (the reference's Places-LT model uses 1.3).

  Zero-count classes: the reference sets ``1 / pi_c = 0`` (their posterior becomes 0 for
  ``beta > 0``); lt_jax applies its zero-count rule (:func:`lt_jax.priors.safe_counts`: the
  class counts as half the rarest observed class), so such classes keep a finite score.
  Equal for every class with training examples.
  """
  return posthoc_adjust(logits, prior, beta, target_prior)




# ---------------------------------------------------------------------------------------
# Class means and the nearest-class-mean classifier.


def class_means(features: Array, labels: Array, num_classes: int,
                mask: Array | None = None) -> tuple[Array, Array]:
  """Per-class mean features ``mu_c = sum_i [y_i = c] m_i f_i / sum_i [y_i = c] m_i``.

  Vectorised with ``jax.ops.segment_sum``. ``mask`` (``(B,)`` bool or float weights,
  e.g. padding of the last eval batch) defaults to all ones; labels outside
  ``[0, num_classes)`` are ignored. A class with no (unmasked) examples gets a zero
  mean; the returned ``counts`` (float32 ``(C,)``, the summed mask per class) tell
  which. ``num_classes`` must be static under ``jit``.

  Returns:
    ``(means (C, D) float32, counts (C,) float32)``.
  """
  f = _check_features(features)
  y = jnp.asarray(labels).reshape(-1)
  if y.shape[0] != f.shape[0]:
    raise ValueError(f"labels {y.shape} and features {f.shape} disagree on the batch size")
  m = jnp.ones(y.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32).reshape(-1)
  sums = jax.ops.segment_sum(f * m[:, None], y, num_segments=num_classes)
  counts = jax.ops.segment_sum(m, y, num_segments=num_classes)
  means = sums / jnp.where(counts > 0, counts, 1.0)[:, None]
  return means, counts


def ncm_centroids(train_features: Array, train_labels: Array, num_classes: int,
                  mask: Array | None = None) -> tuple[Array, Array]:
  """NCM centroids on 'cl2n' features: ``(centroids (C, D), center (D,))``.

  Kang et al., ICLR 2020, ``KNNClassifier(feat_type='cl2n')``: ``center`` is the mean
  training feature, each training feature is centred and L2-normalised,
  ``g_i = (f_i - center) / ||f_i - center||``, and the centroid of class ``c`` is the
  mean of its ``g_i`` (not re-normalised). A class with no examples gets a zero
  centroid (use :func:`class_means` for the counts). ``mask`` as in
  :func:`class_means` (also excluded from ``center``).
  """
  f = _check_features(train_features)
  m = jnp.ones((f.shape[0],), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32).reshape(-1)
  center = jnp.sum(f * m[:, None], axis=0) / jnp.maximum(jnp.sum(m), 1.0)
  g = _l2_normalize(f - center, axis=-1)
  centroids, _ = class_means(g, train_labels, num_classes, mask=m)
  return centroids, center


def ncm_logits(features: Array, class_means: Array, center: Array | None = None,
               *, normalize: bool = True) -> Array:
  """Nearest-class-mean logits ``z_c = -||g(f) - mu_c||_2^2``.

  Kang et al., ICLR 2020, ``KNNClassifier(feat_type='cl2n', dist_type='l2')``:
  ``g(f) = (f - center) / ||f - center||`` with the training mean ``center`` and the
  centroids ``mu_c`` from :func:`ncm_centroids`. ``center=None`` skips centring
  ('l2n'); ``normalize=False`` skips the L2 normalisation ('un', raw features).
  Returns float32 ``(B, C)``; argmax is the nearest centroid.
  """
  f = _check_features(features)
  mu = jnp.asarray(class_means, jnp.float32)
  if mu.ndim != 2 or mu.shape[-1] != f.shape[-1]:
    raise ValueError(f"class_means must have shape (num_classes, {f.shape[-1]}), got {mu.shape}")
  if center is not None:
    f = f - jnp.asarray(center, jnp.float32)
  if normalize:
    f = _l2_normalize(f, axis=-1)
  d2 = (jnp.sum(jnp.square(f), axis=-1, keepdims=True) - 2.0 * (f @ mu.T)
        + jnp.sum(jnp.square(mu), axis=-1)[None, :])
  return -jnp.maximum(d2, 0.0)

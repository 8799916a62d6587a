"""Class counts, priors, long-tailed count profiles, class weights and shot groups.

Everything here is a pure function of a count (or prior) vector. Functions that
return a *dataset size* (``lt_counts``) are host-side NumPy, because sizes must be
static Python integers; everything else is ``jax.numpy`` and safe under ``jit``,
``vmap`` and ``grad``.

Zero-count rule (used by every function in lt_jax that inverts or logs a count):
    a class with no training examples is treated as if it had half as many as the
    rarest *observed* class, ``n_c <- 0.5 * min_{k: n_k > 0} n_k`` (see
    :func:`safe_counts`). The rule is scale-free, so it applies to raw counts and to
    normalised priors alike, and it keeps every weight, margin and log-prior finite.
    An all-zero vector is treated as uniform.
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp

Array = jax.Array

PROFILES = ("exp", "step", "pareto")
WEIGHT_SCHEMES = ("none", "inverse", "sqrt_inverse", "cost_sensitive", "balanced", "effective_number")


def _check_concrete_counts(counts) -> None:
  """Raise on negative counts when the values are known (outside ``jit``)."""
  try:
    arr = np.asarray(counts)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if arr.ndim != 1:
    raise ValueError(f"counts must be a 1-D vector over classes, got shape {arr.shape}")
  if np.any(arr < 0):
    raise ValueError(f"counts must be non-negative, got {arr}")


def class_counts(labels: Array, num_classes: int) -> Array:
  """Number of examples of each class: ``n_c = sum_i [y_i == c]``.

  Labels outside ``[0, num_classes)`` are ignored (not counted).
  """
  labels = jnp.asarray(labels).reshape(-1)
  valid = (labels >= 0) & (labels < num_classes)
  # Out-of-range labels (including -1 padding, which would wrap) go to a dropped slot.
  return jnp.zeros((num_classes,), jnp.int32).at[jnp.where(valid, labels, num_classes)].add(1, mode="drop")


def safe_counts(counts: Array) -> Array:
  """Float counts with the zero-count rule applied (see module docstring).

  ``n_c <- n_c`` if ``n_c > 0`` else ``0.5 * min_{k: n_k>0} n_k``; all-zero -> ones.
  """
  _check_concrete_counts(counts)
  c = jnp.asarray(counts, jnp.float32)
  pos = c > 0
  min_pos = jnp.min(jnp.where(pos, c, jnp.inf))
  fill = jnp.where(jnp.isfinite(min_pos), 0.5 * min_pos, 1.0)
  return jnp.where(pos, c, fill)


def prior(counts: Array) -> Array:
  """Normalised label prior ``pi_c = n_c / sum_k n_k`` (zero-count rule applied).

  Accepts raw counts or an already normalised prior (idempotent).
  """
  c = safe_counts(counts)
  return c / jnp.sum(c)


def log_prior(prior_or_counts: Array) -> Array:
  """``log pi_c`` with the zero-count rule, finite for every class."""
  return jnp.log(prior(prior_or_counts))


def imbalance_ratio(counts: Array) -> Array:
  """Imbalance ratio ``IR = max_c n_c / min_c n_c`` (Cui et al. 2019; Cao et al. 2019).

  A class with zero examples makes the ratio infinite (it is reported, not hidden).
  """
  c = jnp.asarray(counts, jnp.float32)
  return jnp.max(c) / jnp.min(c)


def lt_counts(n_max: int, num_classes: int, imbalance_ratio: float, profile: str = "exp",
              *, mu: float = 0.5, shape: float = 6.0, seed: int = 0) -> np.ndarray:
  """Per-class training counts of a long-tailed version of a balanced dataset.

  Profiles (class 0 is the head):

  * ``exp`` (Cao et al., LDAM-DRW, NeurIPS 2019; Cui et al., CVPR 2019):
    ``n_i = int(n_max * (1/IR)^(i/(C-1)))`` with truncation, exactly as
    ``imbalance_cifar.py:get_img_num_per_cls``. CIFAR-10, IR 100:
    ``[5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]`` (12,406 images).
  * ``step`` (Buda et al. 2018; Cao et al. 2019): the last ``round(mu*C)`` classes are
    reduced to ``int(n_max/IR)``, the rest keep ``n_max``.
  * ``pareto`` (Liu et al., OLTR, CVPR 2019, the ImageNet-LT construction): class sizes
    follow a Pareto law with shape ``shape``; ``seed`` draws ``C`` Pareto variates,
    sorted decreasingly and mapped affinely in log space onto ``[n_max/IR, n_max]``,
    so the head has ``n_max`` and the tail ``int(n_max/IR)`` exactly.

  Returns a NumPy ``int64`` vector (dataset sizes must be static).
  """
  if profile not in PROFILES:
    raise ValueError(f"unknown long-tail profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if not imbalance_ratio >= 1:
    raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
  if n_max < 1:
    raise ValueError(f"n_max must be >= 1, got {n_max}")
  if int(n_max / imbalance_ratio) < 1:
    raise ValueError(f"n_max/imbalance_ratio = {n_max}/{imbalance_ratio} leaves the tail class empty")
  C = num_classes
  if profile == "exp":
    if C == 1:
      return np.array([n_max], np.int64)
    imb_factor = 1.0 / imbalance_ratio  # as in the reference code
    return np.array([int(n_max * imb_factor ** (i / (C - 1.0))) for i in range(C)], np.int64)
  if profile == "step":
    if not 0.0 <= mu <= 1.0:
      raise ValueError(f"step profile: mu must be in [0, 1], got {mu}")
    n_tail = int(round(C * mu))
    return np.array([n_max] * (C - n_tail) + [int(n_max / imbalance_ratio)] * n_tail, np.int64)
  # pareto
  if C == 1:
    return np.array([n_max], np.int64)
  if shape <= 0:
    raise ValueError(f"pareto profile: shape must be > 0, got {shape}")
  rng = np.random.RandomState(seed)
  draws = np.sort(rng.pareto(shape, size=C) + 1.0)[::-1]  # classical Pareto(x_m=1)
  logd = np.log(draws)
  span = logd[0] - logd[-1]
  t = (logd - logd[-1]) / span if span > 0 else np.linspace(1.0, 0.0, C)
  counts = np.exp(np.log(n_max / imbalance_ratio) + t * np.log(imbalance_ratio))
  counts = np.floor(counts + 1e-9).astype(np.int64)
  counts[0], counts[-1] = n_max, int(n_max / imbalance_ratio)
  return counts


def _concrete_float64(counts) -> np.ndarray | None:
  """``counts`` as a float64 NumPy vector with the zero-count rule, or ``None`` when traced."""
  try:
    c = np.asarray(counts, np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  if c.ndim != 1:
    return None
  pos = c > 0
  if not np.any(pos):
    return np.ones_like(c)
  return np.where(pos, c, 0.5 * np.min(c[pos]))


def _effective_number_f64(c: np.ndarray, beta: float) -> np.ndarray:
  """Float64 ``(1 - beta^c) / (1 - beta)`` for float64 counts ``c`` (already zero-count safe)."""
  log_beta = math.log1p(-(1.0 - beta)) if beta > 0 else -math.inf
  return -np.expm1(c * log_beta) / (1.0 - beta)


def effective_number(counts: Array, beta: float) -> Array:
  """Effective number of samples ``E_n = (1 - beta^n) / (1 - beta)`` (Cui et al., CVPR 2019).

  Precision: ``beta`` close to 1 (0.9999) loses digits in float32 (``float32(0.9999)`` is off by
  ``2e-9``, i.e. ``2e-5`` relative to ``1 - beta``). With a Python ``beta``, ``log(beta)`` is taken
  as ``log1p(-(1 - beta))`` in float64 on the host; concrete counts are evaluated entirely in
  float64 NumPy (they are a function of the counts, computed once) and returned as float32.
  Traced counts (under ``jit`` with counts as an argument) use float32 ``-expm1(n * log(beta))``
  with that float64-derived constant, within ~1e-6 relative of the float64 formula. A traced
  ``beta`` falls back to float32 ``log(beta)``.
  """
  if isinstance(beta, jax.core.Tracer):
    n = safe_counts(counts)
    return -jnp.expm1(n * jnp.log(beta)) / (1.0 - beta)
  _check_concrete_counts(counts)
  beta = float(beta)
  log_beta = math.log1p(-(1.0 - beta)) if beta > 0 else -math.inf
  c = _concrete_float64(counts)
  if c is not None:
    return jnp.asarray(_effective_number_f64(c, beta), jnp.float32)
  n = safe_counts(counts)
  return -jnp.expm1(n * jnp.float32(log_beta)) / jnp.float32(1.0 - beta)


def class_weights(counts: Array, scheme: str = "inverse", **kw) -> Array:
  """Per-class loss weights ``w_c`` computed from training counts.

  Schemes (``kw`` in brackets):

  * ``none``: ``w_c = 1``.
  * ``inverse``: ``w_c = n_min / n_c`` (BagofTricks ``CostSensitiveCE`` with gamma=1;
    tail weight is 1, not normalised).
  * ``sqrt_inverse``: ``w_c = (n_min / n_c)^(1/2)``.
  * ``cost_sensitive`` [gamma=1.0]: ``w_c = (n_min / n_c)^gamma``.
  * ``balanced``: ``w_c = N / (C * n_c)`` (scikit-learn ``compute_class_weight('balanced')``).
  * ``effective_number`` [beta=0.9999]: Class-Balanced weights (Cui et al., CVPR 2019)
    ``w_c = (1 - beta) / (1 - beta^{n_c})``, normalised so ``sum_c w_c = C``.
    CIFAR-10 IR100 with beta=0.9999 gives ``[0.051, ..., 3.993]``.
    Matches the reference (``richardaecn/class-balanced-loss``, LDAM-DRW ``cifar_train.py``,
    BagofTricks), which evaluates this in float64 NumPy once: with concrete counts and a Python
    ``beta`` lt_jax does the same on the host (within 1e-6 relative of the float64 formula,
    e.g. beta=0.9999 where a float32 ``log(beta)`` is off by 2e-5); traced counts use the float32
    fallback of :func:`effective_number`.

  The zero-count rule of :func:`safe_counts` applies.
  """
  allowed = {"none": (), "inverse": (), "sqrt_inverse": (), "cost_sensitive": ("gamma",),
             "balanced": (), "effective_number": ("beta",)}
  if scheme not in allowed:
    raise ValueError(f"unknown class-weight scheme {scheme!r}; valid schemes: {', '.join(WEIGHT_SCHEMES)}")
  extra = set(kw) - set(allowed[scheme])
  if extra:
    raise TypeError(f"class_weights(scheme={scheme!r}) got unexpected arguments {sorted(extra)}; "
                    f"it accepts {list(allowed[scheme]) or 'none'}")
  n = safe_counts(counts)
  C = n.shape[0]
  if scheme == "none":
    return jnp.ones_like(n)
  if scheme == "balanced":
    return jnp.sum(n) / (C * n)
  if scheme == "effective_number":
    beta = kw.get("beta", 0.9999)
    if not isinstance(beta, jax.core.Tracer) and not 0.0 <= beta < 1.0:
      raise ValueError(f"effective_number: beta must be in [0, 1), got {beta}")
    if not isinstance(beta, jax.core.Tracer):
      c = _concrete_float64(counts)
      if c is not None:  # host float64: the reference's NumPy formula, rounded once to float32
        w = 1.0 / np.asarray(_effective_number_f64(c, float(beta)))
        return jnp.asarray(w / np.sum(w) * C, jnp.float32)
    w = 1.0 / effective_number(n, beta)
    return w / jnp.sum(w) * C
  gamma = {"inverse": 1.0, "sqrt_inverse": 0.5}.get(scheme, kw.get("gamma", 1.0))
  return (jnp.min(n) / n) ** gamma


def shot_groups(counts: Array, many: int = 100, few: int = 20) -> dict[str, Array]:
  """Many / medium / few-shot class masks (Liu et al., OLTR, CVPR 2019; Kang et al. 2020).

  many: ``n_c > many``; few: ``n_c < few``; medium: the rest (``few <= n_c <= many``),
  exactly as ``classifier-balancing/utils.py:shot_acc``.
  """
  c = jnp.asarray(counts)
  many_m = c > many
  few_m = c < few
  return {"many": many_m, "medium": ~(many_m | few_m), "few": few_m}

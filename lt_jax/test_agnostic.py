"""The test-agnostic long-tail protocol and SADE's test-time self-supervised aggregation.

Zhang et al., "Self-Supervised Aggregation of Diverse Experts for Test-Agnostic Long-Tailed
Recognition" (SADE), NeurIPS 2022 (``Vanint/SADE-AgnosticLT`` ``test_training_cifar.py``;
also used by BalPoE, Sarkar et al., CVPR 2023): a model trained on a long-tailed set is tested
under several *test* label distributions, not only the uniform one:

* ``forward<k>``: long-tailed in the training order with imbalance ``k`` (the most frequent
  training class is also the most frequent test class), ``backward<k>``: the reverse order,
  ``uniform``: the balanced test set; ``k`` in 50, 25, 10, 5, 2 (:data:`IMBALANCES`).
* Per-class test counts (:func:`target_counts`) follow the reference's ``IMBALANCECIFAR``
  construction applied to the test set: ``n'_c = int(n_max * (1/k)^(r_c / (C - 1)))`` where
  ``n_max`` is the balanced test set's per-class count and ``r_c`` the class's rank by
  training count (0 = most frequent; ties by class index), ``C - 1 - r_c`` for backward.
  On CIFAR-LT and Fashion-MNIST-LT the rank is the class index, as in the reference.
* For a model that does not adapt at test time, accuracy under ``pi'`` (``pi'_c = n'_c /
  sum n'``) follows from its per-class recall on the balanced test set:
  ``acc(pi') = sum_c pi'_c recall_c`` (:func:`recall_accuracy`), the expectation of the
  accuracy on a resampled set. A test-time adaptive method (SADE) needs the resampled sets
  themselves (:func:`resampled_indices`: a seeded per-class subset, documented there).
* Post-hoc logit adjustment to a *known* target prior (Menon et al., ICLR 2021, Sec. 4:
  ``argmax_y z_y - tau log pi_y + log pi'_y``) is the baseline a method that does not know
  ``pi'`` is compared with (:func:`posthoc_to_target`).

SADE's aggregation (:func:`fit_aggregation`): expert weights ``a = softmax(w)`` (init uniform)
are learnt on the *unlabelled* test images by maximising the cosine similarity of the
aggregated predictions ``softmax(sum_i a_i z_i)`` of two augmented views of each image
(:func:`aggregation_objective`); no function here takes test labels.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lt_jax import priors
from lt_jax.data import augment

Array = jax.Array

IMBALANCES = (50, 25, 10, 5, 2)


def distribution_names(imbalances=IMBALANCES) -> tuple[str, ...]:
  """``forward<k>`` (largest k first), ``uniform``, ``backward<k>`` (smallest k first): the reference's order."""
  ks = sorted({int(k) if float(k).is_integer() else float(k) for k in imbalances}, reverse=True)
  if any(k <= 1 for k in ks):
    raise ValueError(f"test imbalances must be > 1 (uniform is always included), got {tuple(imbalances)}")
  return tuple(f"forward{k}" for k in ks) + ("uniform",) + tuple(f"backward{k}" for k in reversed(ks))


def parse_distribution(name: str) -> tuple[str, float]:
  """``'forward50'`` -> ``('forward', 50.0)``; ``'uniform'`` -> ``('uniform', 1.0)``."""
  for direction in ("forward", "backward"):
    if name.startswith(direction):
      try:
        k = float(name[len(direction):])
      except ValueError:
        break
      if k > 1:
        return direction, k
  if name == "uniform":
    return "uniform", 1.0
  raise ValueError(f"unknown test distribution {name!r}; valid: uniform, forward<k>, backward<k> with k > 1")


def class_ranks(train_counts) -> np.ndarray:
  """Rank of each class by training count, 0 = most frequent (ties: lower class index first)."""
  c = np.asarray(train_counts, np.float64)
  order = np.argsort(-c, kind="stable")
  ranks = np.empty(len(c), np.int64)
  ranks[order] = np.arange(len(c))
  return ranks


def target_counts(train_counts, n_max: int, name: str) -> np.ndarray:
  """Per-class test counts of distribution ``name`` (module docstring), int64 ``(C,)``."""
  direction, k = parse_distribution(name)
  C = len(train_counts)
  if direction == "uniform" or C == 1:
    return np.full(C, int(n_max), np.int64)
  r = class_ranks(train_counts)
  if direction == "backward":
    r = C - 1 - r
  return np.array([int(n_max * (1.0 / k) ** (ri / (C - 1.0))) for ri in r], np.int64)


def target_prior(train_counts, n_max: int, name: str) -> np.ndarray:
  """``pi'_c = n'_c / sum_k n'_k`` of :func:`target_counts` (float64)."""
  n = target_counts(train_counts, n_max, name).astype(np.float64)
  return n / n.sum()


def per_class_recall(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """``recall_c = #{i: y_i = c, argmax z_i = c} / #{i: y_i = c}`` (NaN for an absent class)."""
  pred = np.argmax(np.asarray(logits), axis=-1)
  y = np.asarray(labels)
  hits = np.bincount(y[pred == y], minlength=num_classes).astype(np.float64)
  n = np.bincount(y, minlength=num_classes).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return hits / n


def recall_accuracy(recall: np.ndarray, prior: np.ndarray) -> float:
  """Accuracy under the test prior ``pi'``: ``sum_c pi'_c recall_c`` (classes with ``pi'_c = 0`` ignored)."""
  p = np.asarray(prior, np.float64)
  r = np.asarray(recall, np.float64)
  return float(np.sum(np.where(p > 0, p * np.nan_to_num(r), 0.0)))


def resampled_indices(labels: np.ndarray, counts: np.ndarray, seed: int = 0) -> np.ndarray:
  """Indices of a resampled test set with ``counts[c]`` examples of class c (sorted by class).

  ``rng = numpy.random.default_rng(seed)``; for ``c = 0, 1, ...``: the first ``counts[c]`` of
  ``rng.permutation(indices of class c)`` — the reference (``IMBALANCECIFAR`` with
  ``np.random.seed(0)``) shuffles each class's indices in class order and keeps the first
  ``n'_c`` the same way, with the legacy global NumPy generator. The same seed gives nested
  subsets for the same class across distributions.
  """
  y = np.asarray(labels)
  rng = np.random.default_rng(seed)
  out = []
  for c, n in enumerate(np.asarray(counts)):
    idx = np.flatnonzero(y == c)
    if n > len(idx):
      raise ValueError(f"class {c} has {len(idx)} test examples, the distribution needs {n}")
    out.append(rng.permutation(idx)[:int(n)])
  return np.concatenate(out).astype(np.int64)


def posthoc_to_target(logits, train_prior, target_prior, train_tau: float = 1.0) -> np.ndarray:
  """``z - train_tau log pi_train + log pi'``: post-hoc logit adjustment to a known test prior.

  Menon et al., ICLR 2021 (eq. 8 with the test prior): for a model whose logits estimate
  ``log p_train(y|x)`` (softmax CE, ``train_tau = 1``) the Bayes classifier under ``pi'`` is
  ``argmax z_y - log pi_y + log pi'_y``; a model trained with the logit-adjusted loss or
  Balanced Softmax already outputs balanced scores (``train_tau = 0``). Classes with
  ``pi'_c = 0`` get ``log`` of the zero-count rule's floor (:func:`lt_jax.priors.log_prior`).
  """
  z = np.asarray(logits, np.float64)
  lp_train = np.asarray(priors.log_prior(jnp.asarray(train_prior, jnp.float32)), np.float64)
  lp_target = np.asarray(priors.log_prior(jnp.asarray(target_prior, jnp.float32)), np.float64)
  return z - train_tau * lp_train + lp_target


# ----------------------------------------------------------------------------- SADE aggregation


def aggregate(expert_logits: Array, weights: Array) -> Array:
  """``sum_i a_i z_i`` over the expert axis: ``(..., E, C)``, ``(E,)`` -> ``(..., C)``."""
  return jnp.einsum("...ec,e->...c", jnp.asarray(expert_logits, jnp.float32), jnp.asarray(weights, jnp.float32))


def aggregation_objective(raw_weights: Array, view0: Array, view1: Array, mask: Array | None = None) -> Array:
  """SADE's test-time loss ``-mean_n cos(softmax(sum_i a_i z0_ni), softmax(sum_i a_i z1_ni))``, ``a = softmax(w)``.

  ``view0``, ``view1``: expert logits ``(N, E, C)`` of two augmented views of the same unlabelled
  images; ``mask`` (N,) selects real rows (padding excluded from the mean). The cosine is
  ``p0 . p1 / max(|p0| |p1|, 1e-6)`` (``torch.nn.CosineSimilarity(eps=1e-6)``; probability vectors
  have norm >= C^-1/2, so the floor never binds). Minimising it maximises the agreement.
  """
  a = jax.nn.softmax(raw_weights)
  p0 = jax.nn.softmax(aggregate(view0, a), axis=-1)
  p1 = jax.nn.softmax(aggregate(view1, a), axis=-1)
  cos = jnp.sum(p0 * p1, -1) / jnp.maximum(jnp.linalg.norm(p0, axis=-1) * jnp.linalg.norm(p1, axis=-1), 1e-6)
  if mask is None:
    return -jnp.mean(cos)
  m = jnp.asarray(mask, jnp.float32)
  return -jnp.sum(cos * m) / jnp.maximum(jnp.sum(m), 1.0)


def aggregation_optimizer(lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                          weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """PyTorch ``SGD(lr, momentum, nesterov, weight_decay)`` (the reference's test-time optimiser):
  decay added to the gradient before the momentum buffer, as ``torch.optim.SGD``."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum, nesterov=nesterov))


def _epoch_fn(tx: optax.GradientTransformation, batch_size: int):
  @jax.jit
  def epoch(raw, opt_state, view0, view1, perm):
    n = perm.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(nb, batch_size)
    mask = (jnp.arange(nb * batch_size) < n).reshape(nb, batch_size)

    def step(carry, b):
      raw, opt_state = carry
      i, m = b
      loss, g = jax.value_and_grad(aggregation_objective)(raw, view0[i], view1[i], m)
      updates, opt_state = tx.update(g, opt_state, raw)
      return (optax.apply_updates(raw, updates), opt_state), loss

    (raw, opt_state), losses = jax.lax.scan(step, (raw, opt_state), (idx, mask))
    return raw, opt_state, losses
  return epoch


def fit_aggregation(view_logits: Callable[[Array], tuple[Array, Array]], num_examples: int, key: Array, *,
                    num_experts: int = 3, epochs: int = 5, lr: float = 0.1, momentum: float = 0.9,
                    nesterov: bool = True, weight_decay: float = 5e-4, batch_size: int = 128,
                    stop_below: float = 0.05) -> tuple[np.ndarray, list[list[float]]]:
  """SADE's test-time self-supervised aggregation; returns ``(a = softmax(w) (E,), losses per epoch)``.

  ``view_logits(key) -> (view0, view1)``: the experts' logits ``(N, E, C)`` of two fresh
  augmented views of the N unlabelled test images (the backbone is frozen and in eval mode, so
  a view's logits do not depend on ``w``: the reference's per-batch forward passes give the same
  numbers). Each epoch draws new views, shuffles the images (``permutation(fold_in(key, epoch))``)
  and takes one SGD step per batch of ``batch_size`` (the last one smaller) on
  :func:`aggregation_objective`; ``w`` starts at ``1/E`` (uniform weights). After an epoch the
  weights are rounded to 2 decimals and fitting stops if any is below ``stop_below`` (the
  reference's ``weight_record[i] < 0.05`` check). Reference settings (``configs/test_time_*.json``):
  SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, batch 128, 5 epochs.
  """
  tx = aggregation_optimizer(lr, momentum, nesterov, weight_decay)
  raw = jnp.full((num_experts,), 1.0 / num_experts, jnp.float32)
  opt_state = tx.init(raw)
  run_epoch = _epoch_fn(tx, int(batch_size))
  history = []
  for e in range(int(epochs)):
    k = jax.random.fold_in(key, e)
    view0, view1 = view_logits(jax.random.fold_in(k, 0))
    perm = jax.random.permutation(jax.random.fold_in(k, 1), num_examples)
    raw, opt_state, losses = run_epoch(raw, opt_state, jnp.asarray(view0), jnp.asarray(view1), perm)
    history.append(np.asarray(losses).tolist())
    if np.any(np.round(np.asarray(jax.nn.softmax(raw)), 2) < stop_below):
      break
  return np.asarray(jax.nn.softmax(raw), np.float64), history


def augment_view(key: Array, images: Array, *, pad: int = 4, flip: bool = True, jitter: float = 0.4,
                 p_jitter: float = 0.8, p_gray: float = 0.2) -> Array:
  """One augmented view for SADE's test-time aggregation, float32 in ``[0, 255]`` (normalise after).

  The reference's ``train_trsfm`` is ``RandomCrop(pad 4)``, ``ColorJitter(0.4, 0.4, 0.4, 0.1)``
  with p 0.8, ``RandomGrayscale(0.2)``, Gaussian blur with p 0.2, ``RandomHorizontalFlip``. Here:
  crop + flip (:func:`lt_jax.data.augment.random_crop_flip`), then with probability ``p_jitter``
  brightness ``x * b`` and contrast ``(x - mean) c + mean`` (``b, c ~ U[1 - jitter, 1 + jitter]``,
  ``mean`` the image's grey mean, clipped to ``[0, 255]``; brightness first, where torchvision
  draws the order), and for RGB images greyscale with probability ``p_gray``. Saturation, hue
  and blur are left out (the data here is greyscale and small).
  """
  k_crop, k_on, k_b, k_c, k_g = jax.random.split(key, 5)
  x = augment.random_crop_flip(k_crop, images, pad=pad, flip=flip).astype(jnp.float32)
  B, C = x.shape[0], x.shape[-1]
  lum = jnp.asarray([0.299, 0.587, 0.114], jnp.float32) if C == 3 else jnp.ones((C,), jnp.float32) / C
  b = jax.random.uniform(k_b, (B, 1, 1, 1), minval=1.0 - jitter, maxval=1.0 + jitter)
  c = jax.random.uniform(k_c, (B, 1, 1, 1), minval=1.0 - jitter, maxval=1.0 + jitter)
  xj = jnp.clip(x * b, 0.0, 255.0)
  mean = jnp.mean(xj @ lum, axis=(1, 2))[:, None, None, None]
  xj = jnp.clip((xj - mean) * c + mean, 0.0, 255.0)
  x = jnp.where(jax.random.bernoulli(k_on, p_jitter, (B, 1, 1, 1)), xj, x)
  if C == 3:
    grey = jnp.broadcast_to((x @ lum)[..., None], x.shape)
    x = jnp.where(jax.random.bernoulli(k_g, p_gray, (B, 1, 1, 1)), grey, x)
  return x

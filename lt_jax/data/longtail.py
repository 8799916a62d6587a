"""Long-tailed subsets of balanced datasets (CIFAR-10-LT, CIFAR-100-LT, Fashion-MNIST-LT).

Construction (Cao et al., LDAM-DRW, NeurIPS 2019, ``imbalance_cifar.py``; Cui et al.,
CVPR 2019): per-class sizes ``n_c`` from :func:`lt_jax.priors.lt_counts` (class 0 is the
head, ``n_0 = n_max``), then a seeded random subset of each class
(:func:`lt_indices`). The test split stays the untouched balanced test set.

Validation split (``val_per_class > 0``)
  Post-hoc choices (tau-normalisation, logit-adjustment tau, checkpoint selection)
  must be tuned on data that is neither trained on nor the test set. The reference
  CIFAR-LT code has none (it reports the best test accuracy, REFERENCE.md §1c), and
  the held-out remainder of the training split cannot give a balanced one: with
  ``n_max`` equal to the balanced per-class count (5000 on CIFAR-10) the head class
  has no remainder. So the validation set is carved *first*: ``val_per_class``
  examples of every class are drawn from the training split (their own RNG stream,
  ``RandomState([seed, 1])``), the long-tailed subset is then drawn from the rest, and
  ``n_max`` defaults to the per-class count minus ``val_per_class`` (CIFAR-10 with
  ``val_per_class=50``: ``n_max = 4950``). With ``val_per_class=0`` (default) the
  training subset is exactly the reference one for the same seed.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from lt_jax import priors
from lt_jax.data import sources

LT_DATASETS = sources.IN_MEMORY_DATASETS


def lt_indices(labels, counts, seed: int, exclude=None) -> np.ndarray:
  """Indices of the reference seeded long-tailed subset, in class order.

  The algorithm of ``IMBALANCECIFAR10.gen_imbalanced_data`` (Cao et al., NeurIPS 2019,
  kaidic/LDAM-DRW ``imbalance_cifar.py``; BBN copies it): seed NumPy's legacy
  Mersenne-Twister once with ``seed``, then for each class ``c = 0, 1, ...`` in sorted
  order: ``idx = np.where(labels == c)[0]``, shuffle ``idx`` in place, keep
  ``idx[:n_c]``; the kept blocks are concatenated class by class. Here the stream is a
  local ``np.random.RandomState(seed)`` (no global state), which draws exactly what
  ``np.random.seed(seed); np.random.shuffle(...)`` draws, so the subset is identical.

  Args:
    labels: int class labels of the balanced split, shape (N,), values in ``[0, C)``.
    counts: per-class sizes ``n_c``, shape (C,) (e.g. from ``priors.lt_counts``).
    seed: the reference ``--rand_number`` (default 0 there).
    exclude: optional indices removed from every class's candidates before the
      shuffle (used to keep a validation split disjoint). ``None`` = reference.

  Returns ``int64`` indices into ``labels``, ``sum(counts)`` of them.
  Raises ``ValueError`` if a class has fewer candidates than ``n_c`` (the reference
  would silently keep fewer).
  """
  labels = np.asarray(labels).reshape(-1)
  counts = np.asarray(counts).reshape(-1)
  if labels.size and (labels.min() < 0 or labels.max() >= counts.size):
    raise ValueError(f"labels must lie in [0, {counts.size}) (one count per class), "
                     f"got range [{labels.min()}, {labels.max()}]")
  if np.any(counts < 0):
    raise ValueError(f"counts must be non-negative, got {counts}")
  rng = np.random.RandomState(seed)
  excluded = None if exclude is None else np.unique(np.asarray(exclude, np.int64))
  out = []
  for c, n_c in enumerate(counts):
    idx = np.where(labels == c)[0]
    if excluded is not None:
      idx = idx[~np.isin(idx, excluded)]
    if idx.size < n_c:
      raise ValueError(f"class {c} has {idx.size} candidate examples, fewer than the {n_c} requested; "
                       "lower n_max or val_per_class")
    rng.shuffle(idx)
    out.append(idx[:n_c])
  return np.concatenate(out).astype(np.int64) if out else np.zeros((0,), np.int64)


def balanced_indices(labels, num_classes: int, per_class: int, seed) -> np.ndarray:
  """``per_class`` random indices of every class (class order, ascending within a class).

  ``seed`` is anything ``np.random.RandomState`` accepts; draws are class by class.
  """
  labels = np.asarray(labels).reshape(-1)
  rng = np.random.RandomState(seed)
  out = []
  for c in range(num_classes):
    idx = np.where(labels == c)[0]
    if idx.size < per_class:
      raise ValueError(f"class {c} has {idx.size} examples, fewer than the {per_class} requested")
    out.append(np.sort(rng.permutation(idx)[:per_class]))
  return np.concatenate(out).astype(np.int64) if out else np.zeros((0,), np.int64)


class LTDataset(NamedTuple):
  """A long-tailed training set with its balanced validation and test sets (NumPy, host).

  Images are ``uint8`` NHWC (normalise on device with ``augment.normalize``); labels
  ``int32``. ``*_indices`` index the tfds ``train`` split. Training examples are in
  class order (as the reference builds them): shuffle every epoch.
  """
  name: str
  num_classes: int
  image_shape: tuple           # (H, W, C)
  class_names: tuple           # tfds label names
  train_images: np.ndarray     # (N_lt, H, W, C) uint8
  train_labels: np.ndarray     # (N_lt,) int32
  train_indices: np.ndarray    # (N_lt,) int64 into the tfds train split
  val_images: np.ndarray       # (C * val_per_class, H, W, C) uint8; empty if val_per_class=0
  val_labels: np.ndarray       # (C * val_per_class,) int32
  val_indices: np.ndarray      # int64 into the tfds train split, disjoint from train_indices
  test_images: np.ndarray      # balanced tfds test split, untouched
  test_labels: np.ndarray
  counts: np.ndarray           # (C,) int64, = priors.lt_counts(n_max, C, IR, profile, ...)
  prior: np.ndarray            # (C,) float32, = priors.prior(counts)
  mean: np.ndarray             # (channels,) float32, on pixel/255
  std: np.ndarray              # (channels,) float32
  imbalance_ratio: float
  profile: str
  seed: int
  n_max: int
  val_per_class: int


def make_lt_dataset(name: str, imbalance_ratio: float, profile: str = "exp", seed: int = 0,
                    data_dir: str | os.PathLike | None = None, val_per_class: int = 0, *,
                    n_max: int | None = None, **profile_kw) -> LTDataset:
  """Build ``<name>``-LT: counts from :func:`priors.lt_counts`, subset by :func:`lt_indices`.

  Args:
    name: ``cifar10``, ``cifar100`` or ``fashion_mnist``.
    imbalance_ratio: ``IR = n_max / n_min >= 1`` (1 = balanced subset of size n_max/class).
    profile: ``exp`` (Cao et al. 2019 / Cui et al. 2019), ``step`` or ``pareto``; see
      :func:`priors.lt_counts`. ``profile_kw`` goes there (``mu`` for step, ``shape``
      for pareto; pareto's draw uses ``seed``).
    seed: subset seed, the reference ``--rand_number`` (0 there). Same seed, same data.
    data_dir: tfds data folder (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    val_per_class: balanced validation examples per class, carved from the training
      split before the LT draw (module docstring); 0 = no validation split.
    n_max: head-class size; default the smallest per-class training count minus
      ``val_per_class`` (the balanced per-class count: 5000 CIFAR-10, 500 CIFAR-100,
      6000 Fashion-MNIST).

  CIFAR-10, IR 100, exp, seed 0: counts ``[5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]``
  (12,406 images) and the same images as the reference code, since ``load_arrays``
  returns CIFAR in its original order (``train_indices`` index that order). Bad names/profiles/IR
  raise ``ValueError`` listing the valid choices, before any data is read.
  """
  if name not in LT_DATASETS:
    raise ValueError(f"unknown dataset {name!r} for make_lt_dataset; valid choices: {', '.join(LT_DATASETS)}"
                     + (" (imagenet_lt is long-tailed already: stream it with lt_jax.data.streaming.TfdsSource)"
                        if name == "imagenet_lt" else ""))
  if profile not in priors.PROFILES:
    raise ValueError(f"unknown long-tail profile {profile!r}; valid profiles: {', '.join(priors.PROFILES)}")
  if not (isinstance(imbalance_ratio, (int, float, np.integer, np.floating)) and imbalance_ratio >= 1):
    raise ValueError(f"imbalance_ratio must be a number >= 1 (n_max / n_min), got {imbalance_ratio!r}")
  if int(val_per_class) != val_per_class or val_per_class < 0:
    raise ValueError(f"val_per_class must be an integer >= 0, got {val_per_class!r}")
  if not 0 <= int(seed) < 2 ** 32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if n_max is not None and n_max < 1:
    raise ValueError(f"n_max must be >= 1, got {n_max}")
  val_per_class = int(val_per_class)
  spec = sources.get_spec(name)
  C = spec.num_classes

  train_x, train_y = sources.load_arrays(name, "train", data_dir)
  test_x, test_y = sources.load_arrays(name, "test", data_dir)
  per_class = np.bincount(train_y, minlength=C)
  if per_class.size != C:
    raise ValueError(f"{name}: labels outside [0, {C}) in the training split")
  available = int(per_class.min()) - val_per_class
  if available < 1:
    raise ValueError(f"val_per_class={val_per_class} leaves no training examples in the smallest class "
                     f"({int(per_class.min())} examples)")
  if n_max is None:
    n_max = available
  elif n_max > available:
    raise ValueError(f"n_max={n_max} exceeds the {available} examples the smallest class has left "
                     f"(after val_per_class={val_per_class})")

  counts = priors.lt_counts(int(n_max), C, float(imbalance_ratio), profile, seed=int(seed), **profile_kw)
  if val_per_class:
    val_idx = balanced_indices(train_y, C, val_per_class, [int(seed), 1])
  else:
    val_idx = np.zeros((0,), np.int64)
  train_idx = lt_indices(train_y, counts, int(seed), exclude=val_idx if val_per_class else None)

  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    names = tuple(tfds.builder(spec.tfds_name, data_dir=sources.resolve_data_dir(data_dir))
                  .info.features["label"].names)
  except Exception:  # pylint: disable=broad-except  (names are cosmetic)
    names = tuple(str(c) for c in range(C))

  return LTDataset(
      name=name, num_classes=C, image_shape=tuple(spec.image_shape), class_names=names,
      train_images=train_x[train_idx], train_labels=train_y[train_idx], train_indices=train_idx,
      val_images=train_x[val_idx], val_labels=train_y[val_idx], val_indices=val_idx,
      test_images=test_x, test_labels=test_y,
      counts=counts, prior=np.asarray(priors.prior(counts), np.float32),
      mean=np.asarray(spec.mean, np.float32), std=np.asarray(spec.std, np.float32),
      imbalance_ratio=float(imbalance_ratio), profile=profile, seed=int(seed), n_max=int(n_max),
      val_per_class=val_per_class)

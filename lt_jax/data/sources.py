"""In-memory tfds sources (CIFAR-10/100, Fashion-MNIST) and the ImageNet-LT stream.

``load_arrays(name, split)`` returns the whole split as NumPy arrays, images
``uint8`` NHWC and labels ``int32``. Order: CIFAR examples are sorted by tfds's ``id``
feature (``train_00000`` ... = the index in the original ``data_batch_1..5`` files),
which restores the original CIFAR order that torchvision, and so the reference
CIFAR-LT code, index (tfds itself stores them hash-shuffled); the binary and python
CIFAR releases hold the same images in the same order. Fashion-MNIST has no ``id``
and keeps tfds's deterministic order (no reference LT subset exists for it). It reads
the tfds build with ``builder.as_dataset(batch_size=...)`` and ``tfds.as_numpy``
(measured on 2 CPU cores: Fashion-MNIST train, 60k PNG decodes, ~4 s; the
``tfds.data_source`` path over an array_record build took ~8 s, since it decodes
each PNG in Python), then keeps a decoded ``.npy`` copy under
``<data_dir>/lt_jax_cache/`` so later loads are a memory copy (~0.1 s).

Readiness: if the tfds build is missing, ``fashion_mnist`` is built automatically
from the Debian files when present (see :mod:`lt_jax.data.prepare`); otherwise
:class:`~lt_jax.data.prepare.DataUnavailableError` is raised at once, naming the
``python -m lt_jax.data.prepare`` command. Nothing here ever downloads.

Normalisation constants (``DatasetSpec.mean``/``std``, on pixel/255):

* CIFAR-10 and CIFAR-100: mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010),
  the constants of the LDAM-DRW code (Cao et al., NeurIPS 2019, ``cifar_train.py``),
  which uses them for both datasets.
* Fashion-MNIST: mean 0.2860, std 0.3530, computed once over all 60,000 x 784 train
  pixels (``x = images / 255.; x.mean(), x.std()`` gave 0.286041, 0.353024).
* ImageNet-LT: the usual ImageNet RGB constants (0.485, 0.456, 0.406) /
  (0.229, 0.224, 0.225) of the OLTR / classifier-balancing code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import NamedTuple

import numpy as np

from lt_jax.data import prepare as _prepare
from lt_jax.data.prepare import DataUnavailableError, resolve_data_dir

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_READ_BATCH = 10_000

# tfds 4.9 logs a deprecation line per feature on every read (its own internal API use).
logging.getLogger("absl").addFilter(lambda record: "TensorInfo.dtype" not in record.getMessage())
_CACHE_FORMAT = "v1"  # bump when the cached arrays' content or order changes


class DatasetSpec(NamedTuple):
  """Static facts about a supported dataset."""
  name: str
  tfds_name: str
  num_classes: int
  image_shape: tuple  # (H, W, C); None for variable sizes
  splits: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  order_key: str | None = None  # tfds feature whose sort order is the original order


SPECS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", "cifar10", 10, (32, 32, 3), ("train", "test"), CIFAR_MEAN, CIFAR_STD, "id"),
    "cifar100": DatasetSpec("cifar100", "cifar100", 100, (32, 32, 3), ("train", "test"), CIFAR_MEAN, CIFAR_STD,
                            "id"),
    "fashion_mnist": DatasetSpec("fashion_mnist", "fashion_mnist", 10, (28, 28, 1), ("train", "test"),
                                 FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "imagenet_lt": DatasetSpec("imagenet_lt", "imagenet_lt", 1000, (None, None, 3),
                               ("train", "validation", "test"), IMAGENET_MEAN, IMAGENET_STD),
}
DATASETS = tuple(SPECS)
IN_MEMORY_DATASETS = ("cifar10", "cifar100", "fashion_mnist")


def get_spec(name: str) -> DatasetSpec:
  """The :class:`DatasetSpec` of ``name``; unknown names raise ``ValueError``."""
  if name not in SPECS:
    raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
  return SPECS[name]


def is_prepared(tfds_name: str, data_dir: str) -> bool:
  """Whether ``data_dir`` holds a complete tfds build of ``tfds_name``."""
  return _prepare.is_prepared(tfds_name, data_dir)


def _redirected(builder, data_dir: str) -> bool:
  """True when tfds reads ``builder`` from outside ``data_dir``.

  With an explicit ``data_dir`` tfds always uses it, except under
  ``tfds.testing.mock_data``, which injects its own folder; such builders are left
  to tfds (no readiness check, no cache).
  """
  path = os.path.abspath(os.fspath(builder.data_path))
  return os.path.commonpath([path, data_dir]) != data_dir


def ensure_prepared(name: str, data_dir: str | os.PathLike | None = None, auto_prepare: bool = True) -> str:
  """Return the resolved data folder, building ``fashion_mnist`` offline if needed.

  Raises ``DataUnavailableError`` (immediately, no network access) when the build is
  missing and cannot be made here.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = get_spec(name)
  data_dir = resolve_data_dir(data_dir)
  if _redirected(tfds.builder(spec.tfds_name, data_dir=data_dir), data_dir):
    return data_dir
  if is_prepared(spec.tfds_name, data_dir):
    return data_dir
  if name == "fashion_mnist" and auto_prepare and _prepare.debian_fashion_mnist_available():
    print(f"lt_jax: building tfds fashion_mnist offline from {_prepare.DEBIAN_FASHION_MNIST_DIR} "
          f"into {data_dir} (once, ~20 s)", file=sys.stderr)
    _prepare.prepare_fashion_mnist(data_dir, verbose=False)
    return data_dir
  hint = f" (needs `{_prepare.APT_INSTALL_HINT}` first)" if name == "fashion_mnist" else ""
  raise DataUnavailableError(
      f"{name} is not prepared in {data_dir}. Run `{_prepare.prepare_command(name, data_dir)}`{hint}, "
      "or pass data_dir= pointing to a prepared tfds data folder (or set TFDS_DATA_DIR).")


def _cache_paths(builder, data_dir: str, split: str):
  """Cache file names, fingerprinted by the build's dataset_info.json (None: no cache)."""
  if _redirected(builder, data_dir):
    return None
  data_path = os.fspath(builder.data_path)
  info = os.path.join(data_path, "dataset_info.json")
  try:
    with open(info, "rb") as f:
      tag = hashlib.sha256(f.read()).hexdigest()[:12]
  except OSError:
    return None
  folder = os.path.join(data_dir, "lt_jax_cache", os.path.relpath(data_path, data_dir))
  stem = os.path.join(folder, f"{split}-{tag}-{_CACHE_FORMAT}")
  return stem + "-images.npy", stem + "-labels.npy"


def _save_atomic(path: str, arr: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.partial.npy"
  np.save(tmp, arr)
  os.replace(tmp, path)


def _read_tfds(builder, split: str, order_key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """All examples of ``split``; sorted by the ``order_key`` feature when given."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Fixed-size batches, not batch_size=-1: the latter crashes under tfds.testing.mock_data.
  ds = builder.as_dataset(split=split, batch_size=_READ_BATCH, shuffle_files=False)
  images, labels, keys = [], [], []
  for ex in tfds.as_numpy(ds):
    images.append(ex["image"])
    labels.append(ex["label"])
    if order_key:
      keys.append(ex[order_key])
  if not images:
    raise DataUnavailableError(f"{builder.name} split {split!r} is empty in {builder.data_dir}")
  images = np.concatenate(images).astype(np.uint8, copy=False)
  labels = np.concatenate(labels).astype(np.int32)
  if order_key:
    order = np.argsort(np.concatenate(keys), kind="stable")  # 'train_00000' < 'train_00001' < ...
    images, labels = images[order], labels[order]
  return images, labels


def load_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                cache: bool = True, auto_prepare: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Load a whole split as ``(images uint8 (N, H, W, C), labels int32 (N,))``.

  Args:
    name: one of ``IN_MEMORY_DATASETS`` (``cifar10``, ``cifar100``, ``fashion_mnist``).
      ``imagenet_lt`` is streamed instead: see :class:`lt_jax.data.streaming.TfdsSource`.
    split: ``'train'`` or ``'test'``.
    data_dir: tfds data folder (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    cache: keep/read a decoded ``.npy`` copy in ``<data_dir>/lt_jax_cache``.
    auto_prepare: build ``fashion_mnist`` from the Debian files if it is missing.

  Returns CIFAR in the original (torchvision) order, Fashion-MNIST in tfds's
  deterministic order (module docstring); Fashion-MNIST images are (28, 28, 1).
  """
  spec = get_spec(name)
  if name not in IN_MEMORY_DATASETS:
    raise ValueError(f"{name} is not loaded into memory (it is streamed): read it with "
                     f"lt_jax.data.streaming.TfdsSource (configs/imagenet_lt.py); in-memory datasets: {', '.join(IN_MEMORY_DATASETS)}")
  if split not in spec.splits:
    raise ValueError(f"unknown split {split!r} for {name}; valid splits: {', '.join(spec.splits)}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = ensure_prepared(name, data_dir, auto_prepare)
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  paths = _cache_paths(builder, data_dir, split) if cache else None
  if paths and all(os.path.isfile(p) for p in paths):
    try:
      return np.load(paths[0]), np.load(paths[1])
    except (OSError, ValueError):
      pass  # unreadable cache: rebuild it below
  images, labels = _read_tfds(builder, split, spec.order_key)
  if images.shape[1:] != spec.image_shape:
    raise ValueError(f"{name}/{split}: expected images of shape (N, {spec.image_shape}), got {images.shape}")
  if paths:
    try:
      _save_atomic(paths[0], images)
      _save_atomic(paths[1], labels)
    except OSError:
      pass  # read-only data_dir: caching is an optimisation only
  return images, labels

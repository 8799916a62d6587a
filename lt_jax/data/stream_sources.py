"""Random-access example sources of the streaming pipeline, and opening them from a config.

Both sources expose ``len``, ``labels`` (read once), ``num_classes`` and ``load(i)``
returning encoded bytes or a decoded ``uint8`` image (the :class:`Source` protocol):
:class:`TfdsSource` (a tfds build read through ``tfds.data_source``, ArrayRecord, no
TensorFlow needed to read) and :class:`lt_jax.data.image_folder.ImageFolderSource` (an
image folder plus an ImageNet-LT-style split list). :func:`open_sources` builds the
``(train, test)`` pair of a streaming ``config.dataset``.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

import numpy as np


class Source(Protocol):
  """Random-access examples: ``len``, ``labels`` (N,) int32, ``num_classes``, ``load(i)``."""
  labels: np.ndarray
  num_classes: int

  def __len__(self) -> int: ...

  def load(self, i: int) -> bytes | np.ndarray: ...


class TfdsSource:
  """A tfds build read by index through ``tfds.data_source`` (ArrayRecord random access).

  The image feature is read undecoded (``tfds.decode.SkipDecoding``): ``load(i)`` returns
  the stored JPEG/PNG bytes and decoding happens in the pipeline's worker threads. Labels
  are read once (one pass over the records, images not decoded) and kept in
  ``<data_dir>/lt_jax_cache/<name>/<version>/<split>-labels.npy`` for the next run.
  Reading needs no TensorFlow; the build must be in ``array_record`` format
  (``download_and_prepare(file_format='array_record')``; TFRecord builds must be
  converted first). Each thread gets its own
  reader.

  Args:
    name: tfds name (``'imagenet_lt'``, or a custom build such as the test fixture).
    split: split name (``'train'``, ``'validation'``, ``'test'``).
    data_dir: tfds data folder (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    image_key, label_key: feature names.
  """

  def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None, *,
               image_key: str = "image", label_key: str = "label"):
    from lt_jax.data.prepare import DataUnavailableError, resolve_data_dir  # pylint: disable=g-import-not-at-top
    self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
    self.data_dir = resolve_data_dir(data_dir)
    self._local = threading.local()
    try:
      ds = self._open()
    except Exception as e:  # tfds raises assorted errors for a missing or TFRecord build
      raise DataUnavailableError(
          f"cannot read tfds {name!r} split {split!r} from {self.data_dir} with tfds.data_source "
          f"(needs an array_record build): {type(e).__name__}: {e}") from e
    self._local.ds = ds
    self._len = len(ds)
    info = ds.dataset_info
    self.num_classes = int(info.features[label_key].num_classes)
    self.labels = self._read_labels(ds, os.path.join(self.data_dir, "lt_jax_cache", name, str(info.version),
                                                     f"{split}-labels.npy"))

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                            decoders={self.image_key: tfds.decode.SkipDecoding()})

  def _read_labels(self, ds, cache: str) -> np.ndarray:
    if os.path.isfile(cache):
      labels = np.load(cache)
      if labels.shape == (self._len,):
        return labels
    chunk = 4096
    labels = np.empty((self._len,), np.int32)
    for start in range(0, self._len, chunk):
      rows = ds.__getitems__(list(range(start, min(start + chunk, self._len))))
      labels[start:start + len(rows)] = [int(r[self.label_key]) for r in rows]
    try:
      os.makedirs(os.path.dirname(cache), exist_ok=True)
      tmp = f"{cache}.{os.getpid()}.partial.npy"
      np.save(tmp, labels)
      os.replace(tmp, cache)
    except OSError:
      pass  # read-only data folder: the cache is an optimisation only
    return labels

  def __len__(self) -> int:
    return self._len

  def load(self, i: int) -> bytes:
    ds = getattr(self._local, "ds", None)
    if ds is None:
      ds = self._local.ds = self._open()
    return ds[int(i)][self.image_key]

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {self.split!r}, {self._len} examples, {self.num_classes} classes)"


STREAM_SOURCES = ("tfds", "folder", "fixture")


def open_sources(d, workdir: str | None = None) -> tuple[Source, Source]:
  """``(train, test)`` sources of a streaming ``config.dataset`` (``d.source`` in :data:`STREAM_SOURCES`).

  * ``tfds``: :class:`TfdsSource` of ``d.tfds_name`` splits ``d.train_split`` / ``d.test_split``
    in ``d.data_dir`` (an ``array_record`` build);
  * ``folder``: :class:`~lt_jax.data.image_folder.ImageFolderSource` of ``d.root`` with the
    split lists ``d.train_split`` / ``d.test_split`` (e.g. ``ImageNet_LT_train.txt``);
  * ``fixture``: a generated long-tailed JPEG folder (``d.fixture`` settings) written to
    ``d.root`` or, if empty, ``<workdir>/fixture`` (for ``smoke`` configs).
  """
  from lt_jax.data import image_folder as imf  # pylint: disable=g-import-not-at-top
  if d.source not in STREAM_SOURCES:
    raise ValueError(f"unknown dataset.source {d.source!r}; valid streaming sources: {', '.join(STREAM_SOURCES)}")
  if d.source == "tfds":
    return (TfdsSource(d.tfds_name, d.train_split, d.data_dir or None),
            TfdsSource(d.tfds_name, d.test_split, d.data_dir or None))
  if d.source == "fixture":
    root = d.root or os.path.join(workdir or ".", "fixture")
    f = d.fixture
    fx = imf.make_fixture(root, num_classes=f.num_classes, max_per_class=f.max_per_class,
                          imbalance_ratio=f.imbalance_ratio, test_per_class=f.test_per_class, size=f.size,
                          seed=f.seed)
    return imf.ImageFolderSource(fx.root, fx.train_split), imf.ImageFolderSource(fx.root, fx.test_split)
  if not d.root:
    raise ValueError("dataset.source='folder' needs dataset.root, the folder the split files' paths start from")
  train = imf.ImageFolderSource(d.root, d.train_split, d.num_classes or None)
  return train, imf.ImageFolderSource(d.root, d.test_split, train.num_classes)

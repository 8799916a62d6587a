"""Image-folder + split-list sources (ImageNet-LT, Places-LT, iNaturalist-2018) and a fixture.

The long-tailed benchmarks are distributed as a folder of images plus split files whose
lines read ``relative/path.jpg label`` (Liu et al., OLTR, CVPR 2019: ``ImageNet_LT_train.txt``,
``Places_LT_train.txt``; Kang et al., ICLR 2020 reuse them; iNaturalist-2018 split lists
in the same format are shipped by classifier-balancing / RIDE / MiSLAS). This module reads
such a list into an :class:`ImageFolderSource` (random access by index, labels read once)
for the host input pipeline :mod:`lt_jax.data.streaming`, and writes a small long-tailed
fixture in the same layout (:func:`make_fixture`) for tests and ``smoke`` configs.

Nothing here imports TensorFlow; :func:`build_tfds_fixture` (tests only) needs
``tensorflow_datasets`` and TensorFlow to *build* an ``array_record`` copy of a fixture.
"""

from __future__ import annotations

import io
import os
import threading
from typing import NamedTuple

import numpy as np

from lt_jax.data.prepare import DataUnavailableError, DatasetFormatError


def read_split_file(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
  """Parses a split list: one ``relative/path label`` per line -> ``(paths, labels int32)``.

  Blank lines are skipped. The path may contain spaces (the label is the last
  whitespace-separated field). A line without an integer label, or a negative label,
  raises ``DatasetFormatError`` (a ``ValueError``) naming the file and the line number.
  """
  paths, labels = [], []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      rel, _, label = line.rpartition(" ")
      try:
        y = int(label)
      except ValueError:
        y = -1
      if not rel.strip() or y < 0:
        raise DatasetFormatError(f"{path}:{lineno}: expected 'relative/path.jpg <non-negative int label>', "
                                 f"got {line!r}")
      paths.append(rel.strip())
      labels.append(y)
  if not paths:
    raise DatasetFormatError(f"{path}: the split file lists no images")
  return paths, np.asarray(labels, np.int32)


class ImageFolderSource:
  """Random access to the images listed in a split file under ``root``.

  ``load(i)`` returns the encoded file bytes (decoded and augmented by the pipeline's
  worker threads); ``labels`` is read once from the split file.

  Args:
    root: folder the split file's relative paths start from.
    split_file: the list (``relative/path.jpg label`` per line); a relative name is
      looked up under ``root``.
    num_classes: number of classes (default ``max(label) + 1``); labels must be below it.
  """

  def __init__(self, root: str | os.PathLike, split_file: str | os.PathLike, num_classes: int | None = None):
    self.root = os.fspath(root)
    split_file = os.fspath(split_file)
    if not os.path.isabs(split_file) and not os.path.exists(split_file):
      split_file = os.path.join(self.root, split_file)
    if not os.path.isfile(split_file):
      raise DataUnavailableError(f"split file {split_file} not found (lines 'relative/path.jpg label')")
    self.split_file = split_file
    self.paths, self.labels = read_split_file(split_file)
    top = int(self.labels.max()) + 1
    self.num_classes = top if num_classes is None else int(num_classes)
    if self.num_classes < top:
      line = 1 + int(np.argmax(self.labels == top - 1))
      raise DatasetFormatError(f"{split_file}: label {top - 1} (image {line} of the list) needs num_classes > "
                               f"{top - 1}, got {self.num_classes}")

  def __len__(self) -> int:
    return len(self.paths)

  def load(self, i: int) -> bytes:
    path = os.path.join(self.root, self.paths[i])
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise DatasetFormatError(f"{self.split_file}: listed image {path} cannot be read "
                               f"({type(e).__name__}: {e.strerror or e})") from None

  def describe(self, i: int) -> str:
    """Where example ``i`` comes from (for error messages)."""
    return os.path.join(self.root, self.paths[i])

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.split_file!r}, {len(self)} images, {self.num_classes} classes)"


# ----------------------------------------------------------------------------------------
# Generated fixture.
# ----------------------------------------------------------------------------------------

class Fixture(NamedTuple):
  """A generated image folder: ``root`` with ``train.txt`` / ``test.txt`` split files."""
  root: str
  train_split: str
  test_split: str
  counts: np.ndarray     # (C,) training images per class
  num_classes: int
  size: int


def fixture_counts(num_classes: int, max_per_class: int, imbalance_ratio: float) -> np.ndarray:
  """Exponential profile ``n_c = int(n_max * IR^(-c / (C - 1)))`` (Cao et al. 2019), at least 1."""
  c = np.arange(num_classes)
  n = (max_per_class * (1.0 / imbalance_ratio) ** (c / max(num_classes - 1, 1))).astype(np.int64)
  return np.maximum(n, 1)


def _class_image(rng: np.random.Generator, cls: int, num_classes: int, h: int, w: int) -> np.ndarray:
  """A learnable pattern: class hue, stripes at a class angle, plus noise (uint8 RGB)."""
  hue = 2 * np.pi * cls / num_classes
  base = 127 + 100 * np.array([np.cos(hue), np.cos(hue - 2.1), np.cos(hue + 2.1)])
  angle = np.pi * cls / num_classes
  yy, xx = np.mgrid[0:h, 0:w]
  phase = rng.uniform(0, 2 * np.pi)
  stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / 8) + phase)
  img = base[None, None, :] + 60 * stripes[..., None] + rng.normal(0, 12, (h, w, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def make_fixture(root: str | os.PathLike, num_classes: int = 12, max_per_class: int = 40,
                 imbalance_ratio: float = 10.0, test_per_class: int = 6, size: int = 32,
                 seed: int = 0) -> Fixture:
  """Writes a long-tailed JPEG image folder with ImageNet-LT-style split files; idempotent.

  Layout: ``root/train/<class>/<k>.jpg`` and ``root/test/<class>/<k>.jpg``, with
  ``root/train.txt`` and ``root/test.txt`` listing ``train/003/0007.jpg 3``-style lines.
  Training counts follow :func:`fixture_counts`; the test split is balanced
  (``test_per_class`` each). Image sides vary in ``[size, 3 * size / 2]`` so crops see
  non-square inputs. Deterministic in ``seed``; an existing complete fixture with the
  same parameters is reused (a ``.complete`` marker records them). Every file is written
  atomically, so several processes may generate the same fixture at once.
  """
  root = os.fspath(root)
  counts = fixture_counts(num_classes, max_per_class, imbalance_ratio)
  tag = f"{num_classes},{max_per_class},{imbalance_ratio},{test_per_class},{size},{seed}\n"
  marker = os.path.join(root, ".complete")
  fx = Fixture(root, os.path.join(root, "train.txt"), os.path.join(root, "test.txt"), counts, num_classes, size)
  if os.path.isfile(marker):
    with open(marker, encoding="utf-8") as f:
      if f.read() == tag:
        return fx
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for split, per_class in (("train", counts), ("test", np.full(num_classes, test_per_class))):
    lines = []
    for c in range(num_classes):
      folder = os.path.join(root, split, f"{c:03d}")
      os.makedirs(folder, exist_ok=True)
      for k in range(int(per_class[c])):
        h, w = rng.integers(size, size * 3 // 2 + 1, size=2)
        rel = f"{split}/{c:03d}/{k:04d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(_class_image(rng, c, num_classes, int(h), int(w))).save(buf, format="JPEG", quality=90)
        _write_atomic(os.path.join(root, rel), buf.getvalue())
        lines.append(f"{rel} {c}\n")
    _write_atomic(os.path.join(root, f"{split}.txt"), "".join(lines).encode())
  _write_atomic(marker, tag.encode())
  return fx


def _write_atomic(path: str, data: bytes) -> None:
  """Write-then-rename, so processes generating the same fixture at once never see a partial file."""
  tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def build_tfds_fixture(fixture: Fixture, data_dir: str | os.PathLike, name: str = "lt_fixture") -> str:
  """Builds the fixture as a tfds ``array_record`` dataset ``name`` in ``data_dir`` (needs TF).

  Features ``image`` (encoded JPEG, read back as bytes) and ``label``; splits ``train`` and
  ``test`` in split-file order. For tests of :class:`lt_jax.data.streaming.TfdsSource`;
  returns ``data_dir``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class LtFixture(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=fixture.num_classes)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(fixture.train_split),
              "test": self._generate_examples(fixture.test_split)}

    def _generate_examples(self, split_file):
      src = ImageFolderSource(fixture.root, split_file, fixture.num_classes)
      for i in range(len(src)):
        # Pass the file object: tfds stores JPEG bytes as they are (no re-encoding).
        yield i, {"image": io.BytesIO(src.load(i)), "label": int(src.labels[i])}

  LtFixture.name = name
  builder = LtFixture(data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(data_dir)

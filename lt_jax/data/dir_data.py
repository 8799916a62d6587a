"""Deep imbalanced regression (DIR) data: the offline rotated Fashion-MNIST benchmark and a CSV loader.

Both return a :class:`RegressionDataset` (uint8 NHWC images and float32 targets for the train /
val / test splits, plus per-channel normalisation constants of the training images).

**Rotated Fashion-MNIST DIR** (:func:`rotated_fashion_mnist`), built offline from the tfds
Fashion-MNIST arrays (:func:`lt_jax.data.sources.load_arrays`), deterministic given its arguments:

1. Target bins: ``B = max_angle`` integer-degree bins ``[b, b + 1)``, ``b = 0 .. B - 1``
   (default ``max_angle = 90``: 90 bins).
2. Training counts per bin follow the exponential long-tail profile of CIFAR-LT with the bins in
   the role of classes, ``n_b = int(n_max * IR^(-b / (B - 1)))`` (:func:`lt_jax.priors.lt_counts`);
   defaults ``n_max = 400``, ``IR = 100`` give 7,813 training images, from 400 images at 0-1 deg
   down to 4 at 89-90 deg, i.e. 27 many-shot bins (> 100 images), 31 medium (20-100) and 32
   few-shot bins (< 20), the thresholds of DIR's ``shot_metrics``.
3. Validation and test targets are balanced: ``val_per_bin`` (10) and ``test_per_bin`` (30)
   examples in every bin.
4. Within its bin each example's angle is ``b + u`` with ``u ~ U[0, 1)``, so targets are
   continuous (float labels, the case the reference LDS code does not handle).
5. Images: a ``numpy.random.default_rng(seed)`` permutation of the 60,000 Fashion-MNIST
   *train* images gives the training images (first ``sum n_b``) and the validation images (next
   ``B * val_per_bin``); a permutation of the 10,000 *test* images gives the test images (first
   ``B * test_per_bin``). All ten clothing classes appear in every split, at their natural rate.
6. Each image is rotated counter-clockwise (as displayed, row 0 at the top) by its angle about
   the image centre with ``scipy.ndimage.rotate(img, angle, reshape=False, order=1,
   mode='constant', cval=0)`` (bilinear, black fill, 28x28 kept; corners leave the frame), then
   rounded and clipped back to uint8. Examples are stored in random order (not sorted by angle).

The result is cached as ``.npz`` under ``<data_dir>/lt_jax_cache/rotated_fashion_mnist/``, keyed
by the arguments and a fingerprint of the source arrays, so a second call is a file read.

**User datasets** (:func:`load_regression_csv`): a CSV of ``(path, target, split)`` rows with an
image folder, the shape of the AgeDB-DIR / IMDB-WIKI-DIR split files (``agedb.csv``:
``age,path,split``), or of ``(index, target, split)`` rows with a ``.npz`` array of images.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import zipfile
from typing import NamedTuple

import numpy as np

from lt_jax.data.prepare import DataUnavailableError, DatasetFormatError, resolve_data_dir  # noqa: F401  (re-exported)

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"valid": "val", "validation": "val", "dev": "val", "training": "train", "testing": "test"}
TARGET_COLUMNS = ("target", "age", "label", "y")
_CACHE_FORMAT = "v1"  # bump when the construction below changes


class RegressionDataset(NamedTuple):
  """Images uint8 ``(N, H, W, C)`` and float32 targets ``(N,)`` per split; train mean / std per channel."""
  name: str
  train_images: np.ndarray
  train_targets: np.ndarray
  val_images: np.ndarray
  val_targets: np.ndarray
  test_images: np.ndarray
  test_targets: np.ndarray
  mean: tuple[float, ...]
  std: tuple[float, ...]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of ``images / 255`` (the normalisation constants of a dataset)."""
  x = np.asarray(images, np.float64) / 255.0
  axes = tuple(range(x.ndim - 1))
  return tuple(float(v) for v in x.mean(axes)), tuple(float(v) for v in np.maximum(x.std(axes), 1e-6))


def _dataset(name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> RegressionDataset:
  mean, std = channel_stats(splits["train"][0])
  return RegressionDataset(name, *splits["train"], *splits["val"], *splits["test"], mean, std)


# ============================================================================ rotated Fashion-MNIST


def rotated_fmnist_counts(max_angle: int = 90, n_max: int = 400, imbalance_ratio: float = 100.0) -> np.ndarray:
  """Training images per integer-degree bin: ``n_b = int(n_max * IR^(-b / (B - 1)))``, ``B = max_angle``."""
  from lt_jax.priors import lt_counts
  return lt_counts(int(n_max), int(max_angle), float(imbalance_ratio), "exp")


def rotate_images(images: np.ndarray, angles: np.ndarray) -> np.ndarray:
  """Rotates each ``(H, W, C)`` uint8 image counter-clockwise by its angle in degrees (step 6 above)."""
  from scipy import ndimage
  out = np.empty_like(images)
  for i in range(images.shape[0]):
    r = ndimage.rotate(images[i].astype(np.float32), float(angles[i]), axes=(1, 0), reshape=False,
                       order=1, mode="constant", cval=0.0)
    out[i] = np.clip(np.rint(r), 0, 255).astype(np.uint8)
  return out


def _angles(rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
  bins = np.repeat(np.arange(len(counts)), counts)
  angles = bins + rng.random(len(bins))
  return angles[rng.permutation(len(bins))].astype(np.float32)


def rotated_fashion_mnist(data_dir: str | os.PathLike | None = None, *, max_angle: int = 90, n_max: int = 400,
                          imbalance_ratio: float = 100.0, val_per_bin: int = 10, test_per_bin: int = 30,
                          seed: int = 0, cache: bool = True, cache_dir: str | None = None) -> RegressionDataset:
  """The offline DIR benchmark "rotated Fashion-MNIST": target = rotation angle in degrees.

  See the module docstring for the exact construction (long-tailed training angles with an
  exponential profile over ``max_angle`` one-degree bins, balanced validation and test angles).
  Deterministic given the arguments; cached under ``cache_dir`` (default
  ``<data_dir>/lt_jax_cache/rotated_fashion_mnist``; ``cache=False``: no cache). Raises
  ``DataUnavailableError`` when Fashion-MNIST is not prepared and cannot be built offline.
  """
  from lt_jax.data import sources
  if not isinstance(max_angle, (int, np.integer)) or not 2 <= max_angle <= 360:
    raise ValueError(f"max_angle must be an int in [2, 360] (one bin per degree), got {max_angle!r}")
  if val_per_bin < 0 or test_per_bin < 1:
    raise ValueError(f"need val_per_bin >= 0 and test_per_bin >= 1, got {val_per_bin}, {test_per_bin}")
  counts = rotated_fmnist_counts(max_angle, n_max, imbalance_ratio)
  n_train, n_val, n_test = int(counts.sum()), max_angle * val_per_bin, max_angle * test_per_bin
  x_tr, _ = sources.load_arrays("fashion_mnist", "train", data_dir)
  x_te, _ = sources.load_arrays("fashion_mnist", "test", data_dir)
  if n_train + n_val > len(x_tr) or n_test > len(x_te):
    raise ValueError(f"rotated_fashion_mnist needs {n_train} + {n_val} train-split and {n_test} test-split "
                     f"images; Fashion-MNIST has {len(x_tr)} and {len(x_te)}: lower n_max, val_per_bin or "
                     "test_per_bin")
  args = dict(max_angle=int(max_angle), n_max=int(n_max), imbalance_ratio=float(imbalance_ratio),
              val_per_bin=int(val_per_bin), test_per_bin=int(test_per_bin), seed=int(seed))
  path = None
  if cache:
    h = hashlib.sha256(json.dumps(args, sort_keys=True).encode() + _CACHE_FORMAT.encode())
    h.update(hashlib.sha256(x_tr.tobytes()).digest() + hashlib.sha256(x_te.tobytes()).digest())
    folder = cache_dir or os.path.join(resolve_data_dir(data_dir), "lt_jax_cache", "rotated_fashion_mnist")
    path = os.path.join(folder, f"{h.hexdigest()[:16]}.npz")
    if os.path.isfile(path):
      try:
        with np.load(path) as z:
          return _dataset("rotated_fashion_mnist",
                          {s: (z[f"{s}_images"], z[f"{s}_targets"]) for s in SPLITS})
      except (OSError, ValueError, KeyError):
        pass  # unreadable cache: rebuild below
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x_tr))
  test_order = rng.permutation(len(x_te))
  y_tr = _angles(rng, counts)
  y_va = _angles(rng, np.full(max_angle, val_per_bin))
  y_te = _angles(rng, np.full(max_angle, test_per_bin))
  splits = {"train": (rotate_images(x_tr[order[:n_train]], y_tr), y_tr),
            "val": (rotate_images(x_tr[order[n_train:n_train + n_val]], y_va), y_va),
            "test": (rotate_images(x_te[test_order[:n_test]], y_te), y_te)}
  if path:
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f"{path}.{os.getpid()}.partial.npz"
      np.savez(tmp, **{f"{s}_{k}": v for s, (x, y) in splits.items() for k, v in (("images", x), ("targets", y))})
      os.replace(tmp, path)
    except OSError:
      pass  # read-only data_dir: caching is an optimisation only
  return _dataset("rotated_fashion_mnist", splits)


# ============================================================================ user datasets


def _read_csv(csv_path: str) -> tuple[list[str], list[dict[str, str]]]:
  if not os.path.isfile(csv_path):
    raise DataUnavailableError(f"regression CSV not found: {csv_path}")
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames:
      raise DatasetFormatError(f"{csv_path}: empty file (expected a header row such as 'path,target,split')")
    columns = [c.strip() for c in reader.fieldnames]
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
  return columns, rows


def _column(columns: list[str], wanted: str | None, choices: tuple[str, ...], what: str, csv_path: str) -> str:
  if wanted:
    if wanted not in columns:
      raise DatasetFormatError(f"{csv_path}: no {what} column {wanted!r}; the columns are {columns}")
    return wanted
  for c in choices:
    if c in columns:
      return c
  raise DatasetFormatError(f"{csv_path}: no {what} column; expected one of {list(choices)}, the columns are "
                           f"{columns} (pass the column name explicitly)")


def _parse_rows(rows, target_col: str, split_col: str, csv_path: str):
  """Targets (float32) and split names per row, with the CSV line number in every error."""
  targets, splits = [], []
  for i, row in enumerate(rows):
    line = i + 2  # 1-based, after the header
    try:
      t = float(row[target_col])
    except ValueError:
      raise DatasetFormatError(f"{csv_path}, line {line}: target {row[target_col]!r} is not a number") from None
    if not math.isfinite(t):
      raise DatasetFormatError(f"{csv_path}, line {line}: target {row[target_col]!r} is not finite")
    s = row[split_col].lower()
    s = SPLIT_ALIASES.get(s, s)
    if s not in SPLITS:
      raise DatasetFormatError(f"{csv_path}, line {line}: unknown split {row[split_col]!r}; valid splits: "
                               f"{', '.join(SPLITS)} (aliases: {', '.join(SPLIT_ALIASES)})")
    targets.append(t)
    splits.append(s)
  if not rows:
    raise DatasetFormatError(f"{csv_path}: no data rows")
  return np.asarray(targets, np.float32), np.asarray(splits)


def _load_image(path: str, size: tuple[int, int] | None, mode: str | None, where: str) -> np.ndarray:
  from PIL import Image
  if not os.path.isfile(path):
    raise DataUnavailableError(f"{where}: image not found: {path}")
  try:
    with Image.open(path) as im:
      im = im.convert(mode or ("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
      if size is not None:
        im = im.resize((size[1], size[0]), Image.BILINEAR)
      x = np.asarray(im, np.uint8)
  except OSError as e:
    raise DatasetFormatError(f"{where}: cannot read image {path}: {e}") from None
  return x[..., None] if x.ndim == 2 else x


def load_regression_csv(csv_path: str, image_root: str | None = None, *, arrays: str | None = None,
                        path_col: str = "path", target_col: str | None = None, split_col: str = "split",
                        index_col: str = "index", arrays_key: str = "images",
                        image_size: tuple[int, int] | None = None, channels: int | None = None,
                        name: str = "csv") -> RegressionDataset:
  """A user regression dataset from a CSV of targets and splits, with images from a folder or a ``.npz``.

  Image folder (AgeDB-DIR / IMDB-WIKI-DIR split-file shape, ``age,path,split``): each row's
  ``path_col`` is an image file relative to ``image_root`` (or absolute). Images are converted
  to grey (``channels=1``) or RGB (``channels=3``; default: grey if the first image is grey) and
  resized to ``image_size = (H, W)`` (bilinear); without ``image_size`` all images must share one
  size. Arrays: ``arrays`` is a ``.npz`` whose ``arrays_key`` (or only) array holds uint8 images
  ``(N, H, W)`` or ``(N, H, W, C)``; each row's ``index_col`` is the row of the array (without
  that column the CSV rows map to the array rows in order, and their numbers must agree).

  ``target_col`` defaults to the first of ``target``, ``age``, ``label``, ``y`` present; split
  values are ``train``, ``val``, ``test`` (case-insensitive; ``valid``/``validation`` mean
  ``val``). Train and test must be non-empty; val may be empty. Missing files raise
  ``DataUnavailableError``; bad columns, values or images raise :class:`DatasetFormatError`
  (a ``ValueError``) naming the file, line and the valid choices.
  """
  if channels not in (None, 1, 3):
    raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
  if image_size is not None:
    image_size = tuple(int(v) for v in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
      raise ValueError(f"image_size must be (H, W) with positive sizes, got {image_size!r}")
  if (arrays is None) == (image_root is None):
    raise ValueError("pass exactly one image source: image_root= (a folder with the CSV's paths) or "
                     "arrays= (a .npz of images)")
  columns, rows = _read_csv(csv_path)
  target_col = _column(columns, target_col, TARGET_COLUMNS, "target", csv_path)
  split_col = _column(columns, split_col, (), "split", csv_path)
  targets, splits = _parse_rows(rows, target_col, split_col, csv_path)
  if arrays is not None:
    images = _images_from_npz(arrays, arrays_key, rows, columns, index_col, csv_path, channels)
  else:
    path_col = _column(columns, path_col, (), "image path", csv_path)
    if not os.path.isdir(image_root):
      raise DataUnavailableError(f"image folder not found: {image_root}")
    mode = {1: "L", 3: "RGB", None: None}[channels]
    images = []
    for i, row in enumerate(rows):
      x = _load_image(os.path.join(image_root, row[path_col]), image_size, mode, f"{csv_path}, line {i + 2}")
      if images and x.shape != images[0].shape:
        raise DatasetFormatError(
            f"{csv_path}, line {i + 2}: image {row[path_col]} has shape {x.shape}, the first image "
            f"{images[0].shape}; pass image_size=(H, W) to resize them all")
      mode = mode or ("L" if x.shape[-1] == 1 else "RGB")
      images.append(x)
    images = np.stack(images)
  out = {s: (images[splits == s], targets[splits == s]) for s in SPLITS}
  for s in ("train", "test"):
    if len(out[s][1]) == 0:
      raise DatasetFormatError(f"{csv_path}: the {s!r} split is empty (column {split_col!r})")
  return _dataset(name, out)


def _images_from_npz(arrays: str, key: str, rows, columns, index_col: str, csv_path: str,
                     channels: int | None) -> np.ndarray:
  if not os.path.isfile(arrays):
    raise DataUnavailableError(f"image arrays not found: {arrays}")
  try:
    z = np.load(arrays, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise ValueError(f"a single {type(z).__name__}, not an .npz archive")
    with z:
      keys = list(z.keys())
      if key not in keys and len(keys) != 1:
        raise DatasetFormatError(f"{arrays}: no array {key!r}; arrays in the file: {keys}")
      key = key if key in keys else keys[0]
      images = np.asarray(z[key])
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # garbage, truncated, pickled objects
    raise DatasetFormatError(f"{arrays}: not a readable .npz of image arrays ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise DatasetFormatError(f"{arrays}: {key!r} must be uint8 (N, H, W) or (N, H, W, C), got "
                             f"{images.dtype} {images.shape}")
  if channels is not None and images.shape[-1] != channels:
    raise DatasetFormatError(f"{arrays}: images have {images.shape[-1]} channels, channels={channels}")
  if index_col in columns:
    idx = []
    for i, row in enumerate(rows):
      try:
        j = int(row[index_col])
      except ValueError:
        raise DatasetFormatError(
            f"{csv_path}, line {i + 2}: {index_col} {row[index_col]!r} is not an integer") from None
      if not 0 <= j < len(images):
        raise DatasetFormatError(f"{csv_path}, line {i + 2}: {index_col} {j} is outside [0, {len(images)})")
      idx.append(j)
    return images[np.asarray(idx, np.int64)]
  if len(rows) != len(images):
    raise DatasetFormatError(f"{csv_path} has {len(rows)} rows but {arrays} holds {len(images)} images; add an "
                             f"{index_col!r} column to map rows to images")
  return images

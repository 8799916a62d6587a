"""DIR data: the rotated Fashion-MNIST construction and the user CSV / image-folder / npz loader."""

import csv
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lt_jax.data import dir_data
from lt_jax.data.dir_data import DatasetFormatError
from lt_jax.data.prepare import DataUnavailableError


# ============================================================================ rotated Fashion-MNIST


def test_default_counts_are_the_documented_exponential_profile():
  c = dir_data.rotated_fmnist_counts()
  b = np.arange(90)
  np.testing.assert_array_equal(c, np.floor(400 * 100.0 ** (-b / 89)).astype(int))
  assert (c[0], c[44], c[-1], c.sum()) == (400, 41, 4, 7813)
  # Shot regions by DIR's thresholds: many > 100, medium 20..100, few < 20 training images.
  assert ((c > 100).sum(), ((c >= 20) & (c <= 100)).sum(), (c < 20).sum()) == (27, 31, 32)


def test_rotate_images_direction_and_scipy_equality():
  dot = np.zeros((1, 5, 5, 1), np.uint8)
  dot[0, 0, 2] = 200  # top centre
  out = dir_data.rotate_images(dot, np.array([90.0]))[0, :, :, 0]
  expected = np.zeros((5, 5), np.uint8)
  expected[2, 0] = 200  # counter-clockwise as displayed: top -> left
  np.testing.assert_array_equal(out, expected)
  x = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  angles = np.array([0.0, 17.3, 89.9])
  got = dir_data.rotate_images(x, angles)
  np.testing.assert_array_equal(got[0], x[0])  # angle 0 is the identity
  for i in range(3):
    ref = ndimage.rotate(x[i, :, :, 0].astype(np.float32), angles[i], reshape=False, order=1, mode="constant")
    np.testing.assert_array_equal(got[i, :, :, 0], np.clip(np.rint(ref), 0, 255).astype(np.uint8))


SMALL = dict(max_angle=12, n_max=30, imbalance_ratio=10.0, val_per_bin=2, test_per_bin=3, seed=3)


def test_rotated_fashion_mnist_construction(tmp_path):
  from lt_jax.data import sources
  ds = dir_data.rotated_fashion_mnist(**SMALL, cache_dir=str(tmp_path))
  counts = dir_data.rotated_fmnist_counts(12, 30, 10.0)
  assert ds.train_images.shape == (counts.sum(), 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.train_targets.dtype == np.float32
  np.testing.assert_array_equal(np.bincount(ds.train_targets.astype(int), minlength=12), counts)
  np.testing.assert_array_equal(np.bincount(ds.val_targets.astype(int), minlength=12), np.full(12, 2))
  np.testing.assert_array_equal(np.bincount(ds.test_targets.astype(int), minlength=12), np.full(12, 3))
  for y in (ds.train_targets, ds.val_targets, ds.test_targets):
    assert y.min() >= 0 and y.max() < 12 and len(np.unique(y)) == len(y)  # continuous angles
  assert not np.all(np.diff(ds.train_targets) >= 0)  # stored in random order, not sorted by angle
  # The documented construction, step by step: permutations of the source splits, then rotation.
  x_tr, _ = sources.load_arrays("fashion_mnist", "train")
  x_te, _ = sources.load_arrays("fashion_mnist", "test")
  rng = np.random.default_rng(3)
  order, test_order = rng.permutation(60000), rng.permutation(10000)
  n = counts.sum()
  np.testing.assert_array_equal(ds.train_images, dir_data.rotate_images(x_tr[order[:n]], ds.train_targets))
  np.testing.assert_array_equal(ds.val_images, dir_data.rotate_images(x_tr[order[n:n + 24]], ds.val_targets))
  np.testing.assert_array_equal(ds.test_images, dir_data.rotate_images(x_te[test_order[:36]], ds.test_targets))
  x = ds.train_images / 255.0
  assert ds.mean == pytest.approx((x.mean(),)) and ds.std == pytest.approx((x.std(),))
  # Cached: one file, and the second call (from the cache) and an uncached build are identical.
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".npz")]) == 1
  again = dir_data.rotated_fashion_mnist(**SMALL, cache_dir=str(tmp_path))
  fresh = dir_data.rotated_fashion_mnist(**SMALL, cache=False)
  for a, b, c in zip(ds[1:7], again[1:7], fresh[1:7]):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  other = dir_data.rotated_fashion_mnist(**{**SMALL, "seed": 4}, cache=False)
  assert not np.array_equal(other.train_targets, ds.train_targets)


def test_rotated_fashion_mnist_bad_arguments():
  with pytest.raises(ValueError, match="max_angle must be an int"):
    dir_data.rotated_fashion_mnist(max_angle=1.5, cache=False)
  with pytest.raises(ValueError, match="lower n_max, val_per_bin or test_per_bin"):
    dir_data.rotated_fashion_mnist(max_angle=90, test_per_bin=200, cache=False)


# ============================================================================ user datasets


def write_csv(path, rows, header=("path", "age", "split")):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return str(path)


@pytest.fixture()
def folder(tmp_path):
  """Eight 6x5 grey PNGs (AgeDB-DIR shape: age,path,split), with the arrays they hold."""
  rng = np.random.default_rng(1)
  imgs = rng.integers(0, 256, (8, 6, 5), dtype=np.uint8)
  os.makedirs(tmp_path / "img" / "sub")
  rows = []
  splits = ["train", "train", "train", "Val", "test", "train", "validation", "test"]
  for i in range(8):
    rel = f"sub/{i}.png"
    Image.fromarray(imgs[i]).save(tmp_path / "img" / rel)
    rows.append((rel, 20 + 3 * i, splits[i]))
  return tmp_path, imgs, rows


def test_image_folder_csv(folder):
  root, imgs, rows = folder
  ds = dir_data.load_regression_csv(write_csv(root / "agedb.csv", rows), str(root / "img"))
  tr, va, te = [0, 1, 2, 5], [3, 6], [4, 7]
  np.testing.assert_array_equal(ds.train_images[..., 0], imgs[tr])
  np.testing.assert_array_equal(ds.val_images[..., 0], imgs[va])
  np.testing.assert_array_equal(ds.test_images[..., 0], imgs[te])
  np.testing.assert_array_equal(ds.train_targets, [20, 23, 26, 35])
  np.testing.assert_array_equal(ds.val_targets, [29, 38])
  np.testing.assert_array_equal(ds.test_targets, [32, 41])
  assert ds.mean[0] == pytest.approx(imgs[tr].mean() / 255) and ds.std[0] == pytest.approx(imgs[tr].std() / 255)
  # RGB and resized: PIL's own conversion and bilinear resize.
  rgb = dir_data.load_regression_csv(str(root / "agedb.csv"), str(root / "img"), image_size=(4, 3), channels=3)
  assert rgb.train_images.shape == (4, 4, 3, 3)
  ref = np.asarray(Image.fromarray(imgs[1]).convert("RGB").resize((3, 4), Image.BILINEAR))
  np.testing.assert_array_equal(rgb.train_images[1], ref)


def test_arrays_csv(tmp_path):
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
  np.savez(tmp_path / "x.npz", images=x)
  path = write_csv(tmp_path / "t.csv", [(4, 1.5, "train"), (0, 2.5, "test"), (2, -1.0, "train")],
                   header=("index", "target", "split"))
  ds = dir_data.load_regression_csv(path, arrays=str(tmp_path / "x.npz"))
  np.testing.assert_array_equal(ds.train_images[..., 0], x[[4, 2]])
  np.testing.assert_array_equal(ds.test_images[..., 0], x[[0]])
  np.testing.assert_array_equal(ds.train_targets, [1.5, -1.0])
  assert ds.val_images.shape == (0, 4, 4, 1)
  # Without an index column the rows map to the arrays in order.
  np.savez(tmp_path / "y.npz", anything=x[:3])
  path = write_csv(tmp_path / "u.csv", [(0.5, "train"), (1.5, "test"), (2.5, "train")], header=("y", "split"))
  ds = dir_data.load_regression_csv(path, arrays=str(tmp_path / "y.npz"))
  np.testing.assert_array_equal(ds.train_images[..., 0], x[[0, 2]])
  np.testing.assert_array_equal(ds.train_targets, [0.5, 2.5])


def test_loader_errors(folder):
  root, imgs, rows = folder
  img = str(root / "img")
  good = write_csv(root / "good.csv", rows)
  with pytest.raises(DataUnavailableError, match="regression CSV not found"):
    dir_data.load_regression_csv(str(root / "nope.csv"), img)
  with pytest.raises(DataUnavailableError, match="image folder not found"):
    dir_data.load_regression_csv(good, str(root / "nope"))
  with pytest.raises(ValueError, match="exactly one image source"):
    dir_data.load_regression_csv(good)
  with pytest.raises(DatasetFormatError, match=r"no target column; expected one of \['target', 'age'"):
    dir_data.load_regression_csv(write_csv(root / "a.csv", rows, ("path", "years", "split")), img)
  with pytest.raises(DatasetFormatError, match=r"no split column 'split'; the columns are \['path', 'age', 'fold'\]"):
    dir_data.load_regression_csv(write_csv(root / "b.csv", rows, ("path", "age", "fold")), img)
  bad = [list(r) for r in rows]
  bad[2][1] = "twenty"
  with pytest.raises(DatasetFormatError, match=r"line 4: target 'twenty' is not a number"):
    dir_data.load_regression_csv(write_csv(root / "c.csv", bad), img)
  bad[2][1] = "nan"
  with pytest.raises(DatasetFormatError, match=r"line 4: target 'nan' is not finite"):
    dir_data.load_regression_csv(write_csv(root / "d.csv", bad), img)
  bad[2][1], bad[5][2] = 3, "holdout"
  with pytest.raises(DatasetFormatError, match=r"line 7: unknown split 'holdout'; valid splits: train, val, test"):
    dir_data.load_regression_csv(write_csv(root / "e.csv", bad), img)
  bad[5][2], bad[1][0] = "train", "sub/missing.png"
  with pytest.raises(DataUnavailableError, match=r"line 3: image not found: .*missing.png"):
    dir_data.load_regression_csv(write_csv(root / "f.csv", bad), img)
  Image.fromarray(np.zeros((7, 5), np.uint8)).save(root / "img" / "big.png")
  bad[1][0] = "big.png"
  with pytest.raises(DatasetFormatError, match=r"has shape \(7, 5, 1\), the first image \(6, 5, 1\); pass image_size"):
    dir_data.load_regression_csv(write_csv(root / "g.csv", bad), img)
  (root / "img" / "junk.png").write_bytes(b"not a png")
  bad[1][0] = "junk.png"
  with pytest.raises(DatasetFormatError, match="cannot read image"):
    dir_data.load_regression_csv(write_csv(root / "h.csv", bad), img)
  no_test = [(p, t, "train") for p, t, _ in rows]
  with pytest.raises(DatasetFormatError, match="the 'test' split is empty"):
    dir_data.load_regression_csv(write_csv(root / "i.csv", no_test), img)
  np.savez(root / "x.npz", images=imgs[:3])
  idx = write_csv(root / "j.csv", [(0, 1, "train"), (3, 2, "test")], ("index", "target", "split"))
  with pytest.raises(DatasetFormatError, match=r"line 3: index 3 is outside \[0, 3\)"):
    dir_data.load_regression_csv(idx, arrays=str(root / "x.npz"))
  short = write_csv(root / "k.csv", [(1, "train"), (2, "test")], ("target", "split"))
  with pytest.raises(DatasetFormatError, match="has 2 rows but .* holds 3 images"):
    dir_data.load_regression_csv(short, arrays=str(root / "x.npz"))
  np.savez(root / "two.npz", a=imgs, b=imgs)
  with pytest.raises(DatasetFormatError, match=r"no array 'images'; arrays in the file: \['a', 'b'\]"):
    dir_data.load_regression_csv(short, arrays=str(root / "two.npz"))
  np.savez(root / "float.npz", images=imgs.astype(np.float32))
  with pytest.raises(DatasetFormatError, match="must be uint8"):
    dir_data.load_regression_csv(short, arrays=str(root / "float.npz"))
  (root / "garbage.npz").write_bytes(b"this is not a numpy archive at all")
  np.save(root / "single.npy", imgs)
  os.replace(root / "single.npy", root / "single.npz")
  full = np.savez(root / "cut.npz", images=imgs) or (root / "cut.npz").read_bytes()
  (root / "cut.npz").write_bytes(full[:len(full) // 2])
  for name, why in (("garbage", "ValueError"), ("single", "not an .npz archive"), ("cut", "BadZipFile")):
    with pytest.raises(DatasetFormatError, match=rf"{name}.npz: not a readable .npz of image arrays \(.*{why}"):
      dir_data.load_regression_csv(short, arrays=str(root / f"{name}.npz"))

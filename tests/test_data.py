"""Tests for lt_jax.data: gzip restoration, fail-fast preparation, tfds sources (mocked),
the reference CIFAR-LT subset selection, LT datasets and on-device augmentation."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import socket
import struct
import subprocess
import threading
import time

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from lt_jax import priors
from lt_jax.data import augment, longtail, prepare, sources
from lt_jax.data.prepare import DataUnavailableError

tfds = pytest.importorskip("tensorflow_datasets")


# ----------------------------------------------------------------------------- gzip header


def test_upstream_gzip_bytes_exact_header_and_payload():
  payload = bytes(range(256)) * 40
  src = gzip.compress(payload, mtime=0x5EDA0AED)  # like Debian's: FLG 0, other mtime
  assert src[3] == 0
  out = prepare.upstream_gzip_bytes(src, "t10k-labels-idx1-ubyte", 0x59A7E9F3)
  name = b"t10k-labels-idx1-ubyte"
  assert out[:4] == b"\x1f\x8b\x08\x08"                # magic, deflate, FNAME flag
  assert out[4:8] == struct.pack("<I", 0x59A7E9F3) == b"\xf3\xe9\xa7\x59"  # mtime, little endian
  assert out[8:10] == b"\x00\x03"                      # XFL 0, OS 3 (Unix)
  assert out[10:10 + len(name) + 1] == name + b"\x00"  # file name, NUL-terminated
  assert out[10 + len(name) + 1:] == src[10:]          # payload + CRC32 + ISIZE untouched
  assert len(out) == len(src) + len(name) + 1
  assert gzip.decompress(out) == payload
  with gzip.GzipFile(fileobj=io.BytesIO(out)) as f:
    f.read()
    assert f.mtime == 0x59A7E9F3


def test_upstream_gzip_bytes_replaces_an_existing_name_field():
  payload = b"lt_jax" * 100
  buf = io.BytesIO()
  with gzip.GzipFile(filename="other-name", mode="wb", fileobj=buf, mtime=7) as f:
    f.write(payload)
  src = buf.getvalue()
  assert src[3] & 0x08
  assert prepare.gzip_payload_offset(src) == 10 + len(b"other-name") + 1
  out = prepare.upstream_gzip_bytes(src, "x", 1)
  assert out[:15] == b"\x1f\x8b\x08\x08\x01\x00\x00\x00\x00\x03x\x00" + src[21:24]
  assert gzip.decompress(out) == payload


def test_upstream_gzip_bytes_rejects_non_gzip():
  with pytest.raises(ValueError, match="1f 8b 08"):
    prepare.upstream_gzip_bytes(b"PK\x03\x04" + b"\x00" * 20, "x", 0)


def _tfds_checksums_file(tfds_name):
  """{filename: (size, sha256)} parsed from the builder's checksums TSV in the tfds package."""
  cls = tfds.builder_cls(tfds_name)
  path = cls._checksums_path  # pylint: disable=protected-access
  path = path() if callable(path) else path
  out = {}
  for line in open(os.fspath(path)).read().splitlines():
    if line.strip() and not line.startswith("#"):
      _, size, sha, fname = line.split("\t")
      out[fname] = (int(size), sha)
  return out


@pytest.mark.skipif(not prepare.debian_fashion_mnist_available(),
                    reason="Debian package dataset-fashion-mnist not installed "
                           "(apt-get install -y dataset-fashion-mnist)")
def test_restored_debian_files_match_tfds_checksums(tmp_path):
  expected = _tfds_checksums_file("fashion_mnist")
  assert set(expected) == set(prepare.FASHION_MNIST_MTIMES)
  written = prepare.restore_fashion_mnist_files(str(tmp_path), verify=False)
  assert len(written) == 4
  for path in written:
    data = open(path, "rb").read()
    size, sha = expected[os.path.basename(path)]
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha
    raw = open(os.path.join(prepare.DEBIAN_FASHION_MNIST_DIR, os.path.basename(path)), "rb").read()
    assert hashlib.sha256(raw).hexdigest() != sha  # the shipped files do not match as is


def _fake_fashion_dir(path):
  os.makedirs(path, exist_ok=True)
  for fname in prepare.FASHION_MNIST_MTIMES:
    with open(os.path.join(path, fname), "wb") as f:
      f.write(gzip.compress(b"not fashion-mnist"))
  return str(path)


def test_prepare_fashion_mnist_bad_files_leave_nothing_behind(tmp_path):
  data_dir = tmp_path / "tfds"
  src = _fake_fashion_dir(tmp_path / "src")
  with pytest.raises(DataUnavailableError, match="registered checksum"):
    prepare.prepare_fashion_mnist(str(data_dir), src_dir=src, verbose=False)
  assert not (data_dir / "fashion_mnist").exists()
  assert not [p for p in os.listdir(data_dir) if p.startswith(".lt_jax_tmp_")]


def test_interrupted_build_folders_are_cleaned_only_when_their_process_is_gone(tmp_path):
  host = socket.gethostname().replace("_", "-")
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = tmp_path / f".lt_jax_tmp_fashion_mnist_{host}_{dead.pid}_ab_cd"
  live = tmp_path / f".lt_jax_tmp_fashion_mnist_{host}_{os.getpid()}_x_yz"
  other = tmp_path / f".lt_jax_tmp_cifar10_{host}_{dead.pid}_abcd"
  for p in (stale, live, other):
    (p / "fashion_mnist").mkdir(parents=True)
  prepare._clean_stale_tmp(str(tmp_path), "fashion_mnist")  # pylint: disable=protected-access
  assert not stale.exists() and live.exists() and other.exists()


# ----------------------------------------------------------------------------- fail fast


def test_network_probe_is_bounded_even_if_connect_hangs(monkeypatch):
  release = threading.Event()

  def hang(*args, **kwargs):  # a DNS lookup / connect that never returns in time
    release.wait(30)
    raise OSError("released")
  monkeypatch.setattr(socket, "create_connection", hang)
  t0 = time.monotonic()
  try:
    assert prepare.network_reachable(["https://www.cs.toronto.edu/x.tar.gz"], timeout=0.3) is False
    assert time.monotonic() - t0 < 2.0
  finally:
    release.set()


def test_prepare_cifar_without_network_fails_fast(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(prepare, "network_reachable", lambda urls, timeout=3.0: calls.append(urls) or False)
  t0 = time.monotonic()
  with pytest.raises(DataUnavailableError) as err:
    prepare.prepare("cifar10", data_dir=str(tmp_path))
  assert time.monotonic() - t0 < 5.0
  msg = str(err.value)
  assert "cifar-10-binary.tar.gz" in msg and "--manual_dir" in msg and "data_dir" in msg
  assert any("cs.toronto.edu" in u for u in calls[0])
  assert os.listdir(tmp_path) == []


def test_prepare_cifar_with_incomplete_manual_dir_refuses(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "network_reachable", lambda *a, **k: pytest.fail("no probe with manual_dir"))
  (tmp_path / "manual").mkdir()
  with pytest.raises(DataUnavailableError, match="cifar-100-binary.tar.gz not found"):
    prepare.prepare("cifar100", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "manual"))


def test_prepare_cli_exit_code_and_apt_hint(tmp_path, capsys):
  rc = prepare.main(["fashion_mnist", "--data_dir", str(tmp_path / "d"), "--manual_dir", str(tmp_path / "none")])
  assert rc == 2
  assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_prepare_imagenet_lt_without_manual_files_explains(tmp_path):
  with pytest.raises(DataUnavailableError, match="ILSVRC2012_img_train.tar"):
    prepare.prepare("imagenet_lt", data_dir=str(tmp_path))


def test_load_arrays_fails_fast_without_data(tmp_path, monkeypatch):
  def no_network(*a, **k):
    raise AssertionError("load_arrays must not touch the network")
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  t0 = time.monotonic()
  with pytest.raises(DataUnavailableError, match="python -m lt_jax.data.prepare cifar10"):
    sources.load_arrays("cifar10", "train", data_dir=str(tmp_path))
  monkeypatch.setattr(prepare, "debian_fashion_mnist_available", lambda src_dir=None: False)
  with pytest.raises(DataUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
    sources.load_arrays("fashion_mnist", "test", data_dir=str(tmp_path))
  assert time.monotonic() - t0 < 5.0


def test_source_and_prepare_reject_unknown_names():
  with pytest.raises(ValueError, match="cifar10, cifar100, fashion_mnist, imagenet_lt"):
    sources.load_arrays("mnist", "train")
  with pytest.raises(ValueError, match="train, test"):
    sources.load_arrays("cifar10", "validation")
  with pytest.raises(ValueError, match="TfdsSource"):
    sources.load_arrays("imagenet_lt", "train")
  with pytest.raises(ValueError, match="fashion_mnist, cifar10, cifar100, imagenet_lt"):
    prepare.prepare("svhn")


# ----------------------------------------------------------------------------- mocked tfds

N_MOCK = 400


@pytest.fixture
def mocked_tfds(tmp_path):
  """Plain tfds.testing.mock_data (random examples, random labels), as the trainer tests use it."""
  with tfds.testing.mock_data(num_examples=N_MOCK):
    yield str(tmp_path)


def test_load_arrays_mocked_cifar10_and_fashion_mnist(mocked_tfds):
  x, y = sources.load_arrays("cifar10", "train", data_dir=mocked_tfds)
  assert x.shape == (N_MOCK, 32, 32, 3) and x.dtype == np.uint8
  assert y.shape == (N_MOCK,) and y.dtype == np.int32 and 0 <= y.min() and y.max() < 10
  x2, y2 = sources.load_arrays("cifar10", "train", data_dir=mocked_tfds)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  xf, yf = sources.load_arrays("fashion_mnist", "test", data_dir=mocked_tfds)
  assert xf.shape == (N_MOCK, 28, 28, 1) and xf.dtype == np.uint8 and yf.dtype == np.int32
  assert not os.path.exists(os.path.join(mocked_tfds, "lt_jax_cache"))  # never caches mock data


def test_cifar_is_returned_in_original_order(mocked_tfds):
  """tfds stores CIFAR hash-shuffled; sorting by `id` (train_00000, ...) restores the original
  data_batch order, which the reference LT selection indexes."""
  ex = next(iter(tfds.as_numpy(tfds.builder("cifar10").as_dataset(split="train", batch_size=N_MOCK))))
  order = np.argsort(ex["id"], kind="stable")
  assert not np.array_equal(order, np.arange(N_MOCK))  # the mock's ids are not in storage order
  x, y = sources.load_arrays("cifar10", "train", data_dir=mocked_tfds)
  np.testing.assert_array_equal(x, ex["image"][order])
  np.testing.assert_array_equal(y, ex["label"][order])


def test_fashion_mnist_is_built_automatically_when_missing(monkeypatch, tmp_path, capsys):
  built = []
  monkeypatch.setattr(sources, "_redirected", lambda builder, data_dir: False)  # pretend unmocked
  monkeypatch.setattr(sources, "is_prepared", lambda tfds_name, data_dir: bool(built))
  monkeypatch.setattr(prepare, "debian_fashion_mnist_available", lambda src_dir=None: True)
  monkeypatch.setattr(prepare, "prepare_fashion_mnist", lambda data_dir, verbose=True: built.append(data_dir))
  with tfds.testing.mock_data(num_examples=8):
    x, _ = sources.load_arrays("fashion_mnist", "train", data_dir=str(tmp_path))
  assert built == [str(tmp_path)] and x.shape == (8, 28, 28, 1)
  err = capsys.readouterr().err.strip().splitlines()
  assert len([l for l in err if l.startswith("lt_jax:")]) == 1


def test_make_lt_dataset_mocked_cifar10(mocked_tfds):
  raw_x, raw_y = sources.load_arrays("cifar10", "train", data_dir=mocked_tfds)
  test_x, test_y = sources.load_arrays("cifar10", "test", data_dir=mocked_tfds)
  n_max, ir, v = 20, 5, 4
  ds = longtail.make_lt_dataset("cifar10", ir, seed=0, data_dir=mocked_tfds, val_per_class=v, n_max=n_max)
  expected = priors.lt_counts(n_max, 10, ir)
  np.testing.assert_array_equal(ds.counts, expected)
  np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), expected)
  np.testing.assert_allclose(ds.prior, expected / expected.sum(), rtol=1e-6)
  np.testing.assert_array_equal(ds.train_images, raw_x[ds.train_indices])
  np.testing.assert_array_equal(ds.train_labels, raw_y[ds.train_indices])
  assert len(np.unique(ds.train_indices)) == len(ds.train_indices)
  # validation: balanced, from the training split, disjoint from the LT subset
  np.testing.assert_array_equal(np.bincount(ds.val_labels, minlength=10), [v] * 10)
  np.testing.assert_array_equal(ds.val_images, raw_x[ds.val_indices])
  assert not set(ds.val_indices) & set(ds.train_indices)
  # test split untouched
  np.testing.assert_array_equal(ds.test_images, test_x)
  np.testing.assert_array_equal(ds.test_labels, test_y)
  assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3) and ds.n_max == n_max
  np.testing.assert_allclose(ds.mean, [0.4914, 0.4822, 0.4465])
  np.testing.assert_allclose(ds.std, [0.2023, 0.1994, 0.2010])
  # deterministic for a seed, different for another
  same = longtail.make_lt_dataset("cifar10", ir, seed=0, data_dir=mocked_tfds, val_per_class=v, n_max=n_max)
  np.testing.assert_array_equal(same.train_indices, ds.train_indices)
  np.testing.assert_array_equal(same.val_indices, ds.val_indices)
  other = longtail.make_lt_dataset("cifar10", ir, seed=1, data_dir=mocked_tfds, val_per_class=v, n_max=n_max)
  np.testing.assert_array_equal(other.counts, ds.counts)
  assert not np.array_equal(other.train_indices, ds.train_indices)
  # without validation: exactly the reference selection on the full training split
  ref = longtail.make_lt_dataset("cifar10", ir, seed=0, data_dir=mocked_tfds, n_max=n_max)
  np.testing.assert_array_equal(ref.train_indices, _reference_gen_imbalanced_idx(raw_y, expected, 0))
  assert ref.val_images.shape == (0, 32, 32, 3)
  # default n_max: smallest class count minus val_per_class
  dflt = longtail.make_lt_dataset("cifar10", 2, data_dir=mocked_tfds, val_per_class=v)
  assert dflt.n_max == np.bincount(raw_y, minlength=10).min() - v == dflt.counts[0]


def test_make_lt_dataset_mocked_fashion_mnist_step_profile(mocked_tfds):
  ds = longtail.make_lt_dataset("fashion_mnist", 4, profile="step", seed=3, data_dir=mocked_tfds, n_max=16, mu=0.3)
  np.testing.assert_array_equal(ds.counts, [16] * 7 + [4] * 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), ds.counts)
  assert ds.train_images.shape == (int(ds.counts.sum()), 28, 28, 1)
  np.testing.assert_allclose(ds.mean, [0.2860]) and np.testing.assert_allclose(ds.std, [0.3530])


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="mnist", imbalance_ratio=10), "cifar10, cifar100, fashion_mnist"),
    (dict(name="imagenet_lt", imbalance_ratio=10), "cifar10, cifar100, fashion_mnist"),
    (dict(name="cifar10", imbalance_ratio=0.5), ">= 1"),
    (dict(name="cifar10", imbalance_ratio=10, profile="linear"), "exp, step, pareto"),
    (dict(name="cifar10", imbalance_ratio=10, val_per_class=-1), "val_per_class"),
])
def test_make_lt_dataset_bad_input_before_reading_data(kwargs, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    longtail.make_lt_dataset(data_dir=str(tmp_path / "nothing_here"), **kwargs)


# ----------------------------------------------------------------------------- reference selection


def _reference_gen_imbalanced_idx(targets, img_num_per_cls, rand_number):
  """The subset rule of REFERENCE.md §1d, written out with the *global* NumPy RNG:
  seed once; classes from np.unique in sorted order; per class shuffle np.where indices
  in place and keep the first n_c; concatenate class by class."""
  state = np.random.get_state()
  try:
    np.random.seed(rand_number)
    targets_np = np.asarray(targets, dtype=np.int64)
    chosen = []
    for the_class, the_img_num in zip(np.unique(targets_np), img_num_per_cls):
      idx = np.where(targets_np == the_class)[0]
      np.random.shuffle(idx)
      chosen.append(idx[:the_img_num])
    return np.concatenate(chosen)
  finally:
    np.random.set_state(state)


@pytest.mark.parametrize("num_classes,n_max,ir,seed", [(10, 500, 100, 0), (10, 500, 10, 7), (100, 50, 50, 0)])
def test_lt_indices_equal_reference_selection(num_classes, n_max, ir, seed):
  labels = np.random.RandomState(123).permutation(np.repeat(np.arange(num_classes), n_max))
  counts = priors.lt_counts(n_max, num_classes, ir)
  ours = longtail.lt_indices(labels, counts, seed)
  ref = _reference_gen_imbalanced_idx(labels, counts, seed)
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(np.bincount(labels[ours], minlength=num_classes), counts)


def test_lt_indices_leave_global_rng_alone_and_check_sizes():
  np.random.seed(99)
  before = np.random.get_state()[1].copy()
  longtail.lt_indices(np.repeat(np.arange(3), 5), [5, 3, 1], 0)
  np.testing.assert_array_equal(np.random.get_state()[1], before)
  with pytest.raises(ValueError, match="class 1 has 5 candidate"):
    longtail.lt_indices(np.repeat(np.arange(3), 5), [5, 6, 1], 0)
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    longtail.lt_indices(np.array([0, 1, 2]), [1, 1], 0)
  ex = longtail.lt_indices(np.repeat(np.arange(2), 4), [3, 3], 0, exclude=[0, 4])
  assert not {0, 4} & set(ex.tolist())


# ----------------------------------------------------------------------------- augmentation


def _images(b=6, h=8, w=8, c=3, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (b, h, w, c)).astype(np.uint8)


def test_random_crop_flip_matches_numpy_windows():
  x = _images()
  pad = 2
  key = jax.random.key(42)
  out = np.asarray(augment.random_crop_flip(key, jnp.asarray(x), pad=pad))
  assert out.shape == x.shape and out.dtype == np.uint8
  # the documented draws
  k_crop, k_flip = jax.random.split(key)
  off = np.asarray(jax.random.randint(k_crop, (x.shape[0], 2), 0, 2 * pad + 1))
  flips = np.asarray(jax.random.bernoulli(k_flip, 0.5, (x.shape[0],)))
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  for i in range(x.shape[0]):
    win = padded[i, off[i, 0]:off[i, 0] + 8, off[i, 1]:off[i, 1] + 8]
    np.testing.assert_array_equal(out[i], win[:, ::-1] if flips[i] else win)


def test_random_crop_flip_outputs_are_windows_of_the_padded_image():
  x = _images(b=64, h=6, w=6, c=1, seed=1)
  pad = 2
  out = np.asarray(augment.random_crop_flip(jax.random.key(0), jnp.asarray(x), pad=pad))
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  seen = set()
  for i in range(x.shape[0]):
    hits = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (0, 1)
            if np.array_equal(out[i], padded[i, dy:dy + 6, dx:dx + 6][:, ::-1] if f
                              else padded[i, dy:dy + 6, dx:dx + 6])]
    assert hits, f"example {i} is not a (flipped) window of its padded image"
    seen.update(hits)
  assert {f for _, _, f in seen} == {0, 1}
  assert len({(dy, dx) for dy, dx, _ in seen}) > 10


def test_flip_only_and_identity():
  x = jnp.asarray(_images(b=32))
  out = np.asarray(augment.random_crop_flip(jax.random.key(3), x, pad=0))
  xn = np.asarray(x)
  flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, xn)]
  same = [np.array_equal(o, xi) for o, xi in zip(out, xn)]
  assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
  np.testing.assert_array_equal(augment.random_crop_flip(jax.random.key(3), x, pad=0, flip=False), x)


def test_random_crop_flip_jit_vmap_and_keys():
  x = jnp.asarray(_images(b=4, h=32, w=32))
  key = jax.random.key(5)
  eager = augment.random_crop_flip(key, x)
  jitted = jax.jit(augment.random_crop_flip, static_argnames=("pad", "flip"))(key, x)
  np.testing.assert_array_equal(eager, jitted)
  np.testing.assert_array_equal(augment.random_crop_flip(key, x), eager)  # same key, same output
  assert not np.array_equal(augment.random_crop_flip(jax.random.fold_in(key, 1), x), eager)
  keys = jax.random.split(key, 3)
  batched = jax.vmap(augment.random_crop_flip)(keys, jnp.stack([x] * 3))
  assert batched.shape == (3, 4, 32, 32, 3)
  np.testing.assert_array_equal(batched[1], augment.random_crop_flip(keys[1], x))
  with pytest.raises(ValueError, match="B, H, W, C"):
    augment.random_crop_flip(key, x[0])


def test_normalize_matches_torchvision_formula():
  x = _images(b=2, h=4, w=4)
  mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
  out = jax.jit(augment.normalize)(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(std))
  assert out.dtype == jnp.float32
  ref = (x.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
  # padded (zero) pixels become -mean/std after the crop, as with torchvision on PIL images
  z = augment.normalize(jnp.zeros((1, 1, 1, 3), jnp.uint8), mean, std)
  np.testing.assert_allclose(np.asarray(z).ravel(), -np.float32(mean) / np.float32(std), rtol=1e-6)
  with pytest.raises(ValueError, match="one per channel"):
    augment.normalize(jnp.asarray(x), (0.5,), (0.5,))


# ----------------------------------------------------------------------------- real data (opt-in)


@pytest.mark.skipif(os.environ.get("LT_JAX_SLOW_TESTS") != "1" or not prepare.debian_fashion_mnist_available(),
                    reason="slow (30-50 s): set LT_JAX_SLOW_TESTS=1; needs dataset-fashion-mnist")
def test_offline_fashion_mnist_build_end_to_end(tmp_path):
  path = prepare.prepare_fashion_mnist(str(tmp_path), verbose=False)
  assert os.path.isfile(os.path.join(path, "dataset_info.json"))
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".lt_jax_tmp_")]
  t0 = time.monotonic()
  assert prepare.prepare_fashion_mnist(str(tmp_path), verbose=False) == path  # idempotent
  assert time.monotonic() - t0 < 5
  x, y = sources.load_arrays("fashion_mnist", "test", data_dir=str(tmp_path))
  assert x.shape == (10000, 28, 28, 1) and np.all(np.bincount(y) == 1000)
  x2, y2 = sources.load_arrays("fashion_mnist", "test", data_dir=str(tmp_path))  # from the cache
  np.testing.assert_array_equal(x, x2) and np.testing.assert_array_equal(y, y2)
  ds = longtail.make_lt_dataset("fashion_mnist", 100, data_dir=str(tmp_path))
  np.testing.assert_array_equal(ds.counts, priors.lt_counts(6000, 10, 100))

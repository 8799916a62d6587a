"""Streaming host pipeline: sources, host samplers (exact across processes), transforms, resume."""

import hashlib
import json
import io
import os
import threading

import jax
import numpy as np
import pytest
from PIL import Image

from lt_jax import samplers
from lt_jax.data import image_folder as imf
from lt_jax.data import streaming as st


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
  return imf.make_fixture(str(tmp_path_factory.mktemp("lt_images")), num_classes=12, max_per_class=40,
                          imbalance_ratio=10.0, size=32)


@pytest.fixture(scope="module")
def source(fixture):
  return imf.ImageFolderSource(fixture.root, fixture.train_split)


# ---------------------------------------------------------------------------------------
# Sources and fixture.


def test_fixture_counts_and_split_files(fixture, source):
  # 40 * 10^(-c/11), truncated (hand-computed: 40, 32.4, 26.3, 21.3, 17.3, 14.0, 11.3, ...).
  np.testing.assert_array_equal(fixture.counts, [40, 32, 26, 21, 17, 14, 11, 9, 7, 6, 4, 4])
  np.testing.assert_array_equal(np.bincount(source.labels, minlength=12), fixture.counts)
  assert len(source) == 191 and source.num_classes == 12
  test = imf.ImageFolderSource(fixture.root, "test.txt")
  np.testing.assert_array_equal(np.bincount(test.labels), [6] * 12)
  img = Image.open(io.BytesIO(source.load(0)))
  assert img.format == "JPEG" and 32 <= min(img.size) and max(img.size) <= 48
  assert source.paths[0] == "train/000/0000.jpg"


def test_split_file_errors(tmp_path):
  (tmp_path / "a.txt").write_text("x/a.jpg 0\n\nx/b c.jpg 2\n")
  paths, labels = imf.read_split_file(tmp_path / "a.txt")
  assert paths == ["x/a.jpg", "x/b c.jpg"] and labels.tolist() == [0, 2]
  (tmp_path / "b.txt").write_text("x/a.jpg 0\nx/b.jpg cat\n")
  with pytest.raises(ValueError, match=r"b.txt:2: expected"):
    imf.read_split_file(tmp_path / "b.txt")
  with pytest.raises(ValueError, match="num_classes > 2"):
    imf.ImageFolderSource(tmp_path, "a.txt", num_classes=2)


def test_image_folder_faults_are_data_errors_naming_the_file(fixture, tmp_path):
  """A missing or empty list, bad labels, a missing, corrupt or truncated image: one DatasetFormatError
  (or DataUnavailableError) naming the file; a bad image stops the run (no skip: exact resume)."""
  from lt_jax.data.prepare import DataUnavailableError, DatasetFormatError
  root = tmp_path
  (root / "ok").mkdir()
  good = open(os.path.join(fixture.root, "train/000/0000.jpg"), "rb").read()
  (root / "ok/a.jpg").write_bytes(good)
  (root / "ok/corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg" * 10)
  (root / "ok/cut.jpg").write_bytes(good[:len(good) // 3])
  lists = {"empty.txt": "\n\n", "neg.txt": "ok/a.jpg -1\n", "train.txt": "ok/a.jpg 0\nok/a.jpg 1\n",
           "big.txt": "ok/a.jpg 0\nok/a.jpg 99\n",
           "imgs.txt": "ok/a.jpg 0\nok/missing.jpg 1\nok/corrupt.jpg 0\nok/cut.jpg 1\n"}
  for name, text in lists.items():
    (root / name).write_text(text)
  with pytest.raises(DataUnavailableError, match="split file .*nope.txt not found"):
    imf.ImageFolderSource(root, "nope.txt")
  with pytest.raises(DatasetFormatError, match="empty.txt: the split file lists no images"):
    imf.ImageFolderSource(root, "empty.txt")
  with pytest.raises(DatasetFormatError, match=r"neg.txt:1: expected .*got 'ok/a.jpg -1'"):
    imf.ImageFolderSource(root, "neg.txt")
  train = imf.ImageFolderSource(root, "train.txt")
  with pytest.raises(DatasetFormatError, match=r"big.txt: label 99 \(image 2 of the list\) needs num_classes > 99, got 2"):
    imf.ImageFolderSource(root, "big.txt", train.num_classes)
  src = imf.ImageFolderSource(root, "imgs.txt")
  t = st.Transform(kind="center_crop", size=16).validate()
  assert st.decode_example(src, 0, t, None).shape == (16, 16, 3)
  with pytest.raises(DatasetFormatError, match=r"imgs.txt: listed image .*ok/missing.jpg cannot be read \(FileNotFound"):
    st.decode_example(src, 1, t, None)
  for i, name in ((2, "corrupt"), (3, "cut")):
    with pytest.raises(DatasetFormatError, match=rf"image .*ok/{name}.jpg cannot be decoded .*rerun to resume"):
      st.decode_example(src, i, t, None)
  with pytest.raises(DatasetFormatError, match="missing.jpg"):  # through the pipeline's worker threads
    list(st.eval_batches(src, t, 2))


def test_tfds_source_reads_array_record_build(fixture, source, tmp_path):
  imf.build_tfds_fixture(fixture, tmp_path / "tfds")
  ts = st.TfdsSource("lt_fixture", "train", tmp_path / "tfds")
  assert len(ts) == 191 and ts.num_classes == 12
  np.testing.assert_array_equal(np.bincount(ts.labels, minlength=12), fixture.counts)
  assert os.path.isfile(tmp_path / "tfds" / "lt_jax_cache" / "lt_fixture" / "1.0.0" / "train-labels.npy")
  # Same bytes as the files, each with its own label; read concurrently from 4 threads.
  by_hash = {hashlib.sha1(source.load(i)).hexdigest(): int(source.labels[i]) for i in range(len(source))}
  got = [None] * len(ts)

  def read(part):
    for i in range(part, len(ts), 4):
      got[i] = hashlib.sha1(ts.load(i)).hexdigest()
  threads = [threading.Thread(target=read, args=(p,)) for p in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(got) == sorted(by_hash)
  assert [by_hash[h] for h in got] == ts.labels.tolist()
  assert np.array_equal(st.TfdsSource("lt_fixture", "train", tmp_path / "tfds").labels, ts.labels)  # cached
  with pytest.raises(Exception, match="array_record build"):
    st.TfdsSource("lt_fixture", "nosuchsplit", tmp_path / "tfds")


# ---------------------------------------------------------------------------------------
# Host samplers.


@pytest.mark.parametrize("q", [1.0, 0.5, 0.0, -1.0])
def test_class_probs_match_device_samplers(q):
  counts = np.array([500, 120, 0, 30, 5])
  np.testing.assert_allclose(st.class_probs(counts, q), np.asarray(samplers.class_probs(counts, q)), rtol=1e-6)
  np.testing.assert_allclose(st.progressive_probs(counts, 0.3), np.asarray(samplers.progressive_probs(counts, 0.3)),
                             rtol=1e-6)
  # Hand-worked: BBN reversed on [100, 50, 10] is [1, 2, 10] / 13.
  np.testing.assert_allclose(st.reversed_probs(np.array([100, 50, 10])), np.array([1, 2, 10]) / 13)


def test_instance_sampler_is_shuffled_epochs(source):
  s = st.HostSampler(source.labels, 12, 16, sampler="instance", seed=1)
  assert s.steps_per_epoch == 191 // 16 == 11
  epoch0 = np.concatenate([s.indices(k) for k in range(11)])
  epoch1 = np.concatenate([s.indices(k) for k in range(11, 22)])
  assert len(np.unique(epoch0)) == 176 and len(np.unique(epoch1)) == 176  # no repeats within an epoch
  assert not np.array_equal(epoch0, epoch1)
  np.testing.assert_array_equal(st.HostSampler(source.labels, 12, 16, seed=1).indices(13), s.indices(13))
  assert not np.array_equal(st.HostSampler(source.labels, 12, 16, seed=2).indices(13), s.indices(13))


def test_deferred_resampling_switches_after_defer_epochs(source):
  drs = st.HostSampler(source.labels, 12, 16, sampler="class_balanced", defer_epochs=2, seed=4)
  plain = st.HostSampler(source.labels, 12, 16, sampler="instance", seed=4)
  cb = st.HostSampler(source.labels, 12, 16, sampler="class_balanced", seed=4)
  for step in (0, 10, 21):  # epochs 0 and 1 (11 steps each): instance batches
    np.testing.assert_array_equal(drs.indices(step), plain.indices(step))
  for step in (22, 40):
    np.testing.assert_array_equal(drs.indices(step), cb.indices(step))


def test_class_balanced_and_sqrt_frequencies(source):
  counts = np.bincount(source.labels, minlength=12)
  for name, q in (("class_balanced", 0.0), ("sqrt", 0.5), ("reversed", -1.0)):
    s = st.HostSampler(source.labels, 12, 64, sampler=name, seed=0)
    drawn = np.concatenate([s.indices(k) for k in range(200)])  # 12,800 draws
    freq = np.bincount(source.labels[drawn], minlength=12) / drawn.size
    p = st.class_probs(counts, q)
    # Binomial standard error at 12,800 draws is <= 0.0045; allow 4 sigma.
    np.testing.assert_allclose(freq, p, atol=0.018)
    # Within a class the example is uniform: head class 0 (40 examples) all show up.
    assert len(np.unique(drawn[source.labels[drawn] == 0])) == 40


def test_progressive_moves_from_instance_to_class_balanced(source):
  counts = np.bincount(source.labels, minlength=12)
  s = st.HostSampler(source.labels, 12, 16, sampler="progressive", num_epochs=3)
  np.testing.assert_allclose(s.probs(0), counts / counts.sum())
  np.testing.assert_allclose(s.probs(s.steps_per_epoch), 0.5 * counts / counts.sum() + 0.5 / 12)
  np.testing.assert_allclose(s.probs(2 * s.steps_per_epoch), np.full(12, 1 / 12))


def test_class_aware_cycle_continues_across_batches(source):
  k, b = 4, 20  # a round is 12 * 4 = 48 slots: batches cut rounds at 20, 40, 60, ...
  s = st.HostSampler(source.labels, 12, b, sampler="class_aware", k_per_class=k, seed=5)
  stream = np.concatenate([s.indices(step) for step in range(12)])  # 240 positions = 5 rounds
  np.testing.assert_array_equal(stream, s.stream(0, 240))
  y = source.labels[stream]
  for r in range(5):
    rnd = y[48 * r:48 * (r + 1)]
    np.testing.assert_array_equal(np.bincount(rnd, minlength=12), [k] * 12)  # each class K times a round
    assert all(len(set(rnd[4 * v:4 * v + 4])) == 1 for v in range(12))      # K consecutive per visit
  orders = [tuple(y[48 * r:48 * (r + 1):4]) for r in range(5)]
  assert len(set(orders)) == 5  # a fresh class order per round
  # Within a class the reference walks a shuffled list without replacement: class 10 has
  # 4 examples, so each of its visits (4 draws) shows all of them; class 0's 20 draws are distinct.
  for c, n_draws in ((10, 20), (0, 20)):
    ex = stream[y == c]
    assert len(ex) == n_draws
    n_c = int(np.sum(source.labels == c))
    for start in range(0, n_draws - n_c + 1, n_c):
      assert len(set(ex[start:start + n_c])) == n_c


def test_host_and_device_class_aware_have_the_same_semantics():
  """Both walk each class without replacement within a pass (the reference's RandomCycleIter)."""
  from test_samplers import check_class_aware_passes  # tests/ is on sys.path (rootdir conftest)
  counts = np.array([12, 7, 0, 3, 1, 5])
  labels = np.random.default_rng(1).permutation(np.repeat(np.arange(6), counts)).astype(np.int32)
  k, rounds = 3, 14  # 5 non-empty classes: 42 draws each
  num = rounds * 5 * k
  host = st.HostSampler(labels, 6, 15, sampler="class_aware", k_per_class=k, seed=3).stream(0, num)
  device = np.asarray(samplers.class_aware_indices(jax.random.key(3), samplers.build_index(labels, 6), num, k))
  for stream in (host, device):
    y = labels[stream].reshape(rounds, 5, k)
    assert np.all(y == y[:, :, :1])  # K consecutive draws per visit
    for r in range(rounds):
      np.testing.assert_array_equal(np.sort(y[r, :, 0]), [0, 1, 3, 4, 5])  # each class once per round
    assert check_class_aware_passes(stream, labels, counts) == sum(42 // n for n in counts if n)


@pytest.mark.parametrize("sampler", st.SAMPLERS)
@pytest.mark.parametrize("num_processes", [2, 4])
def test_union_over_processes_is_the_single_process_batch(fixture, source, sampler, num_processes):
  """Fresh sampler and pipeline per process (as on separate hosts): rows concatenate exactly."""
  b = 20
  kw = dict(sampler=sampler, seed=7, num_epochs=4, k_per_class=3)
  t = st.Transform("random_resized_crop", 24)
  single = st.StreamingPipeline(source, st.HostSampler(source.labels, 12, b, **kw), t, num_threads=1)
  for step in (0, 9, 23):  # 23: second epoch (instance), later round (class-aware)
    whole = single.batch_at(step)
    parts = []
    for p in range(num_processes):
      st._small_permutation.cache_clear(), st._epoch_permutation.cache_clear()
      src = imf.ImageFolderSource(fixture.root, fixture.train_split)
      pipe = st.StreamingPipeline(src, st.HostSampler(src.labels, 12, b, **kw), t,
                                  rows=st.process_rows(b, p, num_processes), num_threads=1)
      parts.append(pipe.batch_at(step))
    np.testing.assert_array_equal(np.concatenate([x.label for x in parts]), whole.label)
    np.testing.assert_array_equal(np.concatenate([x.image for x in parts]), whole.image)
  np.testing.assert_array_equal(source.labels[single.sampler.indices(9)], single.batch_at(9).label)


def test_process_rows_errors():
  assert st.process_rows(512, 3, 4) == (384, 512)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    st.process_rows(512, 0, 3)
  with pytest.raises(ValueError, match="valid samplers: instance, class_balanced"):
    st.HostSampler(np.array([0, 1]), 2, 1, sampler="balanced")


# ---------------------------------------------------------------------------------------
# Transforms.


def test_random_resized_crop_box_fallback_hand_worked():
  rng = np.random.default_rng(0)
  # 40x40 with scale 1 and aspect 2: w = round(sqrt(3200)) = 57 > 40 always fails ->
  # central crop clamped to ratio 2: w = 40, h = 20, at (0, 10).
  assert st.random_resized_crop_box(rng, 40, 40, (1.0, 1.0), (2.0, 2.0)) == (0, 10, 40, 20)
  # 100x30, square crops of the whole area fail (55 > 30) -> h = 30, w = 30, centred at x 35.
  assert st.random_resized_crop_box(rng, 100, 30, (1.0, 1.0), (1.0, 1.0)) == (35, 0, 30, 30)
  # Accepted boxes: inside the image, area and aspect within the ranges (up to rounding).
  for _ in range(300):
    x0, y0, w, h = st.random_resized_crop_box(rng, 500, 375)
    assert 0 <= x0 and x0 + w <= 500 and 0 <= y0 and y0 + h <= 375
    assert 0.08 * 0.9 <= w * h / (500 * 375) <= 1.0
    assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_center_crop_box_hand_worked():
  # 64x48, Resize(32) + CenterCrop(16): factor 32/48, so the crop is 24x24 source px at (20, 12).
  np.testing.assert_allclose(st.center_crop_box(64, 48, 16, 0.5), (20, 12, 24, 24))
  # 256 -> 224 at the default 0.875 on a 500x375 image: 224 * 375 / 256 = 328.125 px.
  np.testing.assert_allclose(st.center_crop_box(500, 375, 224, 0.875)[2], 328.125)


def test_pad_crop_flip_replays_its_draws():
  img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  for seed in range(6):
    out = st.apply_transform(img, st.Transform("pad_crop", 8, pad=2), np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    dy, dx = rng.integers(0, 5, size=2)
    want = np.pad(img, ((2, 2), (2, 2), (0, 0)))[dy:dy + 8, dx:dx + 8]
    if rng.random() < 0.5:
      want = want[:, ::-1]
    np.testing.assert_array_equal(out, want)


def test_jpeg_draft_decoding_keeps_the_crop():
  """Draft (DCT-scaled) decoding must map the box to the same image region."""
  h, w = 384, 512
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  data = buf.getvalue()
  for seed in range(5):
    t = st.Transform("random_resized_crop", 64, flip=False)
    full = st.apply_transform(data, t._replace(draft=False), np.random.default_rng(seed))
    fast = st.apply_transform(data, t, np.random.default_rng(seed))
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 2.0
    # ... and the region is right: the red channel encodes x, so its mean is the box's centre.
    x0, _, cw, _ = st.random_resized_crop_box(np.random.default_rng(seed), w, h)
    assert abs(fast[..., 0].mean() - (x0 + cw / 2) * 255 / w) < 3.0


# ---------------------------------------------------------------------------------------
# Pipeline, resume, global arrays.


def test_iterate_matches_batch_at_and_resumes_exactly(source):
  def pipe(seed=0):
    return st.StreamingPipeline(source, st.HostSampler(source.labels, 12, 16, sampler="class_aware", seed=seed),
                                st.Transform("random_resized_crop", 32), num_threads=2, prefetch=3)
  uninterrupted = list(pipe().iterate(0, 8))
  assert [b.step for b in uninterrupted] == list(range(8))
  first = list(pipe().iterate(0, 3))        # "killed" after step 3, resumed from the checkpointed step
  resumed = list(pipe().iterate(3, 8))
  for a, b in zip(uninterrupted, first + resumed):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
  np.testing.assert_array_equal(pipe().batch_at(5).image, uninterrupted[5].image)
  assert not np.array_equal(pipe(seed=1).batch_at(5).image, uninterrupted[5].image)
  assert uninterrupted[0].image.shape == (16, 32, 32, 3) and uninterrupted[0].image.dtype == np.uint8


def test_eval_batches_cover_the_split_once(fixture):
  test = imf.ImageFolderSource(fixture.root, fixture.test_split)  # 72 images
  t = st.Transform("center_crop", 24)
  whole = list(st.eval_batches(test, t, 32, num_threads=2))
  assert len(whole) == 3 and [int(b.mask.sum()) for b in whole] == [32, 32, 8]
  np.testing.assert_array_equal(np.concatenate([b.label[b.mask] for b in whole]), test.labels)
  halves = [list(st.eval_batches(test, t, 32, rows=st.process_rows(32, p, 2))) for p in range(2)]
  for s in range(3):
    np.testing.assert_array_equal(np.concatenate([halves[0][s].image, halves[1][s].image]), whole[s].image)
    np.testing.assert_array_equal(np.concatenate([halves[0][s].mask, halves[1][s].mask]), whole[s].mask)


def test_to_global_on_a_two_device_mesh(source):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  assert st.sharding_rows(sharding, 16) == (0, 16) == st.default_rows(16)
  pipe = st.StreamingPipeline(source, st.HostSampler(source.labels, 12, 16), st.Transform("pad_crop", 32),
                              rows=st.sharding_rows(sharding, 16))
  batch = pipe.batch_at(2)
  arrays = st.to_global(batch, sharding, 16)
  assert arrays["image"].shape == (16, 32, 32, 3) and arrays["image"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arrays["image"]), batch.image)
  np.testing.assert_array_equal(np.asarray(arrays["label"]), batch.label)
  assert [s.data.shape[0] for s in arrays["label"].addressable_shards] == [8, 8]


def test_smoke_configs_open_a_generated_fixture(tmp_path):
  from configs import imagenet_lt, inat18  # pylint: disable=g-import-not-at-top
  full = imagenet_lt.get_config()
  assert (full.model.name, full.batch_size, full.num_epochs, full.optim.lr, full.optim.schedule,
          full.optim.weight_decay, full.dataset.num_classes) == ("resnext50", 512, 90, 0.2, "cosine", 5e-4, 1000)
  inat = inat18.get_config("source=folder")
  assert (inat.model.name, inat.dataset.num_classes, inat.dataset.test_split) == (
      "resnet50", 8142, "iNaturalist18_val.txt")
  c = inat18.get_config("smoke")
  run = st.open_run(c, str(tmp_path))
  assert run.num_classes == 12 and run.image_shape == (32, 32, 3) and len(run.test_labels) == 72
  np.testing.assert_array_equal(run.counts, [40, 32, 26, 21, 17, 14, 11, 9, 7, 6, 4, 4])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batches = list(st.train_arrays(run, sharding, batch_size=c.batch_size, sampler="class_aware", seed=0,
                                 num_epochs=1, steps_per_epoch=5, start_step=2, end_step=4))
  assert len(batches) == 2 and batches[0]["image"].shape == (32, 32, 32, 3)
  hs = st.HostSampler(run.train_labels, 12, 32, sampler="class_aware", seed=0)
  np.testing.assert_array_equal(np.asarray(batches[1]["label"]), run.train_labels[hs.indices(3)])
  ev = list(st.eval_arrays(run, sharding, c.eval_batch_size))
  assert len(ev) == 3 and sum(int(np.asarray(b["mask"]).sum()) for b in ev) == 72


def test_streamed_training_resumes_exactly(tmp_path):
  """iNat18 smoke on the 2-device mesh: 4 steps straight == 2 steps, stop, resume to 4 (bitwise)."""
  from configs import inat18  # pylint: disable=g-import-not-at-top
  from lt_jax.train.trainer import train_and_evaluate  # pylint: disable=g-import-not-at-top

  def run(workdir, max_steps):
    c = inat18.get_config("smoke")
    c.quiet, c.max_steps, c.sampler.name = True, max_steps, "class_aware"
    c.dataset.root = str(tmp_path / "fixture")  # one fixture for both runs
    return train_and_evaluate(c, str(workdir))

  straight = run(tmp_path / "a", 4)
  run(tmp_path / "b", 2)
  resumed = run(tmp_path / "b", 4)
  assert straight["step"] == resumed["step"] == 4
  for x, y in zip(jax.tree.leaves(jax.device_get(straight["state"].params)),
                  jax.tree.leaves(jax.device_get(resumed["state"].params))):
    np.testing.assert_array_equal(x, y)
  assert straight["nll"] == resumed["nll"] and np.isfinite(straight["nll"])
  summary = json.loads((tmp_path / "a" / "summary.json").read_text())
  assert summary["step"] == 4 and len(summary["per_class_accuracy"]) == 12

"""Host input pipeline throughput vs the training step's consumption, side by side in one run.

Benchmark, not a test. Measures images/s of decode + augment (random-resized-crop + flip)
for the streaming pipeline of :mod:`lt_jax.data.streaming`:

* ``ours threads``: ``StreamingPipeline``: PIL decode (JPEG draft scaling; ``no draft``:
  full-size decode) + antialiased bilinear resize + flip in a thread pool, prefetch 2;
* ``folder`` reads an image folder (``ImageFolderSource``), ``tfds`` an ``array_record`` tfds
  build of the same JPEGs (``TfdsSource``: ``tfds.data_source`` random access);
* ``plain tf.data`` (reference point, not exact across processes): ``tf.io.read_file`` ->
  ``decode_jpeg`` -> ``sample_distorted_bounding_box`` (area 0.08-1, aspect 3/4-4/3, 10
  attempts: the Inception crop) -> bilinear resize (antialiased like PIL / torchvision;
  ``no antialias``: TF's default) -> random flip,
  ``map(num_parallel_calls=AUTOTUNE)`` on a private pool of ``--threads`` threads, batched,
  prefetched;

at 224x224 on ImageNet-sized JPEGs (500x375, ~100 kB, like ImageNet's median) and at the
fixture size (``make_fixture`` JPEGs, 32-48 px, output 32x32). Next to them, in the same
process: the training step's consumption (forward + backward + SGD, jitted, compile
excluded) of ResNet-50 at 224x224 and of the ``smoke`` configs' ResNet-20 at 32x32, as
images/s, and the ratio pipeline / step (> 1: the input keeps up).

Both pipelines get the same number of worker threads (``--threads``): on a shared, loaded
machine a process with more threads simply takes a larger share of the cores.

Reproduce:  python bench/input_pipeline.py                 (about 3-4 minutes on 2 cores)
            python bench/input_pipeline.py --skip-resnet50  (about 1 minute)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from lt_jax.data import image_folder as imf  # noqa: E402
from lt_jax.data import streaming as st  # noqa: E402


def write_imagenet_like(root: str, n: int, seed: int = 0) -> imf.Fixture:
  """``n`` 500x375 JPEGs (smooth colour fields + texture, quality 90) in fixture layout."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "train"), exist_ok=True)
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
  lines = []
  for i in range(n):
    f = rng.uniform(0.005, 0.05, size=3)
    base = 127 + 90 * np.stack([np.sin(f[0] * xx + i), np.cos(f[1] * yy - i), np.sin(f[2] * (xx + yy))], -1)
    img = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    rel = f"train/{i:05d}.jpg"
    Image.fromarray(img).save(os.path.join(root, rel), quality=90)
    lines.append(f"{rel} {i % 10}\n")
  with open(os.path.join(root, "train.txt"), "w") as fh:
    fh.writelines(lines)
  with open(os.path.join(root, "test.txt"), "w") as fh:
    fh.writelines(lines[:10])
  return imf.Fixture(root, os.path.join(root, "train.txt"), os.path.join(root, "test.txt"),
                     np.bincount(np.arange(n) % 10), 10, 500)


def time_pipeline(source, size: int, batch: int, steps: int, threads: int, draft: bool = True) -> float:
  """images/s of ``StreamingPipeline.iterate`` (the first batch, thread start-up, excluded)."""
  sampler = st.HostSampler(source.labels, source.num_classes, batch, sampler="class_balanced", seed=0)
  pipe = st.StreamingPipeline(source, sampler, st.Transform("random_resized_crop", size, draft=draft),
                              num_threads=threads, prefetch=2)
  it = pipe.iterate(0)
  next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  dt = time.perf_counter() - t0
  it.close()
  return steps * batch / dt


def time_tf_data(fixture: imf.Fixture, size: int, batch: int, steps: int, threads: int,
                 antialias: bool = True) -> float:
  import tensorflow as tf
  tf.get_logger().setLevel("ERROR")
  src = imf.ImageFolderSource(fixture.root, fixture.train_split)
  paths = [os.path.join(fixture.root, p) for p in src.paths]

  def load(path):
    img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    begin, extent, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(img), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(img, begin, extent)
    out = tf.image.resize(crop, (size, size), method="bilinear", antialias=antialias)
    return tf.cast(tf.image.random_flip_left_right(out), tf.uint8)

  ds = (tf.data.Dataset.from_tensor_slices(paths).repeat().shuffle(256, seed=0)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(2))
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads  # the same worker count as the threads pipeline
  ds = ds.with_options(options)
  it = iter(ds)
  next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t0)


def time_train_step(model_name: str, size: int, batch: int, steps: int, num_classes: int) -> tuple[float, float]:
  """(images/s, compile s) of one jitted SGD step of ``model_name`` on ``size``x``size``x3."""
  import jax
  import jax.numpy as jnp
  import optax
  from lt_jax.models import get_model, cpu_compiler_options
  model = get_model(model_name, num_classes=num_classes)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((2, size, size, 3)), train=False))(jax.random.key(0))
  tx = optax.sgd(0.1, momentum=0.9)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  def step(state, x, y):
    params, stats, opt = state

    def loss_fn(p):
      (logits, _), upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), stats, opt), loss

  x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (batch, size, size, 3)), jnp.float32) / 255
  y = jnp.arange(batch, dtype=jnp.int32) % num_classes
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0, compiler_options=cpu_compiler_options()).lower(state, x, y).compile()
  compile_s = time.perf_counter() - t0
  state, loss = compiled(state, x, y)
  loss.block_until_ready()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, loss = compiled(state, x, y)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  return batch / float(np.median(times)), compile_s


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--images", type=int, default=128, help="ImageNet-sized JPEGs to generate")
  ap.add_argument("--batch", type=int, default=32, help="pipeline batch size")
  ap.add_argument("--steps", type=int, default=6, help="timed pipeline batches per variant")
  ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
  ap.add_argument("--train-batch", type=int, default=8, help="ResNet-50 step batch (small: 2 CPU cores)")
  ap.add_argument("--skip-resnet50", action="store_true")
  ap.add_argument("--skip-tf", action="store_true", help="skip the plain tf.data reference")
  ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds; medians are reported")
  args = ap.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    big = write_imagenet_like(os.path.join(tmp, "big"), args.images)
    small = imf.make_fixture(os.path.join(tmp, "small"), num_classes=12, max_per_class=40, size=32)
    folder_big = imf.ImageFolderSource(big.root, big.train_split)
    folder_small = imf.ImageFolderSource(small.root, small.train_split)
    imf.build_tfds_fixture(big, os.path.join(tmp, "tfds"), name="bench_big")
    tfds_big = st.TfdsSource("bench_big", "train", os.path.join(tmp, "tfds"))
    print(f"host: {os.cpu_count()} CPUs, {args.threads} decode threads, batch {args.batch}", flush=True)
    b, n, th = args.batch, args.steps, args.threads
    variants = [
        ("ours threads  folder 224 (500x375 JPEG)", lambda: time_pipeline(folder_big, 224, b, n, th)),
        ("ours threads  folder 224 no draft", lambda: time_pipeline(folder_big, 224, b, n, th, draft=False)),
        ("ours threads  tfds   224", lambda: time_pipeline(tfds_big, 224, b, n, th)),
        ("ours threads  folder  32 (fixture)", lambda: time_pipeline(folder_small, 32, b, 4 * n, th)),
    ] + ([] if args.skip_tf else [
        ("plain tf.data folder 224", lambda: time_tf_data(big, 224, b, n, th)),
        ("plain tf.data folder 224 no antialias", lambda: time_tf_data(big, 224, b, n, th, False)),
        ("plain tf.data folder  32 (fixture)", lambda: time_tf_data(small, 32, b, 4 * n, th)),
    ])
    # Round-robin: on a shared machine the load drifts; every variant sees each round's load.
    rates = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
      for name, fn in variants:
        rates[name].append(fn())
    for name, _ in variants:
      rate = float(np.median(rates[name]))
      rows.append((name, rate))
      print(f"  input  {name:40s} {rate:8.1f} images/s  (rounds: {', '.join(f'{r:.0f}' for r in rates[name])})",
            flush=True)
  consumers = [("resnet20 step 32x32, batch 32 (smoke model)", "resnet20", 32, 32, 100)]
  if not args.skip_resnet50:
    consumers.insert(0, (f"resnet50 step 224x224, batch {args.train_batch}", "resnet50", 224, args.train_batch, 1000))
  steps_rate = {}
  for name, model, size, batch, classes in consumers:
    rate, compile_s = time_train_step(model, size, batch, 3 if model == "resnet50" else 10, classes)
    steps_rate[size] = rate
    print(f"  train  {name:40s} {rate:8.1f} images/s  (compile {compile_s:.0f} s)", flush=True)
  print("\nratio input / training consumption (> 1: the host keeps the step fed)")
  for name, rate in rows:
    size = 224 if "224" in name else 32
    if size in steps_rate:
      print(f"  {name:40s} {rate / steps_rate[size]:8.1f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())

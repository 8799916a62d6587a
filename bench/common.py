"""What the step benchmarks share (benchmarks, not tests): synthetic in-memory training data on
device, the recipe's SGD over a synthetic epoch, the step configuration, and a step timer.

Imported as ``common`` by ``bench/*.py`` run as scripts (``python bench/x.py``: the script's folder
is on ``sys.path``).
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from lt_jax import samplers
from lt_jax.train import optim, steps
from lt_jax.train.state import put_global, replicated

NUM_CLASSES = 10
NUM_EPOCHS = 100  # of the synthetic schedule (cosine): only the learning rate at the timed steps depends on it


def image_shape(model_name: str) -> tuple[int, int, int]:
  """28x28x1 (Fashion-MNIST) for the small CNN, 32x32x3 (CIFAR) for the ResNets."""
  return (28, 28, 1) if model_name.startswith("cnn") else (32, 32, 3)


def synthetic_data(model_name: str, counts, mesh, seed: int = 0):
  """Random uint8 images with ``counts[c]`` examples of class c, replicated on ``mesh``:
  ``(shape, images, labels, steps.TrainData)`` (the NumPy arrays too, for meta / evaluation sets)."""
  shape = image_shape(model_name)
  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  images = np.random.default_rng(seed).integers(0, 256, (len(labels), *shape), dtype=np.uint8)
  rep = replicated(mesh)
  data = steps.TrainData(put_global(images, rep), put_global(labels, rep),
                         jax.device_put(samplers.build_index(labels, len(counts)), rep))
  return shape, images, labels, data


def sgd(batch: int, num_examples: int):
  """The recipe's optimiser (SGD 0.05, momentum 0.9, wd 5e-4, cosine): ``(steps_per_epoch, schedule, tx)``."""
  oc = ml_collections.ConfigDict(dict(name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
                                      schedule="cosine", warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1))
  spe = num_examples // batch
  schedule = optim.make_schedule(oc, spe, NUM_EPOCHS)
  return spe, schedule, optim.make_optimizer(oc, schedule)


def step_config(batch: int, steps_per_epoch: int, shape, **overrides) -> steps.StepConfig:
  """Instance sampling, pad-2 crop + flip, the train step's normalisation."""
  return steps.StepConfig(batch_size=batch, steps_per_epoch=steps_per_epoch, num_epochs=NUM_EPOCHS,
                          sampler="instance", k_per_class=4, crop_pad=2, flip=True, mean=(0.5,) * shape[-1],
                          std=(0.25,) * shape[-1], num_classes=NUM_CLASSES, **overrides)


def timed(update, state, inputs: tuple, n: int):
  """``n`` calls of ``update(state, *inputs)`` (compiled already): ``(state, steps per second)``."""
  t = time.perf_counter()
  for _ in range(n):
    state, m = update(state, *inputs)
  jax.block_until_ready((state, m))
  return state, n / (time.perf_counter() - t)

"""What every evaluator shares: the splits as padded, batch-sharded device batches, and the
host outputs (logits, features) of a model, computed once per split and model.

An evaluator is a class with ``__init__(ctx, **settings)`` and ``evaluate(variables) ->
EvalResult``; its ``run(variables)`` yields ``(name, value)`` pairs of the summary, as
big_vision's evaluators do. The jitted part returns masked sums (never averages), reduced
across devices by XLA because the batches are sharded over the mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np

from lt_jax.data import augment
from lt_jax.train.state import batch_sharded, put_global


class EvalResult(NamedTuple):
  summary: dict[str, Any]     # scalars (and lists such as per-class accuracy)
  sums: Any = None            # the additive statistics the summary came from
  extra: dict | None = None   # e.g. a sweep's curves (written to sweep.json)


class Evaluator:
  """Base class: ``evaluate`` computes an :class:`EvalResult`, ``run`` yields its scalars."""

  def __init__(self, ctx: "EvalContext", **settings):
    self.ctx = ctx
    self.settings = settings

  def evaluate(self, variables) -> EvalResult:
    raise NotImplementedError

  def run(self, variables) -> Iterator[tuple[str, Any]]:
    yield from self.evaluate(variables).summary.items()


def padded_batches(arrays: tuple[np.ndarray, ...], batch_size: int):
  """Yields ``(batch of each array, number of real rows)``; the last batch is zero-padded to
  ``batch_size`` so every call has one shape (one compilation)."""
  for start in range(0, len(arrays[0]), batch_size):
    batch = tuple(a[start:start + batch_size] for a in arrays)
    valid = len(batch[0])
    if valid < batch_size:
      batch = tuple(np.concatenate([b, np.zeros((batch_size - valid, *b.shape[1:]), b.dtype)]) for b in batch)
    yield batch, valid


class MemorySplits:
  """Splits of an in-memory dataset (``<split>_images`` and ``<split>_<target>`` arrays)."""

  def __init__(self, ds: Any, target: str = "labels", dtype=None):
    self.ds, self.target, self.dtype = ds, target, dtype

  def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    y = getattr(self.ds, f"{split}_{self.target}")
    return getattr(self.ds, f"{split}_images"), (y if self.dtype is None else y.astype(self.dtype))

  def batches(self, split: str, sharding, batch_size: int) -> Iterator[tuple]:
    images, targets = self.arrays(split)
    for (x, y), valid in padded_batches((images, targets), batch_size):
      yield tuple(put_global(a, sharding) for a in (x, y, np.arange(batch_size) < valid))


class StreamSplits:
  """The streamed test split (each process decodes its own rows, :mod:`lt_jax.data.streaming`)."""

  def __init__(self, run: Any):
    self.run = run

  def arrays(self, split: str):
    raise ValueError(f"split {split!r} of a streamed dataset is not in memory; evaluators that read whole "
                     "splits (tau_norm, posthoc, ncm) need an in-memory dataset")

  def batches(self, split: str, sharding, batch_size: int) -> Iterator[tuple]:
    if split != "test":
      raise ValueError(f"streamed datasets are evaluated on 'test' only, got split {split!r}")
    from lt_jax.data import streaming
    for b in streaming.eval_arrays(self.run, sharding, batch_size):
      yield b["image"], b["label"], b["mask"]


class EvalContext(NamedTuple):
  """What an evaluator may read: the model, the data, the prior and how to place batches."""
  model: Any
  splits: Any                      # MemorySplits | StreamSplits
  mesh: Any
  counts: np.ndarray               # (C,) training counts (per bin for regression)
  num_classes: int
  mean: tuple
  std: tuple
  batch_size: int
  block: bool                      # wait for each batch (emulated CPU meshes, loop.blocks_every_step)
  log: Callable[..., None]
  outputs: "OutputCache"
  logit_fn: Callable | None = None  # model outputs -> class scores (BAGS)
  extra: dict = {}                  # task-specific (regression: bin edges, target scale, config)

  def sum_batches(self, step_fn, variables, split: str):
    """``sum over batches of step_fn(variables, x, y, mask)`` (a pytree of sums, on device)."""
    total = None
    for x, y, mask in self.splits.batches(split, batch_sharded(self.mesh), self.batch_size):
      sums = step_fn(variables, x, y, mask)
      total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
      if self.block:
        total = jax.block_until_ready(total)
    return total


class OutputCache:
  """``get(ctx, variables)(split) -> (logits, features)`` on the host, eval mode, no augmentation.

  One compiled forward pass; each split is computed at most once for the same variables,
  however many evaluators (tau-norm, post-hoc, NCM) read it.
  """

  def __init__(self):
    self._key, self._cache, self._fn = None, {}, None

  def get(self, ctx: EvalContext, variables) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
    if self._key is not variables:
      self._key, self._cache = variables, {}
      mean, std, model = ctx.mean, ctx.std, ctx.model
      self._fn = jax.jit(lambda v, x: model.apply(v, augment.normalize(x, mean, std), train=False))

    def outputs(split: str) -> tuple[np.ndarray, np.ndarray]:
      if split not in self._cache:
        images, _ = ctx.splits.arrays(split)
        sharding = batch_sharded(ctx.mesh)
        logits, feats = [], []
        for (x,), n in padded_batches((images,), ctx.batch_size):
          z, f = jax.device_get(self._fn(variables, put_global(x, sharding)))
          logits.append(np.asarray(z, np.float32)[:n])
          feats.append(np.asarray(f, np.float32)[:n])
        self._cache[split] = np.concatenate(logits), np.concatenate(feats)
      return self._cache[split]

    return outputs

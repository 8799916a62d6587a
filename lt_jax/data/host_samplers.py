"""Exact host-side samplers of the streaming input pipeline (NumPy).

:class:`HostSampler` maps ``(seed, step)`` to the global batch's example indices with the
semantics of the on-device samplers (:func:`lt_jax.train.steps.batch_indices`,
:mod:`lt_jax.samplers`; names in :data:`lt_jax.samplers.SAMPLERS`), as a pure function of
the seed and the step, identical in every process. Process ``p`` of ``P`` loads only rows
``[p B / P, (p + 1) B / P)`` (:func:`process_rows`, :func:`sharding_rows`); the union over
processes is the single-process batch, exactly, for every sampler (class-aware included:
its class cycle is a function of the stream position ``step * B + row``).

Random streams are NumPy ``PCG64`` generators seeded by ``SeedSequence([seed, tag, ...])``
(one tag per use, :data:`_TAG_EPOCH_PERM` ...), so every process computes the same global
batch without communicating.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from lt_jax.samplers import RESAMPLE_MODES, SAMPLERS

# Stream tags: independent random streams from one seed, SeedSequence([seed, tag, ...]).
_TAG_EPOCH_PERM, _TAG_CLASS_DRAW, _TAG_ROUND, _TAG_CLASS_WALK, _TAG_AUG = 1, 2, 3, 4, 5
_TAG_RESAMPLE_SET, _TAG_RESAMPLE_PASS = 6, 7


def _rng(*words: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def _permutation(seed: int, tag: int, a: int, b: int, n: int) -> np.ndarray:
  """``permutation(n)`` of the stream ``(seed, tag, a, b)``, read-only."""
  p = _rng(seed, tag, a, b).permutation(n)
  p.setflags(write=False)
  return p


# Epoch permutations are large (N entries) and used for a whole epoch: keep two.
# Class-aware rounds and per-class walks are small and revisited: keep many.
_epoch_permutation = functools.lru_cache(maxsize=2)(_permutation)
_small_permutation = functools.lru_cache(maxsize=8192)(_permutation)


def class_probs(counts: np.ndarray, q: float) -> np.ndarray:
  """``p_j = n_j^q / sum_i n_i^q`` over non-empty classes (NumPy twin of ``samplers.class_probs``).

  Kang et al., ICLR 2020: ``q = 1`` instance, ``1/2`` square-root, ``0`` class-balanced.
  Empty classes get 0 (they cannot be sampled), as in :mod:`lt_jax.samplers`.
  """
  c = np.asarray(counts, np.float64)
  present = c > 0
  if not present.any():
    raise ValueError("class_probs: every class is empty")
  w = np.where(present, (np.where(present, c, 1.0) / c.max()) ** q, 0.0)
  return w / w.sum()


def resample_counts(counts: np.ndarray, mode: str, target: int = 0) -> np.ndarray:
  """``m_c`` of the dataset-level resamplers (NumPy twin of ``samplers.resample_counts``)."""
  if mode not in RESAMPLE_MODES:
    raise ValueError(f"unknown resampling mode {mode!r}; valid: {', '.join(RESAMPLE_MODES)}")
  n = np.asarray(counts, np.int64)
  present = n > 0
  if mode == "random_under":
    m = np.minimum(n, target or n[present].min())
  else:
    m = np.maximum(n, target or n.max())
  return np.where(present, m, 0)


def progressive_probs(counts: np.ndarray, t: float) -> np.ndarray:
  """``p_j(t) = (1 - t) n_j / N + t / C`` (Kang et al., ICLR 2020), ``t`` clipped to [0, 1]."""
  t = min(max(float(t), 0.0), 1.0)
  return (1.0 - t) * class_probs(counts, 1.0) + t * class_probs(counts, 0.0)


def reversed_probs(counts: np.ndarray) -> np.ndarray:
  """BBN's reversed sampler ``p_j ∝ n_max / n_j`` over non-empty classes (Zhou et al., CVPR 2020)."""
  return class_probs(counts, -1.0)


class HostIndex(NamedTuple):
  """Examples grouped by class (NumPy twin of :class:`lt_jax.samplers.SamplerIndex`)."""
  order: np.ndarray    # (N,) example ids sorted stably by label
  starts: np.ndarray   # (C,) offset of each class's block in ``order``
  counts: np.ndarray   # (C,) examples per class
  classes: np.ndarray  # (C_nonempty,) classes with at least one example


def build_host_index(labels, num_classes: int) -> HostIndex:
  """Groups ``labels`` by class (stable sort, once); labels outside ``[0, C)`` raise ``ValueError``."""
  y = np.asarray(labels)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
  if y.size == 0:
    raise ValueError("labels is empty: nothing to sample")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
  order = np.argsort(y, kind="stable").astype(np.int64)
  counts = np.bincount(y, minlength=num_classes).astype(np.int64)
  return HostIndex(order, np.cumsum(counts) - counts, counts, np.flatnonzero(counts))


class HostSampler:
  """The global batch's example indices for any step: a pure function of ``(seed, step)``.

  Same semantics as the on-device samplers (``lt_jax.train.steps.batch_indices``):

  * ``instance``: shuffled epochs, drop-last. Epoch ``e`` is a fresh permutation of the
    training set (stream ``(seed, e)``); step ``s`` takes positions
    ``[(s mod S) B, (s mod S + 1) B)`` of epoch ``s // S``'s permutation (``S`` steps per epoch).
  * ``class_balanced`` / ``sqrt`` / ``progressive`` / ``reversed``: i.i.d. two-stage draws,
    ``y ~ Categorical(p)`` then an example uniform within class ``y``, with ``p`` from
    :func:`class_probs` (``q = 0``, ``1/2``), :func:`progressive_probs` with
    ``t = epoch / (T - 1)``, :func:`reversed_probs`; stream ``(seed, step)``.
  * ``random_under`` / ``random_over``: dataset-level resampling (``samplers.resampled_indices``):
    the resampled set (``m_c`` examples of class ``c``, :func:`resample_counts`; under: a random
    subset without replacement, stream ``(seed, set, c)``; over: every example once plus
    ``m_c - n_c`` uniform duplicates) is visited in passes of ``M = sum_c m_c`` stream positions
    ``step * B + row``, pass ``p`` in the order of permutation ``(seed, p)`` of ``[0, M)``;
    ``set = 0`` for the whole run, or ``p`` with ``redraw``.
  * ``class_aware`` (Shen et al., ECCV 2016; classifier-balancing ``ClassAwareSampler``,
    ``num_samples_cls = K``): one infinite stream over positions ``step * B + row``. Round
    ``r`` visits every non-empty class once in a fresh random order (stream ``(seed, r)``),
    ``K`` consecutive examples per visit; class ``c`` thus makes its ``j``-th draw at round
    ``j // K``, and draw ``j`` is entry ``j mod n_c`` of the ``(j // n_c)``-th random
    permutation of the class's examples (stream ``(seed, c, j // n_c)``): the reference's
    per-class list walked without replacement and reshuffled after each pass, here
    stateless. The on-device twin (:func:`lt_jax.samplers.class_aware_indices`) has the
    same semantics (class rounds, ``K`` per visit, without replacement within each pass
    over a class) with its own random streams, so the draws differ.

  The streams are NumPy ``PCG64`` generators seeded by ``SeedSequence([seed, tag, ...])``,
  so every process computes the same global batch without communicating.

  Args:
    labels: ``(N,)`` int training labels (the source's, read once).
    num_classes: ``C``.
    batch_size: global batch size ``B``.
    sampler: one of :data:`lt_jax.samplers.SAMPLERS`.
    seed: the sampling seed.
    num_epochs: ``T`` (progressive only).
    steps_per_epoch: ``S`` (default ``N // B``).
    k_per_class: ``K`` (class-aware only).
    defer_epochs: deferred re-sampling (DRS, Cao et al., NeurIPS 2019): epochs before
      this one use ``instance`` batches, later ones ``sampler`` (as the on-device step).
    resample_target: ``T`` of ``random_under`` / ``random_over`` (0: ``n_min`` / ``n_max``).
    resample_redraw: draw a new resampled set for every pass (default: one for the run).
  """

  def __init__(self, labels, num_classes: int, batch_size: int, *, sampler: str = "instance", seed: int = 0,
               num_epochs: int = 1, steps_per_epoch: int | None = None, k_per_class: int = 4,
               defer_epochs: int = 0, resample_target: int = 0, resample_redraw: bool = False):
    if sampler not in SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    self.index = build_host_index(labels, num_classes)
    n = len(self.index.order)
    if batch_size < 1 or (sampler == "instance" and batch_size > n):
      raise ValueError(f"batch_size must be in [1, {n}] (the training set size), got {batch_size}")
    if k_per_class < 1:
      raise ValueError(f"k_per_class must be >= 1, got {k_per_class}")
    self.num_examples, self.num_classes, self.batch_size = n, num_classes, int(batch_size)
    self.sampler, self.seed, self.num_epochs, self.k_per_class = sampler, int(seed), int(num_epochs), int(k_per_class)
    self.defer_epochs = int(defer_epochs)
    if resample_target < 0:
      raise ValueError(f"resample_target must be >= 0 (0: n_min / n_max), got {resample_target}")
    self.resample_target, self.resample_redraw = int(resample_target), bool(resample_redraw)
    self._pass_cache: dict[int, np.ndarray] = {}
    self.steps_per_epoch = int(steps_per_epoch or n // batch_size)
    if self.steps_per_epoch < 1:
      raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
    if self.steps_per_epoch * batch_size > n and (sampler == "instance" or self.defer_epochs > 0):
      raise ValueError(f"instance sampling: steps_per_epoch * batch_size = {self.steps_per_epoch * batch_size} "
                       f"exceeds the {n} examples of an epoch")

  def probs(self, step: int) -> np.ndarray:
    """The class distribution of the i.i.d. samplers at ``step``."""
    counts = self.index.counts
    if self.sampler == "class_balanced":
      return class_probs(counts, 0.0)
    if self.sampler == "sqrt":
      return class_probs(counts, 0.5)
    if self.sampler == "progressive":
      return progressive_probs(counts, (step // self.steps_per_epoch) / max(self.num_epochs - 1, 1))
    if self.sampler == "reversed":
      return reversed_probs(counts)
    raise ValueError(f"sampler {self.sampler!r} has no per-step class distribution")

  def indices(self, step: int) -> np.ndarray:
    """``(B,)`` int64 example indices of the global batch of ``step``."""
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if self.sampler == "instance" or step // self.steps_per_epoch < self.defer_epochs:
      epoch, pos = divmod(step, self.steps_per_epoch)
      perm = _epoch_permutation(self.seed, _TAG_EPOCH_PERM, epoch, 0, self.num_examples)
      return perm[pos * self.batch_size:(pos + 1) * self.batch_size].astype(np.int64)
    if self.sampler == "class_aware":
      return self.stream(step * self.batch_size, self.batch_size)
    if self.sampler in RESAMPLE_MODES:
      return self.resampled(step * self.batch_size, self.batch_size)
    p = self.probs(step)
    rng = _rng(self.seed, _TAG_CLASS_DRAW, step)
    cdf = np.cumsum(p)
    cls = np.searchsorted(cdf, rng.random(self.batch_size) * cdf[-1], side="right")
    cls = np.minimum(cls, np.flatnonzero(p > 0)[-1])  # rounding never yields an empty class
    offset = np.floor(rng.random(self.batch_size) * self.index.counts[cls]).astype(np.int64)
    return self.index.order[self.index.starts[cls] + offset]

  def stream(self, start: int, num: int) -> np.ndarray:
    """Class-aware stream positions ``[start, start + num)`` (see the class docstring)."""
    classes, counts = self.index.classes, self.index.counts
    k = self.k_per_class
    round_len = len(classes) * k
    pos = np.arange(start, start + num, dtype=np.int64)
    rounds, slot = np.divmod(pos, round_len)
    out = np.empty(num, np.int64)
    for i, (r, s) in enumerate(zip(rounds.tolist(), slot.tolist())):
      c = int(classes[_small_permutation(self.seed, _TAG_ROUND, r, 0, len(classes))[s // k]])
      j = r * k + s % k                      # class c's draw number
      n_c = int(counts[c])
      p, within = divmod(j, n_c)          # pass p over the class's examples, position within it
      walk = _small_permutation(self.seed, _TAG_CLASS_WALK, c, p, n_c)
      out[i] = self.index.order[self.index.starts[c] + walk[within]]
    return out


  def resampled_pass(self, p: int) -> np.ndarray:
    """Example ids of pass ``p`` of ``random_under`` / ``random_over``, in visiting order (cached)."""
    if p not in self._pass_cache:
      counts, order, starts = self.index.counts, self.index.order, self.index.starts
      m = resample_counts(counts, self.sampler, self.resample_target)
      set_no = p if self.resample_redraw else 0
      blocks = []
      for c in np.flatnonzero(m):
        n_c = int(counts[c])
        if self.sampler == "random_under":
          e = _small_permutation(self.seed, _TAG_RESAMPLE_SET, set_no, int(c), n_c)[:m[c]]
        else:
          extra = _rng(self.seed, _TAG_RESAMPLE_SET, set_no, int(c)).integers(0, n_c, int(m[c]) - n_c)
          e = np.concatenate([np.arange(n_c), extra])
        blocks.append(order[starts[c] + e])
      every = np.concatenate(blocks)
      if len(self._pass_cache) >= 4:  # passes are visited in order: keep a few
        self._pass_cache.pop(min(self._pass_cache))
      self._pass_cache[p] = every[_permutation(self.seed, _TAG_RESAMPLE_PASS, p, 0, len(every))]
    return self._pass_cache[p]

  def resampled(self, start: int, num: int) -> np.ndarray:
    """``random_under`` / ``random_over`` stream positions ``[start, start + num)``."""
    total = int(resample_counts(self.index.counts, self.sampler, self.resample_target).sum())
    pos = np.arange(start, start + num, dtype=np.int64)
    out = np.empty(num, np.int64)
    for p in np.unique(pos // total):
      sel = pos // total == p
      out[sel] = self.resampled_pass(int(p))[pos[sel] % total]
    return out


def process_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Rows ``[p B / P, (p + 1) B / P)`` of the global batch that process ``p`` of ``P`` loads."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if batch_size % process_count:
    raise ValueError(f"global batch size {batch_size} is not divisible by the {process_count} processes")
  per = batch_size // process_count
  return process_index * per, (process_index + 1) * per


def sharding_rows(sharding, batch_size: int) -> tuple[int, int]:
  """The contiguous rows of a ``(B, ...)`` batch that this process's devices hold under ``sharding``.

  For the trainer's ``NamedSharding(Mesh(jax.devices(), ('data',)), P('data'))`` this is
  :func:`process_rows` with ``jax.process_index()``; raises ``ValueError`` if the local
  rows are not one contiguous block (a mesh that interleaves processes).
  """
  idx = sharding.addressable_devices_indices_map((batch_size,))
  spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in idx.values()})
  lo, hi = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"this process's rows {spans} are not contiguous under {sharding}")
  return lo, hi

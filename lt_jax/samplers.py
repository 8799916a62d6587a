"""Class-rebalancing samplers: sampling distributions over classes and index draws.

Two layers:

1. *Class distributions* ``p`` (shape ``(C,)``) computed from training counts:
   :func:`class_probs` (instance / square-root / class-balanced, Kang et al., ICLR 2020),
   :func:`progressive_probs` (Kang et al., ICLR 2020), :func:`reversed_probs`
   (BBN, Zhou et al., CVPR 2020).
2. *Index draws* of training-example indices, pure JAX and usable inside ``jit``:
   :func:`sample_indices` (class from ``p``, then an example uniformly within the class),
   :func:`class_aware_indices` (Shen et al., ECCV 2016; classifier-balancing
   ``ClassAwareSampler``: rounds over a random class permutation, ``K`` examples per
   class, each class's examples walked without replacement), :func:`resampled_indices`
   (dataset-level random under- / over-sampling: shuffled passes over a resampled set) and
   :func:`instance_indices` (plain uniform).

The sampler names a run config chooses from are :data:`SAMPLERS` (one vocabulary for the
on-device step and the streaming host samplers of :mod:`lt_jax.data.streaming`).

Fast path for a jitted train step. Build a :class:`SamplerIndex` once, on the host, with
:func:`build_index` (a stable sort of the labels, ``O(N log N)``, done once) and pass it
to the jitted step as an ordinary argument (it is a pytree of arrays). Per step,
:func:`sample_indices` then costs ``O(C + num log C)`` (a cumulative sum over classes, a
binary search per draw, one gather) and :func:`class_aware_indices` costs one permutation
of the classes per round touched (``O(C log C)`` each, usually one) plus ``O(num)``.
Measured on the 2-core CPU at iNaturalist scale (N = 1.3M, C = 8142, num = 512):
``sample_indices`` 0.4 ms with the index vs ~500 ms with raw labels; class-aware (K = 4)
~4 ms. Passing the raw ``labels`` to :func:`sample_indices` instead works
but re-sorts the whole training set every call (``O(N log N)`` per step).

Zero-count classes. A class with no training example can never be drawn: sampling from an
empty class is impossible. Every distribution here therefore gives it probability exactly
0 and renormalises over the non-empty classes, i.e. empty classes are *removed from the
class set* (``C`` in the formulas below counts non-empty classes only). This differs on
purpose from the zero-count rule of :mod:`lt_jax.priors` (``safe_counts``), which exists to
keep weights and log-priors finite, not to sample.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from lt_jax.priors import _check_concrete_counts, class_counts

Array = jax.Array

SAMPLERS = ("instance", "class_balanced", "sqrt", "progressive", "class_aware", "reversed", "random_under",
            "random_over")
"""Training-batch samplers, by name (the one vocabulary of configs, the train step and the host pipeline).

* ``instance``: shuffled epochs, every example once per epoch (drop-last); ``p_j = n_j / N``.
* ``class_balanced``: ``p_j = 1 / C`` (:func:`class_probs` with ``q = 0``), example uniform
  within the class (Kang et al., ICLR 2020).
* ``sqrt``: square-root sampling ``p_j ∝ n_j^{1/2}`` (``q = 1/2``; Mahajan et al., ECCV 2018).
* ``progressive``: ``p_j(t) = (1 - t) n_j / N + t / C`` with ``t = epoch / (T - 1)``
  (:func:`progressive_probs`; Kang et al., ICLR 2020).
* ``class_aware``: rounds over a shuffled class list, ``K`` examples per class visit, each
  class's examples walked without replacement and reshuffled after each pass
  (:func:`class_aware_indices`; Shen et al., ECCV 2016; classifier-balancing
  ``ClassAwareSampler``), the cRT / LWS stage sampler.
* ``reversed``: BBN's reversed sampler ``p_j ∝ n_max / n_j`` (:func:`reversed_probs`;
  Zhou et al., CVPR 2020).

* ``random_under``: dataset-level random under-sampling: every class cut down to
  ``m_c = min(n_c, T)`` examples drawn without replacement, ``T = n_min`` (the smallest non-empty
  class) or a target count (imbalanced-learn ``RandomUnderSampler``; Buda et al., Neural Networks
  2018), then shuffled passes over that resampled set (:func:`resampled_indices`).
* ``random_over``: dataset-level random over-sampling: every class filled up to
  ``m_c = max(n_c, T)``, ``T = n_max`` or a target count, keeping each of its ``n_c`` examples
  once and adding ``m_c - n_c`` copies drawn uniformly with replacement (imbalanced-learn
  ``RandomOverSampler``), then shuffled passes over that set (:func:`resampled_indices`).

The i.i.d. samplers (``class_balanced``, ``sqrt``, ``progressive``, ``reversed``) draw the
class from ``p`` and the example uniformly within it (:func:`sample_indices`).

*Passes and epochs of the dataset-level samplers.* The resampled set has ``M = sum_c m_c``
examples; a *pass* is one sweep over it in a fresh random order (stream positions
``[p M, (p + 1) M)``). The training *epoch* is not redefined: it stays ``N // batch_size`` steps
of the long-tailed set's size ``N`` for every sampler (:mod:`lt_jax.train.durations`), so runs of
every sampler have the same number of steps and an epoch covers ``N / M`` passes (Fashion-MNIST-LT
IR 100: about 25 passes of the 590-example under-sampled set, a quarter pass of the 59,800-example
over-sampled one). The resampled set is drawn once and kept for the whole run (``redraw=False``,
the default: imbalanced-learn's ``fit_resample`` done once, then ordinary shuffled epochs over its
output); ``redraw=True`` draws a new resampled set for every pass.
"""


# ----------------------------------------------------------------------------------------
# Class distributions.
# ----------------------------------------------------------------------------------------

def _nonempty(counts: Array) -> tuple[Array, Array]:
  """Float counts and the mask of classes with at least one example."""
  _check_concrete_counts(counts)
  c = jnp.asarray(counts, jnp.float32)
  return c, c > 0


def _normalise_masked(w: Array, present: Array) -> Array:
  """``w`` restricted to ``present`` classes, normalised to sum 1 (uniform if all zero)."""
  w = jnp.where(present, w, 0.0)
  total = jnp.sum(w)
  n_present = jnp.maximum(jnp.sum(present), 1)
  fallback = present.astype(jnp.float32) / n_present
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), fallback)


def class_probs(counts: Array, q: float) -> Array:
  """Class-sampling distribution ``p_j = n_j^q / sum_i n_i^q`` (Kang et al., ICLR 2020).

  ``q = 1``: instance-balanced (``p_j = n_j / N``, the natural data distribution);
  ``q = 1/2``: square-root sampling (Mikolov et al. 2013; Mahajan et al. 2018);
  ``q = 0``: class-balanced (``p_j = 1 / C``). Any real ``q`` is accepted (``q = -1`` is
  BBN's reversed sampler, see :func:`reversed_probs`). As in classifier-balancing's
  samplers (sqrt / class-balanced), the class is drawn from ``p`` and the example
  uniformly within the class (see :func:`sample_indices`).

  Empty classes get ``p_j = 0`` and are excluded from the sum (module docstring); in
  particular ``0^0`` is *not* treated as 1. Accepts raw counts or a normalised prior.
  Computed as ``(n_j / n_max)^q`` so large counts and large ``q`` do not overflow.
  """
  c, present = _nonempty(counts)
  n_max = jnp.max(c)
  scaled = c / jnp.where(n_max > 0, n_max, 1.0)
  w = jnp.exp(q * jnp.log(jnp.where(present, scaled, 1.0)))
  return _normalise_masked(w, present)


def progressive_probs(counts: Array, t: float | Array) -> Array:
  """Progressively-balanced distribution ``p_j(t) = (1 - t) n_j / N + t / C`` (Kang et al., ICLR 2020).

  ``t`` in ``[0, 1]`` is the training progress (classifier-balancing uses ``t = epoch / T``
  with ``T`` the total number of epochs): ``t = 0`` is instance-balanced, ``t = 1``
  class-balanced. Implemented as the mixture ``(1 - t) p^{q=1} + t p^{q=0}`` of
  :func:`class_probs`, so ``C`` counts the non-empty classes only and empty classes get 0.
  ``t`` may be a traced scalar (e.g. computed from the step inside ``jit``); a concrete
  ``t`` outside ``[0, 1]`` raises ``ValueError``, a traced one is clipped to ``[0, 1]``.
  """
  try:
    t_val = float(t)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    t_val = None
  if t_val is not None and not 0.0 <= t_val <= 1.0:
    raise ValueError(f"progressive_probs: t must be in [0, 1] (0 = instance-balanced, "
                     f"1 = class-balanced), got {t_val}")
  t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
  return (1.0 - t) * class_probs(counts, 1.0) + t * class_probs(counts, 0.0)


def reversed_probs(counts: Array) -> Array:
  """BBN reversed sampler ``p_j = w_j / sum_i w_i`` with ``w_j = n_max / n_j`` (Zhou et al., CVPR 2020).

  Matches ``Megvii-Nanjing/BBN`` (the reversed branch's sampler, weight ``N_max / N_i``
  per class, example uniform within the class). Empty classes (infinite weight in the
  formula) get ``p_j = 0``: they cannot be sampled. Counts ``[100, 50, 10]`` give
  ``w = [1, 2, 10]``, ``p = [1, 2, 10] / 13``.
  """
  c, present = _nonempty(counts)
  n_max = jnp.max(c)
  w = n_max / jnp.where(present, c, 1.0)
  return _normalise_masked(w, present)


# ----------------------------------------------------------------------------------------
# Index of the training set by class.
# ----------------------------------------------------------------------------------------

class SamplerIndex(NamedTuple):
  """Training-set examples grouped by class; a pytree of arrays, built once.

  Attributes:
    order: ``(N,)`` int32, example indices sorted (stably) by label: the examples of class
      ``c`` are ``order[starts[c] : starts[c] + counts[c]]``, in increasing index order.
    starts: ``(C,)`` int32, offset of each class's block in ``order``.
    counts: ``(C,)`` int32, number of examples of each class.
    classes: ``(C_nonempty,)`` int32, the classes with at least one example, ascending.
      Its *length* is static; it sets the class-aware round length.
  """
  order: Array
  starts: Array
  counts: Array
  classes: Array

  @property
  def num_classes(self) -> int:
    return self.counts.shape[0]


def build_index(labels, num_classes: int) -> SamplerIndex:
  """Group the training labels by class (host side, once per dataset): ``O(N log N)``.

  ``labels`` must be concrete (NumPy or a committed ``jax.Array``): the number of non-empty
  classes becomes the static length of ``SamplerIndex.classes``. Labels outside
  ``[0, num_classes)`` raise ``ValueError`` (a training example must have a class).
  The result is an ordinary pytree; pass it to the jitted train step as an argument
  (do not close over it, so it is not baked into the compiled program as a constant).
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  try:
    y = np.asarray(labels)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError("build_index needs concrete labels (call it once, outside jit); inside jit "
                     "pass raw labels to sample_indices instead") from e
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array of class ids, got shape {y.shape} dtype {y.dtype}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
  order = np.argsort(y, kind="stable").astype(np.int32)
  counts = np.bincount(y, minlength=num_classes).astype(np.int32)
  starts = (np.cumsum(counts) - counts).astype(np.int32)
  classes = np.flatnonzero(counts).astype(np.int32)
  return SamplerIndex(jnp.asarray(order), jnp.asarray(starts), jnp.asarray(counts), jnp.asarray(classes))


def _traced_index(labels: Array, num_classes: int) -> tuple[Array, Array, Array]:
  """``(order, starts, counts)`` in ``jax.numpy`` (traceable, ``O(N log N)``).

  Out-of-range labels are sorted after every valid one and are never drawn.
  """
  y = jnp.asarray(labels).reshape(-1)
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
  valid = (y >= 0) & (y < num_classes)
  y = jnp.where(valid, y, num_classes)
  order = jnp.argsort(y, stable=True).astype(jnp.int32)
  # Map invalid labels to C first: ``class_counts`` alone would wrap -1 onto class C-1.
  counts = class_counts(y, num_classes)
  starts = jnp.cumsum(counts) - counts
  return order, starts.astype(jnp.int32), counts


def _check_num(num) -> int:
  if not isinstance(num, (int, np.integer)) or num < 0:
    raise ValueError(f"num must be a static non-negative int (mark it static under jit), got {num!r}")
  return int(num)


def _uniform_within(key: Array, cls: Array, order: Array, starts: Array, counts: Array) -> Array:
  """One example uniformly (with replacement) within each class in ``cls``."""
  n_c = counts[cls]
  offset = jax.random.randint(key, cls.shape, 0, jnp.maximum(n_c, 1))
  return order[starts[cls] + offset]


# ----------------------------------------------------------------------------------------
# Index draws.
# ----------------------------------------------------------------------------------------

def sample_indices(key: Array, labels: Array | SamplerIndex, class_probs: Array, num: int) -> Array:
  """``num`` training-example indices whose classes follow ``class_probs``.

  Two-stage draw, i.i.d. over the ``num`` draws (with replacement), the standard way
  class-level samplers are implemented (classifier-balancing's class-balanced / sqrt /
  progressive samplers, BBN's reversed sampler):

    ``y ~ Categorical(p)``, then ``i ~ Uniform{examples of class y}``,

  so ``P(i) = p_{y_i} / n_{y_i}``. The class is drawn by inverse-CDF search over
  ``cumsum(p)`` (not by Gumbel-max, which would cost ``O(num * C)``).

  Args:
    key: a ``jax.random.key``.
    labels: a :class:`SamplerIndex` from :func:`build_index` (fast path, per-call cost
      ``O(C + num log C)``), or the ``(N,)`` int labels of the whole training set (the
      index is then rebuilt inside the call: ``O(N log N)`` every call).
    class_probs: ``(C,)`` non-negative class weights (need not be normalised). Classes
      without training examples are given probability 0 and the rest renormalised; if
      no non-empty class has positive weight, the class is drawn uniformly among
      non-empty classes.
    num: static number of draws.

  Returns:
    ``(num,)`` int32 indices into the training set.
  """
  num = _check_num(num)
  p = jnp.asarray(class_probs, jnp.float32)
  if p.ndim != 1:
    raise ValueError(f"class_probs must be a (C,) vector, got shape {p.shape}")
  if isinstance(labels, SamplerIndex):
    order, starts, counts = labels.order, labels.starts, labels.counts
  else:
    order, starts, counts = _traced_index(labels, p.shape[0])
  if counts.shape[0] != p.shape[0]:
    raise ValueError(f"class_probs has {p.shape[0]} classes but the index has {counts.shape[0]}")
  p = _normalise_masked(jnp.maximum(p, 0.0), counts > 0)
  k_cls, k_ex = jax.random.split(key)
  cdf = jnp.cumsum(p)
  u = jax.random.uniform(k_cls, (num,), jnp.float32) * cdf[-1]
  cls = jnp.searchsorted(cdf, u, side="right")
  # Rounding could put u at cdf[-1]; the last class with positive mass absorbs it, so a
  # zero-probability class is never returned.
  last = jnp.max(jnp.where(p > 0, jnp.arange(p.shape[0]), 0))
  cls = jnp.minimum(cls, last).astype(jnp.int32)
  return _uniform_within(k_ex, cls, order, starts, counts)


def _feistel_round_bits(key: Array, rnd: int, half: Array, mask: Array) -> Array:
  """Keyed round function ``F_rnd(half)`` of :func:`within_class_permutation`."""
  return jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, rnd), half), (), jnp.uint32) & mask


def within_class_permutation(key: Array, x: Array, n: Array, rounds: int = 4) -> Array:
  """``pi_key(x)`` for a keyed pseudo-random permutation ``pi_key`` of ``{0, ..., n - 1}``.

  Stateless, ``O(1)`` per query, static shapes: a balanced Feistel network (Luby &
  Rackoff, SIAM J. Comput. 1988) on ``2h``-bit words, ``h = ceil(ceil(log2 n) / 2)``,
  with ``rounds`` keyed round functions (threefry bits of ``(key, round, half)``), made a
  bijection of ``[0, n)`` by cycle walking (Black & Rogaway, "Ciphers with arbitrary
  finite domains", CT-RSA 2002): re-encrypt while the value is ``>= n`` (fewer than 4
  steps on average, since ``4^h < 4 n``). For a fixed ``key`` and ``n``,
  ``[pi(0), ..., pi(n - 1)]`` is therefore a permutation of ``range(n)`` exactly;
  different keys give (pseudo-)independent permutations. ``x`` and ``n`` may be traced
  (``x`` int32 in ``[0, n)``, ``n >= 1``); vmap over them for many queries.
  """
  n = jnp.asarray(n, jnp.uint32)
  x = jnp.asarray(x, jnp.uint32)
  bits = jnp.where(n > 1, 32 - jax.lax.clz(jnp.maximum(n, 2) - 1), 0).astype(jnp.uint32)  # ceil(log2 n)
  h = (bits + 1) // 2
  mask = (jnp.uint32(1) << h) - 1

  def encrypt(v):
    left, right = v >> h, v & mask
    for r in range(rounds):
      left, right = right, left ^ _feistel_round_bits(key, r, right, mask)
    return (left << h) | right

  y = jax.lax.while_loop(lambda v: v >= n, encrypt, encrypt(x))
  return jnp.where(n > 1, y, 0).astype(jnp.int32)


def class_aware_indices(key: Array, index: SamplerIndex, num: int, k_per_class: int = 4,
                        start: int | Array = 0) -> Array:
  """Class-aware sampling (Shen et al., ECCV 2016; Kang et al., ICLR 2020, cRT / LWS).

  Defines an infinite stream, a pure function of ``key``, made of *rounds*: round ``r``
  visits every non-empty class once, in the order of a fresh random permutation (keyed by
  ``fold_in(key, r)``), and each visit yields ``k_per_class`` consecutive examples of that
  class. A round has ``L = C_nonempty * K`` slots, and each non-empty class appears
  exactly ``K`` times per round, so class ``c`` makes its ``j``-th draw (``j = 0, 1, ...``)
  at round ``j // K``. Draw ``j`` of class ``c`` is entry ``j mod n_c`` of the
  ``(j // n_c)``-th random permutation of the class's examples
  (:func:`within_class_permutation` keyed by ``(key, c, j // n_c)``): every example of the
  class is drawn exactly once per pass over the class, and the order is reshuffled for the
  next pass. This call returns stream positions ``[start, start + num)``.

  Same as the reference (classifier-balancing ``data/ClassAwareSampler.py``,
  ``RandomCycleIter``, ``num_samples_cls=K``, 4 in the cRT / LWS configs): a class
  iterator cycles through a list of classes reshuffled at each pass, and each visit takes
  the next ``K`` examples of that class's own cycling list, reshuffled after each pass
  over the class (without replacement within a pass). The host twin
  :class:`lt_jax.data.streaming.HostSampler` has the same semantics (NumPy permutations
  instead of the Feistel permutation, so different draws). Different here: (a) stateless
  (a function of the stream position) instead of iterator state; the within-class order is
  a keyed pseudo-random permutation, not a uniformly random one. (b) The stream continues
  across calls only if you ask for it: call with a fixed ``key`` and
  ``start = step * num`` to get the reference's behaviour (the class cycle runs on across
  batches, as the train step does); with a fresh key per step and ``start = 0``, each
  batch is the beginning of an independent stream. (c) Empty classes are skipped; the
  reference assumes every class id has examples.

  Cost per call: ``ceil(num / L)`` permutations of the ``C_nonempty`` classes, plus one
  more when the slice crosses a round boundary (``O(C log C)`` each), plus ``O(num)``
  Feistel evaluations (4 threefry draws each, times the few cycle-walking steps).
  iNaturalist scale (N = 1.3M, C = 8142, K = 4, num = 512) on the 2-core CPU under load:
  ~8 ms per call.

  Args:
    key: a ``jax.random.key`` (the stream's seed).
    index: :class:`SamplerIndex` from :func:`build_index`.
    num: static number of indices.
    k_per_class: static ``K >= 1``, examples per class visit.
    start: stream offset (int, may be traced).

  Returns:
    ``(num,)`` int32 indices into the training set.
  """
  num = _check_num(num)
  if not isinstance(index, SamplerIndex):
    raise ValueError("class_aware_indices needs a SamplerIndex (build it once with build_index)")
  if not isinstance(k_per_class, (int, np.integer)) or k_per_class < 1:
    raise ValueError(f"k_per_class must be a static int >= 1, got {k_per_class!r}")
  n_ne = index.classes.shape[0]
  if n_ne == 0:
    raise ValueError("class_aware_indices: the index has no non-empty class")
  K = int(k_per_class)
  L = n_ne * K
  n_rounds = math.ceil(num / L) + 1 if num else 1
  start = jnp.asarray(start, jnp.int32)
  r0 = start // L
  rounds = r0 + jnp.arange(n_rounds, dtype=jnp.int32)
  round_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rounds)

  def one_round(rk):
    perm_key, _ = jax.random.split(rk)
    return jax.random.permutation(perm_key, index.classes)

  # The last round is needed only when this slice crosses into it (probability ~num/L for
  # num < L); lax.cond skips that permutation otherwise (a sort of C_ne keys each).
  perms = jax.vmap(one_round)(round_keys[:-1])                  # (R - 1, C_ne)
  needs_last = (start + max(num, 1) - 1) // L - r0 == n_rounds - 1
  last = jax.lax.cond(needs_last, one_round, lambda rk: jnp.zeros_like(index.classes), round_keys[-1])
  perms = jnp.concatenate([perms, last[None]], axis=0)          # (R, C_ne)
  pos = start + jnp.arange(num, dtype=jnp.int32)                 # global stream positions
  r_global = pos // L
  in_round = pos % L
  cls = perms[r_global - r0, in_round // K]
  j = r_global * K + in_round % K                                # class cls's draw number
  n_c = jnp.maximum(index.counts[cls], 1)
  walk_root = jax.random.split(key, 2)[1]                        # independent of the round keys

  def within(c, p, x, n):
    return within_class_permutation(jax.random.fold_in(jax.random.fold_in(walk_root, c), p), x, n)

  offset = jax.vmap(within)(cls, j // n_c, j % n_c, n_c)
  return index.order[index.starts[cls] + offset]


def instance_indices(key: Array, num_examples: int, num: int, *, replace: bool = True) -> Array:
  """Instance-balanced indices: every example equally likely (``q = 1`` without the class step).

  ``replace=True``: ``num`` i.i.d. uniform draws from ``[0, num_examples)``, ``O(num)``.
  ``replace=False``: the first ``num`` entries of a random permutation (an epoch-style
  draw without repetition, ``O(N log N)``); needs ``num <= num_examples``.
  """
  num = _check_num(num)
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(f"num_examples must be a static positive int, got {num_examples!r}")
  if replace:
    return jax.random.randint(key, (num,), 0, num_examples, dtype=jnp.int32)
  if num > num_examples:
    raise ValueError(f"replace=False needs num <= num_examples, got {num} > {num_examples}")
  return jax.random.permutation(key, num_examples)[:num].astype(jnp.int32)


RESAMPLE_MODES = ("random_under", "random_over")


def resample_counts(counts, mode: str, target: int = 0):
  """Per-class sizes ``m_c`` of the resampled set of :func:`resampled_indices` (traceable).

  ``random_under``: ``m_c = min(n_c, T)``, ``T = target`` or, for ``target = 0``, the smallest
  non-empty class count ``n_min``. ``random_over``: ``m_c = max(n_c, T)``, ``T = target`` or
  ``n_max``. Empty classes stay empty (nothing to draw from). Returns int32 ``(C,)``.
  """
  if mode not in RESAMPLE_MODES:
    raise ValueError(f"unknown resampling mode {mode!r}; valid: {', '.join(RESAMPLE_MODES)}")
  if isinstance(target, (int, np.integer)) and target < 0:
    raise ValueError(f"target must be an int >= 0 (0: n_min for random_under, n_max for random_over), "
                     f"got {target!r}")
  n = jnp.asarray(counts).astype(jnp.int32)
  present = n > 0
  target = jnp.asarray(target, jnp.int32)   # may be traced: one compiled step for every target
  if mode == "random_under":
    m = jnp.minimum(n, jnp.where(target > 0, target, jnp.min(jnp.where(present, n, jnp.iinfo(jnp.int32).max))))
  else:
    m = jnp.maximum(n, jnp.where(target > 0, target, jnp.max(n)))
  return jnp.where(present, m, 0).astype(jnp.int32)


def resampled_indices(key: Array, index: SamplerIndex, num: int, mode: str, *, target: int = 0,
                      start: int | Array = 0, redraw: bool = False) -> Array:
  """Dataset-level random under- / over-sampling as a stateless stream (positions ``[start, start + num)``).

  The resampled set holds ``m_c`` examples of class ``c`` (:func:`resample_counts`):

  * ``random_under``: the first ``m_c`` entries of a keyed random permutation of the class's
    ``n_c`` examples, i.e. ``m_c`` distinct examples drawn without replacement (imbalanced-learn
    ``RandomUnderSampler(sampling_strategy=...)``, ``replacement=False``);
  * ``random_over``: slot ``j < n_c`` is the class's ``j``-th example (each original once), slot
    ``j >= n_c`` a uniform draw with replacement from the class (imbalanced-learn
    ``RandomOverSampler``: the originals plus ``m_c - n_c`` random duplicates).

  The stream is made of passes of ``M = sum_c m_c`` positions; pass ``p`` visits the resampled
  set in the order of a fresh keyed permutation of ``[0, M)`` (:func:`within_class_permutation`,
  a Feistel permutation: ``O(1)`` per position, no ``O(M)`` array per step). With
  ``redraw=False`` the resampled set itself is the same in every pass (drawn once for the run);
  ``redraw=True`` draws a new one for each pass. Every pass therefore contains exactly ``m_c``
  examples of class ``c`` (see the module docstring for passes vs training epochs). The host
  twin (:class:`lt_jax.data.host_samplers.HostSampler`) has the same semantics with NumPy
  streams (different draws).

  Args:
    key: a ``jax.random.key`` (the run's sampling key; the train step passes the same key
      every step and ``start = step * batch_size``, so passes continue across batches).
    index: :class:`SamplerIndex` from :func:`build_index`.
    num: static number of indices.
    mode: static, ``'random_under'`` | ``'random_over'``.
    target: ``T`` (0: ``n_min`` / ``n_max``; may be traced).
    start: stream offset (may be traced).
    redraw: ``True`` redraws the resampled set every pass (may be traced).

  Returns:
    ``(num,)`` int32 indices into the training set.
  """
  num = _check_num(num)
  if not isinstance(index, SamplerIndex):
    raise ValueError("resampled_indices needs a SamplerIndex (build it once with build_index)")
  m = resample_counts(index.counts, mode, target)
  ends = jnp.cumsum(m)
  total = ends[-1]
  pos = jnp.asarray(start, jnp.int32) + jnp.arange(num, dtype=jnp.int32)
  pass_no, within = pos // total, pos % total
  perm_root, set_root = jax.random.split(key)
  slot = jax.vmap(lambda p, q: within_class_permutation(jax.random.fold_in(perm_root, p), q, total))(
      pass_no, within)
  cls = jnp.searchsorted(ends, slot, side="right").astype(jnp.int32)
  j = slot - (ends[cls] - m[cls])                        # slot within the class's block, [0, m_c)
  n_c = jnp.maximum(index.counts[cls], 1)
  set_no = jnp.where(jnp.asarray(redraw), pass_no, 0)

  def example(c, s, jj, n):
    class_key = jax.random.fold_in(jax.random.fold_in(set_root, s), c)
    if mode == "random_under":
      return within_class_permutation(class_key, jj, n)
    dup = jax.random.randint(jax.random.fold_in(class_key, jj), (), 0, n, dtype=jnp.int32)
    return jnp.where(jj < n, jj, dup)

  offset = jax.vmap(example)(cls, set_no, j, n_c)
  return index.order[index.starts[cls] + offset]

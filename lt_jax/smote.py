"""SMOTE (Chawla et al., JAIR 2002) in JAX, for over-sampling frozen features in a decoupled stage.

Semantics of imbalanced-learn's ``SMOTE`` (``imblearn/over_sampling/_smote/base.py``,
``SMOTE._fit_resample`` and ``BaseSMOTE._make_samples``), which lt_jax follows:

1. the classes to over-sample and how many points each gets come from ``sampling_strategy``
   (:func:`smote_counts`; ``'auto'`` = ``'not majority'``: every class but the largest is filled
   up to the largest class's count ``n_max``);
2. for each such class ``c`` (ascending class id), the ``k`` nearest neighbours of each of its
   ``n_c`` points among the class's own points, itself excluded (:func:`smote_neighbours`,
   squared Euclidean distance; imbalanced-learn fits ``NearestNeighbors(k + 1)`` and drops the
   first column);
3. ``s = n_max - n_c`` draws: an index ``r`` uniform in ``[0, n_c k)`` picks the base point
   ``i = r // k`` and its neighbour ``nn[i, r mod k]``, and a step ``u ~ U[0, 1)``
   (:func:`smote_draw`);
4. the synthetic point ``x_i + u (x_nn - x_i)`` (:func:`smote_generate`; imbalanced-learn's
   docstring writes ``x_i - x_nn``, its code computes ``nn_data[nn_num[rows, cols]] - X[rows]``,
   which lt_jax follows); the new points get label ``c`` and are appended after the originals.

Given the same neighbours and the same ``(r, u)`` draws, the points equal imbalanced-learn's
(tests/test_smote.py); the draws themselves come from a ``jax.random`` key (one
``fold_in(key, c)`` per class), not NumPy's ``RandomState``. A class with ``n_c <= k`` uses its
``n_c - 1`` neighbours (imbalanced-learn raises instead); a class with one point is duplicated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SAMPLING_STRATEGIES = ("auto", "not majority", "not minority", "minority", "all", "none")

__all__ = ["SAMPLING_STRATEGIES", "smote_counts", "smote_neighbours", "smote_draw", "smote_generate", "smote",
           "SmoteResult"]


def smote_counts(counts, sampling_strategy: str = "auto") -> np.ndarray:
  """Synthetic points per class, ``(C,)`` int64 (imbalanced-learn's string ``sampling_strategy``).

  The target of every selected class is ``n_max``; it gets ``n_max - n_c`` points. ``'minority'``:
  only the smallest class; ``'not minority'``: all but it; ``'not majority'`` (= ``'auto'``): all but
  the largest; ``'all'``: every class; ``'none'``: no class (no synthetic point: the ablation of a
  classifier stage on cached features without SMOTE; imbalanced-learn spells it
  ``sampling_strategy={}``). Ties resolve to the lowest class id, as imbalanced-learn's
  ``min`` / ``max`` over its class counter. Classes without examples are not resampled (there is
  nothing to interpolate).
  """
  if sampling_strategy not in SAMPLING_STRATEGIES:
    raise ValueError(f"unknown sampling_strategy {sampling_strategy!r}; valid: {', '.join(SAMPLING_STRATEGIES)}")
  n = np.asarray(counts, np.int64)
  present = np.flatnonzero(n > 0)
  if not present.size:
    raise ValueError("smote_counts: every class is empty")
  majority = present[np.argmax(n[present])]
  minority = present[np.argmin(n[present])]
  chosen = np.zeros(len(n), bool)
  chosen[present] = True
  if sampling_strategy in ("auto", "not majority"):
    chosen[majority] = False
  elif sampling_strategy == "not minority":
    chosen[minority] = False
  elif sampling_strategy == "minority":
    chosen[:] = False
    chosen[minority] = True
  elif sampling_strategy == "none":
    chosen[:] = False
  return np.where(chosen, n[majority] - n, 0)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _neighbours_padded(x: Array, n: Array, k: int, chunk: int) -> Array:
  """``k`` nearest other rows of ``x[:n]`` for each row (rows ``>= n`` are padding), ``(len(x), k)``."""
  m = x.shape[0]
  valid = jnp.arange(m) < n
  # Centre first: the squared distance |a|^2 + |b|^2 - 2 a.b loses fewer digits near the mean.
  xc = x - jnp.sum(jnp.where(valid[:, None], x, 0.0), 0) / jnp.maximum(n, 1)
  sq = jnp.sum(xc * xc, axis=1)

  def block(start):
    q = jax.lax.dynamic_slice_in_dim(xc, start, chunk)
    d = sq[start + jnp.arange(chunk), None] + sq[None, :] - 2.0 * q @ xc.T
    self_col = jnp.arange(m)[None, :] == (start + jnp.arange(chunk))[:, None]
    d = jnp.where(valid[None, :] & ~self_col, d, jnp.inf)
    return jax.lax.top_k(-d, k)[1]          # ascending distance; ties: the lower index first

  return jax.lax.map(block, jnp.arange(0, m, chunk)).reshape(m, k).astype(jnp.int32)


def smote_neighbours(x, k: int = 5, chunk: int = 512) -> Array:
  """``(n, min(k, n - 1))`` int32: each row's nearest other rows of ``x`` ``(n, D)``, nearest first.

  Squared Euclidean distance in float32 (after centring), computed in blocks of ``chunk`` rows
  (memory ``O(chunk n)``); the class is padded to a power-of-two size (at least 128) so few sizes compile.
  imbalanced-learn: ``NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[:, 1:]``.
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  if x.ndim != 2 or n < 2:
    raise ValueError(f"smote_neighbours needs an (n >= 2, D) array, got shape {x.shape}")
  k = min(int(k), n - 1)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  size = max(128, 1 << (n - 1).bit_length())  # pad to a power of two (>= 128): few compiled sizes
  chunk = min(int(chunk), size)
  size = -(-size // chunk) * chunk
  padded = jnp.zeros((size, x.shape[1]), jnp.float32).at[:n].set(x)
  return _neighbours_padded(padded, jnp.int32(n), k, chunk)[:n]


def _draw_one(key: Array, t: Array, n: Array, k: Array) -> tuple[Array, Array, Array]:
  k_idx, k_step = jax.random.split(jax.random.fold_in(key, t))
  r = jax.random.randint(k_idx, (), 0, jnp.maximum(n * k, 1), dtype=jnp.int32)
  kk = jnp.maximum(k, 1)
  return r // kk, r % kk, jax.random.uniform(k_step, (), jnp.float32)


@functools.partial(jax.jit, static_argnames=("num",))
def smote_draw(key: Array, n: int, k: int, num: int) -> tuple[Array, Array, Array]:
  """``(rows, cols, steps)`` of ``num`` synthetic points of a class of ``n`` points with ``k`` neighbours.

  imbalanced-learn's ``_make_samples``: ``r ~ U{0, ..., n k - 1}``, ``rows = r // k``,
  ``cols = r mod k``, ``steps ~ U[0, 1)`` (``step_size = 1``). Point ``t`` draws from
  ``fold_in(key, t)``, so a class's first points do not depend on how many it gets.
  """
  return jax.vmap(_draw_one, in_axes=(None, 0, None, None))(key, jnp.arange(num, dtype=jnp.int32), n, k)


@jax.jit
def smote_generate(x, nn, rows, cols, steps) -> Array:
  """``x[rows] + steps (x[nn[rows, cols]] - x[rows])``: the synthetic points (float32)."""
  x = jnp.asarray(x, jnp.float32)
  base = x[rows]
  return base + jnp.asarray(steps, jnp.float32)[:, None] * (x[jnp.asarray(nn)[rows, cols]] - base)


class SmoteResult(NamedTuple):
  features: Array      # (N + S, D): the originals, then the synthetic points by ascending class
  labels: Array        # (N + S,) int32
  num_synthetic: np.ndarray  # (C,) points added per class


@jax.jit
def _synthesise(key: Array, x: Array, nn_global: Array, members: Array, starts: Array, counts: Array,
                k_c: Array, cls: Array, t: Array) -> Array:
  """All synthetic points in one program: point ``t`` of class ``cls`` draws from ``fold_in(fold_in(key, c), t)``."""
  keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(cls)
  rows, cols, steps = jax.vmap(_draw_one)(keys, t, counts[cls], k_c[cls])
  base = members[starts[cls] + rows]                               # global index of x_i
  other = jnp.where(k_c[cls] > 0, nn_global[base, cols], base)     # a one-point class: duplicates
  return x[base] + steps[:, None] * (x[other] - x[base])


def smote(key: Array, features, labels, num_classes: int, *, k_neighbors: int = 5,
          sampling_strategy: str = "auto") -> SmoteResult:
  """SMOTE over-sampling of ``(N, D)`` features with int labels.

  Every selected class is filled up to ``n_max`` (:func:`smote_counts`) with points
  interpolated between a class point and one of its ``k_neighbors`` nearest class neighbours
  (module docstring). Neighbours are searched per class (:func:`smote_neighbours`); the draws of
  class ``c`` are :func:`smote_draw` with ``fold_in(key, c)``, and every class's points are made by
  one compiled program.
  """
  x = jnp.asarray(features, jnp.float32)
  y = np.asarray(labels)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f"features must be (N, D) and labels (N,), got {x.shape} and {y.shape}")
  if not isinstance(k_neighbors, (int, np.integer)) or k_neighbors < 1:
    raise ValueError(f"k_neighbors must be an int >= 1, got {k_neighbors!r}")
  counts = np.bincount(y, minlength=num_classes)
  extra = smote_counts(counts, sampling_strategy)
  members = np.argsort(y, kind="stable").astype(np.int32)          # class blocks, ascending index
  starts = (np.cumsum(counts) - counts).astype(np.int32)
  nn_global = np.zeros((len(y), k_neighbors), np.int32)
  k_c = np.zeros(num_classes, np.int32)
  for c in np.flatnonzero((extra > 0) & (counts > 1)):
    ids = members[starts[c]:starts[c] + counts[c]]
    nn = np.asarray(smote_neighbours(x[ids], k_neighbors))
    k_c[c] = nn.shape[1]
    nn_global[ids, :nn.shape[1]] = ids[nn]
  cls = np.repeat(np.arange(num_classes, dtype=np.int32), extra)
  t = np.concatenate([np.arange(e, dtype=np.int32) for e in extra])
  pts = _synthesise(key, x, jnp.asarray(nn_global), jnp.asarray(members), jnp.asarray(starts),
                    jnp.asarray(counts, jnp.int32), jnp.asarray(k_c), jnp.asarray(cls), jnp.asarray(t))
  return SmoteResult(jnp.concatenate([x, pts]), jnp.concatenate([jnp.asarray(y, jnp.int32), jnp.asarray(cls)]),
                     extra)

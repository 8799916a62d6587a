"""Tests for lt_jax.samplers: formulas, statistical checks of the draws, jit, per-step cost."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.extend.core
import jax.numpy as jnp
from scipy import stats

from lt_jax import samplers as S

# A long-tailed training set with one empty class (index 7).
COUNTS = np.array([400, 200, 100, 50, 20, 10, 5, 0, 3])
C = len(COUNTS)
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(C), COUNTS)).astype(np.int32)
INDEX = S.build_index(LABELS, C)
NUM = 100_000
P_MIN = 1e-4  # chi-square p-value floor (draws use fixed keys: deterministic)

sample_jit = jax.jit(S.sample_indices, static_argnames="num")
class_aware_jit = jax.jit(S.class_aware_indices, static_argnames=("num", "k_per_class"))


def _expected(q):
  w = np.where(COUNTS > 0, COUNTS.astype(float) ** q, 0.0)
  return w / w.sum()


def _class_freqs(idx):
  return np.bincount(LABELS[np.asarray(idx)], minlength=C)


def _chi2_p(observed, probs):
  keep = probs > 0
  assert observed[~keep].sum() == 0, "a zero-probability class was drawn"
  return stats.chisquare(observed[keep], probs[keep] * observed.sum()).pvalue


# ---------------------------------------------------------------- formulas

def test_reversed_probs_hand_computed():
  # w = n_max / n = [1, 2, 10] -> p = [1, 2, 10] / 13
  np.testing.assert_allclose(S.reversed_probs(jnp.array([100, 50, 10])), np.array([1, 2, 10]) / 13, rtol=1e-6)


@pytest.mark.parametrize("q", [1.0, 0.5, 0.0, 2.0])
def test_class_probs_formula(q):
  np.testing.assert_allclose(S.class_probs(COUNTS, q), _expected(q), rtol=1e-5, atol=1e-7)


def test_class_probs_named_cases_and_prior_input():
  n = np.array([9.0, 4.0, 1.0])
  np.testing.assert_allclose(S.class_probs(n, 1.0), n / 14, rtol=1e-6)
  np.testing.assert_allclose(S.class_probs(n, 0.5), np.array([3, 2, 1]) / 6, rtol=1e-6)
  np.testing.assert_allclose(S.class_probs(n, 0.0), np.ones(3) / 3, rtol=1e-6)
  # a normalised prior gives the same distribution as the counts
  np.testing.assert_allclose(S.class_probs(n / n.sum(), 0.5), np.array([3, 2, 1]) / 6, rtol=1e-6)


def test_zero_count_class_gets_zero_probability():
  n = jnp.array([10, 0, 5])
  for p in (S.class_probs(n, 0.0), S.class_probs(n, 0.5), S.reversed_probs(n), S.progressive_probs(n, 0.5)):
    assert float(p[1]) == 0.0
    np.testing.assert_allclose(float(jnp.sum(p)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(S.class_probs(n, 0.0), [0.5, 0.0, 0.5])
  np.testing.assert_allclose(S.reversed_probs(n), [1 / 3, 0.0, 2 / 3], rtol=1e-6)


def test_progressive_probs():
  n = np.array([60.0, 30.0, 10.0])
  for t in (0.0, 0.25, 1.0):
    np.testing.assert_allclose(S.progressive_probs(n, t), (1 - t) * n / 100 + t / 3, rtol=1e-6)
  # empty classes leave the class set: C counts non-empty classes
  np.testing.assert_allclose(S.progressive_probs(np.array([60.0, 0.0, 40.0]), 0.5),
                             [0.5 * 0.6 + 0.25, 0.0, 0.5 * 0.4 + 0.25], rtol=1e-6)
  # traced t (schedule computed inside jit)
  f = jax.jit(lambda t: S.progressive_probs(n, t))
  np.testing.assert_allclose(f(0.25), 0.75 * n / 100 + 0.25 / 3, rtol=1e-6)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    S.progressive_probs(n, 1.5)


def test_one_sampler_vocabulary():
  from lt_jax.data import host_samplers, streaming
  assert S.SAMPLERS == ("instance", "class_balanced", "sqrt", "progressive", "class_aware", "reversed",
                       "random_under", "random_over")
  assert streaming.SAMPLERS is S.SAMPLERS and host_samplers.SAMPLERS is S.SAMPLERS
  assert not hasattr(S, "SAMPLING_SCHEMES") and not hasattr(S, "scheme_probs")
  src = open(S.__file__).read()
  assert all(f"* ``{name}``" in src for name in S.SAMPLERS)  # each one documented
  with pytest.raises(ValueError, match=", ".join(S.SAMPLERS)):
    host_samplers.HostSampler(np.zeros(4, np.int32), 1, 2, sampler="square_root")


# ---------------------------------------------------------------- index

def test_build_index_layout():
  order, starts, counts, classes = (np.asarray(a) for a in INDEX)
  np.testing.assert_array_equal(counts, COUNTS)
  np.testing.assert_array_equal(classes, np.flatnonzero(COUNTS))
  for c in range(C):
    block = order[starts[c]:starts[c] + counts[c]]
    assert np.all(LABELS[block] == c) and np.all(np.diff(block) > 0)
  with pytest.raises(ValueError, match=r"\[0, 9\)"):
    S.build_index(np.array([0, 9]), C)
  with pytest.raises(ValueError, match="integer"):
    S.build_index(np.array([0.0, 1.0]), C)


# ---------------------------------------------------------------- statistical checks

@pytest.mark.parametrize("name,probs", [
    ("instance q=1", _expected(1.0)),
    ("square_root q=1/2", _expected(0.5)),
    ("class q=0", _expected(0.0)),
    ("progressive t=0.3", 0.7 * _expected(1.0) + 0.3 * _expected(0.0)),
    ("reversed", np.where(COUNTS > 0, COUNTS.max() / np.maximum(COUNTS, 1), 0.0)),
])
def test_sample_indices_class_frequencies(name, probs):
  probs = probs / probs.sum()
  jprobs = {"progressive t=0.3": S.progressive_probs(COUNTS, 0.3),
            "reversed": S.reversed_probs(COUNTS)}.get(name, jnp.asarray(probs, jnp.float32))
  idx = sample_jit(jax.random.key(1), INDEX, jprobs, num=NUM)
  assert idx.shape == (NUM,) and idx.dtype == jnp.int32
  obs = _class_freqs(idx)
  assert _chi2_p(obs, probs) > P_MIN, (name, obs)


def test_chi_square_has_power():
  # instance-balanced draws are rejected as class-balanced: the check above means something
  idx = sample_jit(jax.random.key(1), INDEX, S.class_probs(COUNTS, 1.0), num=NUM)
  assert _chi2_p(_class_freqs(idx), _expected(0.0)) < 1e-12


def test_uniform_within_class():
  idx = np.asarray(sample_jit(jax.random.key(2), INDEX, S.class_probs(COUNTS, 0.0), num=NUM))
  for c in (0, 3):  # 400 and 50 examples
    members = np.flatnonzero(LABELS == c)
    hits = np.searchsorted(members, idx[LABELS[idx] == c])
    obs = np.bincount(hits, minlength=len(members))
    assert stats.chisquare(obs).pvalue > P_MIN


def test_raw_labels_path_equals_index_path():
  p = S.class_probs(COUNTS, 0.5)
  a = S.sample_indices(jax.random.key(3), INDEX, p, 64)
  b = jax.jit(S.sample_indices, static_argnames="num")(jax.random.key(3), jnp.asarray(LABELS), p, num=64)
  np.testing.assert_array_equal(a, b)


def test_zero_probability_and_empty_classes_never_drawn():
  # all mass on the empty class 7 and the last class 8 with zero weight: only class 0..6 may appear
  w = jnp.asarray(np.r_[np.zeros(7), 1.0, 0.0], jnp.float32)
  idx = S.sample_indices(jax.random.key(4), INDEX, w, 1000)  # no valid mass -> uniform over non-empty
  assert set(np.unique(LABELS[np.asarray(idx)])) <= set(np.flatnonzero(COUNTS))
  w = jnp.asarray(np.r_[1.0, np.zeros(8)], jnp.float32)
  assert np.all(LABELS[np.asarray(S.sample_indices(jax.random.key(5), INDEX, w, 1000))] == 0)


def _primitives(jaxpr):
  """Names of every primitive in a (closed) jaxpr, sub-jaxprs included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


def test_index_path_costs_no_sort_per_step():
  p = S.class_probs(COUNTS, 0.0)
  fast = jax.make_jaxpr(lambda k, i: S.sample_indices(k, i, p, 128))(jax.random.key(0), INDEX)
  assert "sort" not in _primitives(fast.jaxpr)
  slow = jax.make_jaxpr(lambda k, y: S.sample_indices(k, y, p, 128))(jax.random.key(0), LABELS)
  assert "sort" in _primitives(slow.jaxpr)  # the raw-label path re-sorts every call


# ---------------------------------------------------------------- class-aware

@pytest.mark.parametrize("k", [1, 4])
def test_class_aware_exactly_k_per_class_per_round(k):
  n_ne = int((COUNTS > 0).sum())
  rounds = 50
  idx = np.asarray(class_aware_jit(jax.random.key(6), INDEX, num=rounds * n_ne * k, k_per_class=k))
  cls = LABELS[idx].reshape(rounds, n_ne, k)
  assert np.all(cls == cls[:, :, :1])  # each visit: K examples of one class
  for r in range(rounds):
    np.testing.assert_array_equal(np.sort(cls[r, :, 0]), np.flatnonzero(COUNTS))  # each non-empty class once
  # the class order changes between rounds
  assert len({tuple(cls[r, :, 0]) for r in range(rounds)}) > rounds // 2


def test_class_aware_stream_continues_across_calls():
  key = jax.random.key(7)
  whole = class_aware_jit(key, INDEX, num=90, k_per_class=4)
  parts = [class_aware_jit(key, INDEX, num=30, k_per_class=4, start=jnp.int32(30 * s)) for s in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_class_aware_uniform_within_class():
  idx = np.asarray(class_aware_jit(jax.random.key(8), INDEX, num=8 * 4 * 2500, k_per_class=4))
  members = np.flatnonzero(LABELS == 1)  # 200 examples, 10,000 draws
  obs = np.bincount(np.searchsorted(members, idx[LABELS[idx] == 1]), minlength=len(members))
  assert obs.sum() == 10_000
  assert stats.chisquare(obs).pvalue > P_MIN


def check_class_aware_passes(stream: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> int:
  """Every pass over a class (its draws ``p n_c ... (p + 1) n_c - 1``) is a permutation of its examples.

  Shared with tests/test_streaming.py (the host twin). Returns the number of complete passes checked.
  """
  y = labels[stream]
  checked = 0
  for c in np.flatnonzero(counts):
    members, ex, n_c = np.flatnonzero(labels == c), stream[y == c], int(counts[c])
    for p in range(len(ex) // n_c):
      np.testing.assert_array_equal(np.sort(ex[p * n_c:(p + 1) * n_c]), members)
      checked += 1
    assert len(set(ex[(len(ex) // n_c) * n_c:])) == len(ex) % n_c  # the partial pass repeats nothing
  return checked


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 100, 1000, 4097])
def test_within_class_permutation_is_a_permutation(n):
  f = jax.jit(jax.vmap(S.within_class_permutation, in_axes=(None, 0, None)))
  a = np.asarray(f(jax.random.key(0), jnp.arange(n), n))
  np.testing.assert_array_equal(np.sort(a), np.arange(n))
  if n >= 8:  # not the identity, and another key gives another order
    assert not np.array_equal(a, np.arange(n))
    assert not np.array_equal(a, np.asarray(f(jax.random.key(1), jnp.arange(n), n)))


def test_class_aware_draws_without_replacement_within_each_pass():
  """The reference's RandomCycleIter per class: each pass over a class draws every example once, reshuffled."""
  key = jax.random.key(9)
  n_ne, k = int((COUNTS > 0).sum()), 4
  num = 100 * n_ne * k  # 400 draws per class: 1 pass of class 0, 2 of class 1, ..., 133 of class 8
  whole = np.asarray(class_aware_jit(key, INDEX, num=num, k_per_class=k))
  # The stream continued across calls (as the train step calls it) is the same stream.
  parts = [class_aware_jit(key, INDEX, num=num // 8, k_per_class=k, start=jnp.int32(s * num // 8)) for s in range(8)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  assert check_class_aware_passes(whole, LABELS, COUNTS) == sum(400 // n for n in COUNTS if n)
  # Passes are reshuffled: class 6 (5 examples, 80 passes) does not repeat one order.
  ex = whole[LABELS[whole] == 6].reshape(80, 5)
  assert len({tuple(r) for r in ex}) > 40


def test_class_aware_checks():
  with pytest.raises(ValueError, match="SamplerIndex"):
    S.class_aware_indices(jax.random.key(0), LABELS, 8)
  with pytest.raises(ValueError, match="k_per_class"):
    S.class_aware_indices(jax.random.key(0), INDEX, 8, 0)
  with pytest.raises(ValueError, match="num"):
    S.sample_indices(jax.random.key(0), INDEX, S.class_probs(COUNTS, 0.0), -1)


# ---------------------------------------------------------------- instance

def test_instance_indices():
  a = np.asarray(S.instance_indices(jax.random.key(9), 50, 20_000))
  assert a.min() >= 0 and a.max() < 50
  assert stats.chisquare(np.bincount(a, minlength=50)).pvalue > P_MIN
  b = np.asarray(jax.jit(S.instance_indices, static_argnums=(1, 2), static_argnames="replace")(
      jax.random.key(9), 50, 50, replace=False))
  np.testing.assert_array_equal(np.sort(b), np.arange(50))
  with pytest.raises(ValueError, match="num <= num_examples"):
    S.instance_indices(jax.random.key(9), 5, 6, replace=False)


# ---------------------------------------------------------------- dataset-level under / over-sampling

resampled_jit = jax.jit(S.resampled_indices, static_argnames=("num", "mode"))  # target, redraw traced
# A small set for the pass-level checks (several passes in a few calls): one empty class.
RS_COUNTS = np.array([12, 7, 0, 3, 1, 5])
RS_LABELS = np.random.default_rng(3).permutation(np.repeat(np.arange(6), RS_COUNTS)).astype(np.int32)
RS_INDEX = S.build_index(RS_LABELS, 6)


def test_resample_counts_hand_worked():
  # COUNTS = [400, 200, 100, 50, 20, 10, 5, 0, 3]: n_min = 3 (the empty class stays empty), n_max = 400
  np.testing.assert_array_equal(S.resample_counts(COUNTS, "random_under"), [3] * 7 + [0, 3])
  np.testing.assert_array_equal(S.resample_counts(COUNTS, "random_under", 30), [30, 30, 30, 30, 20, 10, 5, 0, 3])
  np.testing.assert_array_equal(S.resample_counts(COUNTS, "random_over"), [400] * 7 + [0, 400])
  np.testing.assert_array_equal(S.resample_counts(COUNTS, "random_over", 100), [400, 200, 100, 100, 100, 100, 100,
                                                                                0, 100])
  with pytest.raises(ValueError, match="random_under, random_over"):
    S.resample_counts(COUNTS, "smote")


def _passes(stream, m):
  total = int(np.sum(m))
  assert len(stream) % total == 0
  return np.asarray(stream).reshape(-1, total)


def _check_pass(ids, m, mode):
  """One pass: exactly m_c examples of class c; under: distinct; over: every example of the class."""
  np.testing.assert_array_equal(np.bincount(RS_LABELS[ids], minlength=6), m)
  for c in np.flatnonzero(m):
    mine = ids[RS_LABELS[ids] == c]
    members = np.flatnonzero(RS_LABELS == c)
    if mode == "random_under":
      assert len(np.unique(mine)) == m[c]                      # without replacement
    else:
      assert set(mine) == set(members)                          # every original at least once, nothing else


@pytest.mark.parametrize("mode,target", [("random_under", 0), ("random_under", 3), ("random_over", 0),
                                         ("random_over", 6)])
def test_resampled_realised_counts_on_device_and_on_the_host(mode, target):
  """Every pass holds exactly m_c examples of class c, on device and on the host, fixed or redrawn."""
  from lt_jax.data import host_samplers
  m = np.asarray(S.resample_counts(RS_COUNTS, mode, target))
  np.testing.assert_array_equal(m, {("random_under", 0): [1, 1, 0, 1, 1, 1], ("random_under", 3): [3, 3, 0, 3, 1, 3],
                                    ("random_over", 0): [12, 12, 0, 12, 12, 12],
                                    ("random_over", 6): [12, 7, 0, 6, 6, 6]}[(mode, target)])
  total, b, num_passes = int(m.sum()), 16, 6
  steps = -(-num_passes * total // b)
  hs = host_samplers.HostSampler(RS_LABELS, 6, b, sampler=mode, seed=5, resample_target=target)
  for redraw in (False, True):
    hs.resample_redraw, hs._pass_cache = redraw, {}
    # several passes read in batches of b that straddle pass boundaries (start = step * b), as the train step
    device = np.concatenate([np.asarray(resampled_jit(jax.random.key(5), RS_INDEX, b, mode, target=target,
                                                       start=b * t, redraw=redraw)) for t in range(steps)])
    host = np.concatenate([hs.indices(t) for t in range(steps)])
    for stream in (device[:num_passes * total], host[:num_passes * total]):
      passes = _passes(stream, m)
      for ids in passes:
        _check_pass(ids, m, mode)
      assert len({p.tobytes() for p in passes}) > 1          # a fresh visiting order every pass
      same_set = all(np.array_equal(np.sort(passes[0]), np.sort(p)) for p in passes[1:])
      if (mode, target) != ("random_over", 6) or redraw is False:  # (over to 6 redraws only 3 duplicates)
        assert same_set == (not redraw), (mode, redraw)    # fixed: one resampled set; redraw: new ones
    if mode == "random_over":  # m_c - n_c duplicates of class c per pass
      ids = _passes(device[:num_passes * total], m)[0]
      dup = np.array([np.sum(RS_LABELS[ids] == c) - RS_COUNTS[c] for c in range(6)])
      np.testing.assert_array_equal(dup, m - RS_COUNTS)


def test_resampled_duplicates_are_uniform_within_the_class():
  """random_over with redraw: the m_c - n_c duplicates of a class hit its examples uniformly."""
  stream = np.concatenate([np.asarray(resampled_jit(jax.random.key(2), RS_INDEX, 16, "random_over", target=0,
                                                    start=16 * t, redraw=True)) for t in range(1500)])
  ids = stream[RS_LABELS[stream] == 5]     # 5 examples + 7 duplicates per pass, 400 passes
  freq = np.bincount(np.searchsorted(np.flatnonzero(RS_LABELS == 5), ids), minlength=5)
  assert freq.sum() == 400 * 12 and stats.chisquare(freq).pvalue > P_MIN

"""Tests for lt_jax.mixing: Mixup, CutMix, Remix against formulas and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from lt_jax import losses, mixing

B, H, W, CH, C = 8, 6, 5, 3, 4


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, H, W, CH)).astype(np.float32)
  y = rng.integers(0, C, size=B).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _onehot(y, c=C):
  return np.eye(c, dtype=np.float32)[np.asarray(y)]


# ----------------------------------------------------------------------------- Remix


def _pairs(y_i, y_j):
  """Labels and perm so that example k < n has label y_i[k] and partner label y_j[k]."""
  n = len(y_i)
  labels = jnp.asarray(np.concatenate([y_i, y_j]), jnp.int32)
  perm = jnp.asarray(np.concatenate([np.arange(n) + n, np.arange(n)]), jnp.int32)
  return labels, perm


def test_remix_weights_hand_worked():
  counts = jnp.array([300, 100, 30])
  # pairs (y_i, y_j):  ratios n_i/n_j = 3 (boundary), 10, 3.33, 1/3, 0.1, 0.3, 1
  y_i = np.array([0, 0, 1, 1, 2, 2, 0])
  y_j = np.array([1, 2, 2, 0, 0, 1, 0])
  labels, perm = _pairs(y_i, y_j)
  n = len(y_i)
  # lam = 0.3 < tau: rule 1 (w = 0) where n_i / n_j >= 3, default 0.3 elsewhere.
  w = mixing.remix_weights(labels, perm, 0.3, counts)[:n]
  np.testing.assert_allclose(w, [0, 0, 0, 0.3, 0.3, 0.3, 0.3], rtol=1e-6)
  # lam = 0.8, 1 - lam < tau: rule 2 (w = 1) where n_i * 3 / n_j <= 1 (100*3/300 = 1: boundary).
  w = mixing.remix_weights(labels, perm, 0.8, counts)[:n]
  np.testing.assert_allclose(w, [0.8, 0.8, 0.8, 1, 1, 1, 0.8], rtol=1e-6)
  # lam = tau = 0.5: both share conditions are strict -> default everywhere.
  w = mixing.remix_weights(labels, perm, 0.5, counts)[:n]
  np.testing.assert_allclose(w, np.full(n, 0.5), rtol=1e-6)
  # ratio just below kappa (2.9) keeps the default
  w = mixing.remix_weights(*_pairs(np.array([0]), np.array([1])), 0.3, jnp.array([290, 100]))
  np.testing.assert_allclose(w, [0.3, 0.3], rtol=1e-6)
  # other kappa / tau: kappa=2, tau=0.4, lam=0.35: 300/100 >= 2 -> 0; 100/30 >= 2 -> 0; 1 -> 0.35
  w = mixing.remix_weights(*_pairs(np.array([0, 1, 0]), np.array([1, 2, 0])), 0.35, counts,
                           kappa=2.0, tau=0.4)[:3]
  np.testing.assert_allclose(w, [0, 0, 0.35], rtol=1e-6)


def test_remix_rule_symmetry_and_zero_counts():
  counts = jnp.array([300, 100, 30])
  y_i, y_j = np.array([0, 0, 1, 1, 2, 2]), np.array([1, 2, 2, 0, 0, 1])
  labels, perm = _pairs(y_i, y_j)
  n = len(y_i)
  for lam in (0.1, 0.3, 0.7, 0.9):
    # the weight of class y_i in pair (i, j) at lam equals 1 - weight of y_j seen from j at 1 - lam
    w = np.asarray(mixing.remix_weights(labels, perm, lam, counts))
    w_sw = np.asarray(mixing.remix_weights(labels, perm, 1.0 - lam, counts))
    np.testing.assert_allclose(w[:n], 1.0 - w_sw[n:], atol=1e-6)
  # zero count: safe_counts -> 0.5 * min positive = 100, so n = [300, 100, 200]; no NaN
  w = mixing.remix_weights(*_pairs(np.array([0]), np.array([1])), 0.2, jnp.array([300, 0, 200]))
  np.testing.assert_allclose(w, [0.0, 0.2], rtol=1e-6)


def test_remix_targets_and_loss_identity():
  x, y = _batch(1)
  counts = jnp.array([500, 100, 20, 5])
  key = jax.random.key(3)
  mixed, t, lam, perm = mixing.remix(key, x, y, counts, C, alpha=1.0)
  m2, _, lam2, perm2 = mixing.mixup(key, x, y, C, alpha=1.0)
  np.testing.assert_array_equal(mixed, m2)
  assert float(lam) == float(lam2)
  np.testing.assert_array_equal(perm, perm2)
  w = np.asarray(mixing.remix_weights(y, perm, lam, counts))
  yj = np.asarray(y)[np.asarray(perm)]
  np.testing.assert_allclose(t, w[:, None] * _onehot(y) + (1 - w[:, None]) * _onehot(yj), atol=1e-6)
  np.testing.assert_allclose(np.sum(t, axis=-1), np.ones(B), rtol=1e-6)
  z = jax.random.normal(jax.random.key(9), (B, C))
  ce = losses.softmax_cross_entropy(z, t)
  ref = w * losses.softmax_cross_entropy(z, y) + (1 - w) * losses.softmax_cross_entropy(z, jnp.asarray(yj))
  np.testing.assert_allclose(ce, ref, rtol=1e-5, atol=1e-6)
  # hand-worked targets
  labels, perm = _pairs(np.array([0]), np.array([3]))
  t = mixing.remix_targets(labels, perm, 0.3, counts, C)
  # row 0 (class 0 mixed with tail class 3): 0.3 < 0.5 and 500/5 >= 3 -> w = 0, all label mass
  # to the tail. Row 1 (class 3 with partner 0, the same lam = 0.3): 1 - 0.3 is not < 0.5,
  # so no rule fires and w = lam: the tail's image share is 0.3, so the tail gets 0.3.
  np.testing.assert_allclose(t, [[0, 0, 0, 1], [0.7, 0, 0, 0.3]], atol=1e-6)


def test_remix_errors():
  x, y = _batch()
  with pytest.raises(ValueError, match="int class indices"):
    mixing.remix_targets(jnp.asarray(_onehot(y)), jnp.arange(B), 0.3, jnp.ones(C), C)
  with pytest.raises(ValueError, match="kappa"):
    mixing.remix_weights(y, jnp.arange(B), 0.3, jnp.ones(C), kappa=0.0)


# ----------------------------------------------------------------------------- Mixup


def test_mixup_convexity_and_targets():
  x, y = _batch()
  mixed, t, lam, perm = mixing.mixup(jax.random.key(0), x, y, C, alpha=1.0)
  lam_f, p = float(lam), np.asarray(perm)
  assert 0.0 <= lam_f <= 1.0 and lam.dtype == jnp.float32
  assert sorted(p.tolist()) == list(range(B))
  assert mixed.dtype == jnp.float32 and mixed.shape == x.shape
  xn = np.asarray(x)
  np.testing.assert_allclose(mixed, lam_f * xn + (1 - lam_f) * xn[p], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t, lam_f * _onehot(y) + (1 - lam_f) * _onehot(np.asarray(y)[p]), atol=1e-6)
  np.testing.assert_allclose(np.sum(t, axis=-1), np.ones(B), rtol=1e-6)
  # CE against the soft targets = lam CE(y_i) + (1 - lam) CE(y_j)
  z = jax.random.normal(jax.random.key(1), (B, C))
  ref = (lam_f * losses.softmax_cross_entropy(z, y)
         + (1 - lam_f) * losses.softmax_cross_entropy(z, jnp.asarray(np.asarray(y)[p])))
  np.testing.assert_allclose(losses.softmax_cross_entropy(z, t), ref, rtol=1e-5, atol=1e-6)
  # soft input labels and uint8 images
  soft = jnp.asarray(_onehot(y) * 0.5 + 0.125)
  xi = jnp.asarray(np.arange(B * 4).reshape(B, 4) % 255, jnp.uint8)
  m2, t2, lam2, p2 = mixing.mixup(jax.random.key(0), xi, soft, C)
  l2 = float(lam2)
  sn, xf, p2 = np.asarray(soft), np.asarray(xi, np.float32), np.asarray(p2)
  np.testing.assert_allclose(t2, l2 * sn + (1 - l2) * sn[p2], atol=1e-6)
  np.testing.assert_allclose(m2, l2 * xf + (1 - l2) * xf[p2], rtol=1e-5, atol=1e-4)


def test_mixup_alpha_zero_and_errors():
  x, y = _batch()
  mixed, t, lam, _ = mixing.mixup(jax.random.key(0), x, y, C, alpha=0.0)
  assert float(lam) == 1.0
  np.testing.assert_array_equal(mixed, x)
  np.testing.assert_array_equal(t, _onehot(y))
  with pytest.raises(ValueError, match="alpha"):
    mixing.mixup(jax.random.key(0), x, y, C, alpha=-1.0)
  with pytest.raises(ValueError, match="labels"):
    mixing.mixup(jax.random.key(0), x, y[:3], C)


def test_mixup_lambda_distribution():
  # Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)): 1/12 for a = 1 (drawn as a uniform),
  # 0.1786 for a = 0.2 (jax.random.beta). 512 draws, vmapped over keys.
  x, y = _batch()
  keys = jax.random.split(jax.random.key(5), 512)
  for a in (1.0, 0.2):
    lams = np.asarray(jax.vmap(lambda k: mixing.mixup(k, x, y, C, a)[2])(keys))
    assert lams.min() >= 0.0 and lams.max() <= 1.0
    assert abs(lams.mean() - 0.5) < 0.05
    assert abs(lams.var() - 1.0 / (4 * (2 * a + 1))) < 0.02


# ----------------------------------------------------------------------------- CutMix


def test_cutmix_area_equals_mask_mean():
  x = jnp.broadcast_to(jnp.arange(1, B + 1, dtype=jnp.float32)[:, None, None, None], (B, H, W, CH))
  _, y = _batch()
  for seed in range(6):
    mixed, t, lam, perm = mixing.cutmix(jax.random.key(seed), x, y, C, alpha=1.0)
    lam_f, p = float(lam), np.asarray(perm)
    m = np.asarray(mixed)
    for i in range(B):
      if p[i] == i:
        continue
      pasted = m[i, :, :, 0] == p[i] + 1  # pixels that came from the partner
      assert np.all((m[i, :, :, 0] == i + 1) | pasted)
      assert np.all(m[i][pasted] == p[i] + 1)  # every channel
      np.testing.assert_allclose(pasted.mean(), 1.0 - lam_f, atol=1e-6)
      if pasted.any():  # a rectangle
        rows, cols = np.nonzero(pasted)
        assert pasted.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    np.testing.assert_allclose(t, lam_f * _onehot(y) + (1 - lam_f) * _onehot(np.asarray(y)[p]), atol=1e-6)
    np.testing.assert_allclose(np.sum(t, axis=-1), np.ones(B), rtol=1e-6)


def test_cutmix_box_geometry():
  keys = jax.random.split(jax.random.key(0), 64)
  for lam in (0.0, 0.3, 0.75, 1.0):
    masks, lam_adj = jax.vmap(lambda k: mixing.cutmix_box(k, 32, 32, lam))(keys)
    np.testing.assert_allclose(lam_adj, 1.0 - np.asarray(masks).mean(axis=(1, 2)), atol=1e-6)
    if lam == 1.0:
      assert not np.asarray(masks).any()
    # floor(32 sqrt(1 - lam)) // 2 * 2 is the unclipped side: the box never exceeds it
    side = (int(np.floor(32 * np.sqrt(1 - lam))) // 2) * 2
    assert np.all(np.asarray(masks).sum(axis=(1, 2)) <= side * side)
  with pytest.raises(ValueError, match="height"):
    mixing.cutmix_box(jax.random.key(0), 0, 2, 0.5)


def test_cutmix_grayscale_and_errors():
  _, y = _batch()
  x = jax.random.normal(jax.random.key(0), (B, H, W))
  mixed, t, lam, perm = mixing.cutmix(jax.random.key(2), x, y, C)
  assert mixed.shape == x.shape
  with pytest.raises(ValueError, match="H, W"):
    mixing.cutmix(jax.random.key(2), jnp.ones((B, 5)), y, C)


# ----------------------------------------------------------------------------- jit / grad


def test_jit_vmap_grad_safe():
  x, y = _batch(2)
  counts = jnp.array([500, 100, 20, 5])
  key = jax.random.key(4)
  jit_static = dict(static_argnames=("num_classes",))
  cases = ((mixing.mixup, (key, x, y), {}), (mixing.cutmix, (key, x, y), {}),
           (mixing.remix, (key, x, y, counts), {}))
  for fn, args, kw in cases:
    eager = fn(*args, num_classes=C, **kw)
    jitted = jax.jit(fn, **jit_static)(*args, num_classes=C, **kw)
    for a, b in zip(eager, jitted):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # traced alpha, kappa, tau (a traced alpha always goes through jax.random.beta, so its draw
  # differs from the Python alpha == 1 uniform draw; check self-consistency instead)
  f = jax.jit(lambda k, a, kap, tau: mixing.remix(k, x, y, counts, C, a, kap, tau))
  mixed, t, lam, perm = f(key, 1.0, 3.0, 0.5)
  assert 0.0 <= float(lam) <= 1.0
  np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[perm], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t, mixing.remix_targets(y, perm, lam, counts, C), atol=1e-6)
  # gradient through the mixed images
  g = jax.grad(lambda im: jnp.sum(mixing.cutmix(key, im, y, C)[0] ** 2))(x)
  assert np.all(np.isfinite(g))


def test_remix_per_example_rule_differs_from_bagoftricks_batch_mean():
  """lt_jax's Remix loss is the paper's per-example rule, not BagofTricks-LT's batch-mean form.

  Re-derived in float64: per-example ``mean_i(w_i CE_i(y_i) + (1 - w_i) CE_i(y_j))`` (Chou et al.;
  lt_jax, via :func:`mixing.remix_targets`) and BagofTricks' ``combiner.remix`` with a mean-reducing
  criterion ``mean(w) mean_i CE_i(y_i) + (1 - mean(w)) mean_i CE_i(y_j)``.
  """
  counts = np.array([500, 100, 20, 5])
  y = np.array([0, 0, 1, 3, 2, 0])
  perm = np.array([3, 2, 5, 0, 1, 4])  # pairs (0,3), (0,1), (1,0), (3,0), (2,0), (0,2)
  lam = 0.3
  w = np.asarray(mixing.remix_weights(jnp.asarray(y), jnp.asarray(perm), lam, jnp.asarray(counts)), np.float64)
  assert np.ptp(w) > 0  # the rule fired for some pairs, not others
  z = np.asarray(jax.random.normal(jax.random.key(4), (6, 4)), np.float64) * 2
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce_a, ce_b = -logp[np.arange(6), y], -logp[np.arange(6), y[perm]]
  per_example = np.mean(w * ce_a + (1 - w) * ce_b)
  batch_mean = w.mean() * ce_a.mean() + (1 - w.mean()) * ce_b.mean()
  assert abs(per_example - batch_mean) > 1e-2
  t = mixing.remix_targets(jnp.asarray(y), jnp.asarray(perm), lam, jnp.asarray(counts), 4)
  got = losses.reduce_mean(losses.softmax_cross_entropy(jnp.asarray(z, jnp.float32), t))
  np.testing.assert_allclose(got, per_example, rtol=1e-5)
  got_bot = mixing.remix_batch_mean_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(perm), w)
  np.testing.assert_allclose(got_bot, batch_mean, rtol=1e-5)
  # Equal weights (plain Mixup): the two forms coincide.
  same = mixing.remix_batch_mean_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(perm),
                                      np.full(6, lam))
  np.testing.assert_allclose(same, np.mean(lam * ce_a + (1 - lam) * ce_b), rtol=1e-5)

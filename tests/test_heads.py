"""Tests for lt_jax.heads: numbers against NumPy formulas and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from lt_jax import heads, priors

B, D, C = 8, 5, 4


def _rng(seed=0):
  return np.random.default_rng(seed)


def _np_normalize(x, axis):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- heads


def test_linear_head_params_and_formula():
  f = _rng().normal(size=(B, D)).astype(np.float32)
  head = heads.LinearHead(C)
  v = head.init(jax.random.key(0), jnp.asarray(f))
  p = v["params"]
  assert set(p) == {"kernel", "bias"}
  assert p["kernel"].shape == (D, C) and p["bias"].shape == (C,)
  # a non-zero bias so the formula test sees it
  p = {"kernel": p["kernel"], "bias": jnp.arange(C, dtype=jnp.float32)}
  z = head.apply({"params": p}, jnp.asarray(f))
  assert z.dtype == jnp.float32 and z.shape == (B, C)
  np.testing.assert_allclose(z, f @ np.asarray(p["kernel"]) + np.arange(C), rtol=1e-5, atol=1e-5)
  v2 = heads.LinearHead(C, use_bias=False).init(jax.random.key(0), jnp.asarray(f))
  assert set(v2["params"]) == {"kernel"}


def test_bias_initializers():
  f = jnp.zeros((2, D))
  v = heads.LinearHead(10, bias_init=heads.sigmoid_prior_bias_init()).init(jax.random.key(0), f)
  np.testing.assert_allclose(v["params"]["bias"], np.full(10, -np.log(9.0)), rtol=1e-6)
  # RetinaNet pi = 0.01: b = -log(99)
  b = heads.sigmoid_prior_bias_init(0.01)(jax.random.key(0), (3,))
  np.testing.assert_allclose(b, np.full(3, -np.log(99.0)), rtol=1e-6)
  counts = jnp.array([50.0, 30.0, 20.0])
  v = heads.LinearHead(3, bias_init=heads.prior_bias_init(counts, tau=2.0)).init(jax.random.key(0), f)
  np.testing.assert_allclose(v["params"]["bias"], 2.0 * np.log([0.5, 0.3, 0.2]), rtol=1e-6)
  # zero logits from W f -> softmax of the bias is the prior (tau=1)
  v = heads.LinearHead(3, bias_init=heads.prior_bias_init(counts)).init(jax.random.key(0), f)
  z = heads.LinearHead(3).apply(v, f)
  np.testing.assert_allclose(jax.nn.softmax(z), np.tile([0.5, 0.3, 0.2], (2, 1)), rtol=1e-6)
  with pytest.raises(ValueError):
    heads.LinearHead(4, bias_init=heads.prior_bias_init(counts)).init(jax.random.key(0), f)
  with pytest.raises(ValueError):
    heads.sigmoid_prior_bias_init(1.5)


def test_cosine_head_matches_numpy_and_range():
  rng = _rng(1)
  f = rng.normal(size=(B, D)).astype(np.float32)
  f[0] = 0.0  # zero feature: finite, zero logits
  for scale in (1.0, 16.0):
    head = heads.CosineHead(C, scale=scale)
    v = head.init(jax.random.key(1), jnp.asarray(f))
    assert set(v["params"]) == {"kernel"}
    w = np.asarray(v["params"]["kernel"])
    z = np.asarray(head.apply(v, jnp.asarray(f)))
    ref = scale * (_np_normalize(f, 1) @ _np_normalize(w, 0))
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5 * scale)
    assert np.all(np.isfinite(z)) and np.all(z[0] == 0.0)
    assert np.all(np.abs(z) <= scale * (1 + 1e-6))
  # a feature parallel to a weight column gives exactly +-scale
  w = np.asarray(v["params"]["kernel"])
  z = head.apply(v, jnp.asarray(np.stack([3.0 * w[:, 2], -w[:, 2]])))
  np.testing.assert_allclose(z[:, 2], [16.0, -16.0], rtol=1e-5)
  # gradient finite at zero features
  g = jax.grad(lambda x: head.apply(v, x).sum())(jnp.zeros((2, D)))
  assert np.all(np.isfinite(g))


def test_lws_head_formula_and_from_linear():
  rng = _rng(2)
  f = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  lin = heads.LinearHead(C)
  lv = lin.init(jax.random.key(2), f)
  lv = {"params": {"kernel": lv["params"]["kernel"], "bias": jnp.asarray(rng.normal(size=C), jnp.float32)}}
  lws = heads.LWSHead(C)
  v = lws.init(jax.random.key(3), f)
  assert set(v["params"]) == {"kernel", "bias", "scales"}
  np.testing.assert_array_equal(v["params"]["scales"], np.ones(C))
  s = jnp.asarray([0.5, 1.0, 2.0, 3.0])
  p = {**lv["params"], "scales": s}
  z = lws.apply({"params": p}, f)
  ref = (np.asarray(f) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])) * np.asarray(s)
  np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
  # lws_from_linear reproduces the trained linear head exactly, nested or not
  lwsv = heads.lws_from_linear(lv)
  assert set(lwsv["params"]) == {"kernel", "bias", "scales"} and "scales" not in lv["params"]
  np.testing.assert_array_equal(lws.apply(lwsv, f), lin.apply(lv, f))
  inner = heads.lws_from_linear(lv["params"])
  np.testing.assert_array_equal(lws.apply({"params": inner}, f), lin.apply(lv, f))
  # without bias
  nb = heads.LinearHead(C, use_bias=False)
  nv = nb.init(jax.random.key(4), f)
  np.testing.assert_array_equal(heads.LWSHead(C, use_bias=False).apply(heads.lws_from_linear(nv), f),
                                nb.apply(nv, f))
  with pytest.raises(ValueError):
    heads.lws_from_linear({"params": {"bias": jnp.zeros(C)}})


def test_heads_jit_and_bfloat16():
  rng = _rng(3)
  f32 = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  f16 = f32.astype(jnp.bfloat16)
  for head in (heads.LinearHead(C), heads.CosineHead(C, scale=16.0), heads.LWSHead(C)):
    v = head.init(jax.random.key(0), f16)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(v))
    z16 = jax.jit(head.apply)(v, f16)
    z32 = head.apply(v, f16.astype(jnp.float32))
    assert z16.dtype == jnp.float32 and z16.shape == (B, C)
    np.testing.assert_allclose(z16, z32, rtol=1e-6, atol=1e-6)  # bf16 input, f32 compute
    np.testing.assert_allclose(z16, head.apply(v, f32), rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------- tau-norm


def test_weight_norms_and_tau_normalize():
  rng = _rng(4)
  k = rng.normal(size=(D, C)).astype(np.float32) * np.array([1.0, 2.0, 0.5, 3.0], np.float32)
  np.testing.assert_allclose(heads.weight_norms(k), np.linalg.norm(k, axis=0), rtol=1e-6)
  np.testing.assert_array_equal(heads.tau_normalize(k, 0.0), k)  # exact identity
  np.testing.assert_allclose(np.linalg.norm(heads.tau_normalize(k, 1.0), axis=0), np.ones(C), rtol=1e-6)
  for tau in (0.3, 1.0, 1.7):
    ref = k / np.linalg.norm(k, axis=0, keepdims=True) ** tau
    np.testing.assert_allclose(heads.tau_normalize(k, tau), ref, rtol=1e-5)
  # hand-worked: column (3, 4) has norm 5; tau = 2 -> (3, 4) / 25
  np.testing.assert_allclose(heads.tau_normalize(np.array([[3.0], [4.0]]), 2.0), [[0.12], [0.16]], rtol=1e-6)
  # zero column stays zero, finite gradient
  kz = k.copy()
  kz[:, 1] = 0.0
  out = heads.tau_normalize(kz, 1.0)
  assert np.all(np.isfinite(out)) and np.all(np.asarray(out)[:, 1] == 0.0)
  g = jax.grad(lambda w: heads.tau_normalize(w, 1.0).sum())(jnp.asarray(kz))
  assert np.all(np.isfinite(g))
  # logits drop the bias; vmap over the reference grid equals a loop
  f = rng.normal(size=(B, D)).astype(np.float32)
  taus = jnp.linspace(0.0, 2.0, 21)
  grid = jax.jit(jax.vmap(heads.tau_norm_logits, in_axes=(None, None, 0)))(f, k, taus)
  for i, t in enumerate(np.asarray(taus)):
    np.testing.assert_allclose(grid[i], f @ (k / np.linalg.norm(k, axis=0) ** t), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- posthoc


def test_posthoc_adjust_formula():
  rng = _rng(5)
  z = rng.normal(size=(B, C)).astype(np.float32)
  counts = np.array([600.0, 250.0, 100.0, 50.0])
  pi = counts / counts.sum()
  np.testing.assert_allclose(heads.posthoc_adjust(z, counts), z - np.log(pi), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(heads.posthoc_adjust(z, pi, tau=0.5), z - 0.5 * np.log(pi), rtol=1e-5, atol=1e-5)
  tgt = np.array([0.1, 0.2, 0.3, 0.4])
  np.testing.assert_allclose(heads.posthoc_adjust(z, counts, tau=1.5, target_prior=tgt),
                             z - 1.5 * (np.log(pi) - np.log(tgt)), rtol=1e-5, atol=1e-5)
  # target = training prior: no change; uniform target = balanced up to a constant
  np.testing.assert_allclose(heads.posthoc_adjust(z, counts, tau=2.0, target_prior=counts), z, atol=1e-6)
  np.testing.assert_array_equal(
      np.argmax(heads.posthoc_adjust(z, counts, target_prior=pi), -1), np.argmax(z, -1))
  uni = heads.posthoc_adjust(z, counts, target_prior=np.ones(C))
  np.testing.assert_allclose(uni, heads.posthoc_adjust(z, counts) - np.log(C), rtol=1e-5, atol=1e-5)
  # hand-worked: z = 0, pi = (0.8, 0.2): balanced adjust favours the tail class
  out = heads.posthoc_adjust(jnp.zeros((1, 2)), jnp.array([0.8, 0.2]))
  np.testing.assert_allclose(out, [[-np.log(0.8), -np.log(0.2)]], rtol=1e-6)
  # zero-count class goes through the zero-count rule: n = (4, 0) -> (4, 2)
  np.testing.assert_allclose(heads.posthoc_adjust(jnp.zeros((1, 2)), jnp.array([4.0, 0.0])),
                             [[-np.log(4 / 6), -np.log(2 / 6)]], rtol=1e-6)
  assert heads.posthoc_adjust(jnp.asarray(z, jnp.bfloat16), counts).dtype == jnp.float32
  with pytest.raises(ValueError):
    heads.posthoc_adjust(z, np.ones(C + 1))


def test_posthoc_adjust_vmap_tau_and_targets():
  rng = _rng(6)
  z = jnp.asarray(rng.normal(size=(B, C)), jnp.float32)
  counts = jnp.array([600.0, 250.0, 100.0, 50.0])
  taus = jnp.linspace(0.0, 2.0, 9)
  out = jax.jit(jax.vmap(heads.posthoc_adjust, in_axes=(None, None, 0)))(z, counts, taus)
  for i, t in enumerate(taus):
    np.testing.assert_allclose(out[i], heads.posthoc_adjust(z, counts, tau=float(t)), rtol=1e-6, atol=1e-6)
  targets = jnp.asarray(rng.dirichlet(np.ones(C), size=3), jnp.float32)
  out = jax.vmap(lambda t: heads.posthoc_adjust(z, counts, 1.0, t))(targets)
  for i in range(3):
    np.testing.assert_allclose(out[i], heads.posthoc_adjust(z, counts, 1.0, targets[i]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- NCM


def test_class_means_matches_numpy_loop():
  rng = _rng(7)
  f = rng.normal(size=(12, D)).astype(np.float32)
  y = np.array([0, 0, 1, 2, 2, 2, 0, 1, 2, 0, 1, 0])  # class 3 absent
  means, counts = jax.jit(heads.class_means, static_argnums=2)(f, y, C)
  np.testing.assert_array_equal(counts, np.bincount(y, minlength=C))
  for c in range(C):
    ref = f[y == c].mean(0) if np.any(y == c) else np.zeros(D)
    np.testing.assert_allclose(means[c], ref, rtol=1e-5, atol=1e-6)
  m = np.ones(12, bool)
  m[[0, 3, 4]] = False
  means, counts = heads.class_means(f, y, C, mask=m)
  np.testing.assert_array_equal(counts, np.bincount(y[m], minlength=C))
  for c in range(3):
    np.testing.assert_allclose(means[c], f[m & (y == c)].mean(0), rtol=1e-5, atol=1e-6)
  # out-of-range labels (e.g. -1 padding) are ignored
  means2, counts2 = heads.class_means(np.concatenate([f, f[:2]]), np.concatenate([y, [-1, C]]), C)
  np.testing.assert_array_equal(counts2, np.bincount(y, minlength=C))


def test_ncm_matches_numpy():
  rng = _rng(8)
  ftr = rng.normal(size=(40, D)).astype(np.float32) + 2.0
  ytr = rng.integers(0, C, size=40)
  fte = rng.normal(size=(B, D)).astype(np.float32) + 2.0
  cent, center = heads.ncm_centroids(ftr, ytr, C)
  mu = ftr.mean(0)
  g = (ftr - mu) / np.linalg.norm(ftr - mu, axis=1, keepdims=True)
  ref_cent = np.stack([g[ytr == c].mean(0) for c in range(C)])
  np.testing.assert_allclose(center, mu, rtol=1e-5)
  np.testing.assert_allclose(cent, ref_cent, rtol=1e-5, atol=1e-6)
  q = (fte - mu) / np.linalg.norm(fte - mu, axis=1, keepdims=True)
  ref = -((q[:, None, :] - ref_cent[None]) ** 2).sum(-1)
  z = jax.jit(heads.ncm_logits)(fte, cent, center)
  assert z.dtype == jnp.float32 and z.shape == (B, C)
  np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.argmax(z, -1), np.argmax(ref, -1))
  # bf16 features
  z16 = heads.ncm_logits(jnp.asarray(fte, jnp.bfloat16), cent, center)
  assert z16.dtype == jnp.float32 and np.all(np.isfinite(z16))
  # 'un' variant: raw squared distances
  zr = heads.ncm_logits(fte, ref_cent, normalize=False)
  np.testing.assert_allclose(zr, -((fte[:, None] - ref_cent[None]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)


def np_prior_rebalancing(logit, beta, s_prior, t_prior=None):
  """GT-RIPL/UNO-IC classification/rebalancing.py::prior_recbalancing in NumPy float64."""
  z = np.asarray(logit, np.float64)
  prob = np.exp(z - z.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  with np.errstate(divide="ignore"):
    inv_prior = 1.0 / np.asarray(s_prior, np.float64)
  inv_prior[np.isinf(inv_prior)] = 0
  prob_r = prob * inv_prior[None] * (1.0 if t_prior is None else np.asarray(t_prior, np.float64)[None])
  prob_r /= prob_r.sum(1, keepdims=True)
  out = prob ** (1 - beta) * prob_r ** beta
  return out / out.sum(1, keepdims=True)


def test_posterior_recalibration_is_posthoc_adjustment_with_tau_beta():
  rng = np.random.default_rng(0)
  z = rng.normal(0, 3, (16, 10)).astype(np.float32)
  counts = np.asarray(priors.lt_counts(500, 10, 100), np.float64)
  s_prior = counts / counts.sum()
  t_prior = rng.dirichlet(np.ones(10))
  recal = jax.jit(heads.posterior_recalibrate)
  for beta in (0.0, 0.5, 1.0, 1.3, 2.0):
    for tp in (None, t_prior):
      got = jax.nn.softmax(recal(z, counts, beta, tp), axis=-1)   # counts or prior: same result
      np.testing.assert_allclose(np.asarray(got, np.float64), np_prior_rebalancing(z, beta, s_prior, tp),
                                 rtol=2e-5, atol=1e-7)
      np.testing.assert_array_equal(np.asarray(recal(z, s_prior, beta, tp)),
                                    np.asarray(heads.posthoc_adjust(z, s_prior, beta, tp)))  # the alias
  # Target prior = source prior: no change for any beta.
  np.testing.assert_allclose(np.asarray(heads.posterior_recalibrate(z, counts, 1.7, counts)), z, rtol=0, atol=1e-5)

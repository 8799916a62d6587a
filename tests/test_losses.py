"""Tests for lt_jax.losses: numbers against NumPy / pure-Python formulas and hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax

from lt_jax import losses, priors

B, C = 6, 5
COUNTS = np.array([60, 30, 12, 4, 2])          # raw training counts
CIFAR10_IR100 = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])


def _rng(seed=0):
  return np.random.default_rng(seed)


def _data(seed=0, b=B, c=C, scale=2.0):
  r = _rng(seed)
  z = (scale * r.normal(size=(b, c))).astype(np.float32)
  y = r.integers(0, c, size=b).astype(np.int32)
  return z, y


def _soft(seed=0, b=B, c=C):
  """Mixup-style soft targets: lam * e_a + (1 - lam) * e_b."""
  r = _rng(seed + 100)
  a, b_ = r.integers(0, c, size=b), r.integers(0, c, size=b)
  lam = r.uniform(0.2, 0.8, size=(b, 1))
  return (lam * np.eye(c)[a] + (1 - lam) * np.eye(c)[b_]).astype(np.float32)


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_ce(z, y):
  return -_np_log_softmax(z)[np.arange(len(y)), y]


def _np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _np_bce(z, t):
  p = _np_sigmoid(z)
  return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def _np_cb_weights(n, beta):
  w = (1 - beta) / (1 - beta ** np.asarray(n, np.float64))
  return w / w.sum() * len(n)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- building blocks


def test_softmax_ce_matches_numpy_int_and_soft():
  z, y = _data()
  _close(losses.softmax_cross_entropy(z, y), _np_ce(z, y))
  t = _soft()
  _close(losses.softmax_cross_entropy(z, t), -(t * _np_log_softmax(z)).sum(-1))
  # bfloat16 input is computed and returned in float32
  out = losses.softmax_cross_entropy(jnp.asarray(z, jnp.bfloat16), y)
  assert out.dtype == jnp.float32
  _close(out, _np_ce(np.asarray(jnp.asarray(z, jnp.bfloat16), np.float32), y))


def test_sigmoid_bce_and_sum():
  z, y = _data(1)
  t = np.eye(C)[y]
  _close(losses.sigmoid_binary_cross_entropy(z, y), _np_bce(z, t))
  _close(losses.sigmoid_cross_entropy(z, y), _np_bce(z, t).sum(-1))
  _close(losses.sigmoid_binary_cross_entropy(z, y), optax.sigmoid_binary_cross_entropy(z, t))


def test_ldam_margins_cifar10_ir100():
  m = np.asarray(losses.ldam_margins(CIFAR10_IR100))
  assert m[-1] == pytest.approx(0.5, abs=1e-6)
  assert m[0] == pytest.approx(0.5 * (50 / 5000) ** 0.25, abs=1e-6)
  assert m[0] == pytest.approx(0.158, abs=1e-3)
  assert np.all(np.diff(m) > 0)
  _close(m, 0.5 * CIFAR10_IR100 ** -0.25 / np.max(CIFAR10_IR100 ** -0.25))
  # scale-free: a prior gives the same margins; max_m rescales
  _close(losses.ldam_margins(CIFAR10_IR100 / CIFAR10_IR100.sum()), m)
  _close(losses.ldam_margins(CIFAR10_IR100, max_m=0.3), m * 0.6)


def test_apply_margin_true_class_only_and_soft():
  z, y = _data()
  m = np.arange(1, C + 1, dtype=np.float32) / 10
  out = np.asarray(losses.apply_margin(z, y, m))
  expect = z.copy()
  expect[np.arange(B), y] -= m[y]
  _close(out, expect)
  t = _soft()
  _close(losses.apply_margin(z, t, m), z - m[None] * t)


def test_logit_adjust_and_identities():
  z, y = _data(2)
  pi = COUNTS / COUNTS.sum()
  _close(losses.logit_adjust(z, COUNTS, 0.5), z + 0.5 * np.log(pi)[None])
  # LA with tau = 0 is CE
  _close(losses.logit_adjusted_loss(z, y, COUNTS, tau=0.0), _np_ce(z, y))
  la = losses.logit_adjusted_loss(z, y, COUNTS, tau=1.0)
  _close(la, _np_ce(z + np.log(pi)[None], y))
  # counts or prior: identical (log N cancels inside the softmax)
  _close(losses.logit_adjusted_loss(z, y, pi, tau=1.0), la)
  # Balanced Softmax CE(z + log n) EQUALS LA tau=1 CE(z + log pi) per example
  bs = losses.balanced_softmax_loss(z, y, COUNTS)
  _close(bs, _np_ce(z + np.log(COUNTS)[None], y))
  _close(bs, la)


def test_focal_gamma0_is_ce_and_formula():
  z, y = _data(3)
  _close(losses.focal_loss(z, y, gamma=0.0), _np_ce(z, y))
  ce = _np_ce(z, y)
  p = np.exp(-ce)
  alpha = np.linspace(0.5, 2.0, C)
  _close(losses.focal_loss(z, y, gamma=2.0), (1 - p) ** 2 * ce)
  _close(losses.focal_loss(z, y, gamma=1.0, alpha=alpha), alpha[y] * (1 - p) * ce)
  # soft targets: sum_c y_c (1 - p_c)^g (-log p_c)
  t = _soft(3)
  logp = _np_log_softmax(z)
  _close(losses.focal_loss(z, t, gamma=0.5), (t * (1 - np.exp(logp)) ** 0.5 * -logp).sum(-1))


def test_weighted_ce():
  z, y = _data(4)
  _close(losses.weighted_cross_entropy(z, y, COUNTS, weights=np.ones(C)), _np_ce(z, y))
  _close(losses.weighted_cross_entropy(z, y, COUNTS, weights="none"), _np_ce(z, y))
  w = COUNTS.min() / COUNTS
  _close(losses.weighted_cross_entropy(z, y, COUNTS), w[y] * _np_ce(z, y))
  w = (COUNTS.min() / COUNTS) ** 0.7
  _close(losses.weighted_cross_entropy(z, y, COUNTS, weights="cost_sensitive", gamma=0.7),
         w[y] * _np_ce(z, y))
  t = _soft(4)
  _close(losses.class_weighting(np.ones(B), t, w), t @ w)


def test_label_smoothing():
  z, y = _data(5)
  eps = 0.2
  t = (1 - eps) * np.eye(C)[y] + eps / C
  _close(losses.label_smoothing_cross_entropy(z, y, epsilon=eps), -(t * _np_log_softmax(z)).sum(-1))
  _close(losses.label_smoothing_cross_entropy(z, y, epsilon=0.0), _np_ce(z, y))


def test_generalized_la_reproduces_la_and_formula():
  z, y = _data(6)
  for tau in (1.0, 0.5):
    la = losses.logit_adjusted_loss(z, y, COUNTS, tau=tau)
    delta = losses.la_pairwise_delta(COUNTS, tau)
    _close(losses.generalized_logit_adjusted_loss(z, y, delta=delta), la)
    _close(losses.generalized_logit_adjusted_loss(z, y, COUNTS, tau=tau), la)
    _close(losses.generalized_logit_adjusted_loss(z, _soft(6), COUNTS, tau=tau),
           losses.logit_adjusted_loss(z, _soft(6), COUNTS, tau=tau))
  # general Delta (diagonal ignored) and alpha: alpha_y log(1 + sum_{y'!=y} e^{D_yy' + f_y' - f_y})
  r = _rng(7)
  delta = r.normal(size=(C, C))
  alpha = r.uniform(0.5, 2.0, size=C)
  expect = [alpha[yi] * math.log(1 + sum(math.exp(delta[yi, k] + z[i, k] - z[i, yi])
                                         for k in range(C) if k != yi))
            for i, yi in enumerate(y)]
  _close(losses.generalized_logit_adjusted_loss(z, y, delta=delta, alpha=alpha), expect)
  # soft: exact mixture sum_c y_c L(z, c)
  t = _soft(7)
  per_class = np.stack([np.asarray(losses.generalized_logit_adjusted_loss(
      z, np.full(B, c, np.int32), delta=delta, alpha=alpha)) for c in range(C)], 1)
  _close(losses.generalized_logit_adjusted_loss(z, t, delta=delta, alpha=alpha),
         (t * per_class).sum(-1))


def test_class_balanced_variants():
  z, y = _data(8)
  beta = 0.99
  w = _np_cb_weights(COUNTS, beta)
  cb = losses.class_balanced_loss(z, y, COUNTS, beta=beta)
  _close(cb, w[y] * _np_ce(z, y))
  _close(cb, losses.weighted_cross_entropy(z, y, COUNTS, weights="effective_number", beta=beta))
  t = np.eye(C)[y]
  _close(losses.class_balanced_loss(z, y, COUNTS, beta=beta, kind="sigmoid"),
         w[y] * _np_bce(z, t).sum(-1))
  p = _np_sigmoid(z)
  pt = p * t + (1 - p) * (1 - t)
  _close(losses.class_balanced_loss(z, y, COUNTS, beta=beta, kind="focal", gamma=2.0),
         w[y] * ((1 - pt) ** 2 * _np_bce(z, t)).sum(-1))
  # CIFAR-10 IR100, beta=0.9999: weights 0.051 ... 3.993 (REFERENCE.md section 3)
  w10 = priors.class_weights(CIFAR10_IR100, "effective_number", beta=0.9999)
  assert float(w10[0]) == pytest.approx(0.051, abs=1e-3)
  assert float(w10[-1]) == pytest.approx(3.993, abs=1e-3)
  with pytest.raises(ValueError, match="raw per-class counts"):
    losses.class_balanced_loss(z, y, COUNTS / COUNTS.sum())
  with pytest.raises(ValueError, match="valid kinds"):
    losses.class_balanced_loss(z, y, COUNTS, kind="nope")


def test_sigmoid_focal_matches_optax_and_alpha():
  z, y = _data(9)
  t = np.eye(C)[y].astype(np.float32)
  for alpha in (None, 0.25):
    ref = optax.sigmoid_focal_loss(z, t, alpha=alpha, gamma=2.0).sum(-1)
    _close(losses.sigmoid_focal_loss(z, y, gamma=2.0, alpha=alpha), ref)
  av = np.linspace(0.1, 0.9, C)
  p = _np_sigmoid(z)
  pt = p * t + (1 - p) * (1 - t)
  at = av * t + (1 - av) * (1 - t)
  _close(losses.sigmoid_focal_loss(z, y, gamma=0.5, alpha=av),
         (at * (1 - pt) ** 0.5 * _np_bce(z, t)).sum(-1))
  ts = _soft(9)
  pts = p * ts + (1 - p) * (1 - ts)
  _close(losses.sigmoid_focal_loss(z, ts, gamma=2.0), ((1 - pts) ** 2 * _np_bce(z, ts)).sum(-1))


def test_ldam_loss_formula_and_weights():
  z, y = _data(10, scale=0.5)
  m = 0.5 * COUNTS ** -0.25 / np.max(COUNTS ** -0.25)
  adj = z.astype(np.float64).copy()
  adj[np.arange(B), y] -= m[y]
  ref = _np_ce(30 * adj, y)
  _close(losses.ldam_loss(z, y, COUNTS), ref, tol=1e-4)
  w = _np_cb_weights(COUNTS, 0.9999)
  L = losses.make_loss("ldam", weights="effective_number", beta=0.9999)
  out, _ = L.apply(z, y, COUNTS, L.init(C))
  _close(out, w[y] * ref, tol=1e-4)


# ----------------------------------------------------------------------------- reductions


def test_reductions_torch_semantics_hand_computed():
  per = np.array([1.0, 2.0, 3.0, 4.0])
  labels = np.array([0, 1, 1, 2])
  w = np.array([0.5, 2.0, 1.0])
  ew = losses.label_weights(labels, w)
  _close(ew, [0.5, 2.0, 2.0, 1.0])
  # torch F.cross_entropy(weight=w): (0.5*1 + 2*2 + 2*3 + 1*4) / (0.5 + 2 + 2 + 1) = 14.5 / 5.5
  assert float(losses.reduce_weighted_mean(per, ew)) == pytest.approx(14.5 / 5.5, rel=1e-6)
  mask = np.array([1, 1, 0, 1])
  assert float(losses.reduce_weighted_mean(per, ew, mask)) == pytest.approx(8.5 / 3.5, rel=1e-6)
  assert float(losses.reduce_mean(per)) == pytest.approx(2.5)
  assert float(losses.reduce_mean(per, mask)) == pytest.approx(7 / 3, rel=1e-6)
  # masked NaN cannot leak; empty mask gives 0
  per_nan = np.array([1.0, np.nan, 3.0, 4.0])
  assert float(losses.reduce_mean(per_nan, [1, 0, 1, 1])) == pytest.approx(8 / 3, rel=1e-6)
  assert float(losses.reduce_mean(per, np.zeros(4))) == 0.0
  assert float(losses.reduce_weighted_mean(per, np.zeros(4))) == 0.0


def test_registry_weight_norm_batch_is_torch_weighted_mean():
  z, y = _data(11)
  y = np.concatenate([y, [-1]]).astype(np.int32)    # one padding row
  z = np.concatenate([z, 100 * np.ones((1, C), np.float32)])
  w = COUNTS.min() / COUNTS
  L = losses.make_loss("weighted_ce", weights="inverse", weight_norm="batch")
  out, _ = L.apply(z, y, COUNTS, L.init(C))
  valid = y >= 0
  ce = losses.softmax_cross_entropy(z, y)
  torch_like = losses.reduce_weighted_mean(ce, losses.label_weights(y, w))
  assert float(out[-1]) == 0.0
  assert float(losses.reduce_mean(out, valid)) == pytest.approx(float(torch_like), rel=1e-5)
  yv = y[valid]
  expect = (w[yv] * _np_ce(z[valid], yv)).sum() / w[yv].sum()
  assert float(torch_like) == pytest.approx(expect, rel=1e-5)


# ----------------------------------------------------------------------------- EQL / SEQL / EQL v2 / Seesaw


def _py_eql(z, y, freq, lam):
  out = []
  for i in range(len(y)):
    s = 0.0
    for j in range(z.shape[1]):
      yj = 1.0 if j == y[i] else 0.0
      w = 1.0 - (1.0 if freq[j] < lam else 0.0) * (1.0 - yj)
      p = 1 / (1 + math.exp(-z[i, j]))
      s += w * -(yj * math.log(p) + (1 - yj) * math.log(1 - p))
    out.append(s)
  return out


def test_eql_v1_against_python():
  z, y = _data(12)
  freq = COUNTS / COUNTS.sum()
  lam = 0.05    # classes 3 and 4 (freq 0.036, 0.018) are tail
  _close(losses.equalization_loss(z, y, COUNTS, lam=lam), _py_eql(z, y, freq, lam))
  L = losses.make_loss("eql", lam=lam)
  out, st = L.apply(z, y, COUNTS, L.init(C))
  assert st == ()
  _close(out, _py_eql(z, y, freq, lam))
  # lam = 0: plain summed BCE
  _close(losses.equalization_loss(z, y, COUNTS, lam=0.0), _np_bce(z, np.eye(C)[y]).sum(-1))


def _py_seql(z, y, freq, lam, beta):
  """p_j = e^{z_j} / sum_k w_k e^{z_k}, w_k = 1 - beta_k T(f_k)(1 - y_k); loss -log p_y."""
  out = []
  for i in range(len(y)):
    den = 0.0
    for k in range(z.shape[1]):
      yk = 1.0 if k == y[i] else 0.0
      b = beta[i][k] if np.ndim(beta) else beta
      w = 1.0 - b * (1.0 if freq[k] < lam else 0.0) * (1.0 - yk)
      den += w * math.exp(z[i, k])
    out.append(-math.log(math.exp(z[i, y[i]]) / den))
  return out


def test_seql_against_python_deterministic_keyed_and_registry():
  freq = COUNTS / COUNTS.sum()
  lam, gamma = 0.05, 0.6
  z, y = _data(13)
  _close(losses.softmax_equalization_loss(z, y, COUNTS, lam=lam, gamma=gamma),
         _py_seql(z, y, freq, lam, gamma))
  key = jax.random.key(3)
  beta = np.asarray(jax.random.bernoulli(key, gamma, (B, C)), np.float64)
  _close(losses.softmax_equalization_loss(z, y, COUNTS, lam=lam, gamma=gamma, key=key),
         _py_seql(z, y, freq, lam, beta))
  # gamma = 1 removes tail negatives entirely
  _close(losses.softmax_equalization_loss(z, y, COUNTS, lam=lam, gamma=1.0),
         _py_seql(z, y, freq, lam, 1.0))
  # registry: key = fold_in(key(seed), step), a fresh draw each step
  L = losses.make_loss("seql", lam=lam, gamma=gamma, seed=7)
  st = L.init(C)
  outs = []
  for step in range(3):
    z, y = _data(20 + step)
    out, st = L.apply(z, y, COUNTS, st)
    k = jax.random.fold_in(jax.random.key(7), step)
    beta = np.asarray(jax.random.bernoulli(k, gamma, (B, C)), np.float64)
    _close(out, _py_seql(z, y, freq, lam, beta))
    outs.append(out)
  assert int(st["step"]) == 3
  Ld = losses.make_loss("seql", lam=lam, gamma=gamma, stochastic=False)
  assert Ld.init(C) == ()
  _close(Ld.apply(z, y, COUNTS, ())[0], _py_seql(z, y, freq, lam, gamma))


def _py_eqlv2_step(z, y, pos_acc, neg_acc, initialized, gamma=12.0, mu=0.8, alpha=4.0):
  Bn, Cn = z.shape
  r, q = np.ones(Cn), np.ones(Cn)
  if initialized:
    for j in range(Cn):
      g = pos_acc[j] / (neg_acc[j] + 1e-10)
      q[j] = 1 / (1 + math.exp(-gamma * (g - mu)))
      r[j] = 1 + alpha * (1 - q[j])
  out = []
  pos_new, neg_new = pos_acc.copy(), neg_acc.copy()
  for i in range(Bn):
    s = 0.0
    for j in range(Cn):
      yj = 1.0 if j == y[i] else 0.0
      p = 1 / (1 + math.exp(-z[i, j]))
      w = r[j] * yj + q[j] * (1 - yj)
      s += w * -(yj * math.log(p) + (1 - yj) * math.log(1 - p))
      grad = abs(p - yj) * w           # |dL/dz| of the weighted BCE
      pos_new[j] += grad * yj
      neg_new[j] += grad * (1 - yj)
    out.append(s)
  return out, pos_new, neg_new


def test_eqlv2_against_python_over_three_batches():
  L = losses.make_loss("eqlv2")
  st = L.init(C)
  pos, neg = np.zeros(C), np.zeros(C)
  for step in range(3):
    z, y = _data(30 + step)
    out, st = L.apply(z, y, COUNTS, st)
    ref, pos, neg = _py_eqlv2_step(z, y, pos, neg, initialized=step > 0)
    _close(out, ref, tol=1e-4)
    _close(st["pos_grad"], pos, tol=1e-4)
    _close(st["neg_grad"], neg, tol=1e-4)
  assert int(st["step"]) == 3
  # the first step uses weights 1: plain summed BCE
  z, y = _data(30)
  _close(L.apply(z, y, COUNTS, L.init(C))[0], _np_bce(z, np.eye(C)[y]).sum(-1))
  # gradient magnitudes really are |dL/dz| split by sign of the target
  r, q = losses.eqlv2_class_weights(jnp.asarray(pos), jnp.asarray(neg))
  g = jax.grad(lambda zz: losses.eqlv2_loss(zz, y, pos_weight=r, neg_weight=q).sum())(jnp.asarray(z))
  pg, ng = losses.eqlv2_grad_stats(z, y, pos_weight=r, neg_weight=q)
  t = np.eye(C)[y]
  _close(pg, (np.abs(g) * t).sum(0))
  _close(ng, (np.abs(g) * (1 - t)).sum(0))


def _py_seesaw(z, y, cum, p=0.8, q=2.0, eps=1e-2):
  Bn, Cn = z.shape
  N = np.maximum(cum, 1.0)
  out = []
  for i in range(Bn):
    e = np.exp(z[i] - z[i].max())
    sig = e / e.sum()
    yi = y[i]
    adj = z[i].astype(np.float64).copy()
    for j in range(Cn):
      if j == yi:
        continue
      S = (N[j] / N[yi]) ** p if N[j] < N[yi] else 1.0
      ratio = sig[j] / max(sig[yi], eps)
      Cf = ratio ** q if ratio > 1.0 else 1.0
      adj[j] += math.log(S * Cf)
    m = adj.max()
    out.append(-(adj[yi] - m - math.log(np.exp(adj - m).sum())))
  return out


def test_seesaw_against_python_over_three_batches():
  L = losses.make_loss("seesaw")
  st = L.init(C)
  cum = np.zeros(C)
  r = _rng(40)
  for step in range(3):
    z = (3 * r.normal(size=(B, C))).astype(np.float32)
    y = r.choice(C, size=B, p=COUNTS / COUNTS.sum()).astype(np.int32)
    out, st = L.apply(z, y, COUNTS, st)
    cum = cum + np.bincount(y, minlength=C)       # counts are added BEFORE the loss
    _close(out, _py_seesaw(z, y, cum), tol=1e-4)
    _close(st["cum_counts"], cum)
  # p = q = 0 is CE; static counts mode uses prior_or_counts as N
  z, y = _data(41)
  _close(losses.seesaw_loss(z, y, cum_counts=cum, p=0.0, q=0.0), _np_ce(z, y))
  Ls = losses.make_loss("seesaw", online=False)
  assert Ls.init(C) == ()
  _close(Ls.apply(z, y, COUNTS, ())[0], _py_seesaw(z, y, COUNTS.astype(float)), tol=1e-4)
  # soft targets: sum_c y_c Seesaw(z, c); counts add the soft mass
  t = _soft(41)
  per_class = np.stack([_py_seesaw(z, np.full(B, c), cum) for c in range(C)], 1)
  _close(losses.seesaw_loss(z, t, cum_counts=cum), (t * per_class).sum(-1), tol=1e-4)
  _, st2 = L.apply(z, t, COUNTS, L.init(C))
  _close(st2["cum_counts"], t.sum(0))


# Losses of (B, C) logits; the multi-expert ones (B, E, C) get the same checks in tests/test_experts.py.
FLAT_LOSSES = tuple(n for n in losses.LOSSES if n not in losses.EXPERT_LOSSES)


def test_padding_rows_zero_loss_and_no_state_update():
  z, y = _data(42)
  y = y.copy()
  y[-1] = -1
  for name in FLAT_LOSSES:
    L = losses.make_loss(name)
    st = L.init(C)
    out, st_full = L.apply(z, y, COUNTS, st)
    assert float(out[-1]) == 0.0, name
    _, st_part = L.apply(z[:-1], y[:-1], COUNTS, st)
    for k in ("cum_counts", "pos_grad", "neg_grad"):
      if isinstance(st_full, dict) and k in st_full:
        _close(st_full[k], st_part[k])


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
  expected = {"ce", "weighted_ce", "label_smoothing", "focal", "sigmoid_focal", "cb_softmax",
              "cb_sigmoid", "cb_focal", "ldam", "logit_adjusted", "balanced_softmax",
              "generalized_la", "eql", "seql", "eqlv2", "seesaw"}
  assert expected <= set(losses.LOSSES)
  with pytest.raises(ValueError) as err:
    losses.make_loss("nope")
  for n in losses.LOSSES:
    assert n in str(err.value)
  with pytest.raises(ValueError, match="unknown hparam 'gama'.*gamma"):
    losses.make_loss("focal", gama=2.0)
  with pytest.raises(ValueError, match="unknown hparam 'weights'"):
    losses.make_loss("cb_softmax", weights="inverse")
  with pytest.raises(ValueError, match="valid schemes"):
    losses.make_loss("ce", weights="bogus")
  with pytest.raises(ValueError, match="beta"):
    losses.make_loss("ce", weights="inverse", beta=0.9)
  with pytest.raises(ValueError, match="needs weights"):
    losses.make_loss("weighted_ce", weights=None)
  with pytest.raises(ValueError, match="weight_norm"):
    losses.make_loss("ce", weights="inverse", weight_norm="sum")
  with pytest.raises(ValueError, match="weight_norm needs weights"):
    losses.make_loss("ce", weight_norm="batch")
  with pytest.raises(ValueError, match="drw_start needs weights"):
    losses.make_loss("ldam", drw_start=10)
  with pytest.raises(ValueError, match="either delta"):
    losses.make_loss("generalized_la", delta=np.zeros((C, C)), tau=1.0)
  with pytest.raises(ValueError, match="gamma"):
    losses.make_loss("focal", gamma=-1.0)
  L = losses.make_loss("seesaw")
  with pytest.raises(ValueError, match="stateful"):
    L.apply(*_data(), COUNTS, ())
  with pytest.raises(ValueError, match="integer class indices"):
    losses.softmax_cross_entropy(np.zeros((2, C)), np.zeros(2, np.float32))


def test_registry_weights_scheme_kwargs_and_drw():
  z, y = _data(43)
  ce = _np_ce(z, y)
  # focal owns gamma; the cost-sensitive exponent goes through weight_kwargs
  L = losses.make_loss("focal", gamma=0.0, weights="cost_sensitive", weight_kwargs={"gamma": 0.5})
  w = (COUNTS.min() / COUNTS) ** 0.5
  _close(L.apply(z, y, COUNTS, L.init(C))[0], w[y] * ce)
  L = losses.make_loss("ce", weights=np.arange(1, C + 1))
  _close(L.apply(z, y, COUNTS, ())[0], np.arange(1, C + 1)[y] * ce)
  # DRW: unweighted for the first 2 steps, CB-weighted afterwards
  L = losses.make_loss("ce", weights="effective_number", beta=0.999, drw_start=2)
  st = L.init(C)
  wcb = _np_cb_weights(COUNTS, 0.999)
  for step in range(4):
    out, st = L.apply(z, y, COUNTS, st)
    _close(out, ce if step < 2 else wcb[y] * ce)
  assert int(st["step"]) == 4
  # cb_softmax is weighted CE with effective-number weights
  Lcb = losses.make_loss("cb_softmax", beta=0.999)
  Lw = losses.make_loss("weighted_ce", weights="effective_number", beta=0.999)
  _close(Lcb.apply(z, y, COUNTS, ())[0], Lw.apply(z, y, COUNTS, ())[0])


# Registry entries with non-default hparams that make every code path active on COUNTS.
_CONFIGS = {
    "eql": dict(lam=0.05), "seql": dict(lam=0.05), "weighted_ce": dict(weight_norm="batch"),
    "ldam": dict(weights="effective_number", beta=0.999),
}


def _entry(name):
  return losses.make_loss(name, **_CONFIGS.get(name, {}))


def _warm_state(L, z, y):
  """State after one step, so stateful losses use non-trivial statistics."""
  return L.apply(z, y, COUNTS, L.init(C))[1]


@pytest.mark.parametrize("name", FLAT_LOSSES)
def test_registry_jit_vmap_match_eager(name):
  L = _entry(name)
  z0, y0 = _data(50)
  st = _warm_state(L, z0, y0)
  r = _rng(51)
  Z = (2 * r.normal(size=(2, B, C))).astype(np.float32)
  Y = r.integers(0, C, size=(2, B)).astype(np.int32)
  T = np.stack([_soft(52), _soft(53)])
  eager = [L.apply(Z[k], Y[k], COUNTS, st) for k in range(2)]
  jitted = jax.jit(L.apply)(Z[0], Y[0], COUNTS, st)
  _close(jitted[0], eager[0][0], tol=1e-5)
  jax.tree.map(lambda a, b: _close(a, b, tol=1e-5), jitted[1], eager[0][1])
  for labels in (Y, T):   # vmap over a leading batch-of-batches axis, hard and soft labels
    eager = [L.apply(Z[k], labels[k], COUNTS, st) for k in range(2)]
    vm_out, vm_st = jax.vmap(L.apply, in_axes=(0, 0, None, None))(Z, labels, COUNTS, st)
    for k in range(2):
      _close(vm_out[k], eager[k][0], tol=1e-5)
      jax.tree.map(lambda a, b, k=k: _close(a[k], b, tol=1e-5), vm_st, eager[k][1])
    assert np.all(np.isfinite(np.asarray(vm_out)))


@pytest.mark.parametrize("name", FLAT_LOSSES)
def test_registry_finite_at_extremes_bf16_and_zero_counts(name):
  L = _entry(name)
  r = _rng(60)
  y = r.integers(0, C, size=B).astype(np.int32)
  z_ext = (1e30 * np.sign(r.normal(size=(B, C)))).astype(np.float32)
  z_ext[0, y[0]] = 1e30     # confidently right
  z_ext[1, :] = 1e30
  z_ext[1, y[1]] = -1e30    # confidently wrong
  zero_counts = COUNTS.copy()
  zero_counts[2] = 0
  st = _warm_state(L, *_data(61))

  def total(zz, yy, counts):
    out, new_st = L.apply(zz, yy, counts, st)
    return jnp.sum(out), (out, new_st)

  z_bf16 = jnp.asarray(np.concatenate([z_ext[:3], 3 * r.normal(size=(B - 3, C))]), jnp.bfloat16)
  # two compilations: float32 with int labels (4 cases), bfloat16 with soft labels (2 cases)
  cases = [(z_ext, y, COUNTS), (-z_ext, y, COUNTS), (z_ext, y, zero_counts),
           (_data(62)[0], y, zero_counts), (z_bf16, _soft(60), COUNTS),
           (z_bf16, _soft(61), zero_counts)]
  grad_fn = jax.jit(jax.grad(total, has_aux=True))
  for zz, yy, counts in cases:
    g, (out, new_st) = grad_fn(zz, yy, counts)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out))), (name, out)
    assert np.all(np.isfinite(np.asarray(g, np.float32))), (name, g)
    for leaf in jax.tree.leaves(new_st):
      assert np.all(np.isfinite(np.asarray(leaf))), (name, new_st)


def test_stateful_updates_are_batch_sums_under_sharding():
  """Seesaw counts, EQL v2 gradients and weight_norm='batch' sums are global over a sharded batch."""
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs 2 devices (tests/conftest.py emulates 2 CPU devices)")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  data = NamedSharding(Mesh(np.array(devices[:2]), ("data",)), P("data"))
  z, y = _data(70)
  for name, hp in (("seesaw", {}), ("eqlv2", {}), ("weighted_ce", {"weight_norm": "batch"})):
    L = losses.make_loss(name, **hp)
    st = _warm_state(L, *_data(71))
    ref_out, ref_st = L.apply(z, y, COUNTS, st)
    out, new_st = jax.jit(L.apply)(jax.device_put(z, data), jax.device_put(y, data), COUNTS, st)
    _close(out, ref_out, tol=1e-5)
    jax.tree.map(lambda a, b: _close(a, b, tol=1e-5), new_st, ref_st)


# ----------------------------------------------------------------------------- reference conventions


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_ldam_drw_form_matches_reference_focal_with_weight(gamma):
  """``form='ldam_drw'`` is ``kaidic/LDAM-DRW`` ``FocalLoss(weight=w)``; the default is the paper's.

  Reference (re-derived in float64): ``x = w_y * CE`` (``F.cross_entropy(weight=w,
  reduction='none')``), loss ``= mean((1 - exp(-x))^gamma * x)``. lt_jax's default ``form='paper'``
  keeps the model's modulating factor ``w_y (1 - p_y)^gamma CE`` (Lin et al.; Cui et al.'s
  weighting); the two differ whenever ``w_y != 1``.
  """
  z, y = _data(11)
  w = _np_cb_weights(COUNTS, 0.9999)
  ce = _np_ce(z, y)
  x = w[y] * ce
  ref = (1 - np.exp(-x)) ** gamma * x
  paper = w[y] * (1 - np.exp(-ce)) ** gamma * ce
  assert np.max(np.abs(ref - paper)) > 1e-3
  _close(losses.focal_loss(z, y, gamma=gamma, weights=w, form="ldam_drw"), ref)
  _close(losses.focal_loss(z, y, gamma=gamma, weights=w), paper)
  # Registry: explicit vector and the effective-number scheme (no batch normalisation = plain mean).
  for hp in (dict(weights=w), dict(weights="effective_number", beta=0.9999)):
    loss = losses.make_loss("focal", gamma=gamma, form="ldam_drw", **hp)
    per, _ = loss.apply(z, y, COUNTS, loss.init(C))
    _close(per, ref)
    _close(losses.reduce_mean(per), ref.mean())
    per, _ = losses.make_loss("focal", gamma=gamma, **hp).apply(z, y, COUNTS, ())
    _close(per, paper)
  # Without weights both forms are the LDAM-DRW focal (1 - p)^gamma CE.
  _close(losses.focal_loss(z, y, gamma=gamma, form="ldam_drw"), (1 - np.exp(-ce)) ** gamma * ce)
  # DRW: unweighted (= paper form) before drw_start, the reference's weighted form after.
  loss = losses.make_loss("focal", gamma=gamma, form="ldam_drw", weights=w, drw_start=1)
  st = loss.init(C)
  per0, st = loss.apply(z, y, COUNTS, st)
  per1, _ = loss.apply(z, y, COUNTS, st)
  _close(per0, (1 - np.exp(-ce)) ** gamma * ce)
  _close(per1, ref)
  g = jax.grad(lambda zz: losses.focal_loss(zz, y, gamma=0.5, weights=w, form="ldam_drw").sum())(z)
  assert np.all(np.isfinite(g))
  with pytest.raises(ValueError, match="form"):
    losses.make_loss("focal", form="bogus")
  with pytest.raises(ValueError, match="form"):
    losses.focal_loss(z, y, form="bogus")


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjust_vs_official_floor(tau):
  """lt_jax adds ``tau log pi`` (zero-count rule); google-research adds ``log(pi^tau + 1e-12)``.

  Re-derived in float64: equal for observed classes (the floor is negligible), different for an
  empty class (reference: ``log(1e-12)``; lt_jax: ``tau log(0.5 n_min / N')``).
  """
  z, _ = _data(12)
  pi = COUNTS / COUNTS.sum()
  ref = z.astype(np.float64) + np.log(pi ** tau + 1e-12)[None, :]
  _close(losses.logit_adjust(z, COUNTS, tau), ref)
  _close(losses.logit_adjust(z, pi, tau), ref)
  counts0 = np.array([60, 30, 12, 4, 0])
  ref0 = np.log((counts0 / counts0.sum()) ** tau + 1e-12)
  got0 = np.asarray(losses.logit_adjust(np.zeros((1, C), np.float32), counts0, tau))[0]
  safe = np.where(counts0 > 0, counts0, 2.0)
  _close(got0, tau * np.log(safe / safe.sum()))
  assert abs(got0[-1] - ref0[-1]) > 1.0

"""Tests for lt_jax.decoupled: stage partition, BBN, BAGS group softmax, post-hoc sweeps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

from lt_jax import decoupled, heads, losses, metrics, priors

C, D_IN = 4, 3


class Tiny(nn.Module):
  """Backbone (two Dense layers) + a head named 'head', as lt_jax models."""
  head: str = "linear"
  num_classes: int = C

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Dense(6, name="body")(x))
    h = nn.Dense(5, name="neck")(h)
    if self.head == "lws":
      return heads.LWSHead(self.num_classes, name="head")(h)
    return heads.LinearHead(self.num_classes, name="head")(h)


def _params(head="linear", seed=0):
  return Tiny(head).init(jax.random.key(seed), jnp.zeros((1, D_IN)))["params"]


def _data(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, D_IN)), jnp.float32),
          jnp.asarray(rng.integers(0, C, n), jnp.int32))


def _flat_labels(labels):
  return {"/".join(str(getattr(k, "key", k)) for k in p): v
          for p, v in jax.tree_util.tree_leaves_with_path(labels)}


# ----------------------------------------------------------------------------- partition


def test_param_labels_modes():
  p = _params("lws")
  lab = {m: _flat_labels(decoupled.param_labels(p, m)) for m in decoupled.TRAINABLE_MODES}
  assert set(lab["all"].values()) == {"trainable"}
  trainable = {m: {k for k, v in lab[m].items() if v == "trainable"} for m in lab}
  assert trainable["head"] == {"head/kernel", "head/bias", "head/scales"}
  assert {k for k, v in lab["lws_scales"].items() if v == "trainable"} == {"head/scales"}
  assert {k for k, v in lab["backbone"].items() if v == "trainable"} == {
      "body/kernel", "body/bias", "neck/kernel", "neck/bias"}
  # wrapped {'params': ...} gives the same labels under the same nesting
  wrapped = _flat_labels(decoupled.param_labels({"params": p}, "head"))
  assert wrapped == {"params/" + k: v for k, v in lab["head"].items()}
  with pytest.raises(ValueError, match="valid modes: all, head, lws_scales, backbone"):
    decoupled.param_labels(p, "classifier")
  with pytest.raises(ValueError, match="scales"):
    decoupled.param_labels(_params("linear"), "lws_scales")
  with pytest.raises(ValueError, match="'head'"):
    decoupled.param_labels({"body": p["body"]}, "head")


def _array_leaves(tree):
  return [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")]


def _loss(params, model, x, y):
  return jnp.mean(losses.softmax_cross_entropy(model.apply({"params": params}, x), y))


def _partition(tx, params, mode):
  """What the trainer does: optax's own partition over decoupled.param_labels."""
  return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, decoupled.param_labels(params, mode))


@pytest.mark.parametrize("mode", ["head", "lws_scales"])
def test_partition_freezes_and_has_no_frozen_state(mode):
  head = "lws" if mode == "lws_scales" else "linear"
  model = Tiny(head)
  params = _params(head)
  labels = _flat_labels(decoupled.param_labels(params, mode))
  n_train = sum(np.size(v) for k, v in _flat_labels(params).items() if labels[k] == "trainable")
  tx = optax.chain(optax.add_decayed_weights(1e-2), optax.adam(0.1))
  opt = _partition(tx, params, mode)
  state = opt.init(params)
  # frozen part: set_to_zero has no state at all
  assert _array_leaves(state.inner_states["frozen"]) == []
  # trainable part: Adam mu and nu for trainable leaves only, plus the step count
  sizes = sum(int(np.size(a)) for a in _array_leaves(state))
  assert sizes == 2 * n_train + 1

  x, y = _data()

  @jax.jit
  def step(params, state):
    g = jax.grad(_loss)(params, model, x, y)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  new = params
  for _ in range(3):
    new, state = step(new, state)
  before, after = _flat_labels(params), _flat_labels(new)
  for k in before:
    if labels[k] == "frozen":
      np.testing.assert_array_equal(after[k], before[k])  # bit-identical
      assert after[k].dtype == before[k].dtype
    else:
      assert not np.array_equal(after[k], before[k]), k
  if mode == "lws_scales":
    assert set(k for k in before if labels[k] == "trainable") == {"head/scales"}


def test_partition_all_and_backbone():
  model, params = Tiny(), _params()
  x, y = _data(1)
  for mode, changed in (("all", {"body", "neck", "head"}), ("backbone", {"body", "neck"})):
    opt = _partition(optax.sgd(0.5, momentum=0.9), params, mode)
    state = opt.init(params)
    g = jax.grad(_loss)(params, model, x, y)
    updates, _ = opt.update(g, state, params)
    new = optax.apply_updates(params, updates)
    for k in params:
      same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params[k]),
                                                     jax.tree_util.tree_leaves(new[k])))
      assert same == (k not in changed), (mode, k)


def test_reinit_head():
  model = Tiny()
  params = _params(seed=0)
  key = jax.random.key(7)
  fresh = model.init(key, jnp.zeros((2, D_IN)))["params"]["head"]
  new = decoupled.reinit_head(params, key, model, (2, D_IN), train=False)
  for k in ("body", "neck"):
    assert new[k] is params[k]  # untouched, not even copied
  for a, b in zip(jax.tree_util.tree_leaves(new["head"]), jax.tree_util.tree_leaves(fresh)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(new["head"]["kernel"], params["head"]["kernel"])
  wrapped = decoupled.reinit_head({"params": params}, key, model, (2, D_IN))
  np.testing.assert_array_equal(wrapped["params"]["head"]["kernel"], fresh["kernel"])
  assert params["head"]["kernel"] is not new["head"]["kernel"]  # input not modified
  with pytest.raises(ValueError, match="does not match"):
    decoupled.reinit_head(params, key, Tiny(num_classes=C + 1), (2, D_IN))
  with pytest.raises(ValueError, match="no 'head'"):
    decoupled.reinit_head({"body": params["body"]}, key, model, (2, D_IN))


# ----------------------------------------------------------------------------- BBN


def test_bbn_alpha_schedule():
  # T_div = max_epoch = 200: T = 1 -> 1; T = 101 -> 1 - (100/200)^2 = 0.75; T = 200 -> 1 - (199/200)^2
  np.testing.assert_allclose(decoupled.bbn_alpha(1, 200), 1.0)
  np.testing.assert_allclose(decoupled.bbn_alpha(101, 200), 0.75, rtol=1e-6)
  np.testing.assert_allclose(decoupled.bbn_alpha(200, 200), 1 - 0.995 ** 2, rtol=1e-5)
  # 90-epoch run with T_div = 100: last epoch 1 - 0.89^2 = 0.2079; 180 with 200: 1 - (179/200)^2
  np.testing.assert_allclose(decoupled.bbn_alpha(90, 90, div_epoch=100), 0.2079, rtol=1e-5)
  np.testing.assert_allclose(decoupled.bbn_alpha(180, 180, div_epoch=200), 1 - 0.895 ** 2, rtol=1e-5)
  # traced epoch, vmapped over all epochs: monotone decreasing from 1 to 1 - (199/200)^2
  a = jax.jit(jax.vmap(lambda t: decoupled.bbn_alpha(t, 200)))(jnp.arange(1, 201))
  np.testing.assert_allclose(a, 1 - ((np.arange(1, 201) - 1) / 200) ** 2, rtol=1e-5, atol=1e-6)
  assert np.all(np.diff(np.asarray(a)) < 0)
  for bad in (dict(epoch=0, max_epoch=10), dict(epoch=11, max_epoch=10),
              dict(epoch=1, max_epoch=10, div_epoch=5), dict(epoch=1, max_epoch=0)):
    with pytest.raises(ValueError):
      decoupled.bbn_alpha(**bad)


# ----------------------------------------------------------------------------- BAGS


def test_bags_groups():
  counts = np.array([5000, 500, 50, 5, 2000, 9, 10, 100, 999, 1000])
  np.testing.assert_array_equal(decoupled.bags_groups(counts), [3, 2, 1, 0, 3, 0, 1, 2, 2, 3])
  # empty bins dropped and renumbered: bins [3, 0, 3, 1] -> groups [2, 0, 2, 1]
  g = decoupled.bags_groups(np.array([5000, 5, 3000, 20]))
  np.testing.assert_array_equal(g, [2, 0, 2, 1])
  assert decoupled.group_softmax_num_outputs(g) == 4 + 3
  np.testing.assert_array_equal(decoupled.bags_groups([3, 30], bin_split=(20,)), [0, 1])
  with pytest.raises(ValueError, match="strictly increasing"):
    decoupled.bags_groups(counts, bin_split=(100, 10))
  with pytest.raises(ValueError, match="non-negative"):
    decoupled.bags_groups(np.array([-1, 3]))


def _lse(*v):
  return math.log(sum(math.exp(a) for a in v))


def test_group_softmax_hand_worked():
  groups = np.array([0, 0, 1])  # classes 0, 1 in group 0; class 2 in group 1
  # layout: [z0, z1, z2, others_0, others_1]
  z = jnp.array([[1.0, 2.0, 0.0, 0.5, -1.0],
                 [1.0, 2.0, 0.0, 0.5, -1.0],
                 [0.3, -0.2, 1.5, 0.0, 0.7]])
  y = jnp.array([0, 2, 1])
  loss = decoupled.group_softmax_loss(z, y, groups)
  ref = [
      (_lse(1, 2, 0.5) - 1) + (_lse(0, -1) - (-1)),       # y=0: group 0 -> z0, group 1 -> others_1
      (_lse(1, 2, 0.5) - 0.5) + (_lse(0, -1) - 0),        # y=2: group 0 -> others_0, group 1 -> z2
      (_lse(0.3, -0.2, 0.0) - (-0.2)) + (_lse(1.5, 0.7) - 0.7),
  ]
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  # predictions: p_g(c) (class entry of the full group softmax), renormalised over classes
  raw = np.array([[math.exp(1 - _lse(1, 2, 0.5)), math.exp(2 - _lse(1, 2, 0.5)), math.exp(0 - _lse(0, -1))],
                  [math.exp(0.3 - _lse(0.3, -0.2, 0)), math.exp(-0.2 - _lse(0.3, -0.2, 0)),
                   math.exp(1.5 - _lse(1.5, 0.7))]])
  p = decoupled.group_softmax_predict(z[::2], groups)
  np.testing.assert_allclose(p, raw / raw.sum(1, keepdims=True), rtol=1e-5)
  np.testing.assert_allclose(jnp.exp(decoupled.group_softmax_logits(z[::2], groups)), raw, rtol=1e-5)
  # p_g(c) = q_g(c) (1 - p_g(others)) with q the softmax over the group's classes only
  q0 = np.exp([1, 2]) / np.exp([1, 2]).sum()
  p_oth = math.exp(0.5 - _lse(1, 2, 0.5))
  np.testing.assert_allclose(raw[0, :2], q0 * (1 - p_oth), rtol=1e-6)
  # padding label -> 0; grad finite; jit
  lp = jax.jit(lambda z: decoupled.group_softmax_loss(z, jnp.array([0, -1, 1]), jnp.asarray(groups)))(z)
  assert float(lp[1]) == 0.0
  g = jax.grad(lambda z: jnp.mean(decoupled.group_softmax_loss(z, y, groups)))(z * 1e3)
  assert np.all(np.isfinite(g))


def test_group_softmax_others_subsampling():
  groups = np.array([0, 0, 1])
  rng = np.random.default_rng(0)
  n0 = 20
  y = jnp.asarray(np.r_[rng.integers(0, 2, n0), 2], jnp.int32)  # 20 in group 0, 1 in group 1
  z = jnp.asarray(rng.normal(size=(n0 + 1, 5)), jnp.float32)
  full = np.asarray(decoupled.group_softmax_loss(z, y, groups))
  # per-group CE terms by hand
  zz = np.asarray(z)
  lse0 = np.log(np.exp(zz[:, [0, 1, 3]]).sum(1))
  lse1 = np.log(np.exp(zz[:, [2, 4]]).sum(1))
  yy = np.asarray(y)
  ce0 = lse0 - np.where(yy < 2, zz[np.arange(n0 + 1), np.minimum(yy, 1)], zz[:, 3])
  ce1 = lse1 - np.where(yy == 2, zz[:, 2], zz[:, 4])
  np.testing.assert_allclose(full, ce0 + ce1, rtol=1e-5)
  sub = np.asarray(decoupled.group_softmax_loss(z, y, groups, others_ratio=8.0, key=jax.random.key(0)))
  # group 0: 20 fg, 1 others -> all 21 kept, factor 21/21; group 1: 1 fg, 8 of the 20 others kept,
  # factor 21/9, so exactly 8 of the group-0 examples carry their group-1 term.
  extra = sub[:n0] - ce0[:n0]
  carried = ~np.isclose(extra, 0.0, atol=1e-6)
  assert carried.sum() == 8
  np.testing.assert_allclose(extra[carried], ce1[:n0][carried] * 21 / 9, rtol=1e-5)
  np.testing.assert_allclose(sub[n0], ce0[n0] + ce1[n0] * 21 / 9, rtol=1e-5)
  # mean over the batch = sum over groups of the mean CE over selected examples (reference)
  np.testing.assert_allclose(sub.mean(), ce0.mean() + (ce1[:n0][carried].sum() + ce1[n0]) / 9, rtol=1e-5)
  # jit-safe (traced key), same draw as eager
  fj = jax.jit(lambda z, k: decoupled.group_softmax_loss(z, y, groups, others_ratio=8.0, key=k))
  np.testing.assert_allclose(fj(z, jax.random.key(0)), sub, rtol=1e-5, atol=1e-6)
  # a different key selects a different subset
  sub2 = np.asarray(decoupled.group_softmax_loss(z, y, groups, others_ratio=8.0, key=jax.random.key(1)))
  assert not np.allclose(sub, sub2)
  # no foreground of group 1 in the batch: that group contributes nothing
  sub3 = decoupled.group_softmax_loss(z[:n0], y[:n0], groups, others_ratio=8.0, key=jax.random.key(0))
  np.testing.assert_allclose(sub3, ce0[:n0], rtol=1e-5)
  # a large ratio keeps everything: equals the un-subsampled loss
  big = decoupled.group_softmax_loss(z, y, groups, others_ratio=100.0, key=jax.random.key(0))
  np.testing.assert_allclose(big, full, rtol=1e-5)
  with pytest.raises(ValueError, match="key"):
    decoupled.group_softmax_loss(z, y, groups, others_ratio=8.0)
  with pytest.raises(ValueError, match="C class logits"):
    decoupled.group_softmax_loss(z[:, :3], y, groups)
  with pytest.raises(ValueError, match="every id"):
    decoupled.group_softmax_loss(z[:, :4], y, np.array([0, 0, 2]))
  with pytest.raises(ValueError, match="int labels"):
    decoupled.group_softmax_loss(z, jax.nn.one_hot(y, 3), groups)


# ----------------------------------------------------------------------------- sweeps


def _eval_set(seed=0, n=240, c=6, d=5):
  rng = np.random.default_rng(seed)
  counts = priors.lt_counts(200, c, 50.0)
  y = rng.integers(0, c, n)
  feats = rng.normal(size=(n, d)).astype(np.float32) + np.eye(c, d, dtype=np.float32)[y]
  kernel = (rng.normal(size=(d, c)) * np.linspace(2.0, 0.5, c)).astype(np.float32)
  logits = feats @ kernel + np.log(counts / counts.sum()).astype(np.float32)
  return (jnp.asarray(logits), jnp.asarray(y, jnp.int32), jnp.asarray(counts),
          jnp.asarray(feats), jnp.asarray(kernel))


def _loop_scores(z, y, counts):
  k = metrics.per_class_counts(y, jnp.argmax(z, -1), z.shape[-1])
  return metrics.summarize(k, counts, many=100, few=20)


def _assert_row(sweep, idx, ref):
  for key, v in ref.items():
    np.testing.assert_allclose(np.asarray(sweep[key])[idx], v, rtol=0, atol=1e-6, err_msg=key)


def test_posthoc_sweep_matches_loop():
  logits, y, counts, _, _ = _eval_set()
  taus = jnp.linspace(0.0, 2.0, 5)
  sw = decoupled.posthoc_sweep(logits, y, counts, taus, train_counts=counts)
  assert set(sw) == {"accuracy", "balanced_accuracy", "balanced_error_rate", "macro_f1",
                     "many_shot", "medium_shot", "few_shot", "tau"}
  assert sw["accuracy"].shape == (5,)
  for i, t in enumerate(np.asarray(taus)):
    _assert_row(sw, i, _loop_scores(heads.posthoc_adjust(logits, counts, float(t)), y, counts))
  # tau = 0 is the unadjusted model
  _assert_row(sw, 0, _loop_scores(logits, y, counts))
  # the adjustment helps the balanced metric here (the logits carry log pi)
  assert float(sw["balanced_accuracy"][2]) > float(sw["balanced_accuracy"][0])
  # chunked evaluation gives the same numbers
  ch = decoupled.posthoc_sweep(logits, y, counts, taus, train_counts=counts, chunk_size=2)
  for k in sw:
    np.testing.assert_array_equal(np.asarray(ch[k]), np.asarray(sw[k]))
  # without train_counts: no shot keys
  assert "many_shot" not in decoupled.posthoc_sweep(logits, y, counts, taus)


def test_posthoc_sweep_target_prior_grid():
  logits, y, counts, _, _ = _eval_set(1)
  taus = jnp.array([0.0, 0.5, 1.0])
  c = counts.shape[0]
  tps = jnp.stack([jnp.ones(c), counts.astype(jnp.float32), jnp.asarray(np.arange(1, c + 1), jnp.float32)])
  sw = decoupled.posthoc_sweep(logits, y, counts, taus, tps, train_counts=counts)
  assert sw["accuracy"].shape == (3, 3) and sw["tau"].shape == (3, 3)
  np.testing.assert_allclose(sw["tau"], np.repeat(np.asarray(taus)[:, None], 3, 1))
  unadj = _loop_scores(logits, y, counts)
  for i, t in enumerate(np.asarray(taus)):
    for p in range(3):
      ref = _loop_scores(heads.posthoc_adjust(logits, counts, float(t), tps[p]), y, counts)
      _assert_row(sw, (i, p), ref)
    _assert_row(sw, (i, 1), unadj)  # target prior = training prior: no adjustment
  # a single (C,) target prior gives a (T,) sweep equal to the matching column
  one = decoupled.posthoc_sweep(logits, y, counts, taus, tps[2], train_counts=counts)
  np.testing.assert_array_equal(np.asarray(one["accuracy"]), np.asarray(sw["accuracy"])[:, 2])
  with pytest.raises(ValueError, match="target_priors"):
    decoupled.posthoc_sweep(logits, y, counts, taus, jnp.ones((2, c + 1)))


def test_tau_norm_sweep_matches_loop():
  _, y, counts, feats, kernel = _eval_set(2)
  taus = jnp.linspace(0.0, 2.0, 5)
  sw = decoupled.tau_norm_sweep(feats, kernel, y, taus, train_counts=counts)
  for i, t in enumerate(np.asarray(taus)):
    _assert_row(sw, i, _loop_scores(heads.tau_norm_logits(feats, kernel, float(t)), y, counts))
  _assert_row(sw, 0, _loop_scores(feats @ kernel, y, counts))  # tau = 0: the raw classifier
  # with a bias (BagofTricks keeps it)
  bias = jnp.linspace(0.5, -0.5, kernel.shape[1])
  swb = decoupled.tau_norm_sweep(feats, kernel, y, taus, bias=bias)
  for i, t in enumerate(np.asarray(taus)):
    _assert_row(swb, i, {k: v for k, v in _loop_scores(
        heads.tau_norm_logits(feats, kernel, float(t)) + bias, y, counts).items() if "shot" not in k})
  with pytest.raises(ValueError, match="features"):
    decoupled.tau_norm_sweep(feats, kernel.T, y, taus)


def test_select_on_validation():
  s = {"balanced_error_rate": jnp.array([0.3, 0.2, 0.2, 0.25]),
       "accuracy": jnp.array([0.9, 0.8, 0.85, 0.9]),
       "few_shot": jnp.array([np.nan, np.nan, np.nan, np.nan]),
       "tau": jnp.array([0.0, 0.5, 1.0, 1.5])}
  assert decoupled.select_on_validation(s) == 1  # min BER, tie -> smaller tau
  assert decoupled.select_on_validation(s, "accuracy") == 0
  # ties broken by the tau value, not the position
  s2 = dict(s, tau=jnp.array([0.0, 1.0, 0.5, 1.5]))
  assert decoupled.select_on_validation(s2) == 2
  assert decoupled.select_on_validation({"balanced_error_rate": jnp.array([np.nan, 0.4, 0.4])}) == 1
  grid = {"balanced_accuracy": jnp.array([[0.5, 0.7], [0.7, 0.6]]),
          "tau": jnp.array([[1.0, 1.0], [0.0, 0.0]])}
  assert decoupled.select_on_validation(grid, "balanced_accuracy") == (1, 0)
  with pytest.raises(ValueError, match="valid keys"):
    decoupled.select_on_validation(s, "loss")
  with pytest.raises(ValueError, match="NaN"):
    decoupled.select_on_validation(s, "few_shot")
  with pytest.raises(ValueError, match="train_counts"):
    decoupled.select_on_validation(s, "many_shot")


def test_sweep_select_end_to_end():
  # choose tau on a validation split, read the test sweep at that index
  val_logits, val_y, counts, _, _ = _eval_set(3)
  test_logits, test_y, _, _, _ = _eval_set(4)
  taus = jnp.linspace(0.0, 2.0, 9)
  val = decoupled.posthoc_sweep(val_logits, val_y, counts, taus)
  i = decoupled.select_on_validation(val)
  assert float(val["balanced_error_rate"][i]) == float(jnp.min(val["balanced_error_rate"]))
  test = decoupled.posthoc_sweep(test_logits, test_y, counts, taus)
  ref = _loop_scores(heads.posthoc_adjust(test_logits, counts, float(taus[i])), test_y, counts)
  np.testing.assert_allclose(test["balanced_error_rate"][i], ref["balanced_error_rate"], atol=1e-6)

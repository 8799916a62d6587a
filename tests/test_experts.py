"""Multi-expert methods: the vmapped expert models, the RIDE and SADE losses against NumPy float64
re-derivations of the reference code, the test-agnostic protocol and evaluator against explicit
resampled evaluation, SADE's test-time aggregation, the config variants and one end-to-end run."""

from __future__ import annotations

import functools
import inspect
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar_lt, fashion_mnist_lt
from lt_jax import losses, models
from lt_jax import test_agnostic as ta
from lt_jax.train import config as cfg, evaluators
from lt_jax.train.evaluators.classification import make_eval_step, sums_from_logits
from lt_jax.train.state import make_mesh
from lt_jax.train.trainer import train_and_evaluate

COUNTS = np.array([500., 300, 200, 120, 80, 50, 30, 20, 10, 5])


def _rand(seed, shape, scale=1.0):
  return np.random.default_rng(seed).standard_normal(shape) * scale


# ----------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=None)
def _cnn_experts(num_classes=6):
  m = models.get_model("cnn_experts", num_classes=num_classes, head="cosine", cosine_scale=30.0)
  v = jax.jit(lambda k: m.init(k, jnp.zeros((2, 8, 8, 1)), train=False))(jax.random.key(0))
  return m, v


def test_expert_axis_parameter_shapes():
  m, v = _cnn_experts()
  shared, experts = {k: x for k, x in v["params"].items() if k != "experts"}, v["params"]["experts"]
  assert set(shared) == {"conv1", "bn1", "conv2", "bn2"}
  assert set(experts) == {"conv3", "bn3", "conv4", "bn4", "fc", "bn_fc", "head"}
  assert shared["conv2"]["kernel"].shape == (3, 3, 32, 32)          # not per expert
  assert experts["conv3"]["kernel"].shape == (3, 3, 3, 32, 48)      # E = 3, 64 -> 48 (reduce_dimension)
  assert experts["fc"]["kernel"].shape == (3, 2 * 2 * 48, 96)       # 128 -> 96 features
  assert experts["head"]["kernel"].shape == (3, 96, 6)              # one cosine classifier per expert
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(experts))
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(v["batch_stats"]["experts"]))
  k = np.asarray(experts["head"]["kernel"])
  assert np.abs(k[0] - k[1]).max() > 0.1                            # each expert has its own init key
  # ResNet-32 with RIDE's CIFAR settings: the closed form of the docstring, on the real tree.
  for depth, reduce, head in ((32, True, "cosine"), (20, False, "linear")):
    r = models.get_model(f"resnet{depth}_experts", num_classes=10, head=head, reduce_dimension=reduce)
    p = jax.eval_shape(lambda: r.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))
    assert n == models.param_count_expert_resnet(depth, 10, 3, reduce, head)
    assert p["experts"]["stage2_block0"]["conv1"]["kernel"].shape == (3, 3, 3, 16, 24 if reduce else 32)
  assert models.param_count_expert_resnet() == 770_896


def test_expert_conv_under_vmap_equals_the_grouped_convolution():
  """One convolution per expert (values and both gradients) = what vmap makes of lax.conv."""
  from lt_jax.models.experts import _conv, expert_conv2d
  x = jnp.asarray(_rand(0, (3, 2, 6, 6, 4)), jnp.float32)      # (E, B, H, W, C)
  w = jnp.asarray(_rand(1, (3, 3, 3, 4, 5)), jnp.float32)      # (E, kh, kw, C, O)
  g = jnp.asarray(_rand(2, (3, 2, 3, 3, 5)), jnp.float32)
  for conv in (expert_conv2d, _conv):
    f = jax.vmap(lambda x, w, conv=conv: conv(x, w, 2, 1))
    out, vjp = jax.vjp(f, x, w)
    if conv is expert_conv2d:
      got = (out, *vjp(g))
    else:
      want = (out, *vjp(g))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  shared = jax.vmap(lambda w: expert_conv2d(x[0], w, 1, 1))(w)   # shared input, per-expert kernels
  np.testing.assert_allclose(shared[2], _conv(x[0], w[2], 1, 1), rtol=1e-6, atol=1e-6)


def test_model_output_and_evaluated_logits_are_the_mean_over_experts():
  m, v = _cnn_experts()
  x = jnp.asarray(_rand(1, (5, 8, 8, 1)), jnp.float32)

  @jax.jit
  def outputs(v, x):  # one compilation for the four calls
    train = lambda **kw: m.apply(v, x, train=True, mutable=["batch_stats"], **kw)[0]
    return (m.apply(v, x, train=False), m.apply(v, x, train=False, experts=True)), (train(), train(experts=True))

  for (z, f), (ze, fe) in outputs(v, x):
    assert ze.shape == (5, 3, 6) and fe.shape == (5, 3, 96) and z.shape == (5, 6) and f.shape == (5, 288)
    np.testing.assert_allclose(z, np.asarray(ze).mean(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(f, np.asarray(fe).reshape(5, -1))
    assert np.abs(np.asarray(ze)).max() <= 30.0 + 1e-4                 # s * cos
  # The classification evaluator's statistics are those of argmax(mean of the experts' logits).
  images = np.random.default_rng(2).integers(0, 256, (7, 8, 8, 1)).astype(np.uint8)
  labels = jnp.array([0, 1, 2, 3, 4, 5, 0])
  step = make_eval_step(m, 6, (0.5,), (0.25,))
  got = step(v, jnp.asarray(images), labels, jnp.ones(7, bool))
  ze = jax.jit(lambda v, x: m.apply(v, x, train=False, experts=True)[0])(
      v, (jnp.asarray(images, jnp.float32) / 255 - 0.5) / 0.25)
  want = sums_from_logits(jnp.mean(ze, 1), labels, 6, jnp.ones(7, bool))
  np.testing.assert_array_equal(got.confusion, want.confusion)
  np.testing.assert_allclose(got.nll.total, want.nll.total, rtol=1e-5)


# ----------------------------------------------------------------------------- RIDE loss


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ride_reference(z, y, counts, *, max_m=0.5, s=30.0, factor=-0.45, base_t=1.0, rf=0.05, reweight=False,
                    beta=0.9999):
  """RIDELoss.forward of the reference, re-derived in float64 (loop over experts, batch means)."""
  B, E, C = z.shape
  m = 1.0 / np.sqrt(np.sqrt(counts))
  m = m * (max_m / m.max())
  w = (1.0 - beta) / (1.0 - np.power(beta, counts))
  w = w / w.sum() * C
  p = counts / counts.sum()
  wd = C * p * rf + 1 - rf
  wd = wd / wd.max()
  zbar = z.mean(1)
  rows = np.arange(B)
  total, grad = 0.0, np.zeros_like(z)
  for i in range(E):
    x = zbar if factor == 0 else z[:, i]
    xm = x.copy()
    xm[rows, y] -= m[y] * s
    ls = _np_log_softmax(xm)
    ce = -ls[rows, y]
    wy = w[y] if reweight else np.ones(B)
    total += np.sum(wy * ce) / np.sum(wy)                        # F.cross_entropy(weight=w)
    g_ce = (np.exp(ls) - np.eye(C)[y]) * (wy / wy.sum())[:, None]
    if factor == 0:
      grad += g_ce[:, None, :] / E                              # through the mean logits
    else:
      grad[:, i] += g_ce
    T = base_t * wd if reweight else np.full(C, base_t)
    tm = T.mean() if reweight else base_t
    logp = _np_log_softmax(z[:, i] / T)
    logq = _np_log_softmax(zbar / T)
    total += factor * tm ** 2 * np.sum(np.exp(logq) * (logq - logp)) / B   # kl_div(batchmean)
    grad[:, i] += factor * tm ** 2 * (np.exp(logp) - np.exp(logq)) / T / B  # mean dist: no grad
  return total, grad


@pytest.mark.parametrize("reweight,factor", [(False, -0.45), (True, -0.45), (True, 0.3), (True, 0.0)])
def test_ride_loss_matches_reference_values_and_gradients(reweight, factor):
  z = _rand(0, (6, 3, 10), 12.0)
  y = np.array([0, 1, 2, 9, 9, 5])
  want, want_g = _ride_reference(z, y, COUNTS, factor=factor, reweight=reweight)
  hp = dict(diversity_factor=factor)
  if reweight:  # the ride_drw recipe: CB weights normalised over the batch, deferred to step 2
    hp.update(weights="effective_number", beta=0.9999, weight_norm="batch", drw_start=2)
  loss = losses.make_loss("ride", **hp)
  state = loss.init(10)
  if reweight:
    state = dict(state, step=jnp.int32(2))
  f = lambda z: losses.reduce_mean(loss.apply(z, jnp.asarray(y), jnp.asarray(COUNTS, jnp.float32), state)[0])
  got, g = jax.value_and_grad(f)(jnp.asarray(z, jnp.float32))
  assert got == pytest.approx(want, rel=2e-5, abs=2e-5)
  np.testing.assert_allclose(g, want_g, rtol=2e-4, atol=2e-6)


def test_ride_reweighting_switches_at_drw_start():
  z = jnp.asarray(_rand(3, (4, 3, 10), 10.0), jnp.float32)
  y = jnp.array([0, 3, 8, 9])
  c = jnp.asarray(COUNTS, jnp.float32)
  loss = losses.make_loss("ride", weights="effective_number", beta=0.9999, weight_norm="batch", drw_start=1)
  s0 = loss.init(10)
  before, s1 = loss.apply(z, y, c, s0)
  after, s2 = loss.apply(z, y, c, s1)
  assert int(s2["step"]) == 2
  np.testing.assert_allclose(before.mean(), _ride_reference(np.asarray(z), np.asarray(y), COUNTS)[0], rtol=2e-5)
  np.testing.assert_allclose(after.mean(), _ride_reference(np.asarray(z), np.asarray(y), COUNTS, reweight=True)[0],
                             rtol=2e-5)
  # The diversity temperatures: head class 1, the rarest class (C pi f + 1 - f) / max.
  p = COUNTS / COUNTS.sum()
  np.testing.assert_allclose(losses.ride_diversity_weights(c), (10 * p * 0.05 + 0.95) / (10 * p[0] * 0.05 + 0.95),
                             rtol=1e-6)
  padded, _ = loss.apply(z, jnp.array([0, 3, 8, -1]), c, s1)     # a padding row gives exactly 0
  assert float(padded[3]) == 0.0


# ----------------------------------------------------------------------------- SADE loss


def _inverse_prior_reference(p):
  """DiverseExpertLoss.inverse_prior: value, idx0 = sort(p); idx1 = argsort(idx0); value[C - 1 - idx1]."""
  idx0 = np.argsort(p, kind="stable")
  value = p[idx0]
  idx1 = np.argsort(idx0, kind="stable")
  return value[len(p) - 1 - idx1]


def test_inverse_prior_reverses_by_rank():
  p = np.array([0.05, 0.5, 0.15, 0.3])
  np.testing.assert_allclose(losses.inverse_prior(jnp.asarray(p)), [0.5, 0.05, 0.3, 0.15], rtol=1e-6)
  prior = COUNTS / COUNTS.sum()
  np.testing.assert_allclose(losses.inverse_prior(jnp.asarray(COUNTS)), prior[::-1], rtol=1e-6)
  tied = np.array([0.4, 0.2, 0.2, 0.1, 0.1])        # ties: by class index (stable sort), worked by hand
  np.testing.assert_allclose(losses.inverse_prior(jnp.asarray(tied)), [0.1, 0.2, 0.1, 0.4, 0.2], rtol=1e-6)
  np.testing.assert_allclose(losses.inverse_prior(jnp.asarray(tied)), _inverse_prior_reference(tied), rtol=1e-6)


def test_sade_loss_matches_reference_values_and_gradients():
  z = _rand(4, (6, 3, 10), 8.0)
  y = np.array([0, 1, 2, 9, 9, 5])
  prior = COUNTS / COUNTS.sum()
  adj = [np.zeros(10), np.log(prior + 1e-9), np.log(prior + 1e-9) - 2.0 * np.log(_inverse_prior_reference(prior) + 1e-9)]
  want, want_g = 0.0, np.zeros_like(z)
  for i in range(3):                                  # CE(z1) + CE(z2 + log pi) + CE(z3 + log pi - 2 log pi_inv)
    ls = _np_log_softmax(z[:, i] + adj[i])
    want += -ls[np.arange(6), y].mean()
    want_g[:, i] = (np.exp(ls) - np.eye(10)[y]) / 6
  loss = losses.make_loss("sade")
  f = lambda z: losses.reduce_mean(loss.apply(z, jnp.asarray(y), jnp.asarray(COUNTS, jnp.float32), ())[0])
  got, g = jax.value_and_grad(f)(jnp.asarray(z, jnp.float32))
  assert got == pytest.approx(want, rel=1e-5)
  np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="exactly 3 experts"):
    loss.apply(jnp.zeros((2, 4, 10)), jnp.array([0, 1]), jnp.asarray(COUNTS), ())
  with pytest.raises(ValueError, match="experts=True"):
    loss.apply(jnp.zeros((2, 10)), jnp.array([0, 1]), jnp.asarray(COUNTS), ())


@pytest.mark.parametrize("name", losses.EXPERT_LOSSES)
def test_expert_losses_registry_properties(name):
  """What tests/test_losses.py checks for every (B, C) loss: jit = eager, padding rows give 0, values
  and gradients finite for logits of +-1e30, bfloat16 and soft targets, and a zero-count class."""
  hp = dict(weights="effective_number", beta=0.999, weight_norm="batch", drw_start=0) if name == "ride" else {}
  L = losses.make_loss(name, **hp)
  st = L.init(10)
  r = np.random.default_rng(7)
  y = np.array([0, 3, 9, 5, -1])
  z = (3 * r.standard_normal((5, 3, 10))).astype(np.float32)
  eager, _ = L.apply(z, y, COUNTS, st)
  np.testing.assert_allclose(jax.jit(L.apply)(z, y, COUNTS, st)[0], eager, rtol=1e-5, atol=1e-5)
  assert float(eager[-1]) == 0.0 and np.all(np.asarray(eager[:-1]) > -1e3)
  z_ext = (1e30 * np.sign(r.standard_normal((5, 3, 10)))).astype(np.float32)
  soft = r.dirichlet(np.ones(10), 5).astype(np.float32)
  zero = COUNTS.copy()
  zero[2] = 0
  total = jax.jit(jax.grad(lambda zz, yy, c: jnp.sum(L.apply(zz, yy, c, st)[0])))
  for zz, yy, c in ((z_ext, y, COUNTS), (-z_ext, y, zero), (jnp.asarray(z, jnp.bfloat16), soft, COUNTS)):
    out = L.apply(zz, yy, c, st)[0]
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out)), out
    assert np.all(np.isfinite(np.asarray(total(zz, yy, c), np.float32)))


# ----------------------------------------------------------------------------- test-agnostic protocol


def _reference_counts(img_max, C, imb_factor, reverse):
  """IMBALANCECIFAR.get_img_num_per_cls('exp') of the reference (imb_factor = 1 / k)."""
  return [int(img_max * imb_factor ** (((C - 1 - i) if reverse else i) / (C - 1.0))) for i in range(C)]


def test_target_counts_follow_the_reference_construction():
  train = COUNTS  # decreasing in the class index, as CIFAR-LT: the rank is the index
  for name, (factor, reverse) in {"forward50": (0.02, False), "forward5": (0.2, False), "backward2": (0.5, True),
                                  "backward25": (0.04, True), "uniform": (1.0, False)}.items():
    np.testing.assert_array_equal(ta.target_counts(train, 1000, name), _reference_counts(1000, 10, factor, reverse))
  # The order follows the training counts, whatever the class index.
  perm = np.array([3, 0, 9, 1, 5, 2, 8, 4, 7, 6])
  np.testing.assert_array_equal(ta.target_counts(train[perm], 1000, "forward10"),
                                ta.target_counts(train, 1000, "forward10")[perm])
  assert ta.distribution_names() == ("forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
                                     "backward2", "backward5", "backward10", "backward25", "backward50")
  with pytest.raises(ValueError, match="forward<k>"):
    ta.parse_distribution("sideways10")


class _Toy(nn.Module):
  """A linear model with E experts on 2x2 grey images (fast to compile)."""
  num_classes: int = 4
  num_experts: int = 3

  @nn.compact
  def __call__(self, x, train, experts=False):
    f = x.reshape(x.shape[0], -1)
    w = self.param("w", nn.initializers.normal(2.0), (self.num_experts, f.shape[-1], self.num_classes))
    z = jnp.einsum("bd,edc->bec", f, w)
    return (z, f) if experts else (z.mean(1), f)


@functools.lru_cache(maxsize=None)
def _toy_ctx(per_class=60):
  C = 4
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(C), per_class)
  images = rng.integers(0, 256, (len(labels), 2, 2, 1)).astype(np.uint8)
  images[..., 0, 0, 0] = np.clip(images[..., 0, 0, 0] // 2 + 40 * labels, 0, 255)   # some signal
  ds = types.SimpleNamespace(test_images=images, test_labels=labels)
  model = _Toy(C)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 2, 2, 1)), train=False)
  ctx = evaluators.EvalContext(model=model, splits=evaluators.MemorySplits(ds), mesh=make_mesh(1),
                               counts=np.array([400, 120, 40, 8]), num_classes=C, mean=(0.5,), std=(0.25,),
                               batch_size=50, block=False, log=lambda *a: None, outputs=evaluators.OutputCache())
  return ctx, variables, images, labels


def _toy_logits(ctx, variables, images):
  x = (jnp.asarray(images, jnp.float32) / 255 - 0.5) / 0.25
  return np.asarray(ctx.model.apply(variables, x, train=False, experts=True)[0], np.float64)


def test_test_agnostic_evaluator_agrees_with_explicit_resampled_evaluation():
  ctx, variables, images, labels = _toy_ctx()
  imbalances = (10, 2)
  rec = evaluators.make("test_agnostic", ctx, imbalances=imbalances).evaluate(variables).summary
  res = evaluators.make("test_agnostic", ctx, imbalances=imbalances, resample=True, seed=3).evaluate(variables).summary
  assert rec["mode"] == "recall" and res["mode"] == "resampled"
  z = _toy_logits(ctx, variables, images).mean(1)
  pred = z.argmax(1)
  train_prior = ctx.counts / ctx.counts.sum()
  for name in ta.distribution_names(imbalances):
    direction, k = ta.parse_distribution(name)
    n = np.array(_reference_counts(60, 4, 1 / k, direction == "backward"))
    # (1) the evaluator's resampled mode = this explicit computation (same documented subsets).
    rng = np.random.default_rng(3)
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n[c]] for c in range(4)])
    assert res[name] == pytest.approx(np.mean(pred[idx] == labels[idx]), abs=1e-12)
    adj = z - np.log(train_prior) + np.log(n / n.sum())
    assert res[f"posthoc_{name}"] == pytest.approx(np.mean(adj[idx].argmax(1) == labels[idx]), abs=1e-12)
    # (2) the recall formula = the mean accuracy over many independent resampled test sets
    # (the reference's legacy-NumPy per-class shuffles), within 4 standard errors.
    accs = []
    for s in range(400):
      r = np.random.RandomState(s)
      sub = np.concatenate([r.permutation(np.flatnonzero(labels == c))[:n[c]] for c in range(4)])
      accs.append(np.mean(pred[sub] == labels[sub]))
    se = np.std(accs) / np.sqrt(len(accs))
    assert abs(rec[name] - np.mean(accs)) <= 4 * se + 1e-12, (name, rec[name], np.mean(accs), se)
    recall = np.array([np.mean(pred[labels == c] == c) for c in range(4)])
    assert rec[name] == pytest.approx(np.sum(n / n.sum() * recall), abs=1e-12)
    adj_recall = np.array([np.mean(adj.argmax(1)[labels == c] == c) for c in range(4)])
    assert rec[f"posthoc_{name}"] == pytest.approx(np.sum(n / n.sum() * adj_recall), abs=1e-12)
  assert rec["uniform"] == pytest.approx(np.mean(pred == labels), abs=1e-12)


# ----------------------------------------------------------------------------- SADE aggregation


def test_aggregation_objective_value_and_gradient_match_numpy():
  raw = np.array([0.2, -0.4, 0.9])
  v0, v1 = _rand(5, (9, 3, 5), 3.0), _rand(6, (9, 3, 5), 3.0)
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0], bool)

  def ref(w):
    a = np.exp(w) / np.exp(w).sum()
    p0 = np.exp(_np_log_softmax(np.einsum("nec,e->nc", v0, a)))
    p1 = np.exp(_np_log_softmax(np.einsum("nec,e->nc", v1, a)))
    cos = (p0 * p1).sum(1) / (np.linalg.norm(p0, axis=1) * np.linalg.norm(p1, axis=1))
    return -cos[mask].mean()

  f = lambda w: ta.aggregation_objective(w, jnp.asarray(v0, jnp.float32), jnp.asarray(v1, jnp.float32),
                                         jnp.asarray(mask))
  got, g = jax.value_and_grad(f)(jnp.asarray(raw, jnp.float32))
  assert float(got) == pytest.approx(ref(raw), rel=1e-5)
  h = 1e-6
  num = np.array([(ref(raw + h * e) - ref(raw - h * e)) / (2 * h) for e in np.eye(3)])
  np.testing.assert_allclose(g, num, rtol=1e-3, atol=1e-6)


def test_sade_aggregation_objective_decreases_without_labels():
  """A fixed toy set: expert 0 predicts the same class on both views, experts 1, 2 disagree."""
  n, C = 64, 5
  rng = np.random.default_rng(0)
  base = rng.standard_normal((n, C)) * 4
  v0 = np.stack([base, rng.standard_normal((n, C)) * 4, rng.standard_normal((n, C)) * 4], 1)
  v1 = np.stack([base, rng.standard_normal((n, C)) * 4, rng.standard_normal((n, C)) * 4], 1)
  views = (jnp.asarray(v0, jnp.float32), jnp.asarray(v1, jnp.float32))
  assert "labels" not in inspect.signature(ta.fit_aggregation).parameters
  weights, history = ta.fit_aggregation(lambda key: views, n, jax.random.key(0), epochs=5, batch_size=16,
                                        stop_below=0.0)
  obj = lambda a: float(ta.aggregation_objective(jnp.log(jnp.asarray(a, jnp.float32)), *views))
  assert obj(weights) < obj(np.full(3, 1 / 3)) - 0.05       # the agreement of the two views went up
  assert weights[0] > 0.5 and weights.sum() == pytest.approx(1.0)
  assert len(history) == 5 and np.mean(history[-1]) < np.mean(history[0])
  # The reference stops once a (2-decimal) weight drops below 0.05.
  w2, h2 = ta.fit_aggregation(lambda key: views, n, jax.random.key(0), epochs=50, batch_size=16)
  assert len(h2) < 50 and np.round(w2, 2).min() < 0.05


def test_evaluator_aggregation_sees_images_only(monkeypatch):
  ctx, variables, images, labels = _toy_ctx()
  seen = []
  fit = ta.fit_aggregation

  def spy(view_logits, num_examples, key, **kw):
    seen.append(num_examples)
    return fit(view_logits, num_examples, key, **kw)

  monkeypatch.setattr(ta, "fit_aggregation", spy)
  ev = evaluators.make("test_agnostic", ctx, imbalances=(5,), aggregate=True, epochs=2, batch_size=32, crop_pad=0,
                       seed=1)
  s = ev.evaluate(variables).summary
  assert s["mode"] == "aggregated" and len(seen) == 3
  zE = _toy_logits(ctx, variables, images)
  key = jax.random.key(1)
  for i, name in enumerate(ta.distribution_names((5,))):
    n = ta.target_counts(ctx.counts, 60, name)
    idx = ta.resampled_indices(labels, n, 1)
    assert seen[i] == len(idx)
    # The same weights from the subset's images alone (no labels passed anywhere).
    w = ev._aggregation_weights(variables, images[idx], jax.random.fold_in(key, i))
    np.testing.assert_allclose(s[f"weights_{name}"], w, rtol=1e-6)
    assert s[name] == pytest.approx(np.mean(np.einsum("nec,e->nc", zE[idx], w).argmax(1) == labels[idx]))
    assert s[f"no_aggregation_{name}"] == pytest.approx(np.mean(zE[idx].mean(1).argmax(1) == labels[idx]))


# ----------------------------------------------------------------------------- configs and one run


def test_variants_and_config_errors():
  c = fashion_mnist_lt.get_config("loss=ride_drw,epochs=4")
  assert (c.model.name, c.model.head, c.model.cosine_scale, c.model.num_experts) == ("cnn_experts", "cosine", 30.0, 3)
  assert c.loss.name == "ride" and c.loss.drw_epoch == 3.0 and c.loss.hparams.weights == "effective_number"
  cfg.validate(c)
  s = fashion_mnist_lt.get_config("loss=sade,smoke")
  assert s.evals.test_agnostic.aggregate and s.evals.test_agnostic.imbalances == (10,)
  cfg.validate(s)
  la = fashion_mnist_lt.get_config("loss=la,test_agnostic")
  assert la.evals.test_agnostic.train_prior_tau == 0.0 and not la.evals.test_agnostic.aggregate
  assert fashion_mnist_lt.get_config("test_agnostic").evals.test_agnostic.train_prior_tau == 1.0
  assert cifar_lt.get_config("loss=ride").model.name == "resnet32_experts"
  bad = [("--config.loss.name=ride", lambda c: setattr(c.loss, "name", "ride"), "multi-expert model"),
         ("sade with 4 experts", lambda c: (cfg.set_loss(c, "sade"), setattr(c.model, "num_experts", 4)), "exactly 3"),
         ("crt on experts", lambda c: (cfg.set_loss(c, "ride"), setattr(c, "stages", "crt")), "params\\['head'\\]"),
         ("s != scale", lambda c: (cfg.set_loss(c, "ride"), setattr(c.model, "cosine_scale", 16.0)), "must equal"),
         ("aggregate on cnn", lambda c: (cfg.add_test_agnostic(c, aggregate=True)), "multi-expert model")]
  for what, edit, match in bad:
    c = fashion_mnist_lt.get_config()
    edit(c)
    with pytest.raises(cfg.ConfigError, match=match):
      cfg.validate(c)
  c = fashion_mnist_lt.get_config("test_agnostic")
  c.evals = {"test_agnostic": c.evals.test_agnostic}
  with pytest.raises(cfg.ConfigError, match="first"):
    cfg.validate(c)
  c = fashion_mnist_lt.get_config()
  c.model.name = "resnet50"
  with pytest.raises(cfg.ConfigError, match="cnn_experts"):
    cfg.use_experts(c)


def test_sade_end_to_end_on_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=400):
    c = cifar_lt.get_config("smoke")
    c.model.name = "cnn"
    cfg.set_loss(c, "sade")
    c.dataset.imbalance_ratio = 4.0
    c.quiet = True
    c.evals.test_agnostic.update(dict(imbalances=(4,), epochs=1, max_per_class=8))
    out = train_and_evaluate(c, str(tmp_path))
  assert out["step"] == 3 and c.model.name == "cnn_experts"
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(out["state"].params["experts"]))
  summary = json.load(open(tmp_path / "summary.json"))
  table = summary["test_agnostic"]
  assert table["distributions"] == ["forward4", "uniform", "backward4"] and table["mode"] == "aggregated"
  for d in table["distributions"]:
    assert 0 <= table[d] <= 1 and sum(table[f"weights_{d}"]) == pytest.approx(1.0, abs=1e-5)
  assert np.isfinite(summary["balanced_error_rate"])

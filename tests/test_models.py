"""Tests for lt_jax.models: shapes, parameter counts, shortcuts, init, heads, BBN, dtypes,
the hand-written BatchNorm backward."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import flax.linen as nn

from lt_jax import models
from lt_jax.models import layers
from lt_jax.models.cnn import max_pool_2x2
from lt_jax.models.resnet import Bottleneck
from lt_jax.models.resnet_cifar import CifarResNet, option_a_shortcut, param_count_cifar_resnet


def _randn(seed: int, shape) -> jax.Array:
  """Test inputs from NumPy (jax.random.normal compiles a kernel per new shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _n_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


@functools.lru_cache(maxsize=None)
def _small_vars():
  """ResNet-8 (one block per stage): the same code path as ResNet-32, compiles fast."""
  m = CifarResNet(num_classes=10, depth=8)
  return m, jax.jit(lambda k: m.init(k, jnp.zeros((2, 16, 16, 3)), train=False))(jax.random.key(0))


# ---------------------------------------------------------------------------------------
# Shapes and parameter counts.

_SHAPES = {
    "resnet20": ((2, 32, 32, 3), 64), "resnet32": ((2, 32, 32, 3), 64),
    "resnet44": ((2, 32, 32, 3), 64), "resnet56": ((2, 32, 32, 3), 64),
    "cnn": ((2, 28, 28, 1), 128), "resnet50": ((2, 32, 32, 3), 2048),
    "resnext50": ((2, 32, 32, 3), 2048),
    "cnn_experts": ((2, 28, 28, 1), 3 * 96), "resnet20_experts": ((2, 32, 32, 3), 3 * 48),  # E * D features
    "resnet32_experts": ((2, 32, 32, 3), 3 * 48),
}


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("train", [False, True])
def test_output_shapes_all_models(name, train):
  shape, dim = _SHAPES[name]
  m = models.get_model(name, num_classes=7)
  variables = _abstract_init(m, shape)
  assert set(variables) == {"params", "batch_stats"}
  if train:
    (logits, feats), upd = jax.eval_shape(
        lambda v: m.apply(v, jnp.zeros(shape), train=True, mutable=["batch_stats"]), variables)
    assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  else:
    logits, feats = jax.eval_shape(lambda v: m.apply(v, jnp.zeros(shape), train=False), variables)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert feats.shape == (2, dim) and feats.dtype == jnp.float32


def test_cifar_resnet_and_cnn_run_finite():
  m, v = _small_vars()
  x = _randn(1, (2, 16, 16, 3))
  (logits, feats), upd = jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  assert logits.shape == (2, 10) and feats.shape == (2, 64)
  assert np.all(np.isfinite(logits)) and np.all(np.asarray(feats) >= 0)  # pooled ReLU output
  # Running statistics moved towards the batch statistics (momentum 0.9).
  assert not np.allclose(upd["batch_stats"]["bn_init"]["mean"], 0.0)
  c = models.get_model("cnn", num_classes=10)
  cv = jax.jit(lambda k: c.init(k, jnp.zeros((2, 28, 28, 1)), train=False))(jax.random.key(0))
  logits, feats = jax.jit(lambda v, x: c.apply(v, x, train=False))(cv, jnp.ones((3, 28, 28)))
  assert logits.shape == (3, 10) and feats.shape == (3, 128) and np.all(np.isfinite(logits))


def test_resnext_bottleneck_runs():
  """A grouped (ResNeXt 32x4d-style) stride-2 bottleneck with projection, run for real."""
  blk = Bottleneck(16, stride=2, groups=4, width_per_group=8)   # width = 16*8/64*4 = 8
  x = _randn(0, (2, 8, 8, 32))
  v = jax.jit(lambda k: blk.init(k, x, train=False))(jax.random.key(1))
  assert v["params"]["conv2"]["kernel"].shape == (3, 3, 2, 8)      # 8 channels in 4 groups
  assert v["params"]["downsample_conv"]["kernel"].shape == (1, 1, 32, 64)
  y, _ = jax.jit(lambda v, x: blk.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  assert y.shape == (2, 4, 4, 64) and np.all(np.isfinite(y)) and np.all(np.asarray(y) >= 0)


def test_resnet32_param_count_exact():
  """464,154 = 464 (stem) + 23,360 + 88,192 + 351,488 (stages) + 650 (10-class head).

  Derivation (param_count_cifar_resnet docstring): a basic block c_in -> w has two bias-free
  3x3 convs (9 c_in w + 9 w^2) and two BN scale/bias pairs (4 w); option-A shortcuts
  have no parameters. This is the LDAM-DRW resnet32 count (BN affine params included).
  """
  v = _abstract_init(models.get_model("resnet32", num_classes=10), (1, 32, 32, 3))
  assert _n_params(v["params"]) == 464_154
  assert param_count_cifar_resnet(32, 10) == 464_154
  # Stage by stage against the hand derivation.
  p = v["params"]
  stage = lambda s: sum(_n_params(p[f"stage{s}_block{k}"]) for k in range(5))
  assert _n_params(p["conv_init"]) + _n_params(p["bn_init"]) == 432 + 32
  assert (stage(1), stage(2), stage(3)) == (23_360, 88_192, 351_488)
  assert _n_params(p["head"]) == 650
  # Running statistics are not parameters: 2 * channels per BN, 31 BNs.
  assert _n_params(v["batch_stats"]) == 2 * (16 + 5 * 2 * 16 + 5 * 2 * 32 + 5 * 2 * 64)


@pytest.mark.parametrize("name,count", [("resnet20", 269_722), ("resnet44", 658_586),
                                        ("resnet56", 853_018)])
def test_cifar_resnet_param_counts(name, count):
  """Known option-A CIFAR ResNet sizes (0.27M / 0.66M / 0.85M, He et al. 2016 Table 6)."""
  v = _abstract_init(models.get_model(name, num_classes=10), (1, 32, 32, 3))
  assert _n_params(v["params"]) == count == param_count_cifar_resnet(int(name[6:]), 10)


@pytest.mark.parametrize("name,count", [("resnet50", 25_557_032), ("resnext50", 25_028_904)])
def test_imagenet_resnet_param_counts(name, count):
  """torchvision's resnet50 / resnext50_32x4d with a 1000-class head."""
  v = _abstract_init(models.get_model(name, num_classes=1000), (1, 64, 64, 3))
  assert _n_params(v["params"]) == count


# ---------------------------------------------------------------------------------------
# Option-A shortcut.


def test_option_a_shortcut_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)            # NHWC, C_in = 3
  got = np.asarray(option_a_shortcut(jnp.asarray(x), planes=8, stride=2))
  # Hand computation: subsample rows/cols 0, 2, 4..., zero-pad channels 2 before, 3 after.
  want = np.zeros((2, 2, 3, 8), np.float32)
  for b in range(2):
    for h in range(2):
      for w in range(3):
        want[b, h, w, 2:5] = x[b, 2 * h, 2 * w, :]
  np.testing.assert_array_equal(got, want)
  # The reference's doubling case pads planes // 4 on each side (16 -> 32: 8 + 16 + 8).
  x16 = jnp.asarray(rng.normal(size=(1, 4, 4, 16)).astype(np.float32))
  y = np.asarray(option_a_shortcut(x16, 32, 2))
  assert y.shape == (1, 2, 2, 32)
  np.testing.assert_array_equal(y[..., 8:24], np.asarray(x16)[:, ::2, ::2, :])
  assert not y[..., :8].any() and not y[..., 24:].any()
  # Identity when nothing changes.
  np.testing.assert_array_equal(np.asarray(option_a_shortcut(x16, 16, 1)), np.asarray(x16))
  with pytest.raises(ValueError):
    option_a_shortcut(x16, 8, 1)


def test_block_uses_option_a_shortcut():
  """A stride-2 block with zeroed conv weights outputs relu(BN bias + shortcut)."""
  from lt_jax.models.resnet_cifar import BasicBlock
  blk = BasicBlock(8, 2)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 4)).astype(np.float32))
  v = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                   jax.eval_shape(lambda: blk.init(jax.random.key(0), x, train=False)))  # convs 0, BN scale 0 and bias 0, running var 0
  y = blk.apply(v, x, train=False)
  np.testing.assert_allclose(np.asarray(y), np.maximum(np.asarray(option_a_shortcut(x, 8, 2)), 0), atol=1e-6)


# ---------------------------------------------------------------------------------------
# Init, heads and parameter layout.


def _check_kaiming(w, fan):
  w = np.asarray(w).ravel()
  std = np.sqrt(2.0 / fan)
  # Sample std of n normal draws has relative s.e. 1/sqrt(2n) (< 0.5% here).
  assert abs(w.std() / std - 1.0) < 0.04, (w.std(), std)
  assert abs(w.mean()) < 4 * std / np.sqrt(w.size)
  # Untruncated normal: P(|z| > 2) = 4.55% (a 2-sigma truncated normal would give 0).
  assert 0.03 < np.mean(np.abs(w) > 2 * std) < 0.06


def test_kaiming_normal_init():
  _, v = _small_vars()   # CifarResNet(depth=8): the ResNet-32 init code, one block per stage
  p = v["params"]
  _check_kaiming(p["stage3_block0"]["conv2"]["kernel"], fan=3 * 3 * 64)   # 36,864 draws
  _check_kaiming(p["stage3_block0"]["conv1"]["kernel"], fan=3 * 3 * 32)   # 18,432 draws
  _check_kaiming(p["stage2_block0"]["conv2"]["kernel"], fan=3 * 3 * 32)   # 9,216 draws
  _check_kaiming(np.concatenate([np.asarray(p["stage1_block0"][c]["kernel"]).ravel()
                                 for c in ("conv1", "conv2")]), fan=3 * 3 * 16)
  # Linear classifier: kaiming_normal_ on a (C, D) torch weight -> fan_in = D = 64.
  head = np.asarray(p["head"]["kernel"])
  assert head.shape == (64, 10)
  assert abs(head.std() / np.sqrt(2.0 / 64) - 1.0) < 0.2     # 640 draws (s.e. 2.8%)
  assert not np.asarray(p["head"]["bias"]).any()
  assert np.all(np.asarray(p["bn_init"]["scale"]) == 1) and not np.asarray(p["bn_init"]["bias"]).any()
  # ResNet-50 blocks follow torchvision: fan_out mode.
  bv = jax.jit(lambda k: Bottleneck(64).init(k, jnp.zeros((1, 8, 8, 256)), train=False))(
      jax.random.key(3))["params"]
  _check_kaiming(bv["conv2"]["kernel"], fan=3 * 3 * 64)                   # 3x3, 64 -> 64
  _check_kaiming(bv["conv3"]["kernel"], fan=256)                          # 1x1, 64 -> 256


@pytest.mark.parametrize("head,leaves", [("linear", {"kernel", "bias"}), ("cosine", {"kernel"}),
                                         ("lws", {"kernel", "bias", "scales"})])
def test_head_params_live_under_head(head, leaves):
  for name, shape, dim in [("resnet32", (1, 32, 32, 3), 64), ("cnn", (1, 28, 28, 1), 128),
                           ("resnet50", (1, 32, 32, 3), 2048)]:
    v = _abstract_init(models.get_model(name, num_classes=6, head=head), shape)
    assert set(v["params"]["head"]) == leaves
    assert v["params"]["head"]["kernel"].shape == (dim, 6)
    # Nothing else in the tree belongs to a classifier.
    others = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(v["params"])
              if "head" not in jax.tree_util.keystr(p)]
    assert not any("scales" in o or "kernel'][" in o for o in others)
    assert "head" not in v["batch_stats"]


def test_logits_are_head_of_features():
  """LWS and cosine heads on the backbone features (linear: test_bbn_feature_mixing)."""
  _, v = _small_vars()
  x = _randn(2, (3, 16, 16, 3))
  kernel = v["params"]["head"]["kernel"]
  heads = {"lws": {"kernel": kernel, "bias": jnp.linspace(-1, 1, 10), "scales": jnp.linspace(0.5, 2, 10)},
           "cosine": {"kernel": kernel}}
  for head, hp in heads.items():
    m = CifarResNet(num_classes=10, depth=8, head=head, cosine_scale=16.0)
    params = dict(v["params"], head=hp)
    logits, feats = jax.jit(lambda p, x: m.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                                                  train=True, mutable=["batch_stats"])[0])(params, x)
    if head == "cosine":
      f = feats / jnp.linalg.norm(feats, axis=1, keepdims=True)
      k = kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)
      want = 16.0 * (f @ k)
      assert np.max(np.abs(logits)) <= 16.0 + 1e-4
    else:
      want = (feats @ kernel + hp["bias"]) * hp["scales"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# BBN.


def test_bbn_feature_mixing():
  m = CifarResNet(num_classes=5, depth=14, bbn=True)   # n = 2: stage3_block1 becomes cb/rb
  x = _randn(0, (3, 16, 16, 3))
  x_rb = _randn(1, (3, 16, 16, 3))
  v = jax.jit(lambda k: m.init(k, x, train=False))(jax.random.key(2))
  assert {"cb_block", "rb_block", "head"} <= set(v["params"])
  assert "stage3_block1" not in v["params"] and "stage3_block0" in v["params"]
  assert _n_params(v["params"]["cb_block"]) == _n_params(v["params"]["rb_block"]) == 2 * 9 * 64 * 64 + 4 * 64
  assert v["params"]["head"]["kernel"].shape == (128, 5)
  apply = jax.jit(lambda v, x, x_rb, a: m.apply(v, x, train=False, x_rb=x_rb, alpha=a))
  test_apply = jax.jit(lambda v, x: m.apply(v, x, train=False))
  _, f_x = test_apply(v, x)            # [f_cb(x) ; f_rb(x)]
  _, f_xrb = test_apply(v, x_rb)       # [f_cb(x_rb) ; f_rb(x_rb)]
  f_cb, f_rb = f_x[:, :64], f_xrb[:, 64:]
  assert not np.allclose(f_x[:, :64], f_x[:, 64:])   # the branches differ (own params)
  hp = v["params"]["head"]
  for alpha in (0.0, 0.3, 0.8, 1.0):
    logits, feats = apply(v, x, x_rb, alpha)
    want = np.concatenate([2 * alpha * np.asarray(f_cb), 2 * (1 - alpha) * np.asarray(f_rb)], 1)
    np.testing.assert_allclose(np.asarray(feats), want, rtol=1e-5, atol=1e-6)
    want_logits = want @ np.asarray(hp["kernel"]) + np.asarray(hp["bias"])
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4,
                               atol=1e-5 * np.abs(want_logits).max())
  # Test-time concatenation equals the training formula at alpha = 0.5 on the same input.
  l_test, f_test = test_apply(v, x)
  l_half, f_half = apply(v, x, x, 0.5)
  np.testing.assert_allclose(np.asarray(f_half), np.asarray(f_test), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(l_half), np.asarray(l_test), rtol=1e-6, atol=1e-6)
  # Training mode runs both trunk passes and updates the running statistics.
  (logits, feats), upd = jax.jit(lambda v: m.apply(v, x, train=True, x_rb=x_rb, alpha=0.7,
                                                   mutable=["batch_stats"]))(v)
  assert logits.shape == (3, 5) and feats.shape == (3, 128)
  assert set(upd["batch_stats"]) == set(v["batch_stats"])
  # Non-BBN models reject the BBN arguments.
  m1, v1 = _small_vars()
  with pytest.raises(ValueError):
    jax.eval_shape(lambda v: m1.apply(v, x, train=False, alpha=0.5), v1)


# ---------------------------------------------------------------------------------------
# bfloat16 compute.


@pytest.mark.parametrize("name,shape", [("resnet8", (8, 16, 16, 3)), ("cnn", (8, 28, 28, 1))])
def test_bfloat16_compute_close_to_float32(name, shape):
  build = ((lambda **kw: CifarResNet(depth=8, **kw)) if name == "resnet8" else
           (lambda **kw: models.get_model(name, **kw)))
  m32 = build(num_classes=10)
  m16 = build(num_classes=10, dtype="bfloat16")
  v = (_small_vars()[1] if name == "resnet8" else
       jax.jit(lambda k: m32.init(k, jnp.zeros(shape), train=False))(jax.random.key(0)))
  v16 = _abstract_init(m16, shape)   # same tree, float32 parameters and statistics
  assert jax.tree.structure(v16) == jax.tree.structure(v)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype == jnp.float32, v, v16))
  x = _randn(1, shape)
  run = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  (l32, f32), s32 = run(m32)
  (l16, f16), s16 = run(m16)
  assert l16.dtype == jnp.float32 and f16.dtype == jnp.float32
  assert jax.tree.all(jax.tree.map(lambda a: a.dtype == jnp.float32, s16))
  rel = float(jnp.max(jnp.abs(l16 - l32)) / jnp.max(jnp.abs(l32)))
  assert rel < 0.05, rel
  assert float(jnp.max(jnp.abs(f16 - f32)) / jnp.max(jnp.abs(f32))) < 0.05
  with pytest.raises(ValueError):
    _abstract_init(build(dtype="float16"), shape)


# ---------------------------------------------------------------------------------------
# Fused BatchNorm against the flax reference; bn_impl='auto' resolution.


def test_model_gradients_equal_across_conv_and_bn_impls():
  """ResNet-8 loss gradients: (xla, flax BN) == (xla, fused BN) to 1e-4 relative."""
  x = _randn(0, (4, 16, 16, 3))
  y = jnp.arange(4) % 10
  grads = {}
  _, v = _small_vars()
  for conv_impl, bn_impl in [("xla", "flax"), ("xla", "fused")]:
    m = CifarResNet(depth=8, conv_impl=conv_impl, bn_impl=bn_impl)
    assert jax.tree.structure(_abstract_init(m, x.shape)) == jax.tree.structure(v)

    def loss(p, m=m, v=v):
      (logits, _), _ = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                               mutable=["batch_stats"])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    grads[(conv_impl, bn_impl)] = jax.jit(jax.grad(loss))(v["params"])
  ref = grads[("xla", "flax")]
  for key, g in grads.items():
    errs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12)), g, ref)
    worst = max(jax.tree.leaves(errs))
    assert worst < 1e-4, (key, worst)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_batchnorm_matches_flax(dtype):
  x = (3.0 + 2.0 * _randn(0, (4, 5, 5, 6))).astype(dtype)
  fused = layers.batch_norm(True, dtype, bn_impl="fused")
  ref = layers.batch_norm(True, dtype, bn_impl="flax")
  v = ref.init(jax.random.key(1), x)
  assert jax.tree.structure(fused.init(jax.random.key(1), x)) == jax.tree.structure(v)
  v = {"params": {"scale": jnp.linspace(0.5, 1.5, 6), "bias": jnp.linspace(-1, 1, 6)},
       "batch_stats": v["batch_stats"]}
  g = _randn(2, x.shape)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2

  def run(mod):
    def f(params, x):
      y, upd = mod.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
      return jnp.sum(y.astype(jnp.float32) * g), (y, upd)
    (_, (y, upd)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(v["params"], x)
    return y, upd, grads

  y1, u1, g1 = run(fused)
  y0, u0, g0 = run(ref)
  assert y1.dtype == y0.dtype == dtype
  np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y0, np.float32), rtol=tol, atol=tol)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), (np.max(np.abs(a - b)), np.max(np.abs(b)))
  # Eval mode uses the running statistics.
  ev = layers.batch_norm(False, jnp.float32, bn_impl="fused")
  st = {"params": v["params"], "batch_stats": {"mean": jnp.full(6, 2.0), "var": jnp.full(6, 4.0)}}
  xe = jnp.ones((2, 6))
  np.testing.assert_allclose(np.asarray(ev.apply(st, xe)),
                             np.asarray((1.0 - 2.0) / np.sqrt(4.0 + 1e-5) * st["params"]["scale"]
                                        + st["params"]["bias"])[None].repeat(2, 0), rtol=1e-6)


def test_bn_impl_auto_resolution():
  assert layers.resolve_bn_impl("auto", "cpu") == "fused"
  assert layers.resolve_bn_impl("auto", "gpu") == "flax" and layers.resolve_bn_impl("auto", "tpu") == "flax"
  assert layers.resolve_bn_impl("auto") == ("fused" if jax.default_backend() == "cpu" else "flax")
  for impl in ("fused", "flax"):
    assert layers.resolve_bn_impl(impl, "cpu") == impl and layers.resolve_bn_impl(impl, "gpu") == impl
  with pytest.raises(ValueError, match="auto"):
    layers.resolve_bn_impl("group")
  assert models.get_model("resnet32").bn_impl == "auto"


def test_bn_impl_auto_is_the_old_default_on_cpu():
  """On CPU, bn_impl='auto' is bit-identical to 'fused' (the previous default): values and grads."""
  assert jax.default_backend() == "cpu"
  x = _randn(0, (4, 16, 16, 3))
  out = {}
  for impl in ("auto", "fused"):
    m = CifarResNet(depth=8, bn_impl=impl)
    v = m.init(jax.random.key(0), x, train=False)

    def loss(p, m=m, v=v):
      (logits, _), upd = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
      return jnp.sum(logits ** 2), upd

    out[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
  for a, b in zip(jax.tree.leaves(out["auto"]), jax.tree.leaves(out["fused"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_max_pool_2x2_matches_flax():
  x = _randn(0, (2, 6, 4, 3))
  np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)),
                                np.asarray(nn.max_pool(x, (2, 2), strides=(2, 2))))
  with pytest.raises(ValueError):
    max_pool_2x2(jnp.zeros((1, 5, 4, 1)))


# ---------------------------------------------------------------------------------------
# Factory, options and errors.


def test_get_model_errors_and_defaults():
  with pytest.raises(ValueError, match="resnet32"):
    models.get_model("vgg16")
  with pytest.raises(ValueError, match="linear"):
    models.get_model("resnet32", head="softmax")
  with pytest.raises(ValueError, match="bbn"):
    models.get_model("resnet50", bbn=True)
  with pytest.raises(ValueError, match="xla"):
    models.get_model("resnet32", conv_impl="winograd")
  with pytest.raises(ValueError, match="xla"):
    models.get_model("resnet32", conv_impl="im2col")  # removed: slower than XLA everywhere
  with pytest.raises(ValueError, match="fused"):
    models.get_model("resnet32", bn_impl="group")
  with pytest.raises(ValueError, match="6n\\+2"):
    _abstract_init(CifarResNet(depth=30), (1, 32, 32, 3))
  m = models.get_model("resnet32")
  assert isinstance(m, CifarResNet) and m.depth == 32 and m.conv_impl == "xla" and m.bn_impl == "auto"
  assert models.get_model("resnext50").groups == 32
  assert set(models.MODELS) == {"resnet20", "resnet32", "resnet44", "resnet56", "cnn", "resnet50",
                                "resnext50", "cnn_experts", "resnet20_experts", "resnet32_experts"}


def test_cpu_compiler_options():
  assert layers.cpu_compiler_options("gpu") == {} and layers.cpu_compiler_options("tpu") == {}
  opts = layers.cpu_compiler_options()
  if jax.default_backend() != "cpu":
    assert opts == {}
    return
  assert "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION" not in opts.get(
      "xla_cpu_experimental_ynn_fusion_type", "")
  x = _randn(0, (2, 8, 8, 4))
  w = _randn(1, (3, 3, 4, 5))
  f = lambda x, w: jax.grad(lambda w: jnp.sum(jnp.sin(layers.conv2d(x, w, 1, 1))))(w)
  np.testing.assert_allclose(np.asarray(jax.jit(f, compiler_options=opts)(x, w)),
                             np.asarray(jax.jit(f)(x, w)), rtol=1e-5, atol=1e-5)

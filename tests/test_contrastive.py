"""Contrastive learning: SupCon / NT-Xent, BCL and PaCo losses against NumPy float64 transcriptions of
the reference code (values and gradients), SimCLR augmentation, multi-view sampling, the PaCo queue
on 1 vs 2 devices, the config variants and one end-to-end run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lt_jax import losses, samplers
from lt_jax.data import augment
from lt_jax.models import get_model
from lt_jax.models.contrastive import ContrastiveNet
from lt_jax.train import config as config_lib, contrastive, steps
from lt_jax.train.state import create_state, make_mesh, put_global, replicated

RNG = np.random.default_rng(0)


def unit(x, axis=-1):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def num_grad(f, x, eps=1e-6):
  """Central finite differences of a float64 NumPy function."""
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[i] = eps
    g[i] = (f(x + d) - f(x - d)) / (2 * eps)
  return g


# ------------------------------------------------------------------ NumPy transcriptions of the references


def np_supcon(features, labels=None, temperature=0.07, base_temperature=0.07):
  """SupContrast losses.py::SupConLoss.forward, contrast_mode='all'; features [bsz, n_views, d]."""
  bsz, n_views = features.shape[:2]
  mask = np.eye(bsz) if labels is None else (labels[:, None] == labels[None, :]).astype(float)
  contrast = np.concatenate([features[:, v] for v in range(n_views)], 0)
  adc = contrast @ contrast.T / temperature
  logits = adc - adc.max(1, keepdims=True)
  mask = np.tile(mask, (n_views, n_views))
  logits_mask = np.ones_like(mask)
  logits_mask[np.arange(bsz * n_views), np.arange(bsz * n_views)] = 0
  mask = mask * logits_mask
  exp_logits = np.exp(logits) * logits_mask
  log_prob = logits - np.log(exp_logits.sum(1, keepdims=True))
  mpp = mask.sum(1)
  mpp = np.where(mpp < 1e-6, 1, mpp)
  mean_log_prob_pos = (mask * log_prob).sum(1) / mpp
  return (-(temperature / base_temperature) * mean_log_prob_pos).reshape(n_views, bsz)


def np_balscl(centers, features, targets, num_classes, temperature=0.1):
  """BCL loss/contrastive.py::BalSCL.forward (2 views); features [bsz, 2, d]."""
  bsz = features.shape[0]
  targets = targets.reshape(-1, 1)
  t = np.concatenate([np.tile(targets, (2, 1)), np.arange(num_classes).reshape(-1, 1)], 0)
  batch_cls_count = np.eye(num_classes)[t[:, 0]].sum(0)
  mask = (t[:2 * bsz] == t.T).astype(float)
  logits_mask = np.ones_like(mask)
  logits_mask[np.arange(2 * bsz), np.arange(2 * bsz)] = 0
  mask = mask * logits_mask
  f = np.concatenate([features[:, 0], features[:, 1]], 0)
  f = np.concatenate([f, centers], 0)
  logits = f[:2 * bsz] @ f.T / temperature
  logits = logits - logits.max(1, keepdims=True)
  exp_logits = np.exp(logits) * logits_mask
  per_ins_weight = np.broadcast_to(batch_cls_count[t[:, 0]][None, :], mask.shape) - mask
  exp_logits_sum = (exp_logits / per_ins_weight).sum(1, keepdims=True)
  log_prob = logits - np.log(exp_logits_sum)
  mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
  return (-mean_log_prob_pos).reshape(2, bsz)


def np_paco(features, labels, sup_logits, cls_num_list, K, num_classes, alpha, beta, gamma, temperature,
            supt=1.0):
  """PaCo LT/losses.py::PaCoLoss.forward; features = [q; k; queue], labels = [y; y; queue labels]."""
  weight = np.asarray(cls_num_list, float) / np.sum(cls_num_list)
  batch_size = (features.shape[0] - K) // 2
  labels = labels.reshape(-1, 1)
  mask = (labels[:batch_size] == labels.T).astype(float)
  adc = features[:batch_size] @ features.T / temperature
  adc = np.concatenate([(sup_logits + np.log(weight + 1e-9)) / supt, adc], 1)
  logits = adc - adc.max(1, keepdims=True)
  logits_mask = np.ones_like(mask)
  logits_mask[np.arange(batch_size), np.arange(batch_size)] = 0
  mask = mask * logits_mask
  one_hot = np.eye(num_classes)[labels[:batch_size, 0]]
  mask = np.concatenate([one_hot * beta, mask * alpha], 1)
  logits_mask = np.concatenate([np.ones((batch_size, num_classes)), gamma * logits_mask], 1)
  exp_logits = np.exp(logits) * logits_mask
  log_prob = logits - np.log(exp_logits.sum(1, keepdims=True) + 1e-12)
  mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
  return -mean_log_prob_pos  # base_temperature = temperature


# ------------------------------------------------------------------ losses


@pytest.mark.parametrize("views,use_labels", [(2, True), (2, False), (3, True)])
def test_supcon_and_nt_xent_match_supcontrast(views, use_labels):
  B, d = 6, 5
  z = unit(RNG.normal(size=(views, B, d)))
  y = np.array([0, 1, 1, 2, 0, 3]) if use_labels else None
  T = 0.1 if use_labels else 0.5
  ref = lambda zz: np_supcon(np.transpose(unit(zz), (1, 0, 2)), y, T)
  got = jax.jit(losses.supcon_loss, static_argnums=2)(jnp.asarray(z, jnp.float32),
                                                    None if y is None else jnp.asarray(y), T)
  np.testing.assert_allclose(got, ref(z), rtol=1e-5, atol=1e-5)
  if not use_labels:
    np.testing.assert_allclose(losses.nt_xent_loss(jnp.asarray(z, jnp.float32), T), got, rtol=1e-6)
  # gradient of the mean loss through the normalisation, vs finite differences in float64
  f = lambda zz: jnp.mean(losses.supcon_loss(zz / jnp.linalg.norm(zz, axis=-1, keepdims=True),
                                             None if y is None else jnp.asarray(y), T))
  g = jax.jit(jax.grad(f))(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(g, num_grad(lambda zz: ref(zz).mean(), z), rtol=2e-3, atol=2e-4)


def test_supcon_anchor_without_positive_is_zero():
  z = unit(RNG.normal(size=(1, 4, 3)))
  got = losses.supcon_loss(jnp.asarray(z, jnp.float32), jnp.array([0, 1, 2, 2]))
  assert got[0, 0] == 0 and got[0, 1] == 0 and got[0, 2] > 0
  np.testing.assert_allclose(got, np_supcon(np.transpose(z, (1, 0, 2)), np.array([0, 1, 2, 2])), rtol=1e-5, atol=1e-6)


def test_balanced_contrastive_loss_matches_balscl():
  B, d, C = 6, 5, 4
  z = unit(RNG.normal(size=(2, B, d)))
  centres = unit(RNG.normal(size=(C, d)))
  y = np.array([0, 0, 0, 1, 2, 0])  # class 3 only through its centre (class-complement)
  ref = lambda zz, cc: np_balscl(unit(cc), np.transpose(unit(zz), (1, 0, 2)), y, C, 0.07)
  got = losses.balanced_contrastive_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y),
                                         jnp.asarray(centres, jnp.float32), 0.07)
  np.testing.assert_allclose(got, ref(z, centres), rtol=1e-5, atol=1e-5)
  # class-averaging matters: without it (plain SupCon over views + centres) the value differs
  assert not np.allclose(got, np_supcon(np.transpose(z, (1, 0, 2)), y, 0.07, 0.07), rtol=1e-2)
  norm = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  f = lambda zz, cc: jnp.mean(losses.balanced_contrastive_loss(norm(zz), jnp.asarray(y), norm(cc), 0.07))
  gz, gc = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(z, jnp.float32), jnp.asarray(centres, jnp.float32))
  np.testing.assert_allclose(gz, num_grad(lambda zz: ref(zz, centres).mean(), z), rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(gc, num_grad(lambda cc: ref(z, cc).mean(), centres), rtol=2e-3, atol=2e-4)


def test_paco_loss_and_queue_match_reference():
  B, d, C, K = 4, 6, 3, 8
  q, k = unit(RNG.normal(size=(B, d))), unit(RNG.normal(size=(B, d)))
  queue = losses.Queue(jnp.asarray(unit(RNG.normal(size=(K, d))), jnp.float32),
                       jnp.asarray(RNG.integers(0, C, K), jnp.int32), jnp.asarray(4, jnp.int32))
  y = np.array([0, 2, 2, 1])
  sup = RNG.normal(size=(B, C))
  counts = np.array([50.0, 10.0, 2.0])
  hp = dict(alpha=0.05, beta=1.0, gamma=0.5, temperature=0.07)

  def ref(qq, ss):
    feats = np.concatenate([unit(qq), k, np.asarray(queue.keys, float)])
    labs = np.concatenate([y, y, np.asarray(queue.labels)])
    return np_paco(feats, labs, ss, counts, K, C, **hp)

  got, new_q = jax.jit(losses.paco_loss)(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(y),
                                         jnp.asarray(sup, jnp.float32), jnp.asarray(counts), queue, **hp)
  np.testing.assert_allclose(got, ref(q, sup), rtol=1e-5, atol=1e-5)
  norm = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  f = lambda qq, ss: jnp.mean(losses.paco_loss(norm(qq), jnp.asarray(k, jnp.float32), jnp.asarray(y), ss,
                                               jnp.asarray(counts), queue, **hp)[0])
  gq, gs = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(q, jnp.float32), jnp.asarray(sup, jnp.float32))
  np.testing.assert_allclose(gq, num_grad(lambda qq: ref(qq, sup).mean(), q), rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(gs, num_grad(lambda ss: ref(q, ss).mean(), sup), rtol=2e-3, atol=2e-4)
  # enqueue at ptr (4..7), pointer wraps to 0; the rest of the queue is untouched
  np.testing.assert_allclose(new_q.keys[4:], k, rtol=1e-6)
  np.testing.assert_array_equal(new_q.keys[:4], queue.keys[:4])
  np.testing.assert_array_equal(new_q.labels, np.concatenate([np.asarray(queue.labels)[:4], y]))
  assert int(new_q.ptr) == 0
  with pytest.raises(ValueError, match="multiple of the global batch size"):
    losses.queue_push(queue, jnp.zeros((3, d)), jnp.zeros(3, jnp.int32))


# ------------------------------------------------------------------ SimCLR augmentation


def np_resized_crop(img, top, left, h, w):
  """Crop, then bilinear resize to the image size with half-pixel centres clamped in the crop."""
  H, W = img.shape[:2]
  crop = img[top:top + h, left:left + w].astype(float)

  def axis(n_out, n_in):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0

  y0, y1, fy = axis(H, h)
  x0, x1, fx = axis(W, w)
  rows = crop[y0] * (1 - fy)[:, None, None] + crop[y1] * fy[:, None, None]
  return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def test_random_resized_crop_boxes_and_bilinear_resize():
  images = RNG.integers(0, 256, size=(64, 12, 10, 3)).astype(np.uint8)
  boxes = np.asarray(jax.jit(augment.random_resized_crop_boxes, static_argnums=(1, 2, 3, 4))(
      jax.random.key(3), 64, 12, 10, (0.2, 1.0)))
  top, left, h, w = boxes.T
  assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= 12) & (left + w <= 10))
  area = h * w / 120.0
  assert np.all(area >= 0.2 - 0.1) and np.all(area <= 1.0)   # rounding of h, w moves the area a little
  assert np.all(np.abs(np.log(w / h)) <= np.log(4 / 3) + 0.25) and len({tuple(b) for b in boxes}) > 40
  out = np.asarray(jax.jit(augment.resized_crop)(jnp.asarray(images), jnp.asarray(boxes)))
  for i in range(0, 64, 7):
    np.testing.assert_allclose(out[i], np_resized_crop(images[i], *boxes[i]), rtol=1e-5, atol=1e-3)
  # no candidate fits (scale > 1 impossible; ratio far from the image's) -> torchvision's central fallback
  wide = np.asarray(jax.jit(augment.random_resized_crop_boxes, static_argnums=(1, 2, 3, 4, 5))(
      jax.random.key(0), 4, 10, 40, (1.0, 1.0), (1.0, 1.0)))
  np.testing.assert_array_equal(wide, [[0, 15, 10, 10]] * 4)


def test_colour_jitter_matches_torchvision_formulas():
  x = RNG.uniform(0, 255, size=(3, 4, 5, 3))
  b, c, s = np.array([0.7, 1.3, 1.0]), np.array([1.2, 0.6, 1.0]), np.array([0.8, 1.4, 1.0])
  gray = lambda a: (a * np.array(augment.GRAY_WEIGHTS)).sum(-1, keepdims=True)
  ref = np.clip(x * b[:, None, None, None], 0, 255)
  ref = np.clip(c[:, None, None, None] * ref + (1 - c[:, None, None, None]) * gray(ref).mean((1, 2, 3), keepdims=True),
                0, 255)
  ref = np.clip(s[:, None, None, None] * ref + (1 - s[:, None, None, None]) * gray(ref), 0, 255)
  got = augment.adjust_colour(jnp.asarray(x, jnp.float32), b, c, s)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(got[2], x[2], rtol=1e-6)  # factors 1: identity
  # grayscale images: brightness and contrast only
  g1 = augment.adjust_colour(jnp.asarray(x[..., :1], jnp.float32), b, c, s)
  r1 = np.clip(x[..., :1] * b[:, None, None, None], 0, 255)
  r1 = np.clip(c[:, None, None, None] * r1 + (1 - c[:, None, None, None]) * r1.mean((1, 2, 3), keepdims=True), 0, 255)
  np.testing.assert_allclose(g1, r1, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------ multi-view input, PaCo queue on 1 vs 2 devices

N, C, HW = 48, 4, 8


@pytest.fixture(scope="module")
def tiny():
  labels = np.repeat(np.arange(C), [24, 12, 8, 4]).astype(np.int32)
  images = np.random.default_rng(1).integers(0, 256, size=(N, HW, HW, 1)).astype(np.uint8)
  counts = np.bincount(labels, minlength=C).astype(np.float32)
  return images, labels, counts


def _data(tiny, mesh):
  images, labels, _ = tiny
  rep = replicated(mesh)
  return steps.TrainData(put_global(images, rep), put_global(labels, rep),
                         jax.device_put(samplers.build_index(jnp.asarray(labels), C), rep))


def _sc(sampler="instance", batch=8, flip=True):
  return steps.StepConfig(batch_size=batch, steps_per_epoch=N // batch, num_epochs=2, sampler=sampler,
                          k_per_class=2, crop_pad=1, flip=flip, mean=(0.5,), std=(0.25,), num_classes=C)


@pytest.mark.parametrize("sampler", ["class_balanced"])  # instance: the PaCo test checks its indices
def test_multi_view_batch_keeps_the_sampler_and_augments_each_view(tiny, sampler):
  images, labels, counts = tiny
  mesh = make_mesh(1)
  data, key = _data(tiny, mesh), jax.random.key(7)
  cs = contrastive.ContrastiveSettings("bcl", scale_min=1.0, jitter=0.0, grayscale_prob=0.0)
  views_of = contrastive.multi_view_batch  # eager: the op-by-op cache is shared by both samplers
  for step in (5,):
    sc = _sc(sampler, flip=False)
    views, y = views_of(key, jnp.asarray(step), data, jnp.asarray(counts), sc, cs, mesh,
                        ("standard", "simclr", "simclr"))
    idx = np.asarray(steps.batch_indices(jax.random.split(jax.random.fold_in(key, 0))[0], jnp.asarray(step),
                                         data, jnp.asarray(counts), sc))
    np.testing.assert_array_equal(y, labels[idx])          # the classification step's examples
    assert views.shape == (3, 8, HW, HW, 1)
    # view 0 is the classification step's pad-crop batch (same key); SimCLR views at scale 1, no jitter/flip:
    # the images themselves
    aug_key = jax.random.split(jax.random.fold_in(key, 0))[1]
    std_view = augment.random_crop_flip(jax.random.fold_in(aug_key, step), jnp.asarray(images[idx]), 1, False)
    np.testing.assert_allclose(views[0], augment.normalize(std_view, (0.5,), (0.25,)), rtol=1e-6)
    for v in (1, 2):
      np.testing.assert_allclose(views[v], augment.normalize(images[idx], (0.5,), (0.25,)), rtol=1e-5, atol=1e-5)
  # flips on: every SimCLR view is the image or its mirror, and the two views differ somewhere
  views, y = views_of(key, jnp.asarray(5), data, jnp.asarray(counts), _sc(sampler), cs, mesh, ("simclr", "simclr"))
  np.testing.assert_array_equal(y, labels[idx])
  plain = np.asarray(augment.normalize(images[idx], (0.5,), (0.25,)))
  for v in range(2):
    same = np.all(np.isclose(views[v], plain, atol=1e-5), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(views[v], plain[:, :, ::-1], atol=1e-5), axis=(1, 2, 3))
    assert np.all(same | mirrored)
  assert not np.allclose(views[0], views[1])


PACO = contrastive.ContrastiveSettings("paco", temperature=0.2, base_temperature=0.0, alpha=0.5, momentum=0.9,
                                      queue_size=16)


def _paco_run(tiny, num_devices, init=None, num_steps=3):
  """``num_steps`` PaCo steps on a ``num_devices`` mesh from ``init`` (a host copy of the initial state)."""
  images, labels, counts = tiny
  mesh = make_mesh(num_devices)
  model = ContrastiveNet(get_model("cnn", num_classes=C, widths=(4, 8), feature_dim=16), proj_dim=8, proj_bn=True)
  tx = optax.sgd(0.1, momentum=0.9)
  loss = losses.make_loss("ce")
  if init is None:
    init = jax.device_get(contrastive.init_method_state(create_state(model, tx, loss, C, (HW, HW, 1), 0, mesh),
                                                        PACO, C, 0, mesh))
  state = jax.device_put(init, replicated(mesh))
  step = contrastive.make_contrastive_step(model, tx, loss, lambda s: 0.1, put_global(counts, replicated(mesh)),
                                           _sc(), PACO, mesh)
  data = _data(tiny, mesh)
  out = []
  for _ in range(num_steps):
    state, m = step(state, data)
    jax.block_until_ready(m)  # several emulated CPU devices: one step at a time (PLATFORM.md)
    out.append(float(m["loss"]))
  return init, jax.device_get(state.loss_state["method"]["queue"]), out, data


def test_paco_queue_is_exact_on_one_and_two_devices(tiny):
  assert len(jax.devices()) == 2
  init, one, loss1, data = _paco_run(tiny, 1)
  _, two, loss2, _ = _paco_run(tiny, 2, init)
  q0 = init.loss_state["method"]["queue"]
  # 3 global batches of 8 into K = 16: positions 0..7 hold step 3's keys, 8..15 step 2's, pointer at 8
  assert int(one["ptr"]) == int(two["ptr"]) == 8
  np.testing.assert_array_equal(one["labels"], two["labels"])
  np.testing.assert_allclose(one["keys"], two["keys"], atol=2e-5)
  _, labels, counts = tiny
  key = jax.random.split(jax.random.key(0))[1]  # create_state's run key (seed 0)
  drawn = [labels[np.asarray(steps.batch_indices(jax.random.split(jax.random.fold_in(key, 0))[0], jnp.asarray(s),
                                                 data, jnp.asarray(counts), _sc()))] for s in range(3)]
  np.testing.assert_array_equal(one["labels"], np.concatenate([drawn[2], drawn[1]]))
  np.testing.assert_allclose(np.linalg.norm(one["keys"], axis=1), 1.0, rtol=1e-5)  # real keys replaced the random ones
  assert not np.allclose(one["keys"], q0["keys"])
  np.testing.assert_allclose(loss1, loss2, rtol=1e-4)


# ------------------------------------------------------------------ configs and one end-to-end run


def test_contrastive_variants_and_validation():
  from configs import fashion_mnist_lt
  c = fashion_mnist_lt.get_config("smoke,contrastive=bcl")
  assert (c.contrastive.method, c.contrastive.temperature, c.contrastive.beta) == ("bcl", 0.07, 0.35)
  assert (c.loss.name, c.model.head, c.model.cosine_scale) == ("logit_adjusted", "cosine", 30.0)
  c = fashion_mnist_lt.get_config("contrastive=paco")
  assert (c.contrastive.queue_size, c.contrastive.momentum, c.contrastive.alpha, c.contrastive.proj_dim) == \
      (1024, 0.999, 0.01, 32)
  config_lib.validate(c)
  c.contrastive.queue_size = 1000
  with pytest.raises(config_lib.ConfigError, match="multiple of the global batch_size=128"):
    config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match="valid methods: none, simclr, supcon, bcl, paco"):
    fashion_mnist_lt.get_config("contrastive=moco")
  c = fashion_mnist_lt.get_config("contrastive=simclr,mix=mixup")
  with pytest.raises(config_lib.ConfigError, match="cannot be combined"):
    config_lib.validate(c)


def test_simclr_then_finetune_end_to_end(tmp_path):
  """SimCLR joint stage (projection head next to the backbone), then full fine-tuning of every
  parameter, on the mock CIFAR-10 data of tests/test_train.py."""
  import tensorflow_datasets as tfds
  from configs import cifar_lt
  from lt_jax.train.trainer import train_and_evaluate
  c = cifar_lt.get_config("smoke,contrastive=simclr,stages=finetune")
  c.model.name, c.dataset.imbalance_ratio, c.batch_size, c.eval_batch_size = "cnn", 4.0, 16, 100
  c.quiet, c.max_steps, c.num_devices = True, 2, 1
  with tfds.testing.mock_data(num_examples=200):
    out = train_and_evaluate(c, str(tmp_path))
  v = jax.device_get(out["variables"])
  assert set(out["stages"]) == {"finetune"} and np.isfinite(out["stages"]["finetune"]["accuracy"])
  assert v["joint"]["params"]["proj"]["fc2"]["kernel"].shape == (128, 128)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  for part in ("conv1", "bn_fc", "head"):  # the fine-tuning stage trains the backbone and the classifier
    assert not same(v["finetune"]["params"][part], v["joint"]["params"][part]), part

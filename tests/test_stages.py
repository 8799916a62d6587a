"""Multi-stage training: decoupled stages (cRT, LWS, tau-norm, post-hoc LA, NCM), init_from,
BBN, Mixup/Remix and DRW/DRS wiring, stage config errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lt_jax import decoupled, losses, mixing, samplers
from lt_jax.data import augment
from lt_jax.models import get_model
from lt_jax.train import config as config_lib, steps, trainer
from test_train import MOCK_EXAMPLES, tiny_config
from configs import cifar_lt, fashion_mnist_lt


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
  """Joint CE, then post-hoc LA, tau-norm, NCM, cRT and LWS (chained after cRT)."""
  workdir = tmp_path_factory.mktemp("staged")
  c = tiny_config(stages="posthoc,tau_norm,ncm,crt,lws")
  c.dataset.val_per_class = 4
  c.stage.crt.num_epochs = c.stage.lws.num_epochs = 1
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return c, str(workdir), trainer.train_and_evaluate(c, str(workdir))


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def test_crt_trains_only_the_head(staged):
  _, _, out = staged
  joint, crt = _leaves(out["variables"]["joint"]), _leaves(out["variables"]["crt"])
  assert set(joint) == set(crt)
  head = [k for k in joint if k.startswith("['params']['head']")]
  assert head and len(head) < len(joint)
  for k in joint:
    if k in head:
      assert not np.array_equal(joint[k], crt[k]), k  # re-initialised and trained
    else:
      np.testing.assert_array_equal(joint[k], crt[k], err_msg=k)  # frozen params and BN statistics


def test_lws_changes_only_the_scales(staged):
  _, _, out = staged
  crt, lws = _leaves(out["variables"]["crt"]), _leaves(out["variables"]["lws"])
  scales = "['params']['head']['scales']"
  assert set(lws) == set(crt) | {scales}
  for k in crt:
    np.testing.assert_array_equal(crt[k], lws[k], err_msg=k)
  assert lws[scales].shape == (10,) and not np.allclose(lws[scales], 1.0)


@pytest.mark.parametrize("stage", ["posthoc", "tau_norm"])
def test_sweep_stages_select_on_validation(staged, stage):
  c, workdir, out = staged
  sweep = json.load(open(os.path.join(workdir, "stages", stage, "sweep.json")))
  taus = np.asarray(sweep["tau"])
  np.testing.assert_allclose(taus, np.linspace(0, 2, 21), atol=1e-6)
  val_ber = np.asarray(sweep["val"]["balanced_error_rate"])
  best = np.flatnonzero(val_ber == val_ber.min())[0]  # ties go to the smallest tau
  assert sweep["selected_tau"] == pytest.approx(taus[best])
  assert out["stages"][stage]["tau"] == pytest.approx(taus[best])
  # The reported test numbers are the test sweep at the validation-selected tau.
  assert out["stages"][stage]["balanced_error_rate"] == pytest.approx(
      sweep["test"]["balanced_error_rate"][best], abs=1e-6)
  if stage == "posthoc":  # tau = 0 is the unadjusted joint model
    assert sweep["test"]["balanced_error_rate"][0] == pytest.approx(out["balanced_error_rate"], abs=1e-6)


def test_ncm_stage_equals_numpy(staged):
  c, _, out = staged
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    ds = trainer.load_dataset(c)
  model = trainer.build_model(c, ds.num_classes)
  variables = jax.device_get(out["variables"]["joint"])

  def feats(x):
    return np.asarray(model.apply(variables, augment.normalize(x, tuple(ds.mean), tuple(ds.std)), train=False)[1],
                      np.float64)

  f_train, f_test = feats(ds.train_images), feats(ds.test_images)
  center = f_train.mean(0)
  g = (f_train - center) / np.linalg.norm(f_train - center, axis=1, keepdims=True)
  mu = np.stack([g[ds.train_labels == k].mean(0) for k in range(10)])
  h = (f_test - center) / np.linalg.norm(f_test - center, axis=1, keepdims=True)
  pred = np.argmin(((h[:, None, :] - mu[None]) ** 2).sum(-1), axis=1)
  recall = [np.mean(pred[ds.test_labels == k] == k) for k in range(10) if np.any(ds.test_labels == k)]
  assert out["stages"]["ncm"]["balanced_accuracy"] == pytest.approx(np.mean(recall), abs=1e-6)


def test_stage_outputs_and_resume(staged):
  c, workdir, out = staged
  table = json.load(open(os.path.join(workdir, "stages_summary.json")))
  assert list(table) == ["joint", "posthoc", "tau_norm", "ncm", "crt", "lws"]
  for name in ("crt", "lws"):
    assert os.path.isdir(os.path.join(workdir, "stages", name, "checkpoints"))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):  # a finished run resumes to the same numbers
    again = trainer.train_and_evaluate(c, workdir)
  for name in ("crt", "lws"):
    for a, b in zip(jax.tree.leaves(jax.device_get(out["variables"][name])),
                    jax.tree.leaves(jax.device_get(again["variables"][name]))):
      np.testing.assert_array_equal(a, b)
  a, b = again["stages"]["ncm"], out["stages"]["ncm"]
  assert a.keys() == b.keys()
  np.testing.assert_array_equal([a[k] for k in a], [b[k] for k in a])  # NaN (no many-shot class) == NaN


def test_init_from_and_added_stage(staged, tmp_path):
  c, workdir, out = staged
  d = tiny_config(stages="crt", init_from=workdir)
  d.dataset.val_per_class = 4
  d.stage.crt.num_epochs = 1
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    loaded = trainer.train_and_evaluate(d, str(tmp_path / "from"))
  assert loaded["balanced_error_rate"] == pytest.approx(out["balanced_error_rate"], abs=1e-7)
  for a, b in zip(jax.tree.leaves(jax.device_get(out["variables"]["crt"])),
                  jax.tree.leaves(jax.device_get(loaded["variables"]["crt"]))):
    np.testing.assert_array_equal(a, b)  # the same cRT stage from the same joint model
  bad = tiny_config(stages="crt", init_from=workdir)
  bad.dataset.val_per_class = 4
  bad.model.head = "cosine"
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    with pytest.raises(config_lib.ConfigError, match="model.head: checkpoint has 'linear'"):
      trainer.train_and_evaluate(bad, str(tmp_path / "bad"))
    with pytest.raises(config_lib.ConfigError, match="no such run directory"):
      trainer.train_and_evaluate(tiny_config(stages="crt", init_from=str(tmp_path / "nope")), str(tmp_path / "x"))
    import shutil
    from lt_jax.train import checkpoint
    damaged = tmp_path / "damaged"
    shutil.copytree(os.path.join(workdir, "checkpoints"), damaged / "checkpoints")
    latest = max(int(n) for n in os.listdir(damaged / "checkpoints") if n.isdigit())
    for root, _, files in os.walk(damaged / "checkpoints" / str(latest) / "state"):
      for f in files:
        open(os.path.join(root, f), "wb").close()  # truncated
    with pytest.raises(checkpoint.ResumeError, match=rf"init_from=.*damaged.*newest checkpoint \(step {latest} in "
                       r".*\) cannot be read"):
      d.init_from = str(damaged)
      trainer.train_and_evaluate(d, str(tmp_path / "y"))


def test_bbn_and_remix_runs(tmp_path):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    bbn = trainer.train_and_evaluate(tiny_config(max_steps=3, **{"model.bbn": True}), str(tmp_path / "bbn"))
    remix = trainer.train_and_evaluate(tiny_config(max_steps=3, **{"mix.name": "remix"}), str(tmp_path / "remix"))
  for out in (bbn, remix):
    assert out["step"] == 3 and np.isfinite(out["nll"])
  assert "fc_rb" in bbn["variables"]["joint"]["params"]


def test_cnn_bbn_feature_mixing():
  """[2 a f_cb ; 2 (1 - a) f_rb] in training, [f_cb ; f_rb] at test (Zhou et al. 2020)."""
  model = get_model("cnn", num_classes=3, bbn=True)
  x, x_rb = jax.random.normal(jax.random.key(0), (2, 4, 28, 28, 1))
  v = model.init(jax.random.key(1), x, train=False)
  _, both = model.apply(v, x, train=False)
  _, swapped = model.apply(v, x_rb, train=False)
  a = 0.3
  logits, mixed = model.apply(v, x, train=False, x_rb=x_rb, alpha=a)
  d = both.shape[1] // 2
  np.testing.assert_allclose(mixed[:, :d], 2 * a * both[:, :d], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mixed[:, d:], 2 * (1 - a) * swapped[:, d:], rtol=1e-5, atol=1e-6)
  k, b = v["params"]["head"]["kernel"], v["params"]["head"]["bias"]
  np.testing.assert_allclose(logits, mixed @ k + b, rtol=1e-5, atol=1e-5)


def test_bbn_alpha_in_the_step_follows_the_epoch():
  # 1 - ((T - 1) / T_max)^2 for the 1-based epoch T (REFERENCE.md section 3, BBN)
  assert [float(decoupled.bbn_alpha(t, 4)) for t in (1, 2, 3, 4)] == pytest.approx([1, 15 / 16, 12 / 16, 7 / 16])


def _sc(**kw):
  base = dict(batch_size=8, steps_per_epoch=4, num_epochs=4, sampler="class_balanced", k_per_class=2,
              crop_pad=0, flip=False, mean=(0.,), std=(1.,), num_classes=4)
  return steps.StepConfig(**{**base, **kw})


def test_drs_defers_the_sampler():
  counts = np.array([20, 8, 3, 1])
  labels = np.repeat(np.arange(4), counts)
  data = steps.TrainData(images=None, labels=jnp.asarray(labels), index=samplers.build_index(labels, 4))
  key = jax.random.key(0)
  c = jnp.asarray(counts, jnp.float32)
  for step in (0, 5, 7, 8, 13):
    drs = steps.batch_indices(key, jnp.int32(step), data, c, _sc(defer_epochs=2))
    inst = steps.batch_indices(key, jnp.int32(step), data, c, _sc(sampler="instance"))
    cb = steps.batch_indices(key, jnp.int32(step), data, c, _sc())
    np.testing.assert_array_equal(drs, inst if step < 8 else cb)


def test_mix_batch_weights():
  key = jax.random.key(3)
  x = jax.random.normal(key, (6, 4, 4, 1))
  y = jnp.array([0, 0, 1, 2, 3, 3])
  counts = jnp.array([100.0, 30.0, 10.0, 1.0])
  mixed, y2, w = steps.mix_batch(key, x, y, counts, _sc(mix="remix"))
  ref_x, _, lam, perm = mixing.mixup(key, x, y, 4, 1.0)
  np.testing.assert_allclose(mixed, ref_x)
  np.testing.assert_array_equal(y2, y[perm])
  np.testing.assert_allclose(w, mixing.remix_weights(y, perm, lam, counts, 3.0, 0.5))
  _, y2, w = steps.mix_batch(key, x, y, counts, _sc(mix="mixup"))
  np.testing.assert_allclose(w, np.full(6, float(lam)))
  assert steps.mix_batch(key, x, y, counts, _sc())[1] is None


def test_focal_drw_recipe_is_the_ldam_drw_focal_loss():
  """``loss=focal_drw``: LDAM-DRW's ``FocalLoss(weight=per_cls_weights)`` with DRW (gamma 1, CB 0.9999)."""
  c = fashion_mnist_lt.get_config("epochs=4,loss=focal_drw")
  assert (c.loss.name, c.loss.drw_epoch, c.model.head) == ("focal", 3.0, "linear")
  hp = c.loss.hparams.to_dict()
  assert hp == {"gamma": 1.0, "weights": "effective_number", "beta": 0.9999, "form": "ldam_drw",
                "weight_norm": "none"}
  assert fashion_mnist_lt.get_config("loss=focal").loss.hparams.to_dict() == {"gamma": 1.0, "form": "paper"}
  config_lib.validate(c)
  loss = losses.make_loss(c.loss.name, drw_start=5, **hp)
  counts = np.array([100, 40, 10, 3])
  w = (1 - 0.9999) / (1 - 0.9999 ** counts.astype(np.float64))
  w = w / w.sum() * 4
  z = np.asarray(jax.random.normal(jax.random.key(1), (3, 4)), np.float64)
  y = np.array([0, 3, 2])
  ce = -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(3), y]
  x = w[y] * ce
  after, _ = loss.apply(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(counts),
                        {**loss.init(4), "step": jnp.int32(5)})
  np.testing.assert_allclose(after, (1 - np.exp(-x)) * x, rtol=1e-5)


def test_ldam_drw_recipe_defers_to_the_first_decay(tmp_path):
  c = fashion_mnist_lt.get_config("loss=ldam_drw")
  assert (c.loss.name, c.model.head, c.loss.drw_epoch) == ("ldam", "cosine", 12.0)
  assert c.loss.hparams.weights == "effective_number" and c.loss.hparams.weight_norm == "batch"
  c = fashion_mnist_lt.get_config("epochs=4,loss=ldam_drw")
  assert (c.num_epochs, tuple(c.optim.decay_epochs), c.loss.drw_epoch) == (4, (3.0, 3.75), 3.0)
  c = cifar_lt.get_config("loss=ldam_drw")
  assert c.loss.drw_epoch == 160.0  # Cao et al. 2019: DRW from epoch 160 of 200
  c.dataset.imbalance_ratio = 4.0  # the mock split is small
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    ds = trainer.load_dataset(c)
  spe = config_lib.steps_per_epoch(len(ds.train_labels), c.batch_size)
  loss = trainer.make_loss(c, spe)
  z = jax.random.normal(jax.random.key(0), (4, 10)) * 0.3
  yy = jnp.array([0, 9, 3, 9])
  n = jnp.asarray(ds.counts, jnp.float32)
  drw = 160 * spe
  plain = losses.make_loss("ldam", max_m=0.5, s=30.0)
  weighted = losses.make_loss("ldam", max_m=0.5, s=30.0, weights="effective_number", beta=0.9999, weight_norm="batch")
  before, _ = loss.apply(z, yy, n, {**loss.init(10), "step": jnp.int32(drw - 1)})
  after, _ = loss.apply(z, yy, n, {**loss.init(10), "step": jnp.int32(drw)})
  np.testing.assert_allclose(before, plain.apply(z, yy, n, plain.init(10))[0], rtol=1e-6)  # unweighted before
  np.testing.assert_allclose(after, weighted.apply(z, yy, n, weighted.init(10))[0], rtol=1e-6)  # CB-weighted after
  assert not np.allclose(before, after)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c, "stages", "crt,nope"), "unknown stage 'nope'"),
    (lambda c: setattr(c, "stages", "posthoc"), "validation split .* set dataset.val_per_class"),
    (lambda c: (setattr(c, "stages", "lws"), setattr(c.model, "head", "cosine")), "lws and tau_norm rescale"),
    (lambda c: setattr(c, "init_from", "/tmp/x"), "also set stages"),
    (lambda c: (setattr(c.model, "bbn", True), setattr(c.model, "name", "resnet50")), "model.bbn needs"),
    (lambda c: (setattr(c.model, "bbn", True), setattr(c.mix, "name", "mixup")), "cannot be combined"),
    (lambda c: setattr(c.mix, "name", "cutmixx"), "valid choices: none, mixup"),
    (lambda c: setattr(c.loss, "drw_epoch", 3.0), "needs loss.hparams.weights"),
    (lambda c: setattr(c.sampler, "defer_epochs", 99), "defer_epochs must be in"),
    (lambda c: (setattr(c, "stages", "crt"), setattr(c.stage.crt, "sampler", "x")), "stage.crt.sampler"),
    (lambda c: (setattr(c, "stages", "posterior_recal"), setattr(c.dataset, "val_per_class", 5),
                setattr(c.stage.posterior_recal, "betas", ())), "posterior_recal.betas must be a non-empty"),
    (lambda c: (setattr(c, "stages", "posterior_recal"), setattr(c.dataset, "val_per_class", 5),
                setattr(c.stage.posterior_recal, "target_prior", (1.0, -1.0))), "target_prior must be"),
])
def test_stage_config_errors(mutate, message):
  c = fashion_mnist_lt.get_config()
  mutate(c)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_bags_stage_trains_a_group_softmax_head(staged, tmp_path):
  c, workdir, out = staged
  d = tiny_config(stages="bags", init_from=workdir)
  d.dataset.val_per_class = 4
  d.stage.bags.num_epochs = 1
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    res = trainer.train_and_evaluate(d, str(tmp_path))
    counts = np.asarray(trainer.load_dataset(d).counts)
  groups = decoupled.bags_groups(counts)
  G = groups.max() + 1
  assert G >= 2
  joint, bags = _leaves(out["variables"]["joint"]), _leaves(res["variables"]["bags"])
  assert bags["['params']['head']['kernel']"].shape[1] == 10 + G  # C class logits + one "others" per group
  for k in joint:
    if "['head']" not in k:
      np.testing.assert_array_equal(joint[k], bags[k], err_msg=k)
  s = res["stages"]["bags"]
  assert 0 <= s["balanced_error_rate"] <= 1 and np.isfinite(s["nll"])


def test_posterior_recal_stage_is_posthoc_with_beta_and_target_prior(staged, tmp_path):
  """Posterior re-calibration (Tian et al. 2020) on a finished run = the post-hoc LA stage with
  tau = beta; a target prior equal to the training prior leaves the joint model unchanged."""
  c, workdir, out = staged
  d = tiny_config(stages="posterior_recal", init_from=workdir)
  d.dataset.val_per_class = 4
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    recal = trainer.train_and_evaluate(d, str(tmp_path / "recal"))["stages"]["posterior_recal"]
    counts = np.asarray(trainer.load_dataset(d).counts)
    d.stage.posterior_recal.target_prior = tuple(float(n) for n in counts)
    same = trainer.train_and_evaluate(d, str(tmp_path / "same"))["stages"]["posterior_recal"]
  posthoc = out["stages"]["posthoc"]
  assert recal["beta"] == recal["tau"] == posthoc["tau"]
  for key in ("balanced_error_rate", "accuracy", "macro_f1", "nll"):
    assert recal[key] == pytest.approx(posthoc[key], abs=1e-7), key
  sweep = json.load(open(tmp_path / "same" / "stages" / "posterior_recal" / "sweep.json"))
  assert sweep["selected_beta"] == 0.0  # every beta scores the same: ties go to the smallest
  assert same["balanced_error_rate"] == pytest.approx(out["balanced_error_rate"], abs=1e-6)
  assert np.ptp(sweep["test"]["balanced_error_rate"]) <= 1e-6

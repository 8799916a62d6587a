"""DIR training end to end: a small run, its metrics recomputed, kill-and-resume, FDS state, configs, CSV data."""

import csv
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from lt_jax import regression as R
from lt_jax.models import get_model
from lt_jax.train import regression_trainer as rt
from lt_jax.train.config import ConfigError
from lt_jax.train.state import make_mesh, put_global, replicated

from configs import fashion_mnist_dir  # installed (requirements.txt: -e .) or the cwd
from test_train import set_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method="lds_fds", **overrides):
  """Rotated Fashion-MNIST over 20 one-degree bins: 230 training images, 7 steps/epoch, 2 epochs."""
  c = fashion_mnist_dir.get_config(f"method={method},smoke")
  c.quiet = True
  c.plots = False
  c.dataset.update(dict(max_angle=20, n_max=30, imbalance_ratio=10.0, val_per_bin=1, test_per_bin=2))
  c.bins.update(dict(stop=20.0, many=20, few=8))  # lower thresholds so that all three regions exist
  c.batch_size = 32
  c.eval_batch_size = 20
  c.num_epochs = 2
  c.max_steps = -1
  return set_fields(c, overrides)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  return rt.train_and_evaluate_regression(tiny_config(plots=True), str(workdir)), workdir


def test_run_outputs_and_metrics_recomputed(reference_run):
  out, workdir = reference_run
  c = tiny_config()
  assert out["step"] == 14  # 230 // 32 = 7 steps/epoch x 2 epochs
  state = out["state"]
  assert int(state.fds.num_updates) == 2  # once per epoch (start_update = 0)
  # Recompute the test metrics from a plain forward pass (eval-mode BN, no FDS) with NumPy.
  ds = rt.load_dataset(c)
  spec = rt.make_spec(c, ds)
  model = get_model("cnn", num_classes=1)
  x = (ds.test_images / 255.0 - spec.mean[0]) / spec.std[0]
  variables = {"params": rt.model_params(state.params), "batch_stats": state.batch_stats}
  _, f = model.apply(jax.device_get(variables), jnp.asarray(x, jnp.float32), train=False)
  h = jax.device_get(state.params["head"])
  pred = 10.0 + 10.0 * (np.asarray(f) @ h["kernel"][:, 0] + h["bias"][0])  # centre 10, half-width 10
  err = np.abs(pred - ds.test_targets)
  train_counts = np.bincount(ds.train_targets.astype(int), minlength=20)
  region = train_counts[ds.test_targets.astype(int)]
  assert out["mae"] == pytest.approx(err.mean(), rel=1e-4)
  assert out["mse"] == pytest.approx((err ** 2).mean(), rel=1e-4)
  assert out["gm"] == pytest.approx(np.exp(np.log(err + 1e-8).mean()), rel=1e-3)
  for name, keep in (("many", region > 20), ("medium", (region >= 8) & (region <= 20)), ("few", region < 8)):
    assert keep.any()
    assert out[f"{name}_mae"] == pytest.approx(err[keep].mean(), rel=1e-4), name
  # Outputs on disk.
  summary = json.load(open(workdir / "summary.json"))
  assert summary["mae"] == pytest.approx(out["mae"]) and "val_few_mae" in summary
  assert summary["per_bin"]["train_count"] == train_counts.tolist()
  np.testing.assert_allclose(summary["per_bin"]["test_mae"], err.reshape(-1)[np.argsort(
      ds.test_targets.astype(int), kind="stable")].reshape(20, 2).mean(1), rtol=1e-4)
  lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [(l["step"], l["split"]) for l in lines if l["split"] != "train"] == [(7, "val"), (14, "test"), (14, "val")]
  assert (workdir / "error_per_bin.png").stat().st_size > 1000
  assert json.load(open(workdir / "config.json"))["task"] == "regression"


def test_kill_and_resume_is_bit_identical(reference_run, tmp_path):
  full = reference_run[0]["state"]
  part = rt.train_and_evaluate_regression(tiny_config(max_steps=4), str(tmp_path))  # stopped mid-epoch 0
  assert part["step"] == 4 and int(part["state"].fds.num_updates) == 0
  resumed = rt.train_and_evaluate_regression(tiny_config(), str(tmp_path))["state"]
  for a, b in zip(jax.tree.leaves(jax.device_get(full)), jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)  # parameters, optimiser and FDS statistics
  with pytest.raises(Exception, match=r"fds.enabled: checkpoint has True, config has False"):
    rt.train_and_evaluate_regression(tiny_config(method="lds"), str(tmp_path))


def _components(c, num_devices):
  mesh = make_mesh(num_devices)
  ds = rt.load_dataset(c)
  spec = rt.make_spec(c, ds)
  model = get_model("cnn", num_classes=1)
  tx = rt.make_optimizer(c, optax.constant_schedule(1e-3))
  state = rt.create_state(model, tx, c, 20, ds.train_images.shape[1:], mesh)
  rep = replicated(mesh)
  bins = ds.train_targets.astype(np.int32)
  data = rt.DIRData(put_global(ds.train_images, rep), put_global(ds.train_targets, rep), put_global(bins, rep))
  return mesh, ds, spec, model, tx, state, data


def _fds_update(c):
  return jax.jit(functools.partial(R.fds_update, momentum=c.fds.momentum, kernel=c.fds.kernel, ks=c.fds.ks,
                                   sigma=c.fds.sigma))


def test_fds_epoch_statistics_against_numpy_and_two_devices():
  c = tiny_config()
  mesh, ds, spec, model, _, state, data = _components(c, 1)
  n = len(ds.train_targets)
  batches = rt.fds_pass_batches(n, 32, 0)
  seen = np.concatenate([idx[mask] for idx, mask in batches])
  assert sorted(seen) == list(range(n))  # every training example exactly once
  new = rt.fds_epoch_update(state, data, batches, rt.make_fds_sums(model, spec, 20), _fds_update(c), mesh)
  # NumPy: train-mode features of the same batches, per-bin mean / unbiased variance, then the
  # first update (factor 0) and smoothing with a sum-normalised Gaussian window, reflect padding.
  variables = jax.device_get({"params": rt.model_params(state.params), "batch_stats": state.batch_stats})
  feats, bins = [], []
  for idx, mask in batches:
    x = (ds.train_images[idx] / 255.0 - spec.mean[0]) / spec.std[0]
    (_, f), _ = model.apply(variables, jnp.asarray(x, jnp.float32), train=True, mutable=["batch_stats"])
    feats.append(np.asarray(f)[mask])
    bins.append(ds.train_targets[idx][mask].astype(int))
  feats, bins = np.concatenate(feats).astype(np.float64), np.concatenate(bins)
  mean = np.stack([feats[bins == b].mean(0) for b in range(20)])
  var = np.stack([feats[bins == b].var(0, ddof=1) for b in range(20)])
  np.testing.assert_allclose(new.fds.running_mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new.fds.running_var, var, rtol=1e-3, atol=1e-5)
  k = np.asarray(R.lds_kernel("gaussian", 5, 2.0, "sum"), np.float64)
  np.testing.assert_allclose(new.fds.smoothed_mean, ndimage.correlate1d(mean, k, axis=0, mode="mirror"),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new.fds.num_samples, np.bincount(bins, minlength=20))
  # The same pass with the batches sharded over 2 devices.
  mesh2, _, _, model2, _, state2, data2 = _components(c, 2)
  two = rt.fds_epoch_update(state2, data2, batches, rt.make_fds_sums(model2, spec, 20), _fds_update(c), mesh2)
  for a, b in zip(jax.tree.leaves(jax.device_get(new.fds)), jax.tree.leaves(jax.device_get(two.fds))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fds_calibration_applies_in_training_from_start_smooth_only():
  c = tiny_config()
  mesh, ds, spec, model, tx, state, data = _components(c, 1)
  fds_state = rt.fds_epoch_update(state, data, rt.fds_pass_batches(len(ds.train_targets), 32, 0),
                                  rt.make_fds_sums(model, spec, 20), _fds_update(c), mesh).fds
  fds_state = fds_state._replace(smoothed_mean=fds_state.smoothed_mean + 0.5)  # far from the identity
  from lt_jax.train import steps
  sc = steps.StepConfig(batch_size=32, steps_per_epoch=7, num_epochs=2, sampler="instance", k_per_class=1,
                        crop_pad=2, flip=False, mean=spec.mean, std=spec.std)
  weights = jnp.ones((20,), jnp.float32)

  def loss_at(step, fds_on, fds):
    s = spec._replace(fds=fds_on)
    fn = rt.make_train_step(model, tx, rt.make_loss(c.loss), optax.constant_schedule(1e-3), s, sc, weights, mesh)
    st = jax.tree.map(jnp.copy, state.replace(step=jnp.int32(step), fds=fds))
    return float(fn(st, data)[1]["loss"])

  plain0, plain7 = loss_at(0, False, fds_state), loss_at(7, False, fds_state)
  assert loss_at(0, True, fds_state) == plain0  # epoch 0 < start_smooth = 1: features untouched
  assert loss_at(7, True, state.fds) == pytest.approx(plain7, rel=1e-6)  # initial state: identity
  assert abs(loss_at(7, True, fds_state) - plain7) > 1e-3 * plain7  # epoch 1: recalibrated


def test_balanced_mse_noise_scale_has_its_own_learning_rate():
  c = tiny_config(method="balanced_mse")
  tx = rt.make_optimizer(c, optax.constant_schedule(1e-3))
  params = {"head": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros((1,))}, "noise_sigma": jnp.float32(8.0)}
  grads = {"head": {"kernel": jnp.full((3, 1), 2.0), "bias": jnp.ones((1,))}, "noise_sigma": jnp.float32(-3.0)}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is -lr * sign(g): sigma_lr for the noise scale, optim.lr for the model.
  assert float(updates["noise_sigma"]) == pytest.approx(c.loss.sigma_lr, rel=1e-4)
  np.testing.assert_allclose(updates["head"]["kernel"], -1e-3, rtol=1e-4)
  p, t = jnp.array([1.0, 4.0, 2.0]), jnp.array([0.0, 5.0, 3.0])
  learn = rt.make_loss(c.loss)(p, t, params)
  np.testing.assert_allclose(learn, R.balanced_mse(p, t, 64.0), rtol=1e-6)
  c.loss.learn_noise = False
  c.loss.noise_sigma = 2.0
  np.testing.assert_allclose(rt.make_loss(c.loss)(p, t, {}), R.balanced_mse(p, t, 4.0), rtol=1e-6)
  assert not rt.learns_noise(c)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.loss, "name", "l2"), "valid choices: mse, l1, huber, focal_r, balanced_mse"),
    (lambda c: setattr(c.dataset, "name", "agedb"), "valid choices: rotated_fashion_mnist, csv"),
    (lambda c: setattr(c.lds, "kernel", "box"), "valid choices: gaussian, triang, laplace"),
    (lambda c: setattr(c.lds, "reweight", "none"), "lds.enabled needs lds.reweight='sqrt_inv' or 'inverse'"),
    (lambda c: setattr(c.fds, "ks", 4), "fds.ks must be an odd positive int"),
    (lambda c: setattr(c.fds, "momentum", 1.5), r"fds.momentum must be in \[0, 1\]"),
    (lambda c: setattr(c.fds, "clip", (0.0, 10.0)), "fds.clip must be"),
    (lambda c: setattr(c.bins, "width", 0.0), "bins.width must be > 0"),
    (lambda c: setattr(c, "batch_size", 33), r"not divisible by the number of devices \(2\)"),
    (lambda c: setattr(c.dataset, "name", "csv"), "needs dataset.csv"),
    (lambda c: setattr(c.model, "name", "vit"), "valid choices: cnn, resnet20"),
    (lambda c: setattr(c, "task", "classification"), "task must be 'regression'"),
])
def test_config_errors(mutate, message):
  c = fashion_mnist_dir.get_config("method=lds_fds")
  rt.validate(c, num_devices=2)
  mutate(c)
  with pytest.raises(ConfigError, match=message):
    rt.validate(c, num_devices=2)


def test_config_variants():
  c = fashion_mnist_dir.get_config("method=lds,seed=2,loss=l1")
  assert (c.task, c.seed, c.loss.name, c.lds.reweight, c.lds.enabled, c.fds.enabled) == (
      "regression", 2, "l1", "sqrt_inv", True, False)
  c = fashion_mnist_dir.get_config("method=balanced_mse")
  assert (c.loss.name, c.lds.reweight, c.fds.enabled) == ("balanced_mse", "none", False)
  with pytest.raises(ConfigError, match="valid methods: vanilla, sqinv, lds, fds, lds_fds, balanced_mse"):
    fashion_mnist_dir.get_config("method=ranksim")
  with pytest.raises(ConfigError, match="valid keys: method, loss, seed, smoke"):
    fashion_mnist_dir.get_config("ir=10")


def test_csv_dataset_run_and_launch_dispatch(tmp_path):
  """A user dataset (npz + CSV) through the trainer with LDS and L1; launch.py routes task=regression."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
  np.savez(tmp_path / "faces.npz", images=images)
  targets = np.concatenate([rng.uniform(0, 3, 60), rng.uniform(3, 10, 40)])
  splits = ["train"] * 64 + ["val"] * 6 + ["test"] * 30
  with open(tmp_path / "split.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["index", "age", "split"])
    w.writerows((i, f"{targets[i]:.3f}", splits[i]) for i in range(100))
  c = tiny_config(method="lds", **{"loss.name": "l1", "bins.stop": 10.0, "num_epochs": 1})
  c.dataset.update(dict(name="csv", csv=str(tmp_path / "split.csv"), arrays=str(tmp_path / "faces.npz")))
  out = rt.train_and_evaluate_regression(c, str(tmp_path / "run"))
  assert out["step"] == 2 and np.isfinite(out["mae"]) and np.isfinite(out["val_mae"])
  counts = json.load(open(tmp_path / "run" / "train_counts.json"))["counts"]
  np.testing.assert_array_equal(counts, np.bincount(targets[:64].astype(int), minlength=10))
  proc = subprocess.run([sys.executable, "launch.py", "--config=configs/fashion_mnist_dir.py:smoke",
                         f"--workdir={tmp_path / 'bad'}", "--config.loss.name=l3"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "error: unknown regression loss 'l3'; valid choices: mse" in proc.stderr

"""End-to-end training system: mock cifar10 step, 2 devices vs 1, kill-and-resume, config errors."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lt_jax.train import checkpoint, config as config_lib, optim
from lt_jax.train.trainer import NonFiniteLossError, train_and_evaluate

from configs import cifar_lt, fashion_mnist_lt  # installed (requirements.txt: -e .) or the cwd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MOCK_EXAMPLES = 400


@pytest.fixture()
def mock_tfds():
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield


def set_fields(c, overrides: dict):
  """``c`` with the dotted keys of ``overrides`` (``{"optim.lr": 0.1}``) set."""
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def run_killed_after_first_save(config_expr: str, workdir) -> subprocess.CompletedProcess:
  """Trains ``config_expr`` (e.g. ``"tests.test_train.tiny_config()"``) on mock data in a subprocess
  that SIGKILLs itself right after its first checkpoint is on disk; returns the finished process."""
  script = f"""
import os, signal, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})  # test modules import each other
import jax
jax.config.update("jax_num_cpu_devices", {len(jax.devices())})
jax.config.update("jax_compilation_cache_dir", {jax.config.jax_compilation_cache_dir!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
import tensorflow_datasets as tfds
from lt_jax.train import checkpoint
orig = checkpoint.save
def save_then_die(mngr, step, state, meta):
  orig(mngr, step, state, meta)
  mngr.wait_until_finished()
  os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save_then_die
import {config_expr.rsplit(".", 1)[0]}
with tfds.testing.mock_data(num_examples={MOCK_EXAMPLES}):
  from lt_jax.train.trainer import train_and_evaluate
  train_and_evaluate({config_expr}, {str(workdir)!r})
"""
  return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def tiny_config(**overrides):
  """A CNN on mock cifar10 (IR 4): a few steps, quiet, no plots."""
  c = cifar_lt.get_config("smoke")
  c.model.name = "cnn"
  c.dataset.imbalance_ratio = 4.0
  c.batch_size = 16
  c.eval_batch_size = 100
  c.num_epochs = 2
  c.max_steps = -1
  c.quiet = True
  c.optim.warmup_epochs = 0.5
  c.optim.decay_epochs = (1, 2)
  c.checkpoint_every_epochs = 1
  return set_fields(c, overrides)


def params_of(result):
  return jax.tree.leaves(jax.device_get(result["state"].params))


def test_cifar10_resnet_step_on_mock_data(mock_tfds, tmp_path):
  c = cifar_lt.get_config("smoke")
  c.quiet = True
  c.dataset.imbalance_ratio = 4.0
  out = train_and_evaluate(c, str(tmp_path))
  assert out["step"] == 3
  for key in ("accuracy", "balanced_error_rate", "balanced_accuracy", "macro_f1", "ece", "nll"):
    assert np.isfinite(out[key]), key
  assert out["balanced_error_rate"] == pytest.approx(1 - out["balanced_accuracy"])
  counts = json.load(open(tmp_path / "train_counts.json"))["counts"]
  assert counts == sorted(counts, reverse=True) and counts[0] / counts[-1] == pytest.approx(4, rel=0.1)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[-1]["split"] == "test" and lines[-1]["step"] == 3
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))
  assert json.load(open(tmp_path / "config.json"))["model"]["name"] == "resnet20"


def test_two_devices_equal_one_device(mock_tfds, tmp_path):
  assert len(jax.devices()) == 2
  one = train_and_evaluate(tiny_config(num_devices=1, max_steps=4), str(tmp_path / "one"))
  two = train_and_evaluate(tiny_config(num_devices=2, max_steps=4), str(tmp_path / "two"))
  # Same math; only the all-reduce order of the batch sums differs (float32 round-off,
  # amplified a little by 4 SGD steps).
  for a, b in zip(params_of(one), params_of(two)):
    assert np.max(np.abs(a - b)) <= 1e-3 * np.max(np.abs(a)), np.max(np.abs(a - b))
  assert one["accuracy"] == pytest.approx(two["accuracy"], abs=0.02)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """The uninterrupted tiny run (2 epochs, 20 steps) the resume tests compare against."""
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return train_and_evaluate(tiny_config(), str(tmp_path_factory.mktemp("reference")))


def test_kill_and_resume_is_bit_identical(mock_tfds, reference_run, tmp_path):
  full = reference_run
  # Interrupted after 5 steps (mid-epoch: the last checkpoint is at the stop), then resumed.
  part = train_and_evaluate(tiny_config(max_steps=5), str(tmp_path / "resumed"))
  assert part["step"] == 5
  resumed = train_and_evaluate(tiny_config(), str(tmp_path / "resumed"))
  assert resumed["step"] == full["step"]
  for a, b in zip(params_of(full), params_of(resumed)):
    np.testing.assert_array_equal(a, b)


def test_sigkill_mid_run_then_resume(mock_tfds, reference_run, tmp_path):
  """A process killed by SIGKILL after its first checkpoint resumes to the same parameters."""
  ref = reference_run
  workdir = tmp_path / "killed"
  proc = run_killed_after_first_save("tests.test_train.tiny_config()", workdir)
  assert proc.returncode == -9, proc.stderr[-2000:]
  saved = sorted(os.listdir(workdir / "checkpoints"))
  assert [s for s in saved if s.isdigit()], saved
  resumed = train_and_evaluate(tiny_config(), str(workdir))
  for a, b in zip(params_of(ref), params_of(resumed)):
    np.testing.assert_array_equal(a, b)


def test_resume_with_incompatible_config_is_refused(mock_tfds, tmp_path):
  train_and_evaluate(tiny_config(max_steps=2), str(tmp_path))
  with pytest.raises(checkpoint.ResumeError, match=r"loss.name: checkpoint has 'ce', config has 'focal'"):
    c = tiny_config()
    config_lib.set_loss(c, "focal")
    train_and_evaluate(c, str(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["loss"]["name"] == "ce"  # record left intact
  # Fields that do not change training may change.
  out = train_and_evaluate(tiny_config(max_steps=3, log_every_steps=7), str(tmp_path))
  assert out["step"] == 3


def test_fields_added_later_at_their_default_do_not_block_resume():
  """A checkpoint written before a config field existed resumes when the field is at its default."""
  base = config_lib.base_config().to_dict()
  current = tiny_config().to_dict()
  saved = json.loads(json.dumps(current))            # as config.json / the checkpoint's meta store it
  del saved["meta_weight"], saved["sampler"]["redraw"]
  assert config_lib.incompatible_fields(saved, current, defaults=base) == []
  assert [d.split(":")[0] for d in config_lib.incompatible_fields(saved, current)] == ["meta_weight", "sampler.redraw"]
  current["meta_weight"]["hidden"], current["sampler"]["redraw"] = 50, True   # not the defaults: refused
  assert [d.split(":")[0] for d in config_lib.incompatible_fields(saved, current, defaults=base)] == [
      "meta_weight", "sampler.redraw"]


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(mock_tfds, tmp_path):
  c = tiny_config()
  c.optim.lr = 1e30
  c.optim.warmup_epochs = 0.0
  # The gradient of step 1 is already non-finite; nothing was checkpointed before it.
  with pytest.raises(NonFiniteLossError, match=r"at step [12] of stage joint; no checkpoint was written"):
    train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == []


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.dataset, "imbalance_ratio", 0.5), "imbalance_ratio must be >= 1"),
    (lambda c: setattr(c.loss, "name", "nope"), "valid losses: ce,"),
    (lambda c: setattr(c.sampler, "name", "nope"), "valid choices: instance, class_balanced"),
    (lambda c: setattr(c.dataset, "name", "mnist"), "valid choices: fashion_mnist, cifar10, cifar100"),
    (lambda c: setattr(c.model, "name", "vit"), "valid choices: cnn, resnet20"),
    (lambda c: setattr(c, "batch_size", 33), "not divisible by the number of devices \\(2\\)"),
    (lambda c: c.loss.hparams.update({"tau": "x"}), "bad hyper-parameters for loss 'ce'"),
    (lambda c: setattr(c, "keep_checkpoints", 0), "keep_checkpoints must be an integer >= 1"),
    (lambda c: setattr(c, "checkpoint_every_epochs", -1), "checkpoint_every_epochs must be > 0"),
    (lambda c: setattr(c, "eval_every_epochs", -1), "eval_every_epochs must be > 0"),
    (lambda c: setattr(c, "eval_every_steps", 0), "eval_every_steps must be > 0"),
    (lambda c: setattr(c.optim, "weight_decay", -1.0), "optim.weight_decay must be a finite number >= 0"),
    (lambda c: setattr(c.optim, "lr", float("nan")), "optim.lr must be a finite number > 0"),
    (lambda c: setattr(c.optim, "warmup_epochs", float("nan")), "optim.warmup_epochs must be in"),
    (lambda c: setattr(c.dataset, "imbalance_ratio", float("inf")), "imbalance_ratio must be >= 1 and finite"),
    (lambda c: setattr(c.dataset, "val_per_class", -1), "dataset.val_per_class must be >= 0"),
    (lambda c: setattr(c.dataset, "subset_seed", -1), "dataset.subset_seed must be >= 0"),
    (lambda c: setattr(c.augment, "crop_pad", -1), "augment.crop_pad must be >= 0"),
    (lambda c: setattr(c, "host_sync", "sometimes"), "valid choices: auto, always, never"),
    (lambda c: setattr(c.dataset, "data_dir", __file__), "dataset.data_dir=.* is a file, not a directory"),
])
def test_config_validation_errors(mutate, message):
  c = fashion_mnist_lt.get_config()
  mutate(c)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c, num_devices=2)


def test_dir_fixture_and_workdir_errors(tmp_path):
  from configs import fashion_mnist_dir, imagenet_lt
  from lt_jax.train import workdir
  for key, value, message in (("max_angle", 1, r"dataset.max_angle must be an int in \[2, 360\]"),
                              ("imbalance_ratio", 1e9, r"dataset.imbalance_ratio must be in \[1, n_max=400\]")):
    c = fashion_mnist_dir.get_config()
    c.dataset[key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate_regression(c)
  c = imagenet_lt.get_config("smoke")
  c.dataset.num_classes = 5
  with pytest.raises(config_lib.ConfigError, match="dataset.num_classes=5 but the generated fixture has "
                                                   "dataset.fixture.num_classes=12"):
    config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match="--workdir is empty"):
    workdir.check("")
  (tmp_path / "f").write_text("")
  with pytest.raises(config_lib.ConfigError, match="exists and is not a directory"):
    workdir.check(str(tmp_path / "f"))


def test_a_second_process_on_a_locked_workdir_refuses_at_once(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom lt_jax.train import workdir\n"
                             f"with workdir.locked({str(tmp_path)!r}):\n  print('held', flush=True)\n  time.sleep(120)"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    proc = subprocess.run([sys.executable, "launch.py", "--config=configs/fashion_mnist_lt.py:smoke",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  finally:
    holder.kill()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip() == f"error: workdir {tmp_path} is in use by pid {holder.pid} on host " \
      f"{socket.gethostname()}; wait for that run or use another --workdir", proc.stderr[-2000:]


def test_diverging_smoke_run_exits_2_and_keeps_no_bad_checkpoint(tmp_path):
  """The issue-15 probe: lr=1e3 made the gradient norm NaN from step 5, and the run exited 0."""
  proc = subprocess.run([sys.executable, "launch.py", "--config=configs/fashion_mnist_lt.py:smoke",
                         f"--workdir={tmp_path}", "--config.optim.lr=1e3", "--config.quiet=true"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite training ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "summary.json").exists()
  for step in os.listdir(tmp_path / "checkpoints"):  # whatever was kept is finite
    arrays = checkpoint.restore_arrays(checkpoint.manager(str(tmp_path), 3), int(step))
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(arrays["params"])), step


def test_sigterm_stops_after_the_save_with_one_line(tmp_path):
  """Issue 15, item 12, across the process boundary: launch.py turns SIGTERM into a clean stop."""
  import signal
  import time
  proc = subprocess.Popen([sys.executable, "launch.py", "--config=configs/fashion_mnist_lt.py:smoke",
                           f"--workdir={tmp_path}", "--config.max_steps=100000", "--config.num_epochs=1000",
                           "--config.log_every_steps=1", "--config.quiet=true"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 130, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert "Traceback" not in err, err[-2000:]
  assert last.startswith("interrupted at step ") and last.endswith(
      " of stage joint; rerun the same command to resume"), last
  stopped = int(last.split()[3])
  assert stopped >= 1 and not (tmp_path / "summary.json").exists()
  saved = os.listdir(tmp_path / "checkpoints") if (tmp_path / "checkpoints").exists() else []
  assert all(int(s) <= stopped for s in saved if s.isdigit()), saved


def test_num_devices_errors():
  from lt_jax.train.state import make_mesh
  with pytest.raises(config_lib.ConfigError, match="num_devices=4, but only 2 devices are available"):
    make_mesh(4)
  with pytest.raises(config_lib.ConfigError, match="num_devices must be 0 \\(all\\) or a positive"):
    make_mesh(-1)


def test_config_variants():
  c = cifar_lt.get_config("dataset=cifar100,ir=50,loss=la,sampler=cb,seed=3")
  assert (c.dataset.name, c.dataset.imbalance_ratio, c.loss.name, c.sampler.name, c.seed) == (
      "cifar100", 50.0, "logit_adjusted", "class_balanced", 3)
  assert c.loss.hparams.tau == 1.0
  config_lib.validate(c)
  with pytest.raises(ValueError, match="valid keys: ir, .*dataset"):
    cifar_lt.get_config("datset=cifar100")
  with pytest.raises(ValueError, match="valid: cifar10, cifar100"):
    cifar_lt.get_config("dataset=svhn")
  with pytest.raises(ValueError, match="valid losses"):
    cifar_lt.get_config("loss=nope")


@pytest.mark.parametrize("args, message", [
    (["--config=configs/fashion_mnist_lt.py", "--config.optim.lrr=0.1"],
     "error: unknown config key 'optim.lrr': config.optim has no 'lrr'; valid keys: decay_epochs, decay_factor, lr,"),
    (["--config=configs/fashion_mnist_lt.py:ir=abc"], "error: config variant ir='abc': expected a number"),
    (["--config=configs/nope.py"], "error: Failed loading config file"),
])
def test_bad_command_line_gives_one_error_line(args, message):
  proc = subprocess.run([sys.executable, "launch.py", *args, "--workdir=/tmp/never"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().startswith(message) and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_standard_cifar_schedule():
  """REFERENCE.md 1c: 0.1 after a 5-epoch warmup, x0.01 at epoch 160, x0.0001 at 180."""
  c = cifar_lt.get_config()
  spe = 12406 // 128
  sched = optim.make_schedule(c.optim, spe, c.num_epochs)
  assert float(sched(0)) == pytest.approx(0.1 / (5 * spe))
  assert float(sched(5 * spe - 1)) == pytest.approx(0.1)
  assert float(sched(160 * spe - 1)) == pytest.approx(0.1)
  assert float(sched(160 * spe)) == pytest.approx(1e-3)
  assert float(sched(180 * spe)) == pytest.approx(1e-5)
  assert float(sched(200 * spe - 1)) == pytest.approx(1e-5)


def test_batch_indices_for_every_sampler():
  """The on-device batch draw: epochs for 'instance', class frequencies for the others."""
  import jax.numpy as jnp
  from lt_jax import samplers
  from lt_jax.train import steps
  counts = np.array([40, 20, 10, 5])
  labels = np.repeat(np.arange(4), counts)
  data = steps.TrainData(images=None, labels=jnp.asarray(labels), index=samplers.build_index(labels, 4))
  key = jax.random.key(0)

  def draws(name, num_steps, batch=5, k=2):
    sc = steps.StepConfig(batch_size=batch, steps_per_epoch=len(labels) // batch, num_epochs=4, sampler=name,
                          k_per_class=k, crop_pad=0, flip=False, mean=(0.,), std=(1.,))
    fn = jax.jit(lambda s: steps.batch_indices(key, s, data, jnp.asarray(counts, jnp.float32), sc))
    return np.stack([np.asarray(fn(jnp.int32(s))) for s in range(num_steps)])

  epoch = draws("instance", 15).reshape(-1)  # 75 examples, 15 steps of 5 = one epoch
  assert sorted(epoch) == list(range(75))
  assert not np.array_equal(epoch, draws("instance", 30).reshape(-1)[75:])  # next epoch reshuffled
  cb = np.bincount(labels[draws("class_balanced", 400).reshape(-1)], minlength=4) / 2000
  np.testing.assert_allclose(cb, 0.25, atol=0.04)
  sq = np.bincount(labels[draws("sqrt", 400).reshape(-1)], minlength=4) / 2000
  np.testing.assert_allclose(sq, np.sqrt(counts) / np.sqrt(counts).sum(), atol=0.04)
  rev = np.bincount(labels[draws("reversed", 400).reshape(-1)], minlength=4) / 2000
  np.testing.assert_allclose(rev, (40 / counts) / (40 / counts).sum(), atol=0.04)
  aware = labels[draws("class_aware", 4, batch=8, k=2).reshape(-1)]  # 4 rounds of 4 classes x 2
  for r in range(4):
    assert sorted(np.bincount(aware[8 * r:8 * r + 8], minlength=4)) == [2, 2, 2, 2]
  prog_first = np.bincount(labels[draws("progressive", 15).reshape(-1)], minlength=4)
  assert prog_first[0] > prog_first[3]  # epoch 0 of progressive is instance-balanced

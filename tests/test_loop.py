"""The one training loop: asynchronous metrics, the NaN/inf check before checkpoints, durations,
and no hidden host<->device copy in the hot loop."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lt_jax.train import durations, loop, report
from lt_jax.train.state import TrainState
from test_train import MOCK_EXAMPLES, tiny_config


def _env(**kw):
  return loop.Env(is_main=True, quiet=True, log=lambda *a: None, block_each_step=False, **kw)


def _toy_run(tmp_path, bad_step, bad_key="loss", **kw):
  """A scalar 'model' whose update adds 1; metric ``bad_key`` is NaN at ``bad_step``."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros((3,))}, batch_stats={}, opt_state=(),
                     loss_state=(), rng=jnp.zeros((2,), jnp.uint32))

  @jax.jit
  def update(state, data):
    step = state.step + 1
    value = jnp.where(step == bad_step, jnp.nan, 1.0 / step)
    m = {"loss": value if bad_key == "loss" else 1.0, "grad_norm": value if bad_key == "grad_norm" else 0.5}
    return state.replace(step=step, params={"w": state.params["w"] + data}), m

  args = dict(name="stage toy", workdir=str(tmp_path), record={"toy": 1}, state=state, update=update,
              input=loop.DeviceInput(jnp.ones((3,))), last_step=10, batch_size=4, log_every=100,
              checkpoint_every=2, keep_checkpoints=3)
  return loop.Run(**{**args, **kw})


@pytest.mark.parametrize("bad_key", ["loss", "grad_norm"])
def test_nonfinite_step_is_named_and_never_checkpointed(tmp_path, bad_key):
  run = _toy_run(tmp_path, bad_step=5, bad_key=bad_key)
  with pytest.raises(loop.NonFiniteLossError,
                     match=rf"training {bad_key} \(nan\) at step 5 of stage toy; the last good checkpoint \(step 4\)"):
    loop.train(run, _env(), report.MetricWriter(str(tmp_path), enabled=False))
  # Steps 5 and 6 ran (asynchronously) but the check before the step-6 save stopped the run.
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [2, 4]


def test_metrics_are_read_only_at_log_eval_and_checkpoint_steps(tmp_path, monkeypatch):
  reads = []
  real = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: (reads.append(len(x) if isinstance(x, list) else None), real(x))[1])
  evals = [loop.Periodic(every=5, split_name="val", run=lambda st: {"w": float(real(st.params["w"])[0])})]
  run = _toy_run(tmp_path, bad_step=-1, log_every=3, checkpoint_every=100, evals=evals)
  state, step = loop.train(run, _env(), report.MetricWriter(str(tmp_path)))
  assert step == 10 and float(state.params["w"][0]) == 10.0
  # One batched read per log step (3, 6, 9), evaluation (5) and the final checkpoint (10);
  # the list lengths are the steps since the previous read. (The initial step read is a scalar.)
  assert [r for r in reads if r is not None] == [3, 2, 1, 3, 1]
  lines = [l for l in open(tmp_path / "metrics.jsonl").read().splitlines()]
  assert len(lines) == 4 and '"split": "val", "w": 5.0' in lines[1]


def test_hot_loop_has_no_host_device_transfer(tmp_path):
  """A real classification run (on-device sampling, augmentation, step) under
  ``jax.transfer_guard("disallow_explicit")`` around every step of the loop: no host->device
  copy (a NumPy or Python-scalar argument, a ``device_put``) and no implicit read-back
  (``float(x)``) happens in the hot loop. On CPU a ``device_get`` is not a transfer (device
  memory is host memory), so the test above counts the loop's explicit reads instead."""
  c = tiny_config(max_steps=6, num_devices=1, transfer_guard=True, host_sync="never", log_every_steps=3)
  from lt_jax.train.trainer import train_and_evaluate
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    out = train_and_evaluate(c, str(tmp_path))
  assert out["step"] == 6 and np.isfinite(out["nll"])


def test_host_sync_setting():
  mesh1 = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  mesh2 = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  assert not loop.blocks_every_step("auto", mesh1) and loop.blocks_every_step("auto", mesh2)  # CPU here
  assert loop.blocks_every_step("always", mesh1) and not loop.blocks_every_step("never", mesh2)
  with pytest.raises(ValueError, match="valid: auto, always, never"):
    loop.blocks_every_step("sometimes", mesh1)


def test_durations_one_rule():
  assert durations.epochs_to_steps(3.75, 18) == 68          # 67.5 -> 68 (halves up)
  assert durations.epochs_to_steps(3.75, 17) == 64          # 63.75 -> 64
  assert durations.epochs_to_steps(0.25, 61) == 15          # 15.25 -> 15
  cfg = {"eval_every_epochs": 2, "eval_every_steps": None, "eval_every_examples": None}
  assert durations.steps("eval_every", cfg, 61, 128) == 122
  assert durations.steps("eval_every", {**cfg, "eval_every_examples": 1000}, 61, 128) == 8
  assert durations.steps("eval_every", {**cfg, "eval_every_steps": 7, "eval_every_examples": 1000}, 61, 128) == 7
  assert durations.steps("eval_every", {"eval_every_epochs": 0.001}, 61, 128, cadence=True) == 1
  with pytest.raises(durations.DurationError, match="must not be negative"):
    durations.steps("eval_every", {"eval_every_epochs": -1}, 61, 128)
  with pytest.raises(durations.DurationError, match="no duration for 'warmup'"):
    durations.steps("warmup", {}, 61, 128)
  assert [durations.itstime(s, 4, 10) for s in (3, 4, 8, 9, 10)] == [False, True, True, False, True]


def test_evaluators_as_data_val_split(tmp_path):
  """``config.evals.val = dict(type='classification', split='val')``: periodic and final lines in
  metrics.jsonl, and its final accuracy / balanced accuracy equal NumPy on the model's val logits."""
  import json
  import ml_collections
  from lt_jax.train import evaluators, trainer
  c = tiny_config(**{"dataset.val_per_class": 3, "eval_every_epochs": 1})
  c.evals.val = ml_collections.ConfigDict(dict(type="classification", split="val"))
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    out = trainer.train_and_evaluate(c, str(tmp_path))
    ds = trainer.load_dataset(c)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  spe = (len(ds.train_labels)) // c.batch_size  # 2 epochs: a periodic evaluation after the first
  assert [(l["step"], l["split"]) for l in lines if l["split"] in ("val", "test")] == [
      (spe, "test"), (spe, "val"), (2 * spe, "test"), (2 * spe, "val")]
  final_val = lines[-1]
  variables = out["variables"]["joint"]
  model = trainer.build_model(c, ds.num_classes)
  ctx = evaluators.EvalContext(model=model, splits=evaluators.MemorySplits(ds), mesh=jax.sharding.Mesh(
      np.asarray(jax.devices()), ("data",)), counts=np.asarray(ds.counts), num_classes=10, mean=tuple(ds.mean),
      std=tuple(ds.std), batch_size=100, block=True, log=print, outputs=evaluators.OutputCache())
  logits, _ = ctx.outputs.get(ctx, variables)("val")
  pred = logits.argmax(-1)
  assert final_val["accuracy"] == pytest.approx(np.mean(pred == ds.val_labels), abs=1e-6)
  recall = [np.mean(pred[ds.val_labels == k] == k) for k in range(10)]
  assert final_val["balanced_accuracy"] == pytest.approx(np.mean(recall), abs=1e-6)
  with pytest.raises(ValueError, match="unknown evaluator type 'nope'; valid: classification, tau_norm"):
    evaluators.make("nope", ctx)


def test_workdir_lock_refuses_a_second_run(tmp_path):
  from lt_jax.train import workdir
  with workdir.locked(str(tmp_path)):
    with pytest.raises(workdir.WorkdirInUseError, match=rf"workdir {tmp_path} is in use by pid {os.getpid()} on host"):
      with workdir.locked(str(tmp_path)):
        pass
  with workdir.locked(str(tmp_path)):  # released on exit; the stale file does not block
    pass


def test_metrics_jsonl_one_line_per_step_after_resume(tmp_path):
  w = report.MetricWriter(str(tmp_path), enabled=True)
  for s in (1, 2, 3, 4):
    w.write(s, "train", {"loss": float(s)})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "spl')  # cut by a kill
  w = report.MetricWriter(str(tmp_path), enabled=True)
  w.resume(2)  # the checkpoint was at step 2: steps 3, 4 replay
  for s in (2, 3, 4):
    w.write(s, "train", {"loss": 10.0 + s})
  w.close()
  import json
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_sigint_in_the_loop_finishes_the_save_and_names_the_step(tmp_path):
  calls = {"n": 0}
  base = _toy_run(tmp_path, bad_step=-1)

  def update(state, data):
    calls["n"] += 1
    if calls["n"] == 7:
      raise KeyboardInterrupt
    return base.update(state, data)
  with pytest.raises(loop.Interrupted, match="interrupted at step 6 of stage toy; rerun the same command"):
    loop.train(base._replace(update=update), _env(), report.MetricWriter(str(tmp_path), enabled=False))
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [2, 4, 6]
  state, step = loop.train(_toy_run(tmp_path, bad_step=-1), _env(), report.MetricWriter(str(tmp_path), enabled=False))
  assert step == 10 and float(state.params["w"][0]) == 10.0  # resumed at 6, same end point


def test_nonfinite_parameters_are_never_checkpointed(tmp_path):
  base = _toy_run(tmp_path, bad_step=-1)

  def update(state, data):  # finite metrics, but the parameters blow up at step 3
    state, m = base.update(state, data)
    return state.replace(params={"w": jnp.where(state.step >= 3, jnp.inf, state.params["w"])}), m
  with pytest.raises(loop.NonFiniteLossError, match=r"parameters \(NaN/inf\) at step 4 of stage toy; the last good "
                                                     r"checkpoint \(step 2\)"):
    loop.train(base._replace(update=jax.jit(update)), _env(), report.MetricWriter(str(tmp_path), enabled=False))
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [2]


@pytest.mark.parametrize("damage", ["truncate", "meta", "empty"])
def test_unreadable_latest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
  import shutil
  logs = []
  env = loop.Env(is_main=True, quiet=True, log=logs.append, block_each_step=False)
  writer = lambda: report.MetricWriter(str(tmp_path), enabled=False)
  loop.train(_toy_run(tmp_path, bad_step=-1), env, writer())
  latest = tmp_path / "checkpoints" / "10"
  if damage == "truncate":
    for root, _, files in os.walk(latest / "state"):
      for f in files:
        open(os.path.join(root, f), "wb").close()
  elif damage == "meta":
    shutil.rmtree(latest / "meta")
  else:
    shutil.rmtree(latest)
    latest.mkdir()
  state, step = loop.train(_toy_run(tmp_path, bad_step=-1, last_step=12), env, writer())
  assert any("checkpoint step 10" in l and "unreadable" in l and "resuming from step 8" in l for l in logs), logs
  assert step == 12 and float(state.params["w"][0]) == 12.0
  assert (tmp_path / "checkpoints" / "10.unreadable").exists() and (tmp_path / "checkpoints" / "12").exists()


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
  from lt_jax.train import checkpoint
  loop.train(_toy_run(tmp_path, bad_step=-1, last_step=2), _env(), report.MetricWriter(str(tmp_path), enabled=False))
  for root, _, files in os.walk(tmp_path / "checkpoints" / "2"):
    for f in files:
      open(os.path.join(root, f), "wb").close()
  with pytest.raises(checkpoint.ResumeError, match=r"no readable checkpoint in .*: step\(s\) 2 cannot be read.*mv "):
    loop.train(_toy_run(tmp_path, bad_step=-1), _env(), report.MetricWriter(str(tmp_path), enabled=False))


def test_full_disk_stops_with_one_clear_error_and_resumes_after(tmp_path, monkeypatch):
  import errno
  from lt_jax.train import checkpoint
  save = checkpoint.save

  def full_at_6(mngr, step, state, meta):
    if step == 6:
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / "6"))
    save(mngr, step, state, meta)
  monkeypatch.setattr(checkpoint, "save", full_at_6)
  writer = lambda: report.MetricWriter(str(tmp_path), enabled=False)
  with pytest.raises(loop.CheckpointWriteError, match=r"cannot write the step-6 checkpoint of stage toy to .*checkpoints "
                     r"\(no space left on device\); the last good checkpoint \(step 4\) is intact: free space and rerun"):
    loop.train(_toy_run(tmp_path, bad_step=-1), _env(), writer())
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [2, 4]
  monkeypatch.setattr(checkpoint, "save", save)  # space freed: the same run resumes from step 4
  state, step = loop.train(_toy_run(tmp_path, bad_step=-1), _env(), writer())
  assert step == 10 and float(state.params["w"][0]) == 10.0

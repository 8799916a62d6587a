"""``train_and_evaluate(config, workdir)``: the whole run, resumable from its workdir."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lt_jax import heads, losses, metrics, priors, samplers
from lt_jax.data import longtail
from lt_jax.models import get_model
from lt_jax.train import checkpoint, config as config_lib, optim, report, steps
from lt_jax.train.state import TrainState, batch_sharded, create_state, make_mesh, put_global, replicated


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf; the last good checkpoint is kept."""


def load_dataset(config: ml_collections.ConfigDict) -> longtail.LTDataset:
  d = config.dataset
  return longtail.make_lt_dataset(
      d.name, d.imbalance_ratio, profile=d.profile, seed=d.subset_seed,
      data_dir=d.data_dir or None, val_per_class=d.val_per_class,
      **({"mu": d.mu} if d.profile == "step" else {}),
      **({"shape": d.pareto_shape} if d.profile == "pareto" else {}))


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  m = config.model
  kw = {"cosine_scale": m.cosine_scale} if m.head == "cosine" else {}
  return get_model(m.name, num_classes=num_classes, head=m.head,
                   dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32, **kw)


def evaluate(eval_step, variables, images: np.ndarray, labels: np.ndarray, batch_size: int,
             mesh) -> steps.EvalSums:
  """One pass over a split: per-batch sums accumulated on device (padded last batch masked)."""
  sharding = batch_sharded(mesh)
  total = None
  for start in range(0, len(labels), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    valid = len(y)
    if valid < batch_size:  # pad to a fixed shape (one compilation), mask the padding
      x = np.concatenate([x, np.zeros((batch_size - valid, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((batch_size - valid,), y.dtype)])
    mask = np.arange(batch_size) < valid
    sums = eval_step(variables, put_global(x, sharding), put_global(y, sharding), put_global(mask, sharding))
    total = steps.add_sums(total, sums)
  return total


def summarize(sums: steps.EvalSums, train_counts: np.ndarray) -> dict[str, Any]:
  """Scalar metrics (and per-class accuracy) from accumulated evaluation sums."""
  s = metrics.summarize(sums.confusion, train_counts, calibration=sums.calibration, nll=sums.nll)
  return {k: float(v) for k, v in jax.device_get(s).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if a checkpoint is there) and evaluates it.

  Returns the final test summary (top-1, BER, balanced accuracy, macro-F1, many/medium/few,
  ECE, NLL) and writes metrics, config, counts, plots and checkpoints to ``workdir``.
  """
  mesh = make_mesh(config.num_devices)
  config_lib.validate(config, num_devices=mesh.size)
  is_main = jax.process_index() == 0
  quiet = config.quiet or os.environ.get("CI", "").lower() == "true"
  log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
  os.makedirs(workdir, exist_ok=True)

  ds = load_dataset(config)
  counts = np.asarray(ds.counts)
  num_classes = ds.num_classes
  spe = config_lib.steps_per_epoch(len(ds.train_labels), config.batch_size)
  total_steps = spe * config.num_epochs
  last_step = total_steps if config.max_steps < 0 else min(total_steps, config.max_steps)
  log(f"lt_jax: {ds.name}-LT IR={priors.imbalance_ratio(counts):.0f} ({len(ds.train_labels)} train / "
      f"{len(ds.test_labels)} test, {num_classes} classes), model={config.model.name}/{config.model.head}, "
      f"loss={config.loss.name}, sampler={config.sampler.name}, devices={mesh.size}, "
      f"{spe} steps/epoch x {config.num_epochs} epochs")
  model = build_model(config, num_classes)
  loss = losses.make_loss(config.loss.name, **config.loss.hparams.to_dict())
  schedule = optim.make_schedule(config.optim, spe, config.num_epochs)
  tx = optim.make_optimizer(config.optim, schedule)
  state = create_state(model, tx, loss, num_classes, ds.train_images.shape[1:], config.seed, mesh)

  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  restored, meta = checkpoint.restore_latest(mngr, state, config.to_dict())
  if restored is not None:
    state = restored
    log(f"resumed from {mngr.directory} at step {int(state.step)} (epoch {meta['epoch']})")
  if is_main:  # after the resume check, so a refused resume leaves the workdir's record intact
    report.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    report.write_json(os.path.join(workdir, "train_counts.json"),
                      {"counts": counts.tolist(), "prior": np.asarray(priors.prior(counts)).tolist()})

  rep = replicated(mesh)
  data = steps.TrainData(images=put_global(ds.train_images, rep), labels=put_global(ds.train_labels, rep),
                         index=jax.device_put(samplers.build_index(ds.train_labels, num_classes), rep))
  sc = steps.StepConfig(batch_size=config.batch_size, steps_per_epoch=spe, num_epochs=config.num_epochs,
                        sampler=config.sampler.name, k_per_class=config.sampler.k_per_class,
                        crop_pad=config.augment.crop_pad, flip=config.augment.flip,
                        mean=tuple(ds.mean), std=tuple(ds.std))
  counts_dev = put_global(counts.astype(np.float32), rep)
  train_step = steps.make_train_step(model, tx, loss, schedule, counts_dev, sc, mesh)
  eval_step = steps.make_eval_step(model, num_classes, tuple(ds.mean), tuple(ds.std), mesh)
  writer = report.MetricWriter(workdir, enabled=is_main)

  def checkpoint_meta(step: int, last: dict) -> dict:
    return {"config": config.to_dict(), "step": step, "epoch": step / spe,
            "sampler": {"name": config.sampler.name, "epoch": step // spe, "position": step % spe},
            "metrics": last}

  step = int(state.step)
  bar = None
  if not quiet and is_main and step < last_step:
    from tqdm.auto import tqdm
    bar = tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout)
  ckpt_every = max(int(config.checkpoint_every_epochs * spe), 1)
  eval_every = max(int(config.eval_every_epochs * spe), 1)
  last_metrics: dict[str, float] = {}
  t0, seen = time.time(), 0
  while step < last_step:
    state, m = train_step(state, data)
    m = jax.device_get(m)  # blocks on the step: NaN check and no runaway queue on CPU meshes
    step += 1
    seen += config.batch_size
    if not np.isfinite(m["loss"]):
      mngr.wait_until_finished()
      raise NonFiniteLossError(
          f"non-finite training loss ({m['loss']}) at step {step}; the last good checkpoint "
          f"(step {mngr.latest_step()}) is kept in {mngr.directory}")
    last_metrics = {k: float(v) for k, v in m.items()}
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.3f}", img_s=f"{seen / (time.time() - t0):.0f}")
    if step % config.log_every_steps == 0:
      writer.write(step, "train", {**last_metrics, "images_per_sec": seen / (time.time() - t0)})
    if step % eval_every == 0 and step < last_step:
      summary = summarize(evaluate(eval_step, {"params": state.params, "batch_stats": state.batch_stats},
                                   ds.test_images, ds.test_labels, config.eval_batch_size, mesh), counts)
      writer.write(step, "test", summary)
      if bar is not None:
        bar.write(f"step {step}: test top-1 {summary['accuracy']:.4f}, "
                  f"BER {summary['balanced_error_rate']:.4f}")
    if step % ckpt_every == 0 or step == last_step:
      checkpoint.save(mngr, step, state, checkpoint_meta(step, last_metrics))
  if bar is not None:
    bar.close()
  mngr.wait_until_finished()
  mngr.close()

  sums = evaluate(eval_step, {"params": state.params, "batch_stats": state.batch_stats},
                  ds.test_images, ds.test_labels, config.eval_batch_size, mesh)
  summary = summarize(sums, counts)
  writer.write(step, "test", summary)
  writer.close()
  if is_main:
    final_report(workdir, config, ds, state, sums, summary, step, log)
  return {"step": step, **summary, "state": state}


def final_report(workdir: str, config, ds, state: TrainState, sums: steps.EvalSums,
                 summary: dict[str, float], step: int, log) -> None:
  """``summary.json``, the summary table on stdout and the PNG plots (process 0 only)."""
  cm = np.asarray(jax.device_get(sums.confusion))
  per_class = np.asarray(metrics.per_class_recall(cm))
  report.write_json(os.path.join(workdir, "summary.json"),
                    {"step": step, **summary, "per_class_accuracy": per_class.tolist()})
  log(report.summary_table(summary, f"{ds.name}-LT test set, step {step}"))
  if config.plots:
    kernel = state.params.get("head", {}).get("kernel")
    norms = None if kernel is None else np.asarray(heads.weight_norms(kernel))
    paths = report.save_plots(workdir, np.asarray(ds.counts), per_class, norms, cm, ds.class_names)
    log("plots: " + ", ".join(paths))

"""``train_and_evaluate(config, workdir)``: the whole run, resumable from its workdir.

A run is a joint stage (the config's top-level loss, sampler, optimiser and epochs) followed
by the stages named in ``config.stages`` (Kang et al., "Decoupling Representation and
Classifier for Long-Tailed Recognition", ICLR 2020):

* ``crt``: re-initialised classifier trained on the frozen backbone (class-balanced sampler);
* ``lws``: the classifier frozen, per-class scales learnt (class-aware sampler);
* ``tau_norm``: ``w_c / ||w_c||^tau``, ``tau`` chosen on the validation split;
* ``posthoc``: post-hoc logit adjustment ``z - tau log pi`` (Menon et al., ICLR 2021), ``tau``
  chosen on the validation split;
* ``ncm``: nearest class mean of centred, normalised training features;
* ``bags``: a fresh group-softmax classifier (Li et al., CVPR 2020), classes binned by
  training count, trained on the frozen backbone (must be the last stage).

Training stages swap the optax parameter partition (``decoupled.partitioned_optimizer``:
frozen leaves get ``set_to_zero`` and no optimiser state) and call the model with
``train=False`` so the BatchNorm statistics stay those of the joint model. Each stage writes
to ``workdir/stages/<name>/`` and resumes from its own checkpoints; the joint stage keeps
``workdir/`` itself. ``config.init_from`` replaces the joint stage by a finished run.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lt_jax import decoupled, heads, losses, metrics, priors, samplers
from lt_jax.data import augment, longtail, streaming
from lt_jax.models import get_model
from lt_jax.train import checkpoint, config as config_lib, optim, report, steps
from lt_jax.train.state import batch_sharded, create_state, make_mesh, put_global, replicated

Variables = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf; the last good checkpoint is kept."""


def check_finite(loss: float, step: int, mngr, where: str = "") -> None:
  """Raises :class:`NonFiniteLossError` naming the step and the last good checkpoint."""
  if not np.isfinite(loss):
    mngr.wait_until_finished()
    raise NonFiniteLossError(f"non-finite training loss ({loss}) at step {step}{where}; the last good "
                             f"checkpoint (step {mngr.latest_step()}) is kept in {mngr.directory}")


def load_dataset(config: ml_collections.ConfigDict) -> longtail.LTDataset:
  d = config.dataset
  return longtail.make_lt_dataset(
      d.name, d.imbalance_ratio, profile=d.profile, seed=d.subset_seed,
      data_dir=d.data_dir or None, val_per_class=d.val_per_class,
      **({"mu": d.mu} if d.profile == "step" else {}),
      **({"shape": d.pareto_shape} if d.profile == "pareto" else {}))


def build_model(config: ml_collections.ConfigDict, num_classes: int, head: str | None = None):
  m = config.model
  head = head or m.head
  kw = {"cosine_scale": m.cosine_scale} if head == "cosine" else {}
  if m.bbn:
    kw["bbn"] = True
  return get_model(m.name, num_classes=num_classes, head=head,
                   dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32, **kw)


def padded_batches(arrays: tuple[np.ndarray, ...], batch_size: int):
  """Yields ``(batch of each array, number of real rows)``; the last batch is zero-padded to
  ``batch_size`` so every call has one shape (one compilation)."""
  for start in range(0, len(arrays[0]), batch_size):
    batch = tuple(a[start:start + batch_size] for a in arrays)
    valid = len(batch[0])
    if valid < batch_size:
      batch = tuple(np.concatenate([b, np.zeros((batch_size - valid, *b.shape[1:]), b.dtype)]) for b in batch)
    yield batch, valid


def evaluate(eval_step, variables, images: np.ndarray, labels: np.ndarray, batch_size: int,
             mesh) -> steps.EvalSums:
  """One pass over a split: per-batch sums accumulated on device (padded last batch masked)."""
  sharding = batch_sharded(mesh)
  total = None
  for (x, y), valid in padded_batches((images, labels), batch_size):
    mask = np.arange(batch_size) < valid
    sums = eval_step(variables, put_global(x, sharding), put_global(y, sharding), put_global(mask, sharding))
    # Block on each batch: queued collectives on an emulated CPU mesh can time out (PLATFORM.md).
    total = jax.block_until_ready(steps.add_sums(total, sums))
  return total


def summarize(sums: steps.EvalSums, train_counts: np.ndarray) -> dict[str, Any]:
  """Scalar metrics (and per-class accuracy) from accumulated evaluation sums."""
  s = metrics.summarize(sums.confusion, train_counts, calibration=sums.calibration, nll=sums.nll)
  return {k: float(v) for k, v in jax.device_get(s).items()}


class Context(NamedTuple):
  """What every stage of one run shares."""
  config: ml_collections.ConfigDict
  ds: longtail.LTDataset
  mesh: Any
  counts: np.ndarray          # (C,) training counts
  steps_per_epoch: int
  data: steps.TrainData       # the training set on device
  counts_dev: jax.Array
  is_main: bool
  quiet: bool
  log: Callable[..., None]
  stream: streaming.StreamingRun | None = None  # host input pipeline (datasets too big for device)


class StageSpec(NamedTuple):
  """One training stage: what trains, on what, for how long, and where it is recorded."""
  name: str                  # 'joint' or a stage name
  workdir: str
  model: Any
  loss: losses.Loss
  optim: ml_collections.ConfigDict
  num_epochs: int
  step_config: steps.StepConfig
  trainable: str             # decoupled.TRAINABLE_MODES
  record: dict               # the settings a resumed checkpoint must match
  logit_fn: Callable | None = None  # model outputs -> class scores (BAGS group softmax)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if checkpoints are there) and evaluates it.

  Returns the joint model's test summary (top-1, BER, balanced accuracy, macro-F1,
  many/medium/few, ECE, NLL) with ``step`` and ``state``, plus ``stages``: the test summary of
  every stage in ``config.stages``, and ``variables``: the model variables of the joint and
  of every training stage. Writes metrics, config, counts, plots and checkpoints to
  ``workdir`` (stages to ``workdir/stages/<name>``).
  """
  mesh = make_mesh(config.num_devices)
  config_lib.validate(config, num_devices=mesh.size)
  is_main = jax.process_index() == 0
  quiet = config.quiet or os.environ.get("CI", "").lower() == "true"
  log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
  os.makedirs(workdir, exist_ok=True)

  stream = streaming.open_run(config, workdir) if config.dataset.get("source", "memory") != "memory" else None
  ds = load_dataset(config) if stream is None else streamed_dataset(stream)
  counts = np.asarray(ds.counts)
  spe = config_lib.steps_per_epoch(len(ds.train_labels), config.batch_size)
  log(f"lt_jax: {ds.name}-LT IR={priors.imbalance_ratio(counts):.0f} ({len(ds.train_labels)} train / "
      f"{len(ds.val_labels)} val / {len(ds.test_labels)} test, {ds.num_classes} classes), "
      f"model={config.model.name}/{config.model.head}{'/bbn' if config.model.bbn else ''}, "
      f"loss={config.loss.name}, sampler={config.sampler.name}, devices={mesh.size}, "
      f"{spe} steps/epoch x {config.num_epochs} epochs"
      + (f", then stages {config.stages}" if config.stages else ""))
  rep = replicated(mesh)
  data = steps.TrainData(images=put_global(ds.train_images, rep), labels=put_global(ds.train_labels, rep),
                         index=jax.device_put(samplers.build_index(ds.train_labels, ds.num_classes), rep))
  ctx = Context(config, ds, mesh, counts, spe, data, put_global(counts.astype(np.float32), rep),
                is_main, quiet, log, stream)
  if is_main:
    report.write_json(os.path.join(workdir, "train_counts.json"),
                      {"counts": counts.tolist(), "prior": np.asarray(priors.prior(counts)).tolist()})

  if config.init_from:
    model = build_model(config, ds.num_classes)
    variables = load_variables(config.init_from, config, model, ds, mesh)
    state = None
    summary, sums = evaluate_variables(ctx, model, variables)
    step = 0
    log(f"loaded the model of {config.init_from} (test BER {summary['balanced_error_rate']:.4f})")
    if is_main:
      final_report(workdir, config, ds, variables["params"], sums, summary, step, log,
                   title=f"model of {config.init_from}")
  else:
    spec = joint_spec(ctx, workdir)
    state, sums, summary, step = fit(ctx, spec, None)
    model = spec.model
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if is_main:
      final_report(workdir, config, ds, variables["params"], sums, summary, step, log)
  results = {"step": step, **summary, "state": state, "stages": {}, "variables": {"joint": variables}}
  outputs = None  # the current model's outputs, shared by the stages that only read them
  for name in config_lib.stage_names(config):
    stage_dir = os.path.join(workdir, "stages", name)
    if name in config_lib.TRAIN_STAGES:
      spec = stage_spec(ctx, name, stage_dir)
      init = stage_variables(ctx, name, spec.model, variables)
      st, sums, stage_summary, stage_step = fit(ctx, spec, init)
      model, variables = spec.model, {"params": st.params, "batch_stats": st.batch_stats}
      results["variables"][name] = variables
      outputs = None
    else:
      outputs = outputs or model_outputs(ctx, model, variables)
      stage_summary, sums, extra = EVAL_STAGES[name](ctx, variables, outputs)
      stage_step = 0
      if is_main:
        os.makedirs(stage_dir, exist_ok=True)
        report.write_json(os.path.join(stage_dir, "sweep.json"), extra)
    results["stages"][name] = stage_summary
    if is_main:
      final_report(stage_dir, config, ds, variables["params"] if name not in ("ncm", "bags") else {}, sums,
                   stage_summary, stage_step, log, title=f"stage {name}")
  if is_main and results["stages"]:
    report.write_json(os.path.join(workdir, "stages_summary.json"),
                      {"joint": summary, **results["stages"]})
    log(report.stages_table({"joint": summary, **results["stages"]}))
  return results


def joint_spec(ctx: Context, workdir: str) -> StageSpec:
  """The joint stage from the config's top-level fields."""
  c = ctx.config
  hp = c.loss.hparams.to_dict()
  if c.loss.drw_epoch >= 0:  # deferred re-weighting: epochs -> steps here only
    hp["drw_start"] = int(round(c.loss.drw_epoch * ctx.steps_per_epoch))
  sc = _step_config(ctx, c.sampler.name, c.num_epochs, bn_train=True)
  sc = sc._replace(defer_epochs=int(c.sampler.defer_epochs), mix=c.mix.name, mix_alpha=float(c.mix.alpha),
                   remix_kappa=float(c.mix.kappa), remix_tau=float(c.mix.tau), bbn=bool(c.model.bbn),
                   bbn_div_epoch=int(c.model.bbn_div_epoch))
  return StageSpec("joint", workdir, build_model(c, ctx.ds.num_classes), losses.make_loss(c.loss.name, **hp),
                   c.optim, c.num_epochs, sc, "all", c.to_dict())


def stage_spec(ctx: Context, name: str, workdir: str) -> StageSpec:
  """A decoupled classifier stage (cRT / LWS) on the frozen backbone."""
  c, s = ctx.config, ctx.config.stage[name]
  loss_name = config_lib.LOSS_ALIASES.get(s.loss, s.loss)
  head = "lws" if name == "lws" else c.model.head
  loss = losses.make_loss(loss_name, **config_lib.LOSS_DEFAULTS[loss_name])
  num_outputs, logit_fn = ctx.ds.num_classes, None
  if name == "bags":
    groups = jnp.asarray(decoupled.bags_groups(ctx.counts, tuple(s.bin_split)))
    num_outputs = decoupled.group_softmax_num_outputs(groups)
    loss = losses.Loss("group_softmax", lambda C: (),
                       lambda z, y, counts, st: (decoupled.group_softmax_loss(z, y, groups), st))
    logit_fn = functools.partial(decoupled.group_softmax_logits, groups=groups)
  # Later stages may be added, and resumable fields changed, without invalidating this one.
  joint = config_lib.trajectory_fields(c.to_dict(), drop=("stages", "stage", "init_from"))
  record = {"stage": name, "settings": s.to_dict(), "joint": joint, "init_from": c.init_from}
  return StageSpec(name, workdir, build_model(c, num_outputs, head=head), loss, s.optim,
                   int(s.num_epochs), _step_config(ctx, s.sampler, int(s.num_epochs), bn_train=False),
                   "lws_scales" if name == "lws" else "head", record, logit_fn)


def _step_config(ctx: Context, sampler: str, num_epochs: int, bn_train: bool) -> steps.StepConfig:
  c = ctx.config
  return steps.StepConfig(batch_size=c.batch_size, steps_per_epoch=ctx.steps_per_epoch, num_epochs=num_epochs,
                          sampler=sampler, k_per_class=c.sampler.k_per_class, crop_pad=c.augment.crop_pad,
                          flip=c.augment.flip, mean=tuple(ctx.ds.mean), std=tuple(ctx.ds.std),
                          num_classes=ctx.ds.num_classes, bn_train=bn_train)


def stage_variables(ctx: Context, name: str, model, variables: Variables) -> Variables:
  """The starting point of a training stage: cRT re-initialises the head, LWS adds scales,
  BAGS puts a fresh head of ``C + G`` outputs on the backbone."""
  params = dict(variables["params"])
  # A key per stage name: the same stage on the same model starts the same, whatever ran before.
  key = jax.random.fold_in(jax.random.key(ctx.config.seed), 1000 + config_lib.STAGES.index(name))
  shape = (1, *ctx.ds.train_images.shape[1:])
  if name == "crt":
    params = decoupled.reinit_head(params, key, model, shape, train=False)
  elif name == "bags":
    params["head"] = model.init(key, jnp.zeros(shape), train=False)["params"]["head"]
  else:
    params["head"] = heads.lws_from_linear(params["head"])
  return {"params": params, "batch_stats": variables["batch_stats"]}


def fit(ctx: Context, spec: StageSpec, variables: Variables | None):
  """Trains one stage (resuming from ``spec.workdir``), then evaluates it on the test set.

  Returns ``(state, test sums, test summary, step)``.
  """
  config, log, mesh = ctx.config, ctx.log, ctx.mesh
  spe = ctx.steps_per_epoch
  total_steps = spe * spec.num_epochs
  last_step = total_steps if config.max_steps < 0 else min(total_steps, config.max_steps)
  schedule = optim.make_schedule(spec.optim, spe, spec.num_epochs)
  tx = optim.make_optimizer(spec.optim, schedule)
  grad_mask = None
  if spec.trainable != "all":
    tx = decoupled.partitioned_optimizer(tx, variables["params"], spec.trainable)
    grad_mask = jax.tree.map(lambda l: l == "trainable",
                             decoupled.param_labels(variables["params"], spec.trainable))
  state = create_state(spec.model, tx, spec.loss, ctx.ds.num_classes, ctx.ds.train_images.shape[1:],
                       config.seed, mesh, variables)

  mngr = checkpoint.manager(spec.workdir, config.keep_checkpoints)
  restored, meta = checkpoint.restore_latest(mngr, state, spec.record)
  if restored is not None:
    state = restored
    log(f"{spec.name}: resumed from {mngr.directory} at step {int(state.step)} (epoch {meta['epoch']})")
  if ctx.is_main:  # after the resume check, so a refused resume leaves the workdir's record intact
    report.write_json(os.path.join(spec.workdir, "config.json"), spec.record)

  train_step = steps.make_train_step(spec.model, tx, spec.loss, schedule, ctx.counts_dev, spec.step_config,
                                     mesh, grad_mask=grad_mask, logit_fn=spec.logit_fn,
                                     host_batches=ctx.stream is not None)
  eval_step = steps.make_eval_step(spec.model, ctx.ds.num_classes, tuple(ctx.ds.mean), tuple(ctx.ds.std), mesh,
                                   logit_fn=spec.logit_fn)
  writer = report.MetricWriter(spec.workdir, enabled=ctx.is_main)
  sampler = spec.step_config.sampler

  def checkpoint_meta(step: int, last: dict) -> dict:
    return {"config": spec.record, "step": step, "epoch": step / spe,
            "sampler": {"name": sampler, "epoch": step // spe, "position": step % spe},
            "metrics": last}

  def test_sums(state):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if ctx.stream is not None:
      return evaluate_stream(eval_step, variables, ctx.stream, config.eval_batch_size, mesh)
    return evaluate(eval_step, variables, ctx.ds.test_images, ctx.ds.test_labels, config.eval_batch_size, mesh)

  step = int(state.step)
  batches = None
  if ctx.stream is not None:  # the pipeline's position is the step: resuming replays it exactly
    sc = spec.step_config
    batches = streaming.train_arrays(
        ctx.stream, batch_sharded(mesh), batch_size=sc.batch_size, sampler=sc.sampler,
        seed=config.seed if spec.name == "joint" else config.seed + 1000 * (1 + config_lib.STAGES.index(spec.name)),
        num_epochs=spec.num_epochs, steps_per_epoch=spe, k_per_class=sc.k_per_class,
        defer_epochs=sc.defer_epochs, start_step=step, end_step=last_step)
  bar = None
  if not ctx.quiet and ctx.is_main and step < last_step:
    from tqdm.auto import tqdm
    bar = tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout,
               desc=spec.name)
  ckpt_every = max(int(config.checkpoint_every_epochs * spe), 1)
  eval_every = max(int(config.eval_every_epochs * spe), 1)
  last_metrics: dict[str, float] = {}
  t0, seen = time.time(), 0
  while step < last_step:
    if batches is None:
      state, m = train_step(state, ctx.data)
    else:
      b = next(batches)
      state, m = train_step(state, b["image"], b["label"])
    m = jax.device_get(m)  # blocks on the step: NaN check and no runaway queue on CPU meshes
    step += 1
    seen += config.batch_size
    check_finite(m["loss"], step, mngr, f" of stage {spec.name}")
    last_metrics = {k: float(v) for k, v in m.items()}
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.3f}", img_s=f"{seen / (time.time() - t0):.0f}")
    if step % config.log_every_steps == 0:
      writer.write(step, "train", {**last_metrics, "images_per_sec": seen / (time.time() - t0)})
    if step % eval_every == 0 and step < last_step:
      summary = summarize(test_sums(state), ctx.counts)
      writer.write(step, "test", summary)
      if bar is not None:
        bar.write(f"{spec.name} step {step}: test top-1 {summary['accuracy']:.4f}, "
                  f"BER {summary['balanced_error_rate']:.4f}")
    if step % ckpt_every == 0 or step == last_step:
      checkpoint.save(mngr, step, state, checkpoint_meta(step, last_metrics))
  if bar is not None:
    bar.close()
  mngr.wait_until_finished()
  mngr.close()
  sums = test_sums(state)
  summary = summarize(sums, ctx.counts)
  writer.write(step, "test", summary)
  writer.close()
  return state, sums, summary, step


def streamed_dataset(run: streaming.StreamingRun) -> longtail.LTDataset:
  """An ``LTDataset`` view of a streamed dataset: labels and counts; images stay on disk.

  The image arrays hold one zero image (their shape is the model input's); the train step
  gets its batches from ``streaming.train_arrays`` and evaluation reads the test split with
  ``streaming.eval_arrays``.
  """
  blank = np.zeros((1, *run.image_shape), np.uint8)
  counts = run.counts.astype(np.int64)
  return longtail.LTDataset(
      name=run.name, num_classes=run.num_classes, image_shape=run.image_shape, class_names=run.class_names,
      train_images=blank, train_labels=run.train_labels, train_indices=np.arange(len(run.train_labels)),
      val_images=blank[:0], val_labels=np.zeros((0,), np.int32), val_indices=np.zeros((0,), np.int64),
      test_images=blank, test_labels=run.test_labels, counts=counts,
      prior=np.asarray(priors.prior(counts), np.float32), mean=run.mean, std=run.std,
      imbalance_ratio=float(priors.imbalance_ratio(counts)), profile="natural", seed=0,
      n_max=int(counts.max()), val_per_class=0)


def evaluate_stream(eval_step, variables, run: streaming.StreamingRun, batch_size: int, mesh) -> steps.EvalSums:
  """One pass over the streamed test split (each process decodes its rows), sums on device."""
  total = None
  for b in streaming.eval_arrays(run, batch_sharded(mesh), batch_size):
    total = jax.block_until_ready(steps.add_sums(total, eval_step(variables, b["image"], b["label"], b["mask"])))
  return total


def evaluate_variables(ctx: Context, model, variables: Variables) -> tuple[dict, steps.EvalSums]:
  eval_step = steps.make_eval_step(model, ctx.ds.num_classes, tuple(ctx.ds.mean), tuple(ctx.ds.std), ctx.mesh)
  if ctx.stream is not None:
    sums = evaluate_stream(eval_step, variables, ctx.stream, ctx.config.eval_batch_size, ctx.mesh)
  else:
    sums = evaluate(eval_step, variables, ctx.ds.test_images, ctx.ds.test_labels,
                    ctx.config.eval_batch_size, ctx.mesh)
  return summarize(sums, ctx.counts), sums


def load_variables(path: str, config: ml_collections.ConfigDict, model, ds, mesh) -> Variables:
  """``{'params', 'batch_stats'}`` of the latest checkpoint of the run in ``path``.

  ``path`` is a run's workdir (or a stage's, or a ``checkpoints`` directory). The run must
  have the same dataset and model settings (the class counts and the parameter tree); a
  mismatch raises ``ConfigError`` naming the differing keys.
  """
  ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  if not os.path.isdir(ckpt_dir):
    raise config_lib.ConfigError(f"init_from={path!r}: no such run directory")
  mngr = checkpoint.manager(os.path.dirname(os.path.abspath(ckpt_dir)), 1)
  step = mngr.latest_step()
  if step is None:
    raise config_lib.ConfigError(f"init_from={path!r}: no checkpoint in {ckpt_dir}")
  meta = checkpoint.restore_meta(mngr, step)
  saved = meta["config"].get("joint", meta["config"])  # a stage's record nests the joint config
  current = config.to_dict()
  diff = [d for key in ("dataset", "model") for d in config_lib.incompatible_fields(
      saved.get(key, {}), current[key], key + ".") if not d.startswith("dataset.data_dir")]
  if meta["config"].get("stage") == "lws":
    diff.append("model.head: the checkpoint is an LWS stage (head 'lws'); start from the run before it")
  if diff:
    raise config_lib.ConfigError(f"init_from={path!r} was trained with different settings:\n  "
                                 + "\n  ".join(diff))
  arrays = checkpoint.restore_arrays(mngr, step)
  abstract = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *ds.train_images.shape[1:])), train=False),
                            jax.random.key(0))
  rep = replicated(mesh)
  out = {}
  for col in ("params", "batch_stats"):
    want = abstract.get(col, {})
    got = arrays.get(col, {})
    if jax.tree.structure(want) != jax.tree.structure(got) or any(
        np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))):
      raise config_lib.ConfigError(f"init_from={path!r}: the checkpoint's {col} do not match the model")
    out[col] = jax.tree.map(lambda a: put_global(np.asarray(a), rep), got)
  mngr.close()
  return out


# ---------------------------------------------------------------------------------------
# Stages without training: tau-norm, post-hoc logit adjustment, NCM.


def model_outputs(ctx: Context, model, variables: Variables) -> Callable[[str], tuple[np.ndarray, np.ndarray]]:
  """``outputs(split) -> (logits, features)`` of ``'train'`` / ``'val'`` / ``'test'`` on the host.

  Eval mode, no augmentation; one compiled forward pass, and each split is computed at most
  once per model, however many stages (tau-norm, post-hoc, NCM) read it.
  """
  mean, std = tuple(ctx.ds.mean), tuple(ctx.ds.std)
  fn = jax.jit(lambda v, x: model.apply(v, augment.normalize(x, mean, std), train=False))
  sharding = batch_sharded(ctx.mesh)
  cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def outputs(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in cache:
      logits, feats = [], []
      for (x,), n in padded_batches((getattr(ctx.ds, f"{split}_images"),), ctx.config.eval_batch_size):
        z, f = jax.device_get(fn(variables, put_global(x, sharding)))
        logits.append(np.asarray(z, np.float32)[:n])
        feats.append(np.asarray(f, np.float32)[:n])
      cache[split] = np.concatenate(logits), np.concatenate(feats)
    return cache[split]

  return outputs


def _summary_of_logits(ctx: Context, logits: np.ndarray, labels: np.ndarray) -> tuple[dict, steps.EvalSums]:
  sums = steps.sums_from_logits(jnp.asarray(logits), jnp.asarray(labels), ctx.ds.num_classes)
  return summarize(sums, ctx.counts), sums


def _sweep_record(taus, val: dict, test: dict, index: int, select: str) -> dict:
  lists = lambda d: {k: np.asarray(v).tolist() for k, v in jax.device_get(d).items()}
  return {"tau": [float(t) for t in taus], "selected_tau": float(taus[index]), "selected_on": "validation",
          "select": select, "val": lists(val), "test": lists(test)}


def tau_norm_stage(ctx: Context, variables: Variables, outputs):
  """tau-normalisation (Kang et al., ICLR 2020): ``z = f . w_c / ||w_c||^tau``, tau on val."""
  s = ctx.config.stage.tau_norm
  head = variables["params"]["head"]
  bias = head.get("bias") if s.keep_bias else None
  _, f_val = outputs("val")
  _, f_test = outputs("test")
  taus = np.asarray(s.taus, np.float32)
  kw = dict(bias=bias, train_counts=ctx.counts)
  val = decoupled.tau_norm_sweep(f_val, head["kernel"], ctx.ds.val_labels, taus, **kw)
  test = decoupled.tau_norm_sweep(f_test, head["kernel"], ctx.ds.test_labels, taus, **kw)
  i = decoupled.select_on_validation(val, s.select)
  logits = heads.tau_norm_logits(jnp.asarray(f_test), head["kernel"], float(taus[i]))
  if bias is not None:
    logits = logits + bias
  summary, sums = _summary_of_logits(ctx, np.asarray(logits), ctx.ds.test_labels)
  ctx.log(f"tau_norm: tau={taus[i]:.2f} chosen on validation")
  return {**summary, "tau": float(taus[i])}, sums, _sweep_record(taus, val, test, i, s.select)


def posthoc_stage(ctx: Context, variables: Variables, outputs):
  """Post-hoc logit adjustment (Menon et al., ICLR 2021): ``argmax z - tau log pi``, tau on val."""
  s = ctx.config.stage.posthoc
  z_val, _ = outputs("val")
  z_test, _ = outputs("test")
  taus = np.asarray(s.taus, np.float32)
  prior = priors.prior(ctx.counts)
  val = decoupled.posthoc_sweep(z_val, ctx.ds.val_labels, prior, taus, train_counts=ctx.counts)
  test = decoupled.posthoc_sweep(z_test, ctx.ds.test_labels, prior, taus, train_counts=ctx.counts)
  i = decoupled.select_on_validation(val, s.select)
  logits = heads.posthoc_adjust(jnp.asarray(z_test), prior, float(taus[i]))
  summary, sums = _summary_of_logits(ctx, np.asarray(logits), ctx.ds.test_labels)
  ctx.log(f"posthoc: tau={taus[i]:.2f} chosen on validation")
  return {**summary, "tau": float(taus[i])}, sums, _sweep_record(taus, val, test, i, s.select)


def ncm_stage(ctx: Context, variables: Variables, outputs):
  """Nearest class mean on 'cl2n' features (Kang et al., ICLR 2020, ``KNNClassifier``)."""
  _, f_train = outputs("train")
  _, f_test = outputs("test")
  centroids, center = heads.ncm_centroids(jnp.asarray(f_train), ctx.ds.train_labels, ctx.ds.num_classes)
  logits = heads.ncm_logits(jnp.asarray(f_test), centroids, center)
  summary, sums = _summary_of_logits(ctx, np.asarray(logits), ctx.ds.test_labels)
  return summary, sums, {"feature": "cl2n", "distance": "squared l2",
                         "centroids": np.asarray(centroids).tolist(), "center": np.asarray(center).tolist()}


EVAL_STAGES = {"tau_norm": tau_norm_stage, "posthoc": posthoc_stage, "ncm": ncm_stage}


def final_report(workdir: str, config, ds, params, sums: steps.EvalSums, summary: dict[str, float],
                 step: int, log, title: str = "") -> None:
  """``summary.json``, the summary table on stdout and the PNG plots (process 0 only)."""
  os.makedirs(workdir, exist_ok=True)
  cm = np.asarray(jax.device_get(sums.confusion))
  per_class = np.asarray(metrics.per_class_recall(cm))
  report.write_json(os.path.join(workdir, "summary.json"),
                    {"step": step, **summary, "per_class_accuracy": per_class.tolist()})
  log(report.summary_table(summary, f"{ds.name}-LT test set, {title or f'step {step}'}"))
  if config.plots:
    kernel = params.get("head", {}).get("kernel")
    norms = None if kernel is None else np.asarray(heads.weight_norms(kernel))
    paths = report.save_plots(workdir, np.asarray(ds.counts), per_class, norms, cm, ds.class_names)
    log("plots: " + ", ".join(paths))

"""``train_and_evaluate(config, workdir)``: a classification run, resumable from its workdir.

A run is the joint stage (the config's top-level loss, sampler, optimiser and epochs)
followed by the stages named in ``config.stages`` (Kang et al., "Decoupling Representation
and Classifier for Long-Tailed Recognition", ICLR 2020). Every training stage is the one
loop (:func:`lt_jax.train.loop.train`) with

* a model initialised from the previous training stage (:func:`stage_variables`: cRT
  re-initialises the head, LWS adds per-class scales, BAGS puts on a fresh group-softmax
  head of ``C + G`` outputs), and
* a frozen-parameter partition through optax (``optax.multi_transform`` with
  ``optax.set_to_zero`` for frozen leaves, which then keep no optimiser state), the
  backbone called with ``train=False`` so its BatchNorm statistics stay frozen.

``tau_norm``, ``posthoc`` and ``ncm`` train nothing: they are evaluators
(:mod:`lt_jax.train.evaluators`) run on the current model. Each stage writes to
``workdir/stages/<name>/`` and resumes from its own checkpoints; the joint stage keeps
``workdir/`` itself. ``config.init_from`` replaces the joint stage by a finished run.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lt_jax import decoupled, heads, losses, metrics, priors, samplers
from lt_jax import weight_balancing
from lt_jax.data import longtail
from lt_jax.models import EXPERT_MODELS, get_model
from lt_jax.train import checkpoint, config as config_lib, durations, evaluators, feature_stages, loop, optim, report
from lt_jax.train import steps
from lt_jax.train import workdir as workdir_lib
from lt_jax.train.loop import NonFiniteLossError  # noqa: F401  (re-exported: the run's error)
from lt_jax.train.state import batch_sharded, create_state, make_mesh, put_global, replicated

Variables = dict[str, Any]


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
  if m.name in EXPERT_MODELS:  # RIDE / SADE (config.use_experts adds these fields)
    kw.update(num_experts=int(m.get("num_experts", 3)), reduce_dimension=bool(m.get("reduce_dimension", True)))
  model = get_model(m.name, num_classes=num_classes, head=head,
                    dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32, **kw)
  k = config.get("contrastive")
  if k is not None and k.method != "none":  # projection head(s) next to the backbone's parameters
    from lt_jax.models.contrastive import ContrastiveNet
    model = ContrastiveNet(model, proj_dim=k.proj_dim, proj_hidden=k.proj_hidden, proj_bn=k.proj_bn,
                           centres=k.method == "bcl")
  return model


class Data(NamedTuple):
  """A classification dataset as the loop sees it: in memory (on device) or streamed."""
  name: str
  num_classes: int
  image_shape: tuple
  class_names: tuple
  counts: np.ndarray          # (C,) training counts
  mean: tuple
  std: tuple
  num_train: int
  num_val: int
  num_test: int
  splits: Any                 # evaluators.MemorySplits | StreamSplits
  device: steps.TrainData | None = None   # the training set on device (in-memory input)
  stream: Any = None                      # streaming.StreamingRun (host input)


def open_data(config: ml_collections.ConfigDict, workdir: str, mesh) -> Data:
  """The config's dataset: in memory (placed on device once) or a host stream."""
  if config.dataset.get("source", "memory") != "memory":
    from lt_jax.data import streaming
    run = streaming.open_run(config, workdir)
    return Data(run.name, run.num_classes, tuple(run.image_shape), run.class_names, run.counts.astype(np.int64),
                tuple(run.mean), tuple(run.std), len(run.train_labels), 0, len(run.test_labels),
                evaluators.StreamSplits(run), stream=run)
  ds = load_dataset(config)
  rep = replicated(mesh)
  device = steps.TrainData(images=put_global(ds.train_images, rep), labels=put_global(ds.train_labels, rep),
                           index=jax.device_put(samplers.build_index(ds.train_labels, ds.num_classes), rep))
  return Data(ds.name, ds.num_classes, tuple(ds.train_images.shape[1:]), ds.class_names, np.asarray(ds.counts),
              tuple(ds.mean), tuple(ds.std), len(ds.train_labels), len(ds.val_labels), len(ds.test_labels),
              evaluators.MemorySplits(ds), device=device)


class Context(NamedTuple):
  """What every stage of one run shares."""
  config: ml_collections.ConfigDict
  data: Data
  mesh: Any
  steps_per_epoch: int
  counts_dev: jax.Array
  env: loop.Env


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
  # variables -> a transformation chained after the optimiser, inside the trainable partition (wb's MaxNorm)
  extra_tx: Callable | None = None
  # The stage's update function and input, ``build(ctx, spec, state, tx, schedule, grad_mask, variables)
  # -> (state, update, input)`` (see :func:`classification_update`); None: the classification step.
  build: Callable | None = None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if checkpoints are there) and evaluates it.

  Returns the joint model's test summary (top-1, BER, balanced accuracy, macro-F1,
  many/medium/few, ECE, NLL) with ``step`` and ``state``, plus ``stages``: the test summary of
  every stage in ``config.stages``, and ``variables``: the model variables of the joint and
  of every training stage. Writes metrics, config, counts, plots and checkpoints to
  ``workdir`` (stages to ``workdir/stages/<name>``).
  """
  from lt_jax.train import population  # many members as one program (config.population)
  if population.enabled(config):
    return population.train_and_evaluate(config, workdir)
  mesh = make_mesh(config.num_devices)
  config_lib.validate(config, num_devices=mesh.size)
  env = make_env(config, mesh)
  with workdir_lib.locked(workdir, enabled=env.is_main):
    return _train_and_evaluate(config, workdir, mesh, env)


def _train_and_evaluate(config, workdir: str, mesh, env: loop.Env) -> dict[str, Any]:
  data = open_data(config, workdir, mesh)
  spe = config_lib.steps_per_epoch(data.num_train, config.batch_size)
  env.log(f"lt_jax: {data.name}-LT IR={priors.imbalance_ratio(data.counts):.0f} ({data.num_train} train / "
          f"{data.num_val} val / {data.num_test} test, {data.num_classes} classes), "
          f"model={config.model.name}/{config.model.head}{'/bbn' if config.model.bbn else ''}, "
          f"loss={config.loss.name}, sampler={config.sampler.name}, devices={mesh.size}, "
          f"{spe} steps/epoch x {config.num_epochs} epochs"
          + (f", then stages {config.stages}" if config.stages else ""))
  ctx = Context(config, data, mesh, spe, put_global(data.counts.astype(np.float32), replicated(mesh)), env)
  if env.is_main:
    report.write_json(os.path.join(workdir, "train_counts.json"),
                      {"counts": data.counts.tolist(), "prior": np.asarray(priors.prior(data.counts)).tolist()})

  if config.init_from:
    model = build_model(config, data.num_classes)
    variables = load_variables(config.init_from, config, model, data.image_shape, mesh)
    state, step = None, 0
    summary, sums = final_eval(ctx, configured_evals(ctx, model), variables)
    env.log(f"loaded the model of {config.init_from} (test BER {summary['balanced_error_rate']:.4f})")
    title = f"model of {config.init_from}"
  else:
    spec = joint_spec(ctx, workdir)
    state, step, evs = fit(ctx, spec, None)
    model = spec.model
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    summary, sums = final_eval(ctx, evs, variables, workdir, step)
    title = ""
  if env.is_main:
    final_report(workdir, config, data, variables["params"], sums, summary, step, env.log, title=title)
  results = {"step": step, **summary, "state": state, "stages": {}, "variables": {"joint": variables}}
  outputs = evaluators.OutputCache()  # shared by the evaluator stages of the same model
  for name in config_lib.stage_names(config):
    stage_dir = os.path.join(workdir, "stages", name)
    if name in config_lib.TRAIN_STAGES:
      spec = stage_spec(ctx, name, stage_dir)
      init = stage_variables(ctx, name, spec.model, variables)
      st, stage_step, evs = fit(ctx, spec, init)
      model, variables = spec.model, {"params": st.params, "batch_stats": st.batch_stats}
      results["variables"][name] = variables
      stage_summary, sums = final_eval(ctx, evs, variables, stage_dir, stage_step)
    else:
      ev = evaluators.make(name, eval_context(ctx, model, outputs), **config.stage[name].to_dict())
      res = ev.evaluate(variables)
      stage_summary, sums, stage_step = res.summary, res.sums, 0
      if env.is_main:
        os.makedirs(stage_dir, exist_ok=True)
        report.write_json(os.path.join(stage_dir, "sweep.json"), res.extra)
    results["stages"][name] = stage_summary
    if env.is_main:
      final_report(stage_dir, config, data, variables["params"] if name not in ("ncm", "bags") else {}, sums,
                   stage_summary, stage_step, env.log, title=f"stage {name}")
  if env.is_main and results["stages"]:
    report.write_json(os.path.join(workdir, "stages_summary.json"), {"joint": summary, **results["stages"]})
    env.log(report.stages_table({"joint": summary, **results["stages"]}))
  return results


def make_env(config: ml_collections.ConfigDict, mesh) -> loop.Env:
  is_main = jax.process_index() == 0
  return loop.Env(is_main=is_main, quiet=config.quiet or os.environ.get("CI", "").lower() == "true",
                  log=(lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None),
                  block_each_step=loop.blocks_every_step(config.host_sync, mesh),
                  transfer_guard=bool(config.transfer_guard))


def eval_context(ctx: Context, model, outputs=None, logit_fn=None) -> evaluators.EvalContext:
  d = ctx.data
  return evaluators.EvalContext(model=model, splits=d.splits, mesh=ctx.mesh, counts=d.counts,
                                num_classes=d.num_classes, mean=d.mean, std=d.std,
                                batch_size=ctx.config.eval_batch_size, block=ctx.env.block_each_step,
                                log=ctx.env.log, outputs=outputs or evaluators.OutputCache(), logit_fn=logit_fn)


def configured_evals(ctx: Context, model, logit_fn=None) -> list[tuple[str, evaluators.Evaluator, dict]]:
  """``config.evals``: ``(name, evaluator, settings)`` for every entry (``type`` + its settings)."""
  out = []
  ectx = eval_context(ctx, model, logit_fn=logit_fn)
  for name, entry in ctx.config.evals.items():
    entry = entry.to_dict()
    kind = entry.pop("type")
    cadence = {k: entry.pop(k) for k in ("every_epochs", "every_steps") if k in entry}
    out.append((name, evaluators.make(kind, ectx, **entry), cadence))
  return out


def final_eval(ctx: Context, evs, variables, workdir: str | None = None, step: int = 0):
  """``(summary, sums)`` of the primary evaluator (the first of ``config.evals``) at the end of a stage;
  every evaluator's summary goes to ``workdir/metrics.jsonl`` (split = its name), and that of an
  evaluator with ``in_summary`` (the test-agnostic table) also into the summary, under its name."""
  first, tables = None, {}
  writer = report.MetricWriter(workdir, enabled=ctx.env.is_main) if workdir else None
  for name, ev, _ in evs:
    res = ev.evaluate(variables)
    if first is not None and getattr(ev, "in_summary", False):
      tables[name] = res.summary
    first = first or res
    if writer is not None:
      writer.write(step, name, res.summary)
  if writer is not None:
    writer.close()
  return {**first.summary, **tables}, first.sums


def make_loss(c: ml_collections.ConfigDict, steps_per_epoch: int, **hparams) -> losses.Loss:
  """The joint stage's loss; deferred re-weighting's epoch becomes a step here.

  ``hparams`` replace the config's (a population member's traced values, :mod:`population`).
  """
  hp = {**c.loss.hparams.to_dict(), **hparams}
  if c.loss.drw_epoch >= 0:
    hp["drw_start"] = durations.epochs_to_steps(c.loss.drw_epoch, steps_per_epoch)
  return losses.make_loss(c.loss.name, **hp)


def joint_spec(ctx: Context, workdir: str) -> StageSpec:
  """The joint stage from the config's top-level fields."""
  c = ctx.config
  sc = _step_config(ctx, c.sampler.name, c.num_epochs, bn_train=True)
  sc = sc._replace(defer_epochs=int(c.sampler.defer_epochs), mix=c.mix.name, mix_alpha=float(c.mix.alpha),
                   remix_kappa=float(c.mix.kappa), remix_tau=float(c.mix.tau), bbn=bool(c.model.bbn),
                   bbn_div_epoch=int(c.model.bbn_div_epoch), experts=c.loss.name in losses.EXPERT_LOSSES)
  build = None
  if c.get("contrastive") is not None and c.contrastive.method != "none":
    from lt_jax.train import contrastive
    build = functools.partial(contrastive_update, contrastive.settings(c))
  elif c.meta_weight.enabled:
    build = meta_weight_update
  return StageSpec("joint", workdir, build_model(c, ctx.data.num_classes), make_loss(c, ctx.steps_per_epoch),
                   c.optim, c.num_epochs, sc, "all", c.to_dict(), build=build)


def stage_spec(ctx: Context, name: str, workdir: str) -> StageSpec:
  """A decoupled classifier stage (cRT / LWS / BAGS / weight balancing's stage 2 / the cached-feature
  stages SMOTE-cRT and Meta Sampler) on the frozen backbone, or full fine-tuning."""
  c, s = ctx.config, ctx.config.stage[name]
  loss_name = config_lib.LOSS_ALIASES.get(s.loss, s.loss)
  head = "lws" if name == "lws" else c.model.head
  loss = losses.make_loss(loss_name, **losses.default_hparams(loss_name))
  num_outputs, logit_fn, extra_tx, build = ctx.data.num_classes, None, None, None
  if name == "wb":  # MaxNorm with the radius of the stage-1 classifier (Alshammari et al., CVPR 2022)
    thresh = float(s.max_norm_thresh)
    extra_tx = lambda v: weight_balancing.max_norm(
        weight_balancing.max_norm_radius(v["params"]["head"]["kernel"], thresh))
  if name in config_lib.FEATURE_STAGES:
    loss, build = feature_stages.stage_loss(name, s, ctx.data.counts), feature_stages.build
  if name == "bags":
    groups = jnp.asarray(decoupled.bags_groups(ctx.data.counts, tuple(s.bin_split)))
    num_outputs = decoupled.group_softmax_num_outputs(groups)
    loss = losses.Loss("group_softmax", lambda C: (),
                       lambda z, y, counts, st: (decoupled.group_softmax_loss(z, y, groups), st))
    logit_fn = functools.partial(decoupled.group_softmax_logits, groups=groups)
  # Later stages may be added, and resumable fields changed, without invalidating this one.
  joint = config_lib.trajectory_fields(c.to_dict(), drop=("stages", "stage", "init_from"))
  record = {"stage": name, "settings": s.to_dict(), "joint": joint, "init_from": c.init_from}
  finetune = name == "finetune"  # every parameter trains, BatchNorm in training mode
  trainable = "all" if finetune else "lws_scales" if name == "lws" else "head"
  return StageSpec(name, workdir, build_model(c, num_outputs, head=head), loss, s.optim,
                   int(s.num_epochs), _step_config(ctx, s.sampler, int(s.num_epochs), bn_train=finetune),
                   trainable, record, logit_fn, extra_tx=extra_tx, build=build)


def _step_config(ctx: Context, sampler: str, num_epochs: int, bn_train: bool) -> steps.StepConfig:
  c, d = ctx.config, ctx.data
  return steps.StepConfig(batch_size=c.batch_size, steps_per_epoch=ctx.steps_per_epoch, num_epochs=num_epochs,
                          sampler=sampler, k_per_class=c.sampler.k_per_class, crop_pad=c.augment.crop_pad,
                          flip=c.augment.flip, mean=d.mean, std=d.std, num_classes=d.num_classes, bn_train=bn_train,
                          resample_target=int(c.sampler.target_count), resample_redraw=bool(c.sampler.redraw))


def stage_variables(ctx: Context, name: str, model, variables: Variables) -> Variables:
  """The starting point of a training stage: cRT (and the cached-feature stages) re-initialise the
  head, LWS adds scales, BAGS puts a fresh head of ``C + G`` outputs on the backbone, weight
  balancing's stage 2 fine-tunes the stage-1 classifier itself, fine-tuning starts from the model as is."""
  params = dict(variables["params"])
  # A key per stage name: the same stage on the same model starts the same, whatever ran before.
  key = jax.random.fold_in(jax.random.key(ctx.config.seed), 1000 + config_lib.STAGES.index(name))
  shape = (1, *ctx.data.image_shape)
  if name == "crt" or name in config_lib.FEATURE_STAGES:
    params = decoupled.reinit_head(params, key, model, shape, train=False)
  elif name == "bags":
    params["head"] = model.init(key, jnp.zeros(shape), train=False)["params"]["head"]
  elif name == "lws":
    params["head"] = heads.lws_from_linear(params["head"])
  return {"params": params, "batch_stats": variables["batch_stats"]}


def train_input(ctx: Context, spec: StageSpec):
  """The stage's input: the on-device dataset, or the host stream seeded per stage."""
  if ctx.data.stream is None:
    return loop.DeviceInput(ctx.data.device)
  from lt_jax.data import streaming
  c, sc = ctx.config, spec.step_config
  seed = c.seed if spec.name == "joint" else c.seed + 1000 * (1 + config_lib.STAGES.index(spec.name))
  return loop.StreamInput(lambda start, end: streaming.train_arrays(
      ctx.data.stream, batch_sharded(ctx.mesh), batch_size=sc.batch_size, sampler=sc.sampler, seed=seed,
      num_epochs=spec.num_epochs, steps_per_epoch=ctx.steps_per_epoch, k_per_class=sc.k_per_class,
      defer_epochs=sc.defer_epochs, start_step=start, end_step=end, resample_target=sc.resample_target,
      resample_redraw=sc.resample_redraw))


def fit(ctx: Context, spec: StageSpec, variables: Variables | None):
  """Trains one stage with the loop (resuming from ``spec.workdir``).

  Returns ``(state, step, evaluators)``: the configured evaluators, compiled once for the
  periodic and the final evaluation.
  """
  config, mesh, spe = ctx.config, ctx.mesh, ctx.steps_per_epoch
  total_steps = durations.epochs_to_steps(spec.num_epochs, spe)
  last_step = total_steps if config.max_steps < 0 else min(total_steps, config.max_steps)
  schedule = optim.make_schedule(spec.optim, spe, spec.num_epochs)
  tx = optim.make_optimizer(spec.optim, schedule)
  if spec.extra_tx is not None:
    tx = optax.chain(tx, spec.extra_tx(variables))
  grad_mask = None
  if spec.trainable != "all":
    labels = decoupled.param_labels(variables["params"], spec.trainable)
    tx = optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)  # frozen: no state
    grad_mask = jax.tree.map(lambda l: l == "trainable", labels)
  state = create_state(spec.model, tx, spec.loss, ctx.data.num_classes, ctx.data.image_shape, config.seed, mesh,
                       variables)
  state, update, stage_input = (spec.build or classification_update)(ctx, spec, state, tx, schedule, grad_mask,
                                                                      variables)
  sampler = spec.step_config.sampler
  periodic = []
  evs = configured_evals(ctx, spec.model, spec.logit_fn)
  for name, ev, cadence in evs:
    every = durations.steps("every", cadence, spe, config.batch_size, cadence=True) if cadence else \
        durations.steps("eval_every", config, spe, config.batch_size, cadence=True)
    run_ev = lambda st, ev=ev: ev.evaluate({"params": st.params, "batch_stats": st.batch_stats}).summary
    periodic.append(loop.Periodic(every, name, run_ev, lambda step, s: (
        f"{spec.name} step {step}: test top-1 {s['accuracy']:.4f}, BER {s['balanced_error_rate']:.4f}")
        if "accuracy" in s else None))
  run = loop.Run(
      name=f"stage {spec.name}", workdir=spec.workdir, record=spec.record, state=state, update=update,
      input=stage_input, last_step=last_step, batch_size=config.batch_size,
      log_every=int(config.log_every_steps),
      checkpoint_every=durations.steps("checkpoint_every", config, spe, config.batch_size, cadence=True),
      keep_checkpoints=config.keep_checkpoints, evals=periodic,
      meta=lambda step, last: {"epoch": step / spe, "sampler": {"name": sampler, "epoch": step // spe,
                                                                 "position": step % spe}},
      postfix=("loss", "accuracy"))
  writer = report.MetricWriter(spec.workdir, enabled=ctx.env.is_main)
  try:
    state, step = loop.train(run, ctx.env, writer)
  finally:
    writer.close()
  return state, step, evs


def classification_update(ctx: Context, spec: StageSpec, state, tx, schedule, grad_mask, variables):
  """``(state, update, input)`` of the classification step (:func:`lt_jax.train.steps.make_train_step`:
  every registry loss, mixing, BBN, DRW/DRS, multi-expert logits, frozen partitions), the default.

  Every update builder has this signature (``StageSpec.build``): a method with its own update
  function, state fields or inputs (contrastive methods, Meta-Weight-Net, the cached-feature
  stages) is one such function, and :func:`fit` runs whichever the stage names in the one loop.
  """
  del variables
  update = steps.make_train_step(spec.model, tx, spec.loss, schedule, ctx.counts_dev, spec.step_config, ctx.mesh,
                                 grad_mask=grad_mask, logit_fn=spec.logit_fn,
                                 host_batches=ctx.data.stream is not None)
  return state, update, train_input(ctx, spec)


def contrastive_update(cs, ctx: Context, spec: StageSpec, state, tx, schedule, grad_mask, variables):
  """``(state, update, input)`` of a contrastive method ``cs`` (:mod:`lt_jax.train.contrastive`): its
  own state (PaCo's key encoder and queue) and multi-view update over the on-device dataset."""
  del grad_mask, variables
  from lt_jax.train import contrastive
  state = contrastive.init_method_state(state, cs, ctx.data.num_classes, ctx.config.seed, ctx.mesh)
  update = contrastive.make_contrastive_step(spec.model, tx, spec.loss, schedule, ctx.counts_dev,
                                             spec.step_config, cs, ctx.mesh)
  return state, update, train_input(ctx, spec)


def meta_weight_update(ctx: Context, spec: StageSpec, state, tx, schedule, grad_mask, variables):
  """``(MetaWeightState, update, input)`` of a Meta-Weight-Net stage (Shu et al., NeurIPS 2019).

  The meta set is the validation split (``dataset.val_per_class`` per class, carved from the
  training pool before the long-tailed subset, as the reference's ``build_dataset`` carves
  ``num_meta`` per class): balanced, never trained on directly, and the same training counts as
  every other run with that split. The VNet is initialised from its own key
  (``fold_in(key(seed), 2000)``) and optimised by ``config.meta_weight.optim``; both are part of
  the checkpointed state, so a resumed run is exact.
  """
  from lt_jax import meta_weight  # the algorithm (pure); steps.make_meta_weight_step wires it in
  mc, mesh = ctx.config.meta_weight, ctx.mesh
  images, labels = ctx.data.splits.arrays("val")
  rep = replicated(mesh)
  meta = steps.MetaData(put_global(images, rep), put_global(np.asarray(labels, np.int32), rep))
  size = min(mc.meta_batch_size or ctx.config.batch_size, len(labels)) // mesh.size * mesh.size
  if size < 1:
    raise config_lib.ConfigError(f"the meta set ({len(labels)} examples) is smaller than the {mesh.size} devices")
  vnet_tx = optim.make_optimizer(mc.optim, optim.make_schedule(mc.optim, ctx.steps_per_epoch, spec.num_epochs))

  def init(st):
    vnet = meta_weight.init_vnet(jax.random.fold_in(jax.random.key(ctx.config.seed), 2000), mc.hidden)
    return steps.MetaWeightState(step=st.step, params=st.params, batch_stats=st.batch_stats, opt_state=st.opt_state,
                                 loss_state=st.loss_state, rng=st.rng, vnet_params=vnet,
                                 vnet_opt_state=vnet_tx.init(vnet))
  state = jax.jit(init, out_shardings=rep)(state)
  step = steps.make_meta_weight_step(spec.model, tx, vnet_tx, spec.loss, schedule, ctx.counts_dev, spec.step_config,
                                     mesh, size)
  del grad_mask, variables
  return state, lambda st, data: step(st, data, meta), train_input(ctx, spec)


def load_variables(path: str, config: ml_collections.ConfigDict, model, image_shape: tuple, mesh) -> Variables:
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
  def unreadable(e):  # another run's files are not moved aside: say which step to check
    return checkpoint.ResumeError(
        f"init_from={path!r}: its newest checkpoint (step {step} in {ckpt_dir}) cannot be read "
        f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); rerun or resume that run first")
  try:
    meta = checkpoint.restore_meta(mngr, step)
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds for damaged files)
    raise unreadable(e) from None
  saved = meta["config"].get("joint", meta["config"])  # a stage's record nests the joint config
  current = config.to_dict()
  diff = [d for key in ("dataset", "model") for d in config_lib.incompatible_fields(
      saved.get(key, {}), current[key], key + ".") if not d.startswith("dataset.data_dir")]
  if meta["config"].get("stage") == "lws":
    diff.append("model.head: the checkpoint is an LWS stage (head 'lws'); start from the run before it")
  if diff:
    raise config_lib.ConfigError(f"init_from={path!r} was trained with different settings:\n  " + "\n  ".join(diff))
  try:
    arrays = checkpoint.restore_arrays(mngr, step)
  except Exception as e:  # pylint: disable=broad-except
    raise unreadable(e) from None
  abstract = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *image_shape)), train=False), jax.random.key(0))
  rep = replicated(mesh)
  out = {}
  for col in ("params", "batch_stats"):
    want, got = abstract.get(col, {}), arrays.get(col, {})
    if jax.tree.structure(want) != jax.tree.structure(got) or any(
        np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))):
      raise config_lib.ConfigError(f"init_from={path!r}: the checkpoint's {col} do not match the model")
    out[col] = jax.tree.map(lambda a: put_global(np.asarray(a), rep), got)
  mngr.close()
  return out


def final_report(workdir: str, config, data: Data, params, sums, summary: dict[str, float],
                 step: int, log, title: str = "") -> None:
  """``summary.json``, the summary table on stdout and the PNG plots (process 0 only)."""
  os.makedirs(workdir, exist_ok=True)
  cm = np.asarray(jax.device_get(sums.confusion))
  per_class = np.asarray(metrics.per_class_recall(cm))
  report.write_json(os.path.join(workdir, "summary.json"),
                    {"step": step, **summary, "per_class_accuracy": per_class.tolist()})
  log(report.summary_table(summary, f"{data.name}-LT test set, {title or f'step {step}'}"))
  if config.plots:
    kernel = params.get("head", {}).get("kernel")
    norms = None if kernel is None else np.asarray(heads.weight_norms(kernel))
    paths = report.save_plots(workdir, np.asarray(data.counts), per_class, norms, cm, data.class_names)
    log("plots: " + ", ".join(paths))

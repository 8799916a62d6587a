"""Deep imbalanced regression runs: ``train_and_evaluate_regression(config, workdir)``, resumable.

Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021 (LDS, FDS, Focal-R) and Ren et
al., "Balanced MSE for Imbalanced Visual Regression", CVPR 2022, as a task of the one training
loop (:mod:`lt_jax.train.loop`): an update function (:func:`make_train_step`, drawing its batch
with the on-device epoch permutation :func:`lt_jax.train.steps.batch_indices`), the FDS
statistics pass as an end-of-epoch hook, and ``regression`` evaluators
(:mod:`lt_jax.train.evaluators.regression`). The pure pieces are :mod:`lt_jax.regression`.

Model: any ``lt_jax.models`` backbone built with ``num_classes=1``; the regressor is its linear
head applied to the (FDS-calibrated, in training) features,
``yhat = c + s * (f @ params['head']['kernel'] + params['head']['bias'])``, where ``c, s`` are the
centre and half-width of the target bins (``model.normalize_targets``; ``c = 0, s = 1`` when
off) so that a freshly initialised head already predicts on the target's scale. Losses are
computed in target units.

One epoch: ``N // batch_size`` steps over a fresh permutation; then, with FDS and
``epoch >= fds.start_update``, one gradient-free pass over the whole training set (train-mode
BatchNorm, as the reference's no-grad pass under ``model.train()``, no augmentation, a fixed
example order) sums :func:`~lt_jax.regression.fds_batch_stats` on device (batch-sharded inputs:
XLA all-reduces the sums) and calls :func:`~lt_jax.regression.fds_update` once; then evaluation
and the checkpoint. The FDS statistics are the ``fds`` field of :class:`RegressionState`, so
they are checkpointed and restored with the parameters. FDS recalibration is applied in the
train step from epoch ``fds.start_smooth`` on, never in evaluation.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lt_jax import regression
from lt_jax.data import augment
from lt_jax.models import cpu_compiler_options, get_model
from lt_jax.train import config as config_lib, durations, evaluators, loop, optim, report, steps
from lt_jax.train import workdir as workdir_lib
from lt_jax.train.config import validate_regression as validate
from lt_jax.train.state import TrainState, batch_sharded, make_mesh, put_global, replicated

SUMMARY_KEYS = tuple(f"{g}{k}" for g in ("", "many_", "medium_", "few_") for k in regression.REGRESSION_KEYS)


# ============================================================================ data, state, steps


def load_dataset(config: ml_collections.ConfigDict):
  """The config's :class:`lt_jax.data.dir_data.RegressionDataset`."""
  from lt_jax.data import dir_data
  d = config.dataset
  if d.name == "rotated_fashion_mnist":
    return dir_data.rotated_fashion_mnist(
        d.data_dir or None, max_angle=d.max_angle, n_max=d.n_max, imbalance_ratio=d.imbalance_ratio,
        val_per_bin=d.val_per_bin, test_per_bin=d.test_per_bin, seed=d.subset_seed)
  size = tuple(d.image_size) if min(d.image_size) > 0 else None
  return dir_data.load_regression_csv(
      d.csv, d.image_root or None, arrays=d.arrays or None, target_col=d.target_col or None,
      image_size=size, channels=d.channels or None)


@flax.struct.dataclass
class RegressionState(TrainState):
  """:class:`~lt_jax.train.state.TrainState` plus ``fds``, the explicit :class:`~lt_jax.regression.FDSState`.

  ``params`` is the model's parameter dict, plus ``'noise_sigma'`` (scalar) for Balanced MSE
  with a learnable noise scale. ``loss_state`` is unused (``()``).
  """
  fds: regression.FDSState


class DIRData(NamedTuple):
  """The training set on device (replicated): images uint8, targets float32, their bins int32."""
  images: jax.Array
  targets: jax.Array
  bin_ids: jax.Array


class Spec(NamedTuple):
  """Static settings shared by the steps."""
  edges: tuple[float, ...]
  center: float
  scale: float
  mean: tuple[float, ...]
  std: tuple[float, ...]
  fds: bool
  start_smooth: int
  fds_clip: tuple[float, float]
  weighted: bool


def make_spec(config: ml_collections.ConfigDict, ds) -> Spec:
  edges = np.asarray(regression.make_bins(config.bins.start, config.bins.stop, config.bins.width))
  lo, hi = float(config.bins.start), float(config.bins.stop)
  center, scale = ((lo + hi) / 2, (hi - lo) / 2) if config.model.normalize_targets else (0.0, 1.0)
  return Spec(tuple(float(e) for e in edges), center, scale, tuple(ds.mean), tuple(ds.std), bool(config.fds.enabled),
              int(config.fds.start_smooth), tuple(float(v) for v in config.fds.clip), config.lds.reweight != "none")


def model_params(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != "noise_sigma"}


def features(model, params, batch_stats, x, train: bool):
  """``(features (B, D) float32, batch_stats)`` of the backbone; ``train=True`` uses batch statistics
  and returns the updated BatchNorm averages (the FDS pass discards them)."""
  variables = {"params": model_params(params), "batch_stats": batch_stats}
  if train:
    (_, f), new_vars = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return f, new_vars.get("batch_stats", batch_stats)
  _, f = model.apply(variables, x, train=False)
  return f, batch_stats


def predict(params, feats, spec: Spec) -> jax.Array:
  """``yhat = c + s * (f @ W + b)``, ``(B,)`` float32 (the model's linear head on given features)."""
  h = params["head"]
  out = feats.astype(jnp.float32) @ h["kernel"][:, 0].astype(jnp.float32)
  if "bias" in h:
    out = out + h["bias"][0]
  return spec.center + spec.scale * out


def label_prior(config: ml_collections.ConfigDict, train_targets, counts, edges):
  """What Balanced MSE's GAI / BNI integrate over, from the training targets, once (host-side).

  GAI: :func:`~lt_jax.regression.fit_gmm` (``loss.gmm_components`` components, seed 0 as the
  reference's ``random_state=0``); BNI: :func:`~lt_jax.regression.bni_buckets` of the per-bin
  training counts (smoothed with the LDS window when ``loss.bni_smooth``); ``None`` otherwise.
  """
  lc = config.loss
  if lc.name == "balanced_mse_gai":
    return regression.fit_gmm(train_targets, lc.gmm_components, seed=0)
  if lc.name == "balanced_mse_bni":
    l = config.lds
    kernel = np.asarray(regression.lds_kernel(l.kernel, l.ks, l.sigma)) if lc.bni_smooth else None
    return regression.bni_buckets(counts, edges, kernel)
  return None


def make_loss(lc: ml_collections.ConfigDict, prior=None) -> Callable[[jax.Array, jax.Array, dict], jax.Array]:
  """``per_example(pred, target, params) -> (B,)`` for ``lc.name`` in :data:`DIR_LOSSES`.

  ``prior``: :func:`label_prior` of the run (needed by ``balanced_mse_gai`` / ``balanced_mse_bni``).
  """
  if lc.name == "mse":
    return lambda p, t, params: regression.mse(p, t)
  if lc.name == "l1":
    return lambda p, t, params: regression.l1(p, t)
  if lc.name == "huber":
    return lambda p, t, params: regression.huber(p, t, lc.huber_beta)
  if lc.name == "focal_r":
    return lambda p, t, params: regression.focal_r(p, t, lc.focal_kind, lc.focal_beta, lc.focal_gamma,
                                                   lc.focal_activation)
  fixed = float(lc.noise_sigma)
  var = lambda params: params.get("noise_sigma", fixed) ** 2  # noqa: E731
  if lc.name in ("balanced_mse_gai", "balanced_mse_bni") and prior is None:
    raise ValueError(f"loss {lc.name!r} integrates over the training label density: pass "
                     "prior=label_prior(config, train_targets, counts, edges)")
  if lc.name == "balanced_mse_gai":
    return lambda p, t, params: regression.balanced_mse_gai(p, t, var(params), prior)
  if lc.name == "balanced_mse_bni":
    return lambda p, t, params: regression.balanced_mse_bni(p, t, var(params), *prior)
  return lambda p, t, params: regression.balanced_mse(p, t, var(params))


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  """The config's optimizer; a learnable Balanced-MSE noise scale gets its own Adam (``loss.sigma_lr``).

  Ren et al.'s code adds ``noise_sigma`` as a separate parameter group with ``lr = sigma_lr``.
  """
  tx = optim.make_optimizer(config.optim, schedule)
  if not learns_noise(config):
    return tx
  def labels(params):
    return {k: "noise" if k == "noise_sigma" else jax.tree.map(lambda _: "model", v) for k, v in params.items()}
  return optax.multi_transform({"model": tx, "noise": optax.adam(float(config.loss.sigma_lr))}, labels)


def learns_noise(config) -> bool:
  return config.loss.name in config_lib.BALANCED_MSE and bool(config.loss.learn_noise)


def create_state(model, tx, config, num_bins: int, input_shape, mesh) -> RegressionState:
  """The initial state, built shape-first and placed replicated (as :func:`lt_jax.train.state.create_state`)."""
  def init() -> RegressionState:
    init_key, rng = jax.random.split(jax.random.key(config.seed))
    variables = model.init(init_key, jnp.zeros((2, *input_shape), jnp.float32), train=False)
    params = dict(variables["params"])
    if learns_noise(config):
      params["noise_sigma"] = jnp.asarray(config.loss.noise_sigma, jnp.float32)
    dim = params["head"]["kernel"].shape[0]
    return RegressionState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params), loss_state=(),
                           rng=jax.random.key_data(rng), fds=regression.fds_init(num_bins, dim))
  shardings = jax.tree.map(lambda _: replicated(mesh), jax.eval_shape(init))
  return jax.jit(init, out_shardings=shardings)()


def make_train_step(model, tx, loss_fn, schedule, spec: Spec, sc: steps.StepConfig, bin_weights: jax.Array, mesh):
  """``step(state, data) -> (state, metrics)``: loss ``weighted(l(yhat, y), w_bin(y))``, FDS in the forward pass."""
  sharding = batch_sharded(mesh)

  def train_step(state: RegressionState, data: DIRData):
    key = jax.random.wrap_key_data(state.rng)
    sample_key, aug_key = jax.random.split(jax.random.fold_in(key, 0))
    idx = steps.batch_indices(sample_key, state.step, steps.TrainData(data.images, data.targets, None), None, sc)
    images, y, b = (jax.lax.with_sharding_constraint(a[idx], sharding) for a in data)
    x = augment.random_crop_flip(jax.random.fold_in(aug_key, state.step), images, pad=sc.crop_pad, flip=False)
    x = augment.normalize(x, spec.mean, spec.std)
    smooth = state.step // sc.steps_per_epoch >= spec.start_smooth

    def loss_of(params):
      f, batch_stats = features(model, params, state.batch_stats, x, train=True)
      if spec.fds:
        f = jnp.where(smooth, regression.fds_calibrate(f, b, state.fds, spec.fds_clip), f)
      pred = predict(params, f, spec)
      w = bin_weights[b] if spec.weighted else jnp.ones_like(y)
      return regression.weighted(loss_fn(pred, y, params), w), (batch_stats, pred)

    (value, (batch_stats, pred)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": value, "mae": jnp.mean(jnp.abs(pred - y)), "lr": schedule(state.step),
               "grad_norm": optax.tree_utils.tree_norm(grads)}
    if "noise_sigma" in state.params:
      metrics["noise_sigma"] = state.params["noise_sigma"]
    return new, metrics

  return jax.jit(train_step, donate_argnums=(0,), compiler_options=cpu_compiler_options())


def fds_pass_batches(n: int, batch_size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """``(indices, mask)`` batches covering ``n`` examples once, in a fixed seeded order.

  Every batch holds ``batch_size`` *real* examples, so train-mode BatchNorm statistics are never
  diluted by padding: the last batch is the final ``batch_size`` of the order, with the examples
  already counted masked out. Needs ``n >= batch_size``.
  """
  order = np.random.default_rng(seed).permutation(n).astype(np.int32)
  out = []
  for start in range(0, n, batch_size):
    lo = min(start, n - batch_size)
    out.append((order[lo:lo + batch_size], np.arange(lo, lo + batch_size) >= start))
  return out


def make_fds_sums(model, spec: Spec, num_bins: int):
  """``sums(params, batch_stats, data, idx, mask) -> FDSSums`` of uncalibrated train-mode features."""
  def fds_sums(params, batch_stats, data: DIRData, idx, mask):
    x = augment.normalize(data.images[idx], spec.mean, spec.std)
    f, _ = features(model, params, batch_stats, x, train=True)
    return regression.fds_batch_stats(f, data.bin_ids[idx], num_bins, mask)
  return jax.jit(fds_sums, compiler_options=cpu_compiler_options())


def fds_epoch_update(state: RegressionState, data: DIRData, batches, fds_sums, fds_update, mesh) -> RegressionState:
  """Sums the FDS statistics of the whole training set on device and applies one update."""
  sharding = batch_sharded(mesh)
  total = None
  for idx, mask in batches:
    s = fds_sums(state.params, state.batch_stats, data, put_global(idx, sharding), put_global(mask, sharding))
    total = s if total is None else total + s
  return state.replace(fds=fds_update(state.fds, total))


def summarize(sums: regression.RegressionSums, train_counts, config) -> dict[str, float]:
  s = regression.regression_summary(sums, train_counts, config.bins.many, config.bins.few)
  return {k: float(v) for k, v in jax.device_get(s).items()}


# ============================================================================ the run


def train_and_evaluate_regression(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a DIR config in ``workdir`` with the one loop (resuming from its checkpoint) and evaluates it.

  The DIR task is an update function (:func:`make_train_step`), a hook (the end-of-epoch FDS
  statistics pass, :func:`fds_epoch_update`) and ``regression`` evaluators (val during
  training, val and test at the end) of :func:`lt_jax.train.loop.train`.

  Returns the final test summary (``mae``, ``mse``, ``gm`` overall and ``many_/medium_/few_``
  by training counts per bin, plus ``val_*``), ``step`` and ``state``. Writes ``config.json``,
  ``train_counts.json``, ``metrics.jsonl`` (train / val / test lines), ``summary.json``, the plot
  ``error_per_bin.png`` and checkpoints to ``workdir``.
  """
  from lt_jax.train import trainer  # the run environment is the classification run's
  mesh = make_mesh(config.num_devices)
  validate(config, num_devices=mesh.size)
  env = trainer.make_env(config, mesh)
  with workdir_lib.locked(workdir, enabled=env.is_main):
    return _train_and_evaluate_regression(config, workdir, mesh, env)


def _train_and_evaluate_regression(config, workdir: str, mesh, env) -> dict[str, Any]:
  log = env.log

  ds = load_dataset(config)
  spec = make_spec(config, ds)
  edges = jnp.asarray(spec.edges, jnp.float32)
  num_bins = len(spec.edges) - 1
  train_bins = np.asarray(regression.bin_index(ds.train_targets, edges))
  counts = np.bincount(train_bins, minlength=num_bins)
  spe = config_lib.steps_per_epoch(len(ds.train_targets), config.batch_size)
  total_steps = durations.epochs_to_steps(config.num_epochs, spe)
  last_step = total_steps if config.max_steps < 0 else min(total_steps, config.max_steps)
  smoothing = "+".join(n for n, on in (("LDS", config.lds.enabled), ("FDS", config.fds.enabled)) if on)
  log(f"lt_jax DIR: {ds.name} ({len(ds.train_targets)} train / {len(ds.val_targets)} val / "
      f"{len(ds.test_targets)} test, {num_bins} bins), model={config.model.name}, loss={config.loss.name}, "
      f"reweight={config.lds.reweight}, smoothing={smoothing or 'none'}, devices={mesh.size}, {spe} steps/epoch x "
      f"{config.num_epochs} epochs")

  model = get_model(config.model.name, num_classes=1,
                    dtype=jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32)
  schedule = optim.make_schedule(config.optim, spe, config.num_epochs)
  tx = make_optimizer(config, schedule)
  state = create_state(model, tx, config, num_bins, ds.train_images.shape[1:], mesh)
  if env.is_main:
    report.write_json(os.path.join(workdir, "train_counts.json"),
                      {"edges": list(spec.edges), "counts": counts.tolist()})

  rep = replicated(mesh)
  data = DIRData(put_global(ds.train_images, rep), put_global(ds.train_targets.astype(np.float32), rep),
                 put_global(train_bins.astype(np.int32), rep))
  lc = config.lds
  bin_weights = put_global(np.asarray(regression.lds_bin_weights(
      counts, lc.reweight, lc.enabled, lc.kernel, lc.ks, lc.sigma, tuple(lc.clip),
      truncate_density=bool(lc.truncate))), rep)
  sc = steps.StepConfig(batch_size=config.batch_size, steps_per_epoch=spe, num_epochs=config.num_epochs,
                        sampler="instance", k_per_class=1, crop_pad=config.augment.crop_pad, flip=False,
                        mean=spec.mean, std=spec.std)
  prior = label_prior(config, ds.train_targets, counts, np.asarray(spec.edges))
  update = make_train_step(model, tx, make_loss(config.loss, prior), schedule, spec, sc, bin_weights, mesh)

  hooks = []
  fc = config.fds
  if fc.enabled:
    fds_sums = make_fds_sums(model, spec, num_bins)
    fds_update = jax.jit(functools.partial(regression.fds_update, momentum=fc.momentum, kernel=fc.kernel,
                                           ks=fc.ks, sigma=fc.sigma, reference_lag=bool(fc.reference_lag)))
    fds_batches = fds_pass_batches(len(ds.train_targets), config.batch_size, config.seed)

    def fds_hook(state, step):  # after the last step of an epoch >= start_update: one FDS pass
      if step % spe == 0 and step // spe - 1 >= fc.start_update:
        state = fds_epoch_update(state, data, fds_batches, fds_sums, fds_update, mesh)
      return state
    hooks.append(fds_hook)

  ectx = evaluators.EvalContext(
      model=model, splits=evaluators.MemorySplits(ds, target="targets", dtype=np.float32), mesh=mesh,
      counts=counts, num_classes=0, mean=spec.mean, std=spec.std, batch_size=config.eval_batch_size,
      block=env.block_each_step, log=log, outputs=evaluators.OutputCache(),
      extra={"spec": spec, "many": config.bins.many, "few": config.bins.few})
  val_ev = evaluators.make("regression", ectx, split="val")
  test_ev = evaluators.make("regression", ectx, split="test")
  variables_of = lambda st: {"params": st.params, "batch_stats": st.batch_stats}
  periodic = []
  if len(ds.val_targets):
    periodic.append(loop.Periodic(
        durations.steps("eval_every", config, spe, config.batch_size, cadence=True), "val",
        lambda st: val_ev.evaluate(variables_of(st)).summary,
        lambda step, v: (f"epoch {step // spe}: val MAE {v['mae']:.3f} (many {v['many_mae']:.3f} / medium "
                         f"{v['medium_mae']:.3f} / few {v['few_mae']:.3f})")))
  run = loop.Run(
      name="stage regression", workdir=workdir, record=config.to_dict(), state=state, update=update,
      input=loop.DeviceInput(data), last_step=last_step, batch_size=config.batch_size,
      log_every=int(config.log_every_steps),
      checkpoint_every=durations.steps("checkpoint_every", config, spe, config.batch_size, cadence=True),
      keep_checkpoints=config.keep_checkpoints, evals=periodic, hooks=hooks,
      meta=lambda step, last: {"epoch": step / spe}, postfix=("loss", "mae"))
  writer = report.MetricWriter(workdir, enabled=env.is_main)
  try:
    state, step = loop.train(run, env, writer)
    test = test_ev.evaluate(variables_of(state))
    writer.write(step, "test", test.summary)
    val = val_ev.evaluate(variables_of(state)).summary if len(ds.val_targets) else {}
    if val:
      writer.write(step, "val", val)
  finally:
    writer.close()
  out = {"step": step, **test.summary, **{f"val_{k}": v for k, v in val.items()}}
  if env.is_main:
    final_report(workdir, config, ds.name, spec, counts, test.sums, out, log)
  return {**out, "state": state}


def final_report(workdir, config, name, spec: Spec, counts, sums, out: dict, log) -> None:
  """``summary.json`` (with per-bin test MAE), a table on stdout and ``error_per_bin.png``."""
  s = jax.device_get(sums)
  n = np.asarray(s.count, np.float64)
  per_bin = np.where(n > 0, np.asarray(s.sum_abs) / np.maximum(n, 1), np.nan)
  report.write_json(os.path.join(workdir, "summary.json"),
                    {**out, "per_bin": {"edges": list(spec.edges), "train_count": counts.tolist(),
                                        "test_count": n.astype(int).tolist(),
                                        "test_mae": [None if np.isnan(v) else float(v) for v in per_bin]}})
  lines = [f"{name} test set, step {out['step']}", f"{'':<8}{'MAE':>9}{'MSE':>11}{'GM':>9}"]
  for g in ("", "many_", "medium_", "few_"):
    lines.append(f"{(g[:-1] or 'all'):<8}{out[g + 'mae']:>9.3f}{out[g + 'mse']:>11.2f}{out[g + 'gm']:>9.3f}")
  log("\n".join(lines))
  if config.plots:
    log("plot: " + save_error_plot(workdir, np.asarray(spec.edges), counts, per_bin, config))


def save_error_plot(workdir: str, edges: np.ndarray, counts: np.ndarray, per_bin_mae: np.ndarray, config) -> str:
  """Test MAE per target bin (line) over the training count per bin (grey bars, log scale)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  centers = (edges[:-1] + edges[1:]) / 2
  fig, ax = plt.subplots(figsize=(7, 4))
  ax2 = ax.twinx()
  ax2.bar(centers, np.maximum(counts, 0.5), width=np.diff(edges), color="0.85")
  ax2.axhline(config.bins.many, color="0.6", ls=":", lw=1)
  ax2.axhline(config.bins.few, color="0.6", ls="--", lw=1)
  ax2.set_yscale("log")
  ax2.set_ylabel("training examples per bin (log)")
  ax.plot(centers, per_bin_mae, "o-", ms=2.5, color="C3")
  ax.set_zorder(ax2.get_zorder() + 1)
  ax.patch.set_visible(False)
  ax.set_xlabel("target")
  ax.set_ylabel("test MAE of the bin")
  ax.set_title("Error per target bin vs training density (dotted: many > 100, dashed: few < 20)")
  return report._save(fig, workdir, "error_per_bin.png")  # pylint: disable=protected-access

"""The classification update function: one jitted train step, sharded over a ``data`` mesh.

Small datasets live on device: each step draws its global batch with the core samplers
(``lt_jax.samplers``), gathers and augments it on device, and constrains it to be sharded
over the batch axis, so the same code runs on 1 CPU, N devices or many hosts.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lt_jax import losses as losses_lib
from lt_jax import decoupled, mixing, samplers
from lt_jax.data import augment
from lt_jax.models import cpu_compiler_options
from lt_jax.train.config import MIXES
from lt_jax.train.state import TrainState, batch_sharded


class TrainData(NamedTuple):
  """The long-tailed training set on device (replicated) plus its sampler index."""
  images: jax.Array      # (N, H, W, C) uint8
  labels: jax.Array      # (N,) int32
  index: Any             # samplers index pytree (built once)


class StepConfig(NamedTuple):
  """Static (hashable) settings of the train step.

  ``defer_epochs``: deferred re-sampling (DRS, Cao et al., NeurIPS 2019): instance sampling
  before this epoch, ``sampler`` from then on (0: ``sampler`` throughout).
  ``bn_train``: ``False`` freezes the BatchNorm statistics (decoupled classifier stages call
  the model with ``train=False``, so the frozen backbone is exactly the joint one).
  ``mix``: ``'none'`` | ``'mixup'`` | ``'cutmix'`` | ``'remix'`` (:mod:`lt_jax.mixing`).
  ``bbn``: BBN two-sampler training (a second, reversed-sampler batch and the cumulative
  ``alpha``; the model must be built with ``bbn=True``).
  ``experts``: the loss takes the experts' logits ``(B, E, C)`` (RIDE, SADE:
  ``losses.EXPERT_LOSSES``); the model (a ``*_experts`` model) is called with ``experts=True``
  and the reported accuracy is that of the mean over experts, the model's prediction.
  """
  batch_size: int
  steps_per_epoch: int
  num_epochs: int
  sampler: str
  k_per_class: int
  crop_pad: int
  flip: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int = 0
  defer_epochs: int = 0
  bn_train: bool = True
  mix: str = "none"
  mix_alpha: float = 1.0
  remix_kappa: float = 3.0
  remix_tau: float = 0.5
  bbn: bool = False
  bbn_div_epoch: int = 0  # BBN T_div; 0: decoupled.bbn_div_epoch(num_epochs), the reference rule
  experts: bool = False
  resample_target: int = 0       # random_under / random_over target count (0: n_min / n_max)
  resample_redraw: bool = False  # random_under / random_over: a new resampled set every pass


def _instance_indices(key: jax.Array, step: jax.Array, n: int, sc: StepConfig) -> jax.Array:
  perm = jax.random.permutation(jax.random.fold_in(key, step // sc.steps_per_epoch), n)
  return jax.lax.dynamic_slice(perm, ((step % sc.steps_per_epoch) * sc.batch_size,), (sc.batch_size,))


def batch_indices(key: jax.Array, step: jax.Array, data: TrainData, counts: jax.Array,
                  sc: StepConfig, sampler: str | None = None) -> jax.Array:
  """The global batch's example indices for ``step`` (a pure function of key and step).

  ``instance`` reproduces ordinary shuffled epochs (a fresh permutation of the training
  set each epoch, drop-last); every other sampler draws from ``lt_jax.samplers``. With
  ``sc.defer_epochs`` (DRS) epochs before it use ``instance``. ``sampler`` overrides
  ``sc.sampler`` (BBN's reversed branch).
  """
  sampler = sc.sampler if sampler is None else sampler
  n = data.labels.shape[0]
  epoch = step // sc.steps_per_epoch
  if sampler == "instance":
    return _instance_indices(key, step, n, sc)
  if sampler == "class_aware":  # one class cycle continued across batches, as the reference
    idx = samplers.class_aware_indices(key, data.index, sc.batch_size, sc.k_per_class,
                                       start=step * sc.batch_size)
  elif sampler in samplers.RESAMPLE_MODES:  # passes over the resampled set, continued across batches
    idx = samplers.resampled_indices(key, data.index, sc.batch_size, sampler, target=sc.resample_target,
                                     start=step * sc.batch_size, redraw=sc.resample_redraw)
  else:
    draw_key = jax.random.fold_in(key, step)
    if sampler == "class_balanced":
      probs = samplers.class_probs(counts, 0.0)
    elif sampler == "sqrt":
      probs = samplers.class_probs(counts, 0.5)
    elif sampler == "progressive":
      probs = samplers.progressive_probs(counts, epoch / max(sc.num_epochs - 1, 1))
    elif sampler == "reversed":
      probs = samplers.reversed_probs(counts)
    else:
      raise ValueError(f"unknown sampler {sampler!r}")
    idx = samplers.sample_indices(draw_key, data.index, probs, sc.batch_size)
  if sc.defer_epochs > 0:
    idx = jnp.where(epoch < sc.defer_epochs, _instance_indices(key, step, n, sc), idx)
  return idx


def mix_batch(key: jax.Array, x: jax.Array, labels: jax.Array, counts: jax.Array,
              sc: StepConfig) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """``(images, partner labels, weight of the own label)`` for ``sc.mix``.

  The loss of a mixed batch is ``w l(z, y) + (1 - w) l(z, y_perm)`` for whichever loss
  is configured: for cross-entropy this equals CE against the soft targets of
  :mod:`lt_jax.mixing` (Mixup: Zhang et al., ICLR 2018; CutMix: Yun et al., ICCV 2019;
  Remix: Chou et al., ECCV-W 2020, where ``w`` moves the label toward the minority class).
  """
  if sc.mix == "none":
    return x, None, None
  C = sc.num_classes
  if sc.mix == "mixup":
    x, _, lam, perm = mixing.mixup(key, x, labels, C, sc.mix_alpha)
    w = jnp.broadcast_to(lam, labels.shape)
  elif sc.mix == "cutmix":
    x, _, lam, perm = mixing.cutmix(key, x, labels, C, sc.mix_alpha)
    w = jnp.broadcast_to(lam, labels.shape)
  elif sc.mix == "remix":
    x, _, lam, perm = mixing.mixup(key, x, labels, C, sc.mix_alpha)
    w = mixing.remix_weights(labels, perm, lam, counts, sc.remix_kappa, sc.remix_tau)
  else:
    raise ValueError(f"unknown mix {sc.mix!r}; valid: {', '.join(MIXES)}")  # config.validate checks first
  return x, labels[perm], w


def _gather(data: TrainData, idx: jax.Array, sharding) -> tuple[jax.Array, jax.Array]:
  images = jax.lax.with_sharding_constraint(data.images[idx], sharding)
  labels = jax.lax.with_sharding_constraint(data.labels[idx], sharding)
  return images, labels


def make_train_step(model, tx: optax.GradientTransformation, loss: losses_lib.Loss,
                    schedule: optax.Schedule, counts: jax.Array, sc: StepConfig,
                    mesh: Mesh, grad_mask: Any = None, host_batches: bool = False,
                    logit_fn: Callable[[jax.Array], jax.Array] | None = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """``step(state, data) -> (state, metrics)``: :func:`train_step_fn` jitted with the state donated."""
  fn = train_step_fn(model, tx, loss, schedule, counts, sc, mesh, grad_mask=grad_mask,
                     host_batches=host_batches, logit_fn=logit_fn)
  return jax.jit(fn, donate_argnums=(0,), compiler_options=cpu_compiler_options())


def train_step_fn(model, tx: optax.GradientTransformation, loss: losses_lib.Loss,
                  schedule: optax.Schedule, counts: jax.Array, sc: StepConfig,
                  mesh: Mesh, grad_mask: Any = None, host_batches: bool = False,
                  logit_fn: Callable[[jax.Array], jax.Array] | None = None,
                  indices_fn: Callable[..., jax.Array] | None = None
                  ) -> Callable[..., tuple[TrainState, dict]]:
  """The update ``step(state, data) -> (state, metrics)``, not jitted (a population vmaps it,
  :mod:`lt_jax.train.population`).

  ``grad_mask``: a pytree of bools like ``params`` (``True`` = trainable, e.g. from
  :func:`lt_jax.decoupled.param_labels`); the reported ``grad_norm`` covers those leaves
  only (the frozen ones get no update from the partitioned optimiser, and XLA drops
  their gradient computation).

  ``host_batches=True``: the step is ``step(state, images, labels)`` with a global batch
  the host input pipeline already drew and augmented (uint8 ``(B, H, W, C)``, int
  ``(B,)``; :mod:`lt_jax.data.streaming`); the device only normalises it.

  ``logit_fn`` maps the model's outputs to class scores for the reported accuracy (e.g.
  the BAGS group-softmax head, whose ``C + G`` outputs the loss consumes directly).

  ``indices_fn(key, step, data, counts, sc)`` replaces :func:`batch_indices` for the main batch
  (a population member's sampler chosen by an index, :mod:`lt_jax.train.population`).
  """
  sharding = batch_sharded(mesh)

  def update(state: TrainState, key, images, labels, rb=None):
    aug_key = jax.random.split(jax.random.fold_in(key, 0))[1]
    if not host_batches:
      images = augment.random_crop_flip(jax.random.fold_in(aug_key, state.step), images,
                                        pad=sc.crop_pad, flip=sc.flip)
    x = augment.normalize(images, sc.mean, sc.std)
    x, labels2, w = mix_batch(jax.random.fold_in(jax.random.fold_in(key, 1), state.step),
                              x, labels, counts, sc)
    kw = {}
    if rb is not None:  # BBN: reversed-sampler batch, cumulative alpha of the 1-based epoch
      x_rb = augment.random_crop_flip(jax.random.fold_in(jax.random.fold_in(key, 3), state.step), rb[0],
                                      pad=sc.crop_pad, flip=sc.flip)
      alpha = decoupled.bbn_alpha(state.step // sc.steps_per_epoch + 1, sc.num_epochs, sc.bbn_div_epoch or None)
      kw = {"x_rb": augment.normalize(x_rb, sc.mean, sc.std), "alpha": alpha}
      labels2, w = rb[1], jnp.broadcast_to(alpha, labels.shape)
    if sc.experts:
      kw = dict(kw, experts=True)

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      if sc.bn_train:
        (logits, _), new_vars = model.apply(variables, x, train=True, mutable=["batch_stats"], **kw)
      else:
        (logits, _), new_vars = model.apply(variables, x, train=False, **kw), {}
      per_example, loss_state = loss.apply(logits, labels, counts, state.loss_state)
      if labels2 is not None:  # mixed / BBN batch: w l(z, y) + (1 - w) l(z, y2)
        other, _ = loss.apply(logits, labels2, counts, state.loss_state)
        per_example = w * per_example + (1.0 - w) * other
      return losses_lib.reduce_mean(per_example), (new_vars, loss_state, logits)

    (value, (new_vars, loss_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=new_vars.get("batch_stats", state.batch_stats),
                              opt_state=opt_state, loss_state=loss_state)
    shown = grads if grad_mask is None else jax.tree.map(
        lambda g, m: g if m else jnp.zeros((), g.dtype), grads, grad_mask)
    scores = jnp.mean(logits, axis=1) if sc.experts else logits
    scores = scores if logit_fn is None else logit_fn(scores)
    metrics = {"loss": value, "accuracy": jnp.mean(jnp.argmax(scores, -1) == labels),
               "lr": schedule(state.step), "grad_norm": optax.tree_utils.tree_norm(shown)}
    return new_state, metrics

  def train_step(state: TrainState, data: TrainData):
    key = jax.random.wrap_key_data(state.rng)
    sample_key = jax.random.split(jax.random.fold_in(key, 0))[0]
    images, labels = _gather(data, (indices_fn or batch_indices)(sample_key, state.step, data, counts, sc), sharding)
    rb = None
    if sc.bbn:
      rb = _gather(data, batch_indices(jax.random.fold_in(key, 2), state.step, data, counts, sc,
                                       sampler="reversed"), sharding)
    return update(state, key, images, labels, rb)

  def host_step(state: TrainState, images, labels):
    return update(state, jax.random.wrap_key_data(state.rng), images, labels)

  return host_step if host_batches else train_step


# ============================================================================ Meta-Weight-Net


@flax.struct.dataclass
class MetaWeightState(TrainState):
  """:class:`~lt_jax.train.state.TrainState` plus the weighting net of Meta-Weight-Net
  (:mod:`lt_jax.meta_weight`): its parameters and its optimiser's state, checkpointed with the rest."""
  vnet_params: Any
  vnet_opt_state: Any


class MetaData(NamedTuple):
  """The balanced meta set on device (replicated): uint8 images and int32 labels."""
  images: jax.Array
  labels: jax.Array


def meta_batch(key: jax.Array, step: jax.Array, meta: MetaData, size: int) -> jax.Array:
  """Indices of the step's meta batch: the first ``size`` of a fresh permutation of the meta set.

  The reference draws ``next(iter(validation_loader))`` every step, i.e. the first batch of a
  newly shuffled loader: ``size`` meta examples without replacement (all of them when the meta
  set is no larger than the batch).
  """
  return jax.random.permutation(jax.random.fold_in(key, step), meta.labels.shape[0])[:size]


def make_meta_weight_step(model, tx: optax.GradientTransformation, vnet_tx: optax.GradientTransformation,
                          loss: losses_lib.Loss, schedule: optax.Schedule, counts: jax.Array, sc: StepConfig,
                          mesh: Mesh, meta_batch_size: int) -> Callable[..., tuple[MetaWeightState, dict]]:
  """``step(state, data, meta) -> (state, metrics)``: one Meta-Weight-Net step, jitted, state donated.

  Shu et al., NeurIPS 2019 (:func:`lt_jax.meta_weight.meta_weight_grads`): the training batch is
  drawn and augmented exactly as :func:`make_train_step` draws it (same keys), the per-example
  loss is the configured registry loss (the reference: CE), the meta loss is CE on
  ``meta_batch_size`` augmented examples of the meta set (the reference applies its training
  transform to the meta set too), every forward pass in train mode as the reference's
  ``model.train()`` (BatchNorm statistics of the batch; the running averages are updated by the
  training batch only). The virtual step uses ``schedule(step)``, the lr of the real step.
  Metrics: ``loss`` (``Σ w ℓ``, the reference's ``l_f``), ``meta_loss``, ``weight_cv`` (std / mean
  of the step's weights: 0 when the weights are all equal), ``accuracy``, ``lr``, ``grad_norm``.
  """
  from lt_jax import meta_weight  # the algorithm; this is its wiring into the train step
  sharding = batch_sharded(mesh)

  def step(state: MetaWeightState, data: TrainData, meta: MetaData):
    key = jax.random.wrap_key_data(state.rng)
    sample_key, aug_key = jax.random.split(jax.random.fold_in(key, 0))
    images, labels = _gather(data, batch_indices(sample_key, state.step, data, counts, sc), sharding)
    x = augment.normalize(augment.random_crop_flip(jax.random.fold_in(aug_key, state.step), images,
                                                   pad=sc.crop_pad, flip=sc.flip), sc.mean, sc.std)
    idx = meta_batch(jax.random.fold_in(key, 4), state.step, meta, meta_batch_size)
    m_images, m_labels = _gather(TrainData(meta.images, meta.labels, None), idx, sharding)
    xm = augment.normalize(augment.random_crop_flip(jax.random.fold_in(jax.random.fold_in(key, 5), state.step),
                                                    m_images, pad=sc.crop_pad, flip=sc.flip), sc.mean, sc.std)

    def per_example_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      (logits, _), new_vars = model.apply(variables, x, train=True, mutable=["batch_stats"])
      per_example, loss_state = loss.apply(logits, labels, counts, state.loss_state)
      return per_example, (new_vars, loss_state, logits)

    def meta_loss_fn(params):
      (logits, _), _ = model.apply({"params": params, "batch_stats": state.batch_stats}, xm, train=True,
                                   mutable=["batch_stats"])
      return jnp.mean(losses_lib.softmax_cross_entropy(logits, m_labels))

    lr = schedule(state.step)
    out = meta_weight.meta_weight_grads(per_example_fn, meta_loss_fn, state.params, state.vnet_params,
                                        state.vnet_opt_state, vnet_tx, lr)
    new_vars, loss_state, logits = out.aux
    updates, opt_state = tx.update(out.grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=new_vars["batch_stats"], opt_state=opt_state, loss_state=loss_state,
                              vnet_params=out.vnet_params, vnet_opt_state=out.vnet_opt_state)
    w = out.weights
    metrics = {"loss": jnp.sum(w * out.per_example), "meta_loss": out.meta_loss,
               "weight_cv": jnp.std(w) / jnp.mean(w), "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "lr": lr, "grad_norm": optax.tree_utils.tree_norm(out.grads)}
    return new_state, metrics

  return jax.jit(step, donate_argnums=(0,), compiler_options=cpu_compiler_options())

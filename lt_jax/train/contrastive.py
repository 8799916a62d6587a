"""Contrastive update functions for the one training loop: SimCLR, SupCon, BCL and PaCo.

Each method is an update ``step(state, data) -> (state, metrics)`` with the same contract
as the classification step (:mod:`lt_jax.train.steps`): jitted with the state donated,
the in-memory dataset as its argument (:class:`lt_jax.train.loop.DeviceInput`).

**Multi-view input.** :func:`multi_view_batch` draws the global batch with the *same*
sampler, key and step as the classification step (``steps.batch_indices``: instance,
class-balanced, square-root, progressive, class-aware, DRS), gathers it on device and
returns ``V`` augmented views of every example, ``(V, B, H, W, C)``. A view is
``'standard'`` (the config's pad-crop + flip: view 0 is bit-identical to the batch the
classification step would see) or ``'simclr'`` (:func:`lt_jax.data.augment.simclr_augment`:
random resized crop, flip, colour jitter, grayscale), normalised.

**Methods** (:data:`METHODS`; ``config.contrastive.method``; the model is a
:class:`lt_jax.models.contrastive.ContrastiveNet`):

* ``simclr`` — NT-Xent on two SimCLR views, no labels (Chen et al., ICML 2020).
* ``supcon`` — SupCon on two SimCLR views (Khosla et al., NeurIPS 2020).
* ``bcl`` — ``alpha * CE-family(z_0) + beta * BalSCL(z_1, z_2, centres)`` (Zhu et al., CVPR 2022):
  the configured registry loss (logit-adjusted CE) on the standard view's logits, all three
  views in one forward pass (BatchNorm over ``3B``) as ``main.py`` concatenates them.
* ``paco`` — PaCo (Cui et al., ICCV 2021): the query encoder sees the standard view, the
  momentum key encoder the SimCLR view; the queue and the key encoder are explicit state.

The state's ``loss_state`` is ``{'loss': <registry loss state>, 'method': <method state>}``
(PaCo: ``{'queue': {'keys', 'labels', 'ptr'}, 'key_params', 'key_batch_stats'}``; the
others ``()``), checkpointed with the rest of the state.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lt_jax import losses as losses_lib
from lt_jax.data import augment
from lt_jax.models import cpu_compiler_options
from lt_jax.train import steps
from lt_jax.train.state import TrainState, batch_sharded, replicated

# method -> the kind of each view (view 0 first)
VIEWS = {"simclr": ("simclr", "simclr"), "supcon": ("simclr", "simclr"),
         "bcl": ("standard", "simclr", "simclr"), "paco": ("standard", "simclr")}
METHODS = tuple(VIEWS)
VIEW_KINDS = ("standard", "simclr")


class ContrastiveSettings(NamedTuple):
  """Static (hashable) settings of a contrastive update (``config.contrastive``)."""
  method: str
  temperature: float = 0.07
  base_temperature: float = 0.07
  alpha: float = 1.0
  beta: float = 0.35
  gamma: float = 1.0
  supt: float = 1.0
  momentum: float = 0.999
  queue_size: int = 1024
  scale_min: float = 0.2
  jitter: float = 0.4
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.2


def settings(c: ml_collections.ConfigDict) -> ContrastiveSettings:
  """The static settings of ``c.contrastive``."""
  k, a = c.contrastive, c.contrastive.aug
  if k.method not in METHODS:
    raise ValueError(f"unknown contrastive method {k.method!r}; valid methods: {', '.join(METHODS)}")
  return ContrastiveSettings(k.method, float(k.temperature), float(k.base_temperature), float(k.alpha),
                             float(k.beta), float(k.gamma), float(k.supt), float(k.momentum), int(k.queue_size),
                             float(a.scale_min), float(a.jitter), float(a.jitter_prob), float(a.grayscale_prob))


def augment_view(key: jax.Array, images: jax.Array, kind: str, sc: steps.StepConfig,
                 cs: ContrastiveSettings) -> jax.Array:
  """One normalised view of a ``uint8`` batch: ``'standard'`` (pad-crop + flip) or ``'simclr'``."""
  if kind == "standard":
    x = augment.random_crop_flip(key, images, pad=sc.crop_pad, flip=sc.flip)
  elif kind == "simclr":
    x = augment.simclr_augment(key, images, scale=(cs.scale_min, 1.0), flip=sc.flip, jitter=cs.jitter,
                               jitter_prob=cs.jitter_prob, grayscale_prob=cs.grayscale_prob)
  else:
    raise ValueError(f"unknown view kind {kind!r}; valid kinds: {', '.join(VIEW_KINDS)}")
  return augment.normalize(x, sc.mean, sc.std)


def multi_view_batch(key: jax.Array, step: jax.Array, data: steps.TrainData, counts: jax.Array,
                     sc: steps.StepConfig, cs: ContrastiveSettings, mesh: Mesh,
                     kinds: tuple[str, ...] | None = None) -> tuple[jax.Array, jax.Array]:
  """``(views (V, B, H, W, C) float32, labels (B,))`` of the global batch of ``step``.

  ``key`` is the run key (``wrap_key_data(state.rng)``). The indices are
  ``steps.batch_indices`` with the classification step's sampling key, so every sampler
  draws exactly the examples the classification step would; view ``v`` is augmented
  with ``fold_in(k_step, v)`` (``k_step`` = the classification step's crop key, which
  view 0 uses itself).
  """
  kinds = VIEWS[cs.method] if kinds is None else tuple(kinds)
  sample_key, aug_key = jax.random.split(jax.random.fold_in(key, 0))
  idx = steps.batch_indices(sample_key, step, data, counts, sc)
  images, labels = steps._gather(data, idx, batch_sharded(mesh))
  k_step = jax.random.fold_in(aug_key, step)
  views = [augment_view(k_step if v == 0 else jax.random.fold_in(k_step, v), images, kind, sc, cs)
           for v, kind in enumerate(kinds)]
  views = jax.lax.with_sharding_constraint(jnp.stack(views), NamedSharding(mesh, P(None, "data")))
  return views, labels


def init_method_state(state: TrainState, cs: ContrastiveSettings, num_classes: int, seed: int,
                      mesh: Mesh) -> TrainState:
  """``state`` with ``loss_state = {'loss': state.loss_state, 'method': ...}`` (replicated).

  PaCo: the key encoder starts as a copy of the query encoder's parameters and BatchNorm
  statistics (``param_k.data.copy_(param_q.data)``), the queue as :func:`lt_jax.losses.queue_init`.
  """
  dim_key = jax.random.fold_in(jax.random.key(seed), 2000)

  def init(state):
    method: Any = ()
    if cs.method == "paco":
      proj = state.params["proj"]["fc2"]["kernel"]
      q = losses_lib.queue_init(dim_key, cs.queue_size, proj.shape[-1], num_classes)
      copy = lambda tree: jax.tree.map(jnp.copy, tree)  # own buffers: the step donates the state
      method = {"queue": q._asdict(), "key_params": copy(state.params), "key_batch_stats": copy(state.batch_stats)}
    return state.replace(loss_state={"loss": state.loss_state, "method": method})

  abstract = jax.eval_shape(init, state)
  return jax.jit(init, out_shardings=jax.tree.map(lambda _: replicated(mesh), abstract))(state)


def make_contrastive_step(model, tx: optax.GradientTransformation, loss: losses_lib.Loss,
                          schedule: optax.Schedule, counts: jax.Array, sc: steps.StepConfig,
                          cs: ContrastiveSettings, mesh: Mesh) -> Callable[..., tuple[TrainState, dict]]:
  """``step(state, data) -> (state, metrics)`` for ``cs.method``, jitted with the state donated.

  ``loss`` is the registry loss of BCL's classification term (unused by the others).
  Metrics: ``loss`` (the total), ``contrastive_loss``, ``ce_loss`` (BCL), ``accuracy`` of the
  classifier on view 0 (the query for PaCo; meaningless for SimCLR / SupCon, whose
  classifier is not trained), ``lr``, ``grad_norm``.
  """
  if cs.method not in METHODS:
    raise ValueError(f"unknown contrastive method {cs.method!r}; valid methods: {', '.join(METHODS)}")
  sharding = batch_sharded(mesh)
  V = len(VIEWS[cs.method])

  def joint_views(state: TrainState, views, labels):
    """SimCLR / SupCon / BCL: all views in one forward pass (BatchNorm over V * B)."""
    B = labels.shape[0]
    x = jax.lax.with_sharding_constraint(views.reshape(V * B, *views.shape[2:]), sharding)
    ls = state.loss_state

    def loss_fn(params):
      out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                  method="contrast", mutable=["batch_stats"])
      z = out["z"].reshape(V, B, -1)
      logits = out["logits"][:B]
      aux = {}
      if cs.method == "simclr":
        con = jnp.mean(losses_lib.nt_xent_loss(z, cs.temperature, cs.base_temperature or cs.temperature))
        total, loss_state = con, ls["loss"]
      elif cs.method == "supcon":
        con = jnp.mean(losses_lib.supcon_loss(z, labels, cs.temperature, cs.base_temperature or cs.temperature))
        total, loss_state = con, ls["loss"]
      else:  # bcl: CE-family on view 0, BalSCL on views 1..V-1 and the class centres
        per_example, loss_state = loss.apply(logits, labels, counts, ls["loss"])
        ce = losses_lib.reduce_mean(per_example)
        con = jnp.mean(losses_lib.balanced_contrastive_loss(z[1:], labels, out["centres"], cs.temperature))
        total = cs.alpha * ce + cs.beta * con
        aux["ce_loss"] = ce
      aux["contrastive_loss"] = con
      return total, (new_vars, {"loss": loss_state, "method": ls["method"]}, logits, aux)

    return loss_fn

  def paco(state: TrainState, views, labels):
    """PaCo: momentum update of the key encoder, keys of view 1, loss on the queries of view 0."""
    ls = state.loss_state
    ms = ls["method"]
    m = cs.momentum
    # The reference updates the key encoder first (with the query encoder before this step's
    # gradient step), then encodes the keys with it, in training mode (its own BN statistics).
    key_params = jax.tree.map(lambda k, q: m * k + (1.0 - m) * q, ms["key_params"], state.params)
    kout, kvars = model.apply({"params": key_params, "batch_stats": ms["key_batch_stats"]}, views[1],
                              train=True, method="contrast", mutable=["batch_stats"])
    keys = jax.lax.stop_gradient(kout["z"])
    queue = losses_lib.Queue(**ms["queue"])

    def loss_fn(params):
      out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, views[0], train=True,
                                  method="contrast", mutable=["batch_stats"])
      per_anchor, new_queue = losses_lib.paco_loss(
          out["z"], keys, labels, out["logits"], counts, queue, alpha=cs.alpha, beta=cs.beta, gamma=cs.gamma,
          temperature=cs.temperature, base_temperature=cs.base_temperature or None, supt=cs.supt)
      total = jnp.mean(per_anchor)
      method = {"queue": new_queue._asdict(), "key_params": key_params, "key_batch_stats": kvars["batch_stats"]}
      return total, (new_vars, {"loss": ls["loss"], "method": method}, out["logits"], {"contrastive_loss": total})

    return loss_fn

  def train_step(state: TrainState, data: steps.TrainData):
    key = jax.random.wrap_key_data(state.rng)
    views, labels = multi_view_batch(key, state.step, data, counts, sc, cs, mesh)
    loss_fn = (paco if cs.method == "paco" else joint_views)(state, views, labels)
    (value, (new_vars, loss_state, logits, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=new_vars.get("batch_stats", state.batch_stats),
                              opt_state=opt_state, loss_state=loss_state)
    metrics = {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "lr": schedule(state.step), "grad_norm": optax.tree_utils.tree_norm(grads), **aux}
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,), compiler_options=cpu_compiler_options())

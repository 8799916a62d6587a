"""Decoupled classifier stages on cached frozen features: SMOTE-cRT and the BALMS Meta Sampler.

A *feature stage* is a classifier stage (Kang et al., ICLR 2020) whose backbone never runs in the
training loop: the frozen model's features of the whole training split are computed once (eval
mode, no augmentation: :class:`lt_jax.train.evaluators.OutputCache`, the pass NCM and the
τ-sweeps use), put on device as the stage's "images", and each step trains only
``params['head']`` on a batch of them (``optax.partition`` freezes the rest, as in cRT). The
stage's state is the full model's :class:`~lt_jax.train.state.TrainState`, so checkpoints,
resume, evaluators and reports are those of every other stage.

* ``smote_crt``: SMOTE over-sampling of the cached features (:func:`lt_jax.smote.smote`,
  imbalanced-learn's ``sampling_strategy='auto'``, ``k = 5``), then a fresh classifier trained on
  the balanced set with any sampler of :data:`lt_jax.samplers.SAMPLERS` (default ``instance``:
  shuffled epochs of the over-sampled set) and a registry loss (default CE).
* ``meta_sampler``: BALMS (Ren et al., NeurIPS 2020; :mod:`lt_jax.meta_sampler`): a fresh
  classifier trained with Balanced Softmax on batches drawn by the learnt sampler, whose logits
  are meta-trained every step on class-aware meta batches of the cached training features (the
  reference's CIFAR recipe: ``ClassAwareSampler`` over the training set). The sampler's logits
  and their Adam state live in the state's ``loss_state`` slot (the stage objective's explicit
  state), so they are checkpointed and resumed with the classifier.

Differences from the references, both from caching: the features are un-augmented (cRT in
lt_jax, classifier-balancing and BALMS pass augmented images through the frozen backbone every
step), and the "epoch" of the loop stays ``N // batch_size`` steps of the long-tailed training
set (:mod:`lt_jax.train.durations`), whatever the size of the SMOTE set.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lt_jax import losses as losses_lib
from lt_jax import meta_sampler as ms_lib
from lt_jax import samplers, smote
from lt_jax.models import layers
from lt_jax.train import loop, steps
from lt_jax.train.config import FEATURE_STAGES
from lt_jax.train.state import TrainState, batch_sharded, put_global, replicated


def standalone_head(model):
  """The model's classifier as a module of its own (applied to ``params['head']`` and features)."""
  return layers.make_head(model.head, model.num_classes, model.cosine_scale, model.head_bias, name=None)


def cached_features(ctx, model, variables) -> tuple[np.ndarray, np.ndarray]:
  """``(features (N, D) float32, labels (N,))`` of the training split under ``variables`` (eval mode)."""
  from lt_jax.train import evaluators, trainer  # the trainer builds the evaluation context
  outputs = evaluators.OutputCache().get(trainer.eval_context(ctx, model), variables)
  _, feats = outputs("train")
  return feats, np.asarray(ctx.data.splits.arrays("train")[1])


def feature_data(features, labels, num_classes: int, mesh) -> steps.TrainData:
  """Cached features as the stage's on-device training set (replicated, with its sampler index)."""
  rep = replicated(mesh)
  labels = np.asarray(labels, np.int32)
  return steps.TrainData(images=put_global(np.asarray(features, np.float32), rep), labels=put_global(labels, rep),
                         index=jax.device_put(samplers.build_index(labels, num_classes), rep))


def _gather(data: steps.TrainData, idx, sharding):
  return (jax.lax.with_sharding_constraint(data.images[idx], sharding),
          jax.lax.with_sharding_constraint(data.labels[idx], sharding))


def _metrics(value, scores, labels, lr, grads, grad_mask):
  shown = grads if grad_mask is None else jax.tree.map(
      lambda g, m: g if m else jnp.zeros((), g.dtype), grads, grad_mask)
  return {"loss": value, "accuracy": jnp.mean(jnp.argmax(scores, -1) == labels), "lr": lr,
          "grad_norm": optax.tree_utils.tree_norm(shown)}


def classifier_update(head, tx: optax.GradientTransformation, per_example: Callable, params, opt_state, feats,
                      labels):
  """One plain classifier step: ``(value, logits, grads, params', opt_state')`` of the mean loss."""
  def loss_fn(p):
    z = head.apply({"params": p["head"]}, feats)
    return losses_lib.reduce_mean(per_example(z, labels)), z

  (value, z), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return value, z, grads, optax.apply_updates(params, updates), opt_state


def make_feature_step(head, tx, loss: losses_lib.Loss, schedule, counts, sc: steps.StepConfig, mesh,
                      grad_mask=None):
  """``step(state, data) -> (state, metrics)`` on cached features; the batch is drawn by
  :func:`lt_jax.train.steps.batch_indices` (every sampler of :data:`lt_jax.samplers.SAMPLERS`)."""
  sharding = batch_sharded(mesh)

  def step(state: TrainState, data: steps.TrainData):
    key = jax.random.wrap_key_data(state.rng)
    sample_key = jax.random.split(jax.random.fold_in(key, 0))[0]
    feats, labels = _gather(data, steps.batch_indices(sample_key, state.step, data, counts, sc), sharding)
    loss_state = state.loss_state

    def per_example(z, y):
      return loss.apply(z, y, counts, loss_state)[0]

    value, z, grads, params, opt_state = classifier_update(head, tx, per_example, state.params, state.opt_state,
                                                           feats, labels)
    new_loss_state = loss.apply(z, labels, counts, loss_state)[1]
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_state=new_loss_state)
    return new, _metrics(value, z, labels, schedule(state.step), grads, grad_mask)

  return jax.jit(step, donate_argnums=(0,))


def stage_base_loss(settings) -> losses_lib.Loss:
  """The registry loss a feature stage's ``loss`` setting names (aliases allowed), default hparams."""
  from lt_jax.train.config import LOSS_ALIASES
  name = LOSS_ALIASES.get(settings.loss, settings.loss)
  return losses_lib.make_loss(name, **losses_lib.default_hparams(name))


def meta_optimizer(settings) -> optax.GradientTransformation:
  """Adam on the sampler logits (the reference's ``optimizer_meta``, lr ``meta_lr``, 0.01)."""
  return optax.adam(float(settings.meta_lr))


def stage_loss(name: str, settings, counts) -> losses_lib.Loss:
  """A feature stage's loss: the registry loss, or for ``meta_sampler`` that loss carrying the sampler state."""
  base = stage_base_loss(settings)
  if name == "meta_sampler":
    return meta_sampler_loss(base, counts, meta_optimizer(settings), float(settings.init_pow))
  return base


def meta_sampler_loss(base: losses_lib.Loss, counts, meta_tx: optax.GradientTransformation,
                      init_pow: float = 0.0) -> losses_lib.Loss:
  """The ``meta_sampler`` stage's loss: ``base`` (stateless, e.g. Balanced Softmax) whose explicit
  state is the sampler (:class:`lt_jax.meta_sampler.MetaSamplerState`, initialised from ``counts``)."""
  phi0 = ms_lib.init_logits(counts, init_pow)

  def init(num_classes):
    if num_classes != phi0.shape[0]:
      raise ValueError(f"meta sampler: {num_classes} classes, counts have {phi0.shape[0]}")
    return ms_lib.MetaSamplerState(phi0, meta_tx.init(phi0))

  def apply(z, y, prior, state):
    return base.apply(z, y, prior, ())[0], state

  return losses_lib.Loss(f"{base.name}+meta_sampler", init, apply)


def make_meta_sampler_step(head, tx, base: losses_lib.Loss, meta_tx, schedule, counts, sc: steps.StepConfig, mesh,
                           grad_mask=None, meta_batch_size: int = 0, meta_sampler: str = "class_aware"):
  """The BALMS step (:mod:`lt_jax.meta_sampler`), jit-compiled, state donated:

  1. draw the batch by hard Gumbel-softmax with the sampler's logits ``phi_t``;
  2. meta-gradient of the virtual classifier's CE on a ``meta_sampler`` meta batch (class-aware
     over the cached training features by default) through one step of ``tx`` with the
     straight-through-weighted ``base`` loss; Adam (``meta_tx``) gives ``phi_{t+1}``;
  3. the real classifier step on the same batch with the unweighted ``base`` loss.
  """
  sharding = batch_sharded(mesh)
  meta_bs = int(meta_batch_size) or sc.batch_size
  meta_sc = sc._replace(batch_size=meta_bs, sampler=meta_sampler, defer_epochs=0)

  def per_example(z, y):
    return base.apply(z, y, counts, ())[0]

  def step(state: TrainState, data: steps.TrainData):
    key = jax.random.wrap_key_data(state.rng)
    sampler_state: ms_lib.MetaSamplerState = state.loss_state
    draws = ms_lib.gumbel_draws(jax.random.fold_in(jax.random.fold_in(key, 4), state.step), sampler_state.logits,
                                data.labels, sc.batch_size)
    feats, labels = _gather(data, draws.indices, sharding)
    meta_key = jax.random.split(jax.random.fold_in(key, 5))[0]
    meta_feats, meta_labels = _gather(data, steps.batch_indices(meta_key, state.step, data, counts, meta_sc),
                                      sharding)

    def train_loss(p, w):
      return jnp.mean(w * per_example(head.apply({"params": p["head"]}, feats), labels))

    def meta_loss(p):
      return jnp.mean(losses_lib.softmax_cross_entropy(head.apply({"params": p["head"]}, meta_feats), meta_labels))

    meta_value, meta_grad = ms_lib.meta_gradient(
        sampler_state.logits, state.params, state.opt_state, tx, train_loss, meta_loss,
        lambda phi: ms_lib.straight_through_weights(phi, draws, labels))
    updates, meta_opt = meta_tx.update(meta_grad, sampler_state.opt_state, sampler_state.logits)
    new_sampler = ms_lib.MetaSamplerState(optax.apply_updates(sampler_state.logits, updates), meta_opt)
    value, z, grads, params, opt_state = classifier_update(head, tx, per_example, state.params, state.opt_state,
                                                           feats, labels)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_state=new_sampler)
    m = _metrics(value, z, labels, schedule(state.step), grads, grad_mask)
    probs = ms_lib.sampling_probs(new_sampler.logits, counts)
    m.update(meta_loss=meta_value, meta_grad_norm=jnp.linalg.norm(meta_grad),
             sampler_min_prob=jnp.min(jnp.where(counts > 0, probs, 1.0)), sampler_max_prob=jnp.max(probs))
    return new, m

  return jax.jit(step, donate_argnums=(0,))


def build(ctx, spec, state, tx, schedule, grad_mask, variables) -> tuple[Any, Callable, Any]:
  """``(state, update, input)`` of the feature stage ``spec.name`` (``trainer.StageSpec.build``).

  The features come from ``variables`` (the stage's starting model: its backbone is frozen), so a
  resumed stage recomputes the same set; SMOTE draws from ``fold_in(key(seed), 2000)``.
  """
  c, s = ctx.config, ctx.config.stage[spec.name]
  feats, labels = cached_features(ctx, spec.model, variables)
  head = standalone_head(spec.model)
  sc = spec.step_config
  if spec.name == "smote_crt":
    out = smote.smote(jax.random.fold_in(jax.random.key(c.seed), 2000), feats, labels, ctx.data.num_classes,
                      k_neighbors=int(s.k_neighbors), sampling_strategy=s.sampling_strategy)
    ctx.env.log(f"stage smote_crt: {int(out.num_synthetic.sum())} SMOTE points added to {len(labels)} cached "
                f"features (k={int(s.k_neighbors)}, sampling_strategy={s.sampling_strategy!r})")
    data = feature_data(np.asarray(out.features), np.asarray(out.labels), ctx.data.num_classes, ctx.mesh)
    update = make_feature_step(head, tx, spec.loss, schedule, ctx.counts_dev, sc, ctx.mesh, grad_mask)
  elif spec.name == "meta_sampler":
    data = feature_data(feats, labels, ctx.data.num_classes, ctx.mesh)
    update = make_meta_sampler_step(head, tx, stage_base_loss(s), meta_optimizer(s), schedule, ctx.counts_dev, sc,
                                    ctx.mesh, grad_mask, int(s.meta_batch_size), s.sampler)
  else:
    raise ValueError(f"unknown feature stage {spec.name!r}; valid: {', '.join(FEATURE_STAGES)}")
  return state, update, loop.DeviceInput(data)

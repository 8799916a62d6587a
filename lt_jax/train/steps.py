"""The jitted train and eval steps (one pure function each, sharded over a ``data`` mesh).

Small datasets live on device: each step draws its global batch with the core samplers
(``lt_jax.samplers``), gathers and augments it on device, and constrains it to be sharded
over the batch axis, so the same code runs on 1 CPU, N devices or many hosts.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lt_jax import losses as losses_lib
from lt_jax import metrics as metrics_lib
from lt_jax import samplers
from lt_jax.data import augment
from lt_jax.models import cpu_compiler_options
from lt_jax.train.state import TrainState, batch_sharded


class TrainData(NamedTuple):
  """The long-tailed training set on device (replicated) plus its sampler index."""
  images: jax.Array      # (N, H, W, C) uint8
  labels: jax.Array      # (N,) int32
  index: Any             # samplers index pytree (built once)


class StepConfig(NamedTuple):
  """Static (hashable) settings of the train step."""
  batch_size: int
  steps_per_epoch: int
  num_epochs: int
  sampler: str
  k_per_class: int
  crop_pad: int
  flip: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]


def batch_indices(key: jax.Array, step: jax.Array, data: TrainData, counts: jax.Array,
                  sc: StepConfig) -> jax.Array:
  """The global batch's example indices for ``step`` (a pure function of key and step).

  ``instance`` reproduces ordinary shuffled epochs (a fresh permutation of the training
  set each epoch, drop-last); every other sampler draws from ``lt_jax.samplers``.
  """
  n = data.labels.shape[0]
  epoch = step // sc.steps_per_epoch
  if sc.sampler == "instance":
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    return jax.lax.dynamic_slice(perm, ((step % sc.steps_per_epoch) * sc.batch_size,), (sc.batch_size,))
  if sc.sampler == "class_aware":  # one class cycle continued across batches, as the reference
    return samplers.class_aware_indices(key, data.index, sc.batch_size, sc.k_per_class,
                                        start=step * sc.batch_size)
  draw_key = jax.random.fold_in(key, step)
  if sc.sampler == "class_balanced":
    probs = samplers.class_probs(counts, 0.0)
  elif sc.sampler == "sqrt":
    probs = samplers.class_probs(counts, 0.5)
  elif sc.sampler == "progressive":
    probs = samplers.progressive_probs(counts, epoch / max(sc.num_epochs - 1, 1))
  elif sc.sampler == "reversed":
    probs = samplers.reversed_probs(counts)
  else:
    raise ValueError(f"unknown sampler {sc.sampler!r}")
  return samplers.sample_indices(draw_key, data.index, probs, sc.batch_size)


def make_train_step(model, tx: optax.GradientTransformation, loss: losses_lib.Loss,
                    schedule: optax.Schedule, counts: jax.Array, sc: StepConfig,
                    mesh: Mesh) -> Callable[[TrainState, TrainData], tuple[TrainState, dict]]:
  """``step(state, data) -> (state, metrics)``, jitted with the state donated."""
  sharding = batch_sharded(mesh)

  def train_step(state: TrainState, data: TrainData):
    key = jax.random.wrap_key_data(state.rng)
    sample_key, aug_key = jax.random.split(jax.random.fold_in(key, 0))
    idx = batch_indices(sample_key, state.step, data, counts, sc)
    images = jax.lax.with_sharding_constraint(data.images[idx], sharding)
    labels = jax.lax.with_sharding_constraint(data.labels[idx], sharding)
    x = augment.random_crop_flip(jax.random.fold_in(aug_key, state.step), images,
                                 pad=sc.crop_pad, flip=sc.flip)
    x = augment.normalize(x, sc.mean, sc.std)

    def loss_fn(params):
      (logits, _), new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
      per_example, loss_state = loss.apply(logits, labels, counts, state.loss_state)
      return losses_lib.reduce_mean(per_example), (new_vars, loss_state, logits)

    (value, (new_vars, loss_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=new_vars.get("batch_stats", state.batch_stats),
                              opt_state=opt_state, loss_state=loss_state)
    metrics = {"loss": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "lr": schedule(state.step), "grad_norm": optax.tree_utils.tree_norm(grads)}
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,), compiler_options=cpu_compiler_options())


class EvalSums(NamedTuple):
  """Additive evaluation statistics (sums and counts, never averages)."""
  confusion: jax.Array                   # (C, C) int32, rows = true class
  calibration: metrics_lib.CalibrationCounts
  nll: metrics_lib.NLLSums


def make_eval_step(model, num_classes: int, mean, std, mesh: Mesh, num_bins: int = 15):
  """``eval_step(variables, images, labels, mask) -> EvalSums`` of one (sharded) batch."""
  del mesh  # inputs arrive batch-sharded; XLA reduces the sums across devices.

  def eval_step(variables, images, labels, mask):
    x = augment.normalize(images, mean, std)
    logits, _ = model.apply(variables, x, train=False)
    logits = logits.astype(jnp.float32)
    return EvalSums(
        confusion=metrics_lib.confusion_matrix(labels, jnp.argmax(logits, -1), num_classes, mask=mask),
        calibration=metrics_lib.calibration_counts(logits, labels, num_bins, mask=mask, from_logits=True),
        nll=metrics_lib.nll_sums(logits, labels, mask=mask, from_logits=True))

  return jax.jit(eval_step, compiler_options=cpu_compiler_options())


def add_sums(a: EvalSums | None, b: EvalSums) -> EvalSums:
  """Field-wise sum (NamedTuple ``+`` would concatenate)."""
  return b if a is None else jax.tree.map(jnp.add, a, b)

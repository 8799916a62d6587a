"""Cost of a Meta-Weight-Net step against a plain step, side by side (benchmark, not a test).

The same model, data, batch, optimiser and on-device sampling/augmentation: (a) the plain
classification step (``lt_jax.train.steps.make_train_step``, CE) and (b) the Meta-Weight-Net step
(``steps.make_meta_weight_step``: virtual SGD step, meta loss on a meta batch of the same size,
VNet update, real step; one shared forward pass of the training batch). ``--naive`` adds (c): the
same step written as the reference computes it, ``jax.grad`` of the meta loss through
``jax.grad`` of the weighted loss plus a second forward/backward pass for the real step (no shared
``jax.vjp``), to show what sharing saves. Rounds alternate the variants so they see the same
machine load; medians are reported with their ratio to the plain step.

  python bench/meta_weight_step.py                          # small CNN, 28x28x1, batch 128
  python bench/meta_weight_step.py --model=resnet32 --steps=10 --rounds=2 --naive
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lt_jax import losses, meta_weight as mw
from lt_jax.data import augment
from lt_jax.models import cpu_compiler_options, get_model
from lt_jax.train import config as config_lib, optim, steps
from lt_jax.train.state import create_state, make_mesh, put_global, replicated

import common  # bench/common.py


def setup(model_name: str, batch: int, num_train: int, num_meta: int):
  mesh = make_mesh(1)
  shape, images, labels, data = common.synthetic_data(model_name, [num_train // 10] * 10, mesh)
  rep = replicated(mesh)
  meta = steps.MetaData(put_global(images[:num_meta], rep), put_global(labels[:num_meta], rep))
  model = get_model(model_name, num_classes=10)
  spe, schedule, tx = common.sgd(batch, len(labels))
  vc = config_lib.base_config().meta_weight.optim
  vnet_tx = optim.make_optimizer(vc, optim.make_schedule(vc, spe, common.NUM_EPOCHS))
  loss = losses.make_loss("ce")
  sc = common.step_config(batch, spe, shape)
  counts = put_global(np.bincount(labels, minlength=10).astype(np.float32), rep)
  mbs = min(batch, num_meta)
  plain = steps.make_train_step(model, tx, loss, schedule, counts, sc, mesh)
  meta_step = steps.make_meta_weight_step(model, tx, vnet_tx, loss, schedule, counts, sc, mesh, mbs)

  def fresh(with_vnet: bool):
    st = create_state(model, tx, loss, 10, shape, 0, mesh)
    if not with_vnet:
      return st
    vnet = jax.device_put(mw.init_vnet(jax.random.key(1)), rep)
    return steps.MetaWeightState(step=st.step, params=st.params, batch_stats=st.batch_stats, opt_state=st.opt_state,
                                 loss_state=st.loss_state, rng=st.rng, vnet_params=vnet,
                                 vnet_opt_state=jax.device_put(vnet_tx.init(vnet), rep))

  naive = make_naive_step(model, tx, vnet_tx, schedule, sc, mbs)
  return {"plain": (lambda st: plain(st, data), lambda: fresh(False)),
          "mwnet": (lambda st: meta_step(st, data, meta), lambda: fresh(True)),
          "naive": (lambda st: naive(st, data, meta), lambda: fresh(True))}


def make_naive_step(model, tx, vnet_tx, schedule, sc, mbs):
  """The reference's computation order: grad-of-grad for the meta step, a second forward for the real step."""
  def step(state, data, meta):
    key = jax.random.wrap_key_data(state.rng)
    sample_key, aug_key = jax.random.split(jax.random.fold_in(key, 0))
    idx = steps.batch_indices(sample_key, state.step, data, None, sc)
    x = augment.normalize(augment.random_crop_flip(jax.random.fold_in(aug_key, state.step), data.images[idx],
                                                   pad=sc.crop_pad, flip=sc.flip), sc.mean, sc.std)
    y = data.labels[idx]
    midx = steps.meta_batch(jax.random.fold_in(key, 4), state.step, meta, mbs)
    xm = augment.normalize(augment.random_crop_flip(jax.random.fold_in(jax.random.fold_in(key, 5), state.step),
                                                    meta.images[midx], pad=sc.crop_pad, flip=sc.flip), sc.mean, sc.std)

    def forward(params, inputs):
      (logits, _), new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
                                          mutable=["batch_stats"])
      return logits, new_vars

    per_example = lambda p: losses.softmax_cross_entropy(forward(p, x)[0], y)  # noqa: E731
    meta_loss = lambda p: jnp.mean(losses.softmax_cross_entropy(forward(p, xm)[0], meta.labels[midx]))  # noqa: E731
    lr = schedule(state.step)
    _, g_phi = mw.meta_gradient(per_example, meta_loss, state.params, state.vnet_params, lr)
    upd, vnet_opt = vnet_tx.update(g_phi, state.vnet_opt_state, state.vnet_params)
    vnet = optax.apply_updates(state.vnet_params, upd)

    def real(p):
      logits, new_vars = forward(p, x)
      ell = losses.softmax_cross_entropy(logits, y)
      return jnp.sum(ell * jax.lax.stop_gradient(mw.example_weights(vnet, ell))), new_vars
    (value, new_vars), g = jax.value_and_grad(real, has_aux=True)(state.params)
    updates, opt_state = tx.update(g, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=new_vars["batch_stats"], opt_state=opt_state, vnet_params=vnet,
                         vnet_opt_state=vnet_opt), {"loss": value}
  return jax.jit(step, donate_argnums=(0,), compiler_options=cpu_compiler_options())


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="cnn")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--meta", type=int, default=200, help="meta set size (the meta batch is min(batch, meta))")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--naive", action="store_true", help="also time the reference-order step")
  a = p.parse_args()
  variants = setup(a.model, a.batch, 4000, a.meta)
  names = ["plain", "mwnet"] + (["naive"] if a.naive else [])
  for name in names:  # compile
    common.timed(variants[name][0], variants[name][1](), (), 2)
  rates = {n: [] for n in names}
  for r in range(a.rounds):
    for name in names:
      update, fresh = variants[name]
      rates[name].append(common.timed(update, fresh(), (), a.steps)[1])
    print(f"round {r}: " + ", ".join(f"{n} {rates[n][-1]:.2f} steps/s" for n in names), flush=True)
  med = {n: statistics.median(v) for n, v in rates.items()}
  print(f"{a.model} batch {a.batch}, meta batch {min(a.batch, a.meta)}, {a.steps} steps x {a.rounds} rounds, "
        f"{jax.default_backend()}: " + ", ".join(
            f"{n} {med[n]:.2f} steps/s ({med['plain'] / med[n]:.2f}x the plain step's time)" for n in names))


if __name__ == "__main__":
  main()

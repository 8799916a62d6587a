"""Cost of the BALMS Meta Sampler step against a plain classifier step, side by side (benchmark, not a test).

Three jitted steps of the decoupled classifier stage, on the Fashion-MNIST-LT IR 100 recipe's
shapes (N = 14,837 training examples with the reproduction counts, 10 classes, 128-d features of
the small CNN, batch 128):

* ``plain``: a classifier step on cached features (``feature_stages.make_feature_step``: draw a batch
  with the class-balanced sampler, gather, linear head, CE, SGD), what ``smote_crt`` runs;
* ``meta``: the Meta Sampler step (``feature_stages.make_meta_sampler_step``): ``B x N`` Gumbel draws,
  the meta-gradient through one virtual SGD step (a Hessian-vector product of the head), Adam on the
  sampler logits, then the same plain step;
* ``crt_images``: lt_jax's image cRT step (``steps.make_train_step`` with the backbone frozen by the
  optax partition, BN in eval mode): the frozen CNN's forward pass on augmented 28x28 images each step.

Rounds alternate the three so they see the same machine load (``crt_images`` runs ``steps // 10``
steps, at least 5: it is two orders of magnitude slower on a CPU); medians of steps/s are reported with
the ratios ``meta / plain`` and ``meta / crt_images`` (time per step). ``--gumbel`` also times the
draws alone.

  python bench/meta_sampler_step.py                  # 200 steps x 3 rounds
  python bench/meta_sampler_step.py --steps=100 --rounds=5 --gumbel
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lt_jax import decoupled, losses, meta_sampler, samplers
from lt_jax.models import get_model
from lt_jax.train import feature_stages, optim, steps
from lt_jax.train.state import create_state, make_mesh, put_global, replicated

import common  # bench/common.py

COUNTS = np.array([5980, 3584, 2149, 1288, 772, 463, 277, 166, 99, 59])   # the reproduction recipe's


def setup(batch: int):
  mesh = make_mesh(1)
  rep = replicated(mesh)
  rng = np.random.default_rng(0)
  labels = rng.permutation(np.repeat(np.arange(10), COUNTS)).astype(np.int32)
  model = get_model("cnn", num_classes=10)
  oc = ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
                                      schedule="cosine", warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1))
  spe = len(labels) // batch
  schedule = optim.make_schedule(oc, spe, 100)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  tx = optax.partition({"trainable": optim.make_optimizer(oc, schedule), "frozen": optax.set_to_zero()},
                       decoupled.param_labels(variables["params"], "head"))
  counts = put_global(COUNTS.astype(np.float32), rep)
  sc = steps.StepConfig(batch_size=batch, steps_per_epoch=spe, num_epochs=100, sampler="class_balanced",
                        k_per_class=4, crop_pad=2, flip=True, mean=(0.5,), std=(0.25,), num_classes=10,
                        bn_train=False)
  feats = feature_stages.feature_data(rng.normal(size=(len(labels), 128)).astype(np.float32), labels, 10, mesh)
  images = steps.TrainData(put_global(rng.integers(0, 256, (len(labels), 28, 28, 1), dtype=np.uint8), rep),
                           put_global(labels, rep), jax.device_put(samplers.build_index(labels, 10), rep))
  head = feature_stages.standalone_head(model)
  ce, bs = losses.make_loss("ce"), losses.make_loss("balanced_softmax")
  meta_tx = optax.adam(0.01)
  ms_loss = feature_stages.meta_sampler_loss(bs, COUNTS, meta_tx)
  builds = {
      "plain": (feature_stages.make_feature_step(head, tx, ce, schedule, counts, sc, mesh), ce, feats),
      "meta": (feature_stages.make_meta_sampler_step(head, tx, bs, meta_tx, schedule, counts,
                                                     sc._replace(sampler="instance"), mesh,
                                                     meta_sampler="class_aware"), ms_loss, feats),
      "crt_images": (steps.make_train_step(model, tx, ce, schedule, counts, sc, mesh), ce, images),
  }
  fresh = {k: (lambda loss=loss: create_state(model, tx, loss, 10, (28, 28, 1), 0, mesh, variables))
           for k, (_, loss, _) in builds.items()}
  return builds, fresh, feats


def timed(update, state, data, n: int) -> float:
  state, m = update(state, data)           # compiled already; one step outside the clock
  jax.block_until_ready(m)
  return common.timed(update, state, (data,), n)[1]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--gumbel", action="store_true", help="also time the B x N Gumbel draws alone")
  args = p.parse_args()
  builds, fresh, feats = setup(args.batch)
  for name, (update, _, data) in builds.items():   # compile everything first
    jax.block_until_ready(update(fresh[name](), data)[1])
  rates = {k: [] for k in builds}
  draw = jax.jit(lambda key, phi: meta_sampler.gumbel_draws(key, phi, feats.labels, args.batch))
  gumbel = []
  for r in range(args.rounds):
    for name, (update, _, data) in builds.items():
      n = max(args.steps // 10, 5) if name == "crt_images" else args.steps
      rates[name].append(timed(update, fresh[name](), data, n))
    if args.gumbel:
      phi = jnp.zeros(10)
      jax.block_until_ready(draw(jax.random.key(0), phi))
      t = time.perf_counter()
      for i in range(args.steps):
        out = draw(jax.random.key(i), phi)
      jax.block_until_ready(out)
      gumbel.append(args.steps / (time.perf_counter() - t))
    print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f} steps/s" for k, v in rates.items()), flush=True)
  med = {k: statistics.median(v) for k, v in rates.items()}
  print(f"\nmedian steps/s over {args.rounds} rounds of {args.steps} steps, batch {args.batch}, "
        f"N = {int(COUNTS.sum())}, {jax.devices()[0].platform}:")
  for k, v in med.items():
    print(f"  {k:<11} {v:8.1f} steps/s  ({1e3 / v:.2f} ms/step)")
  print(f"  Meta Sampler step / plain cached-feature step: {med['plain'] / med['meta']:.1f}x the time")
  print(f"  Meta Sampler step / image cRT step:            {med['crt_images'] / med['meta']:.2f}x the time")
  if gumbel:
    g = statistics.median(gumbel)
    print(f"  B x N Gumbel draws alone: {1e3 / g:.2f} ms ({100 * med['meta'] / g:.0f}% of the Meta Sampler step)")


if __name__ == "__main__":
  main()

"""Step throughput of the contrastive methods against the CE step, side by side (benchmark, not a test).

Each method's jitted update (``lt_jax.train.contrastive``: on-device sampling, V augmented views,
forward/backward, SGD; PaCo also the momentum key encoder and the queue) against the
classification step with CE (``lt_jax.train.steps``: one pad-crop view), on the same synthetic
in-memory data and model. Rounds cycle through all steps so every one sees the same machine load;
reported: the best round (the least disturbed by other processes on a shared machine, as ``timeit``)
and the median, as steps/s, training examples/s and the cost relative to the CE step (best rounds).

  python bench/contrastive_step.py                       # small CNN, 28x28x1, batch 128, 10 steps x 9
  python bench/contrastive_step.py --model=resnet32 --steps=10 --rounds=2
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

from lt_jax import losses
from lt_jax.models import get_model
from lt_jax.models.contrastive import ContrastiveNet
from lt_jax.train import config as config_lib, contrastive, steps
from lt_jax.train.state import create_state, make_mesh, put_global, replicated

import common  # bench/common.py


def setup(model_name: str, batch: int, num_train: int):
  mesh = make_mesh(1)
  shape, _, labels, data = common.synthetic_data(model_name, [num_train // 10] * 10, mesh)
  spe, schedule, tx = common.sgd(batch, len(labels))
  sc = common.step_config(batch, spe, shape)
  counts = put_global(np.bincount(labels, minlength=10).astype(np.float32), replicated(mesh))

  def ce():
    model, loss = get_model(model_name, num_classes=10), losses.make_loss("ce")
    return steps.make_train_step(model, tx, loss, schedule, counts, sc, mesh), \
        create_state(model, tx, loss, 10, shape, 0, mesh)

  def method(name):
    c = config_lib.base_config()
    c.batch_size = batch
    config_lib.set_contrastive(c, name)
    k = c.contrastive
    head = c.model.head
    model = ContrastiveNet(get_model(model_name, num_classes=10, head=head,
                                     **({"cosine_scale": c.model.cosine_scale} if head == "cosine" else {})),
                           proj_dim=k.proj_dim, proj_bn=k.proj_bn, centres=name == "bcl")
    loss = losses.make_loss(c.loss.name, **c.loss.hparams.to_dict())
    cs = contrastive.settings(c)
    state = contrastive.init_method_state(create_state(model, tx, loss, 10, shape, 0, mesh), cs, 10, 0, mesh)
    return contrastive.make_contrastive_step(model, tx, loss, schedule, counts, sc, cs, mesh), state

  return {"ce": ce, **{m: (lambda m=m: method(m)) for m in contrastive.METHODS}}, data


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="cnn")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--num_train", type=int, default=5120)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=9)
  args = p.parse_args()
  builders, data = setup(args.model, args.batch, args.num_train)
  runs = {}
  for name, build in builders.items():
    update, state = build()
    state, _ = common.timed(update, state, (data,), 2)  # compile + warm up
    runs[name] = [update, state, []]
  for _ in range(args.rounds):
    for name, run in runs.items():
      run[1], rate = common.timed(run[0], run[1], (data,), args.steps)
      run[2].append(rate)
  views = {"ce": 1, **{m: len(contrastive.VIEWS[m]) for m in contrastive.METHODS}}
  base = max(runs["ce"][2])
  print(f"{args.model}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds "
        f"({jax.devices()[0].platform}); best round (median):")
  print("| step | views | steps/s | examples/s | cost vs CE step |")
  print("|---|---|---|---|---|")
  for name, run in runs.items():
    best, med = max(run[2]), statistics.median(run[2])
    print(f"| {name} | {views[name]}{' + key encoder' if name == 'paco' else ''} | {best:.2f} ({med:.2f}) | "
          f"{best * args.batch:.0f} | {base / best:.2f}x ({statistics.median(runs['ce'][2]) / med:.2f}x) |")


if __name__ == "__main__":
  main()

"""The cost of E experts: RIDE and SADE train steps against the CE step, side by side (benchmark, not a test).

The same classification update (``lt_jax.train.steps.make_train_step``: on-device sampling,
augmentation, forward/backward, SGD) on synthetic in-memory data, for

* ``ce``: the single model (small CNN / ResNet-32, linear head), softmax CE;
* ``ride``: the ``*_experts`` model (3 experts, ``reduce_dimension``, cosine heads s = 30, the
  experts one ``nn.vmap``-ed module) with the RIDE loss (LDAM + CB DRW + diversity KL);
* ``sade``: the same model with SADE's three-expert loss;
* ``ride_full``: RIDE without ``reduce_dimension`` (experts as wide as the single model).

Rounds alternate the methods so all see the same machine load; medians of steps/s (images/s)
and the ratio to CE are printed, with the parameter counts.

  python bench/experts.py                                 # small CNN, batch 128, 60 steps x 3 rounds
  python bench/experts.py --model=resnet32 --steps=10 --rounds=2
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

from lt_jax import losses
from lt_jax.models import get_model
from lt_jax.train import steps
from lt_jax.train.state import create_state, make_mesh, put_global, replicated

import common  # bench/common.py

METHODS = ("ce", "ride", "sade", "ride_full")


def setup(model_name: str, method: str, batch: int, num_train: int):
  mesh = make_mesh(1)
  counts = np.maximum((num_train // 10) * 0.01 ** (np.arange(10) / 9), 5).astype(int)
  shape, _, labels, data = common.synthetic_data(model_name, counts, mesh)
  rep = replicated(mesh)
  if method == "ce":
    model, loss = get_model(model_name, num_classes=10), losses.make_loss("ce")
  else:
    model = get_model(f"{model_name}_experts", num_classes=10, head="cosine", cosine_scale=30.0, num_experts=3,
                      reduce_dimension=method != "ride_full")
    loss = (losses.make_loss("sade") if method == "sade" else
            losses.make_loss("ride", weights="effective_number", beta=0.9999, weight_norm="batch", drw_start=0))
  spe, schedule, tx = common.sgd(batch, len(labels))
  sc = common.step_config(batch, spe, shape, experts=method != "ce")
  update = steps.make_train_step(model, tx, loss, schedule, put_global(counts.astype(np.float32), rep), sc, mesh)
  state = create_state(model, tx, loss, 10, shape, 0, mesh)
  n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  return update, state, data, n_params


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="cnn", choices=("cnn", "resnet32"))
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--methods", default=",".join(METHODS))
  a = p.parse_args()
  methods = a.methods.split(",")
  runs = {}
  for m in methods:
    update, state, data, n_params = setup(a.model, m, a.batch, 6000)
    state, _ = common.timed(update, state, (data,), 2)  # compile
    runs[m] = [update, state, data, n_params, []]
  for r in range(a.rounds):
    for m in methods:
      update, state, data, _, rates = runs[m]
      runs[m][1], rate = common.timed(update, state, (data,), a.steps)
      rates.append(rate)
    print(f"round {r}: " + ", ".join(f"{m} {runs[m][4][-1]:.2f}" for m in methods) + " steps/s", flush=True)
  base = statistics.median(runs["ce"][4]) if "ce" in runs else None
  print(f"\n{a.model}, batch {a.batch}, {a.steps} steps x {a.rounds} rounds, {jax.default_backend()} "
        f"({jax.device_count()} device): median steps/s")
  print(f"| method | params | steps/s | images/s | vs CE |\n|---|---|---|---|---|")
  for m in methods:
    med = statistics.median(runs[m][4])
    ratio = f"{med / base:.2f}x" if base else "n/a"
    print(f"| {m} | {runs[m][3]:,} | {med:.2f} | {med * a.batch:.0f} | {ratio} |")


if __name__ == "__main__":
  main()

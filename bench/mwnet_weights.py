r"""What a finished Meta-Weight-Net run learnt (an analysis, not a test).

For each workdir: the VNet's map ``V(ℓ)`` at initialisation and at the end of training on a grid
of losses, and, with the final model (eval-mode BatchNorm, no augmentation), the mean normalised
weight ``B·w_i`` of each class's training examples (1 = the unweighted mean) in batches of the
run's batch size — i.e. how much MW-Net up-weights the tail relative to plain CE.

  python bench/mwnet_weights.py runs/reproduce/mwnet_seed0 ...
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lt_jax import losses, meta_weight as mw
from lt_jax.data import augment
from lt_jax.train import checkpoint, trainer

GRID = (0.0, 0.1, 0.5, 1.0, 2.0, 4.0)


def analyse(workdir: str) -> dict:
  config = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
  ds = trainer.load_dataset(config)
  model = trainer.build_model(config, ds.num_classes)
  mngr = checkpoint.manager(workdir, 1)
  state = checkpoint.restore_arrays(mngr, mngr.latest_step())
  vnet = state["vnet_params"]
  init = mw.init_vnet(jax.random.fold_in(jax.random.key(config.seed), 2000), config.meta_weight.hidden)
  grid = jnp.asarray(GRID, jnp.float32)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  apply = jax.jit(lambda x, y: losses.softmax_cross_entropy(
      model.apply(variables, augment.normalize(x, tuple(ds.mean), tuple(ds.std)), train=False)[0], y))
  ell = np.concatenate([np.asarray(apply(ds.train_images[i:i + 1000], ds.train_labels[i:i + 1000]))
                        for i in range(0, len(ds.train_labels), 1000)])
  rng = np.random.default_rng(0)
  b = config.batch_size
  order = rng.permutation(len(ell))[: len(ell) // b * b].reshape(-1, b)
  w = np.concatenate([b * np.asarray(mw.example_weights(vnet, jnp.asarray(ell[o]))) for o in order])
  y = ds.train_labels[order.reshape(-1)]
  return {"v_init": np.asarray(mw.VNet(config.meta_weight.hidden).apply(init, grid)),
          "v_final": np.asarray(mw.VNet(config.meta_weight.hidden).apply(vnet, grid)),
          "class_weight": np.array([w[y == c].mean() for c in range(ds.num_classes)]),
          "class_loss": np.array([ell[ds.train_labels == c].mean() for c in range(ds.num_classes)]),
          "counts": np.asarray(ds.counts)}


def main():
  for w in sys.argv[1:]:
    r = analyse(w)
    print(f"{w}\n  V(l) at l = {GRID}:\n    init  {np.round(r['v_init'], 4)}\n    final {np.round(r['v_final'], 4)}")
    print(f"  per class (counts {r['counts'].tolist()}):\n    mean B*w  {np.round(r['class_weight'], 3)}"
          f"\n    mean loss {np.round(r['class_loss'], 3)}", flush=True)


if __name__ == "__main__":
  main()

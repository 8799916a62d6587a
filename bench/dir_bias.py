r"""Signed test error (prediction − target) per shot group of finished DIR runs (an analysis, not a test).

Balanced MSE divides the training label density out of the likelihood; on the exponential
profile of rotated Fashion-MNIST (``n(y) ∝ exp(−λ y)``, ``λ = ln(100) / 89`` per degree) the
balancing term's gradient is nearly constant, so it shifts every prediction up by about
``σ² λ`` degrees, whatever the bin's own error. This prints, for each run, the learnt (or fixed)
``σ``, that shift, and the measured mean signed error of the many / medium / few-shot test bins.

  python bench/dir_bias.py runs/dir/vanilla_seed0 runs/dir/balanced_mse_bni_seed0 ...
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lt_jax import regression
from lt_jax.data import augment
from lt_jax.models import get_model
from lt_jax.train import checkpoint
from lt_jax.train.regression_trainer import features, load_dataset, make_spec, predict


def signed_errors(workdir: str) -> dict:
  config = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
  ds = load_dataset(config)
  spec = make_spec(config, ds)
  mngr = checkpoint.manager(workdir, 1)
  arrays = checkpoint.restore_arrays(mngr, mngr.latest_step())
  params, stats = arrays["params"], arrays["batch_stats"]
  model = get_model(config.model.name, num_classes=1)
  f, _ = jax.jit(lambda p, s, x: features(model, p, s, x, False))(params, stats,
                                                                  augment.normalize(ds.test_images, spec.mean, spec.std))
  pred = np.asarray(predict(params, f, spec), np.float64).reshape(-1)
  edges = jnp.asarray(spec.edges, jnp.float32)
  counts = np.bincount(np.asarray(regression.bin_index(ds.train_targets, edges)), minlength=len(spec.edges) - 1)
  group = counts[np.asarray(regression.bin_index(ds.test_targets, edges))]
  err = pred - ds.test_targets
  if "noise_sigma" in params:
    sigma = float(params["noise_sigma"])
  else:
    sigma = float(config.loss.noise_sigma) if config.loss.name.startswith("balanced_mse") else 0.0
  lam = math.log(config.dataset.imbalance_ratio) / (config.dataset.max_angle - 1)
  return {"sigma": sigma, "shift": sigma ** 2 * lam,
          **{g: float(err[m].mean()) for g, m in (("many", group > config.bins.many),
                                                  ("medium", (group >= config.bins.few) & (group <= config.bins.many)),
                                                  ("few", group < config.bins.few))}}


def main():
  print(f"{'run':<40}{'sigma':>7}{'s^2 lam':>9}{'many':>8}{'medium':>8}{'few':>8}   (mean pred - target, deg)")
  for w in sys.argv[1:]:
    r = signed_errors(w)
    print(f"{os.path.basename(w.rstrip('/')):<40}{r['sigma']:>7.2f}{r['shift']:>9.2f}{r['many']:>8.2f}"
          f"{r['medium']:>8.2f}{r['few']:>8.2f}", flush=True)


if __name__ == "__main__":
  main()

r"""Per-class classifier norms ||w_c|| against the training count: CE vs weight balancing's two stages.

Reads the final checkpoints of ``bench/reproduce.py`` runs (no training): the CE run's joint model
(``<root>/ce_seed<k>``), weight balancing's stage 1 (the joint model of ``<root>/wb_seed<k>``: CE with
weight decay 5e-3) and stage 2 (``<root>/wb_seed<k>/stages/wb``: MaxNorm + weight decay 0.1 + the CB
loss), and plots ||w_c|| against n_c (mean over seeds, min-max bars) with the MaxNorm radius of each
seed's stage-1 classifier. Prints the norms and the max/min norm ratio of each model.

  python bench/weight_norms.py --root=runs/reproduce --seeds=0,1,2 --out=docs/weight_balancing_norms.png
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from lt_jax import heads
from lt_jax import weight_balancing as wb
from lt_jax.train import checkpoint

MODELS = (("CE (wd 5e-4)", "ce_seed{k}"), ("WB stage 1: CE, wd 5e-3", "wb_seed{k}"),
          ("WB stage 2: MaxNorm + wd 0.1 + CB", "wb_seed{k}/stages/wb"))


def head_kernel(workdir: str) -> np.ndarray:
  mngr = checkpoint.manager(workdir, 1)
  arrays = checkpoint.restore_arrays(mngr, mngr.latest_step())
  mngr.close()
  return np.asarray(arrays["params"]["head"]["kernel"])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="runs/reproduce")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--thresh", type=float, default=0.1, help="stage.wb.max_norm_thresh of the runs")
  p.add_argument("--out", default="docs/weight_balancing_norms.png")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  counts = np.asarray(json.load(open(os.path.join(args.root, f"ce_seed{seeds[0]}", "train_counts.json")))["counts"])
  norms = {name: np.stack([np.asarray(heads.weight_norms(head_kernel(os.path.join(args.root, d.format(k=k)))))
                           for k in seeds]) for name, d in MODELS}
  radii = [float(wb.max_norm_radius(head_kernel(os.path.join(args.root, f"wb_seed{k}")), args.thresh)) for k in seeds]
  print(f"counts: {counts.tolist()}")
  for name, n in norms.items():
    ratio = n.max(1) / n.min(1)
    print(f"{name:<36} ||w_c|| (mean over seeds): {np.round(n.mean(0).astype(float), 3).tolist()}  "
          f"max/min {ratio.mean():.2f} ± {ratio.std():.2f}")
  print(f"MaxNorm radius per seed: {np.round(radii, 3).tolist()}")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for (name, n), marker in zip(norms.items(), "osD"):
    mean = n.mean(0)
    ax.errorbar(counts, mean, yerr=[mean - n.min(0), n.max(0) - mean], marker=marker, capsize=2, label=name)
  ax.axhline(np.mean(radii), color="gray", ls="--", lw=1, label=f"MaxNorm radius (mean {np.mean(radii):.2f})")
  ax.set_xscale("log")
  ax.set_xlabel("training examples of the class, n_c")
  ax.set_ylabel("classifier norm ||w_c||")
  ax.set_title(f"Fashion-MNIST-LT IR 100, seeds {seeds} (mean, min-max)", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

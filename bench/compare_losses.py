r"""Train one config with several losses and seeds; print mean ± std of the test metrics.

  python bench/compare_losses.py --config=configs/fashion_mnist_lt.py --losses=ce,la \
      --seeds=0,1,2 --root=runs/compare

Each run is a separate ``launch.py`` process in ``<root>/<loss>_seed<k>`` (so finished
runs are skipped and interrupted ones resume). Extra ``--config.*`` overrides are passed on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "many_shot", "medium_shot", "few_shot", "ece")  # in %


def run(config: str, loss: str, seed: int, workdir: str, overrides: list[str]) -> dict:
  summary = os.path.join(workdir, "summary.json")
  if not os.path.exists(summary):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}:loss={loss},seed={seed}",
           f"--workdir={workdir}", "--config.quiet=true", *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
  with open(summary) as f:
    out = json.load(f)
  # Wall time of training + evaluation (config.json is written at start, summary.json at the end).
  out["minutes"] = (os.path.getmtime(summary) - os.path.getmtime(os.path.join(workdir, "config.json"))) / 60
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/fashion_mnist_lt.py")
  p.add_argument("--losses", default="ce,la")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--root", default="runs/compare")
  args, overrides = p.parse_known_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  table = {}
  for loss in args.losses.split(","):
    rows = [run(args.config, loss, s, os.path.join(args.root, f"{loss}_seed{s}"), overrides) for s in seeds]
    table[loss] = {k: [r[k] for r in rows if k in r and np.isfinite(r[k])] for k in (*KEYS, "minutes")}
  print(f"\n{args.config}, seeds {seeds} (test set; mean ± std over seeds)")
  print(f"{'loss':<10}" + "".join(f"{k:>20}" for k in KEYS) + f"{'minutes/run':>14}")
  for loss, cols in table.items():
    cells = "".join(f"{100 * np.mean(v):>13.2f} ± {100 * np.std(v):4.2f}" if v else f"{'n/a':>20}"
                    for k, v in cols.items() if k != "minutes")
    print(f"{loss:<10}{cells}{np.mean(cols['minutes']):>14.1f}")
  with open(os.path.join(args.root, "table.json"), "w") as f:
    json.dump(table, f, indent=2)


if __name__ == "__main__":
  main()

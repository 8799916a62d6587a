r"""Deep imbalanced regression on rotated Fashion-MNIST: vanilla vs LDS vs FDS vs LDS+FDS vs Balanced MSE
(BMC, GAI, BNI).

  nice -n 10 python bench/dir.py --seeds=0,1,2 --root=runs/dir

Each run is a separate ``launch.py`` process with ``configs/fashion_mnist_dir.py:method=<m>,seed=<k>``
in ``<root>/<m>_seed<k>`` (finished runs are skipped, interrupted ones resume). Prints overall and
many / medium / few-shot test MAE (mean ± std over seeds) and writes ``<root>/table.json``.
Extra ``--config.*`` overrides are passed on to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("vanilla", "lds", "fds", "lds_fds", "balanced_mse", "balanced_mse_gai", "balanced_mse_bni")
KEYS = ("mae", "many_mae", "medium_mae", "few_mae", "gm", "few_gm", "mse")


def _child_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def run(config: str, method: str, seed: int, workdir: str, overrides: list[str]) -> dict:
  summary = os.path.join(workdir, "summary.json")
  timing = os.path.join(workdir, "bench_time.json")
  if not os.path.exists(summary):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}:method={method},seed={seed}",
           f"--workdir={workdir}", "--config.quiet=true", *overrides]
    print("+", " ".join(cmd), flush=True)
    cpu0, t0 = _child_cpu(), time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(timing, "w") as f:
      json.dump({"cpu_s": _child_cpu() - cpu0, "wall_s": time.time() - t0}, f)
  with open(summary) as f:
    out = json.load(f)
  if os.path.exists(timing):
    with open(timing) as f:
      out.update(json.load(f))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/fashion_mnist_dir.py")
  p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--root", default="runs/dir")
  args, overrides = p.parse_known_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = args.methods.split(",")
  rows = {m: [] for m in methods}
  for s in seeds:  # seed-major: an interrupted benchmark still compares every method
    for m in methods:
      rows[m].append(run(args.config, m, s, os.path.join(args.root, f"{m}_seed{s}"), overrides))
  table = {m: {k: [r[k] for r in rows[m] if k in r] for k in (*KEYS, "cpu_s", "wall_s")} for m in methods}
  print(f"\n{args.config}, seeds {seeds}: test MAE in degrees (mean ± std over seeds)")
  print(f"{'method':<14}" + "".join(f"{k:>16}" for k in KEYS) + f"{'CPU s/run':>11}")
  for method, cols in table.items():
    cells = "".join(f"{np.mean(cols[k]):>9.3f} ± {np.std(cols[k]):4.2f}" if cols[k] else f"{'n/a':>16}"
                    for k in KEYS)
    cpu = f"{np.mean(cols['cpu_s']):>11.0f}" if cols["cpu_s"] else f"{'n/a':>11}"
    print(f"{method:<14}{cells}{cpu}")
  os.makedirs(args.root, exist_ok=True)
  with open(os.path.join(args.root, "table.json"), "w") as f:
    json.dump({"config": args.config, "seeds": seeds, "overrides": overrides, "table": table}, f, indent=2)


if __name__ == "__main__":
  main()

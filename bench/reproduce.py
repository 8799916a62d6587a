r"""The reproduction table: every long-tail method of the seeds on one recipe, several seeds.

  python bench/reproduce.py --config=configs/fashion_mnist_lt.py --variant=epochs=4 \
      --seeds=0,1,2 --root=runs/reproduce --jobs=2
  python bench/reproduce.py --config=configs/cifar_lt.py --variant=dataset=cifar10 \
      --root=runs/c10_reproduce          # the standard 200-epoch recipe (needs CIFAR + an accelerator)

Each training run is a separate ``launch.py`` process in ``<root>/<run>_seed<k>`` (finished
runs are skipped, interrupted ones resume). The decoupled rows are stages of the CE run
(post-hoc LA, tau-norm, NCM, cRT) or of a run initialised from it (LWS), so they share its
representation, as in Kang et al. (ICLR 2020). Every run carves the same balanced
validation split (``--val_per_class``) from the training data; tau is chosen there.
Prints top-1, BER and many/medium/few (mean ± std over seeds, %), writes ``table.json``
and a plot (``--plot``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("accuracy", "balanced_error_rate", "many_shot", "medium_shot", "few_shot")
NAMES = ("top-1", "BER", "many", "medium", "few")

# run name -> (variant keys, needs the CE run first)
RUNS = {
    "ce": ("loss=ce,stages=posthoc+tau_norm+ncm+crt", False),
    "ce_lws": ("loss=ce,stages=lws", True),
    "wce": ("loss=wce", False),
    "wce_sqrt": ("loss=wce_sqrt", False),
    "focal": ("loss=focal", False),
    "cb": ("loss=cb", False),
    "ldam_drw": ("loss=ldam_drw", False),
    "focal_drw": ("loss=focal_drw", False),
    "la": ("loss=la", False),
    "bs": ("loss=bs", False),
    "bbn": ("bbn", False),
    "mixup": ("mix=mixup", False),
    "remix": ("mix=remix", False),
    # issue 14: weight balancing (stage 1 = the joint CE with wd 5e-3, stage 2 = wb), dataset-level
    # re-sampling, and the cached-feature stages on the CE run's representation
    "wb": ("wb", False),
    "rus": ("sampler=under", False),
    "ros": ("sampler=over", False),
    "ce_feat": ("stages=smote_crt+meta_sampler", True),
}
# table row -> (run, stage or None for the joint model); no commas in row names (--rows splits on them)
ROWS = {
    "CE": ("ce", None),
    "weighted CE (inverse)": ("wce", None),
    "weighted CE (sqrt)": ("wce_sqrt", None),
    "focal (gamma 1)": ("focal", None),
    "Class-Balanced CE": ("cb", None),
    "LDAM-DRW": ("ldam_drw", None),
    "focal-DRW (LDAM-DRW FocalLoss)": ("focal_drw", None),
    "logit-adjusted loss": ("la", None),
    "Balanced Softmax": ("bs", None),
    "CE + post-hoc LA": ("ce", "posthoc"),
    "CE + cRT": ("ce", "crt"),
    "CE + tau-norm": ("ce", "tau_norm"),
    "CE + LWS": ("ce_lws", "lws"),
    "CE + NCM": ("ce", "ncm"),
    "BBN": ("bbn", None),
    "Mixup": ("mixup", None),
    "Remix": ("remix", None),
    "WB stage 1 (CE wd 5e-3)": ("wb", None),
    "WB stages 1+2 (MaxNorm + CB + wd 0.1)": ("wb", "wb"),
    "random under-sampling": ("rus", None),
    "random over-sampling": ("ros", None),
    "CE + SMOTE-cRT (cached features)": ("ce_feat", "smote_crt"),
    "CE + Meta Sampler (BALMS; cached features)": ("ce_feat", "meta_sampler"),
}


def _done_file(workdir: str, variant: str) -> str:
  return os.path.join(workdir, "stages_summary.json" if "stages=" in variant else "summary.json")


def run(args, name: str, seed: int) -> dict:
  """Runs (or resumes, or skips) one training run; returns its summaries by stage."""
  variant, needs_ce = RUNS[name]
  workdir = os.path.join(args.root, f"{name}_seed{seed}")
  done = _done_file(workdir, variant)
  if not os.path.exists(done):
    base = f"{args.variant}," if args.variant else ""
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={args.config}:{base}{variant},seed={seed}",
           f"--workdir={workdir}", "--config.quiet=true", "--config.plots=false",
           f"--config.dataset.val_per_class={args.val_per_class}", *args.overrides]
    if needs_ce:
      cmd.append(f"--config.init_from={os.path.join(args.root, f'ce_seed{seed}')}")
    print("+", " ".join(cmd), flush=True)
    with open(os.path.join(args.root, f"{name}_seed{seed}.log"), "w") as log:
      subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  with open(done) as f:
    out = json.load(f)
  if "stages=" not in variant:
    out = {"joint": out}
  minutes = (os.path.getmtime(done) - os.path.getmtime(os.path.join(workdir, "train_counts.json"))) / 60
  return {"minutes": minutes, **out}


def collect(args, seeds: list[int]) -> dict:
  """Runs everything (``--jobs`` at a time; LWS after its CE run) and gathers the summaries."""
  os.makedirs(args.root, exist_ok=True)
  names = [n for n in RUNS if any(ROWS[r][0] == n for r in args.rows)]
  first = [(n, s) for n in names if not RUNS[n][1] for s in seeds]
  second = [(n, s) for n in names if RUNS[n][1] for s in seeds]
  results = {}
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for batch in (first, second):
      futures = {pool.submit(run, args, n, s): (n, s) for n, s in batch}
      for fut in concurrent.futures.as_completed(futures):
        results[futures[fut]] = fut.result()
  return results


def table(args, seeds: list[int], results: dict) -> dict:
  out = {}
  for row in args.rows:
    name, stage = ROWS[row]
    per_seed = [results[(name, s)][stage or "joint"] for s in seeds]
    out[row] = {k: [100 * r[k] for r in per_seed if np.isfinite(r.get(k, np.nan))] for k in KEYS}
    out[row]["minutes"] = [results[(name, s)]["minutes"] for s in seeds]
    out[row]["run"], out[row]["stage"] = name, stage
  return out


def print_table(title: str, rows: dict) -> None:
  print(f"\n{title}")
  print(f"| method | " + " | ".join(NAMES) + " | min/run |")
  print("|---|" + "---|" * (len(NAMES) + 1))
  for row, cols in rows.items():
    cells = [f"{np.mean(cols[k]):.2f} ± {np.std(cols[k]):.2f}" if cols[k] else "n/a" for k in KEYS]
    print(f"| {row} | " + " | ".join(cells) + f" | {np.mean(cols['minutes']):.1f} |")


def plot(rows: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(rows)
  fig, ax = plt.subplots(figsize=(9, 4.5))
  x = np.arange(len(names))
  width = 0.27
  for i, (k, label) in enumerate((("balanced_error_rate", "BER"), ("many_shot", "many-shot acc"),
                                  ("medium_shot", "medium-shot acc"))):
    mean = [np.mean(rows[n][k]) if rows[n][k] else np.nan for n in names]
    std = [np.std(rows[n][k]) if rows[n][k] else 0 for n in names]
    ax.bar(x + (i - 1) * width, mean, width, yerr=std, label=label, capsize=2)
  ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
  ax.set_ylabel("%")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/fashion_mnist_lt.py")
  p.add_argument("--variant", default="", help="variant keys added to every run, e.g. epochs=4")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--root", default="runs/reproduce")
  p.add_argument("--rows", default=",".join(ROWS), help="comma-separated table rows (default: all)")
  p.add_argument("--val_per_class", type=int, default=20)
  p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
  p.add_argument("--plot", default="", help="PNG path for the bar chart (default: <root>/table.png)")
  args, args.overrides = p.parse_known_args()
  args.rows = [r for r in args.rows.split(",") if r]  # row names never contain a comma (checked below)
  unknown = [r for r in args.rows if r not in ROWS]
  if unknown:
    p.error(f"unknown rows {unknown}; valid rows: {list(ROWS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = table(args, seeds, collect(args, seeds))
  title = f"{args.config}:{args.variant} seeds {seeds}, test set (mean ± std over seeds, %)"
  print_table(title, rows)
  with open(os.path.join(args.root, "table.json"), "w") as f:
    json.dump({"title": title, "rows": rows}, f, indent=2)
  plot(rows, args.plot or os.path.join(args.root, "table.png"), title)


if __name__ == "__main__":
  main()

r"""The reproduction table: every long-tail method of the seeds on one recipe, several seeds.

  python bench/reproduce.py --config=configs/fashion_mnist_lt.py --variant=epochs=4 \
      --seeds=0,1,2 --root=runs/reproduce --jobs=2
  python bench/reproduce.py --config=configs/cifar_lt.py --variant=dataset=cifar10 \
      --root=runs/c10_reproduce          # the standard 200-epoch recipe (needs CIFAR + an accelerator)

``--mode=population`` (default): the seeds of every method family train as one population
(:mod:`lt_jax.train.population`, one ``launch.py`` process per family in
``<root>/population_<runs>``): runs that differ only in their loss and share the model (e.g. CE,
weighted CE, focal, CB, LA, Balanced Softmax: one population; LDAM-DRW's cosine head, BBN, Mixup
and Remix: one each) x ``--seeds``. On CPU the population runs each member's own single-run program
(``vectorize='unroll'``), so its numbers are bit-identical to the per-process runs'. The decoupled
rows are stages of a process per seed that starts from the population's CE member
(``--config.init_from=<population>/members/ce_seed<k>``). ``--mode=process``: each training run is a
separate ``launch.py`` process in ``<root>/<run>_seed<k>`` (``--jobs`` at a time), the CE run with
its stages; LWS initialised from it.

In both modes finished runs are skipped and interrupted ones resume. The decoupled rows share the
CE run's representation, as in Kang et al. (ICLR 2020). Every run carves the same balanced
validation split (``--val_per_class``) from the training data; tau is chosen there.
Prints top-1, BER and many/medium/few (mean ± std over seeds, %) with the training minutes per run
(a population's wall time divided by its members), writes ``table.json`` and a plot (``--plot``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
from typing import Any

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
    "ride": ("loss=ride_drw,test_agnostic", False),  # 3 experts; the test-agnostic table in summary.json
    "sade": ("loss=sade", False),                    # 3 experts; + test-time aggregation (test_agnostic)
    # contrastive joint stages (lt_jax.train.contrastive); SimCLR/SupCon train no classifier themselves
    "simclr": ("contrastive=simclr,stages=crt+finetune", False),
    "supcon": ("contrastive=supcon,stages=crt", False),
    "bcl": ("contrastive=bcl", False),
    "paco": ("contrastive=paco", False),
    # issue 14: weight balancing (stage 1 = the joint CE with wd 5e-3, stage 2 = wb), dataset-level
    # re-sampling, and the cached-feature stages on the CE run's representation
    "wb": ("wb", False),
    "rus": ("sampler=under", False),
    "ros": ("sampler=over", False),
    "ce_feat": ("stages=smote_crt+meta_sampler", True),
    "mwnet": ("mwnet", False),                                  # meta set = the validation split
    "ce_recal": ("loss=ce,stages=posterior_recal", True),       # evaluates the CE run's model
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
    "RIDE (3 experts)": ("ride", None),
    "SADE (3 experts; mean of experts)": ("sade", None),
    "SimCLR + cRT": ("simclr", "crt"),
    "SimCLR + fine-tune (CE)": ("simclr", "finetune"),
    "SupCon + cRT": ("supcon", "crt"),
    "BCL": ("bcl", None),
    "PaCo": ("paco", None),
    "WB stage 1 (CE wd 5e-3)": ("wb", None),
    "WB stages 1+2 (MaxNorm + CB + wd 0.1)": ("wb", "wb"),
    "random under-sampling": ("rus", None),
    "random over-sampling": ("ros", None),
    "CE + SMOTE-cRT (cached features)": ("ce_feat", "smote_crt"),
    "CE + Meta Sampler (BALMS; cached features)": ("ce_feat", "meta_sampler"),
    "MW-Net": ("mwnet", None),
    "CE + posterior re-calibration": ("ce_recal", "posterior_recal"),
}
assert not any("," in row for row in ROWS), "--rows splits on commas"


def _done_file(workdir: str, variant: str) -> str:
  return os.path.join(workdir, "stages_summary.json" if "stages=" in variant else "summary.json")


def run(args, name: str, seed: int, init_from: str = "") -> dict:
  """Runs (or resumes, or skips) one training run; returns its summaries by stage.

  ``init_from``: the CE model to start the stages from (a population member's directory);
  default, for runs that need it, the CE run ``<root>/ce_seed<k>``.
  """
  variant, needs_ce = RUNS[name]
  if init_from and not needs_ce:  # the joint stage comes from the population
    variant = ",".join(i for i in variant.split(",") if not i.startswith("loss="))
  workdir = os.path.join(args.root, f"{name}_seed{seed}" + ("_from_population" if init_from else ""))
  done = _done_file(workdir, variant)
  if not os.path.exists(done):
    base = f"{args.variant}," if args.variant else ""
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={args.config}:{base}{variant},seed={seed}",
           f"--workdir={workdir}", "--config.quiet=true", "--config.plots=false",
           f"--config.dataset.val_per_class={args.val_per_class}", *args.overrides]
    if needs_ce or init_from:
      cmd.append(f"--config.init_from={init_from or os.path.join(args.root, f'ce_seed{seed}')}")
    print("+", " ".join(cmd), flush=True)
    with open(workdir + ".log", "w") as log:
      subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  with open(done) as f:
    out = json.load(f)
  if "stages=" not in variant:
    out = {"joint": out}
  minutes = (os.path.getmtime(done) - os.path.getmtime(os.path.join(workdir, "train_counts.json"))) / 60
  return {"minutes": minutes, **out}


def _variant_items(variant: str) -> dict:
  return dict(item.partition("=")[::2] for item in variant.split(",") if item)


def _join(items: dict) -> str:
  return ",".join(f"{k}={v}" if v else k for k, v in items.items())


def families(args, names: list[str]) -> list[list[str]]:
  """Groups the trained runs (stages stripped) into populations: same variant but the loss, and a
  model the losses share (:func:`population.shared_differences`), in ``RUNS`` order."""
  from lt_jax.train import population
  mod = _config_module(args.config)
  groups: list[tuple[str, Any, list[str]]] = []
  for name in names:
    items = _variant_items(RUNS[name][0])
    items.pop("stages", None)
    rest = _join({k: v for k, v in items.items() if k != "loss"})
    c = mod.get_config(",".join(filter(None, [args.variant, _join(items)])))
    for key, first, members in groups:
      if key == rest and not population.shared_differences(first, c):
        members.append(name)
        break
    else:
      groups.append((rest, c, [name]))
  return [members for _, _, members in groups]


def _config_module(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("reproduce_config", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def run_population(args, names: list[str], seeds: list[int]) -> dict:
  """Trains (or resumes, or skips) one population of ``names`` x ``seeds``; returns per (run, seed)
  its joint summary and the population's training minutes per member."""
  workdir = os.path.join(args.root, "population_" + "+".join(names))
  done = os.path.join(workdir, "population_summary.json")
  items = [_variant_items(RUNS[n][0]) for n in names]
  for it in items:
    it.pop("stages", None)
  rest = _join({k: v for k, v in items[0].items() if k != "loss"})
  losses = [it.get("loss", "") for it in items]
  pop = [f"seeds={'+'.join(map(str, seeds))}"] + ([f"losses={'+'.join(losses)}"] if any(losses) else [])
  if not os.path.exists(done):
    variant = ",".join(filter(None, [args.variant, rest, *pop]))
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={args.config}:{variant}",
           f"--workdir={workdir}", "--config.quiet=true", "--config.plots=false",
           f"--config.dataset.val_per_class={args.val_per_class}", *args.overrides]
    print("+", " ".join(cmd), flush=True)
    with open(workdir + ".log", "w") as log:
      subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  with open(done) as f:
    summary = json.load(f)
  minutes = (os.path.getmtime(done) - os.path.getmtime(os.path.join(workdir, "train_counts.json"))) / 60
  out, rows = {}, summary["members"]
  for i, n in enumerate(names):  # members are variant-major (losses in order), seeds inner
    for j, seed in enumerate(seeds):
      row = rows[i * len(seeds) + j]
      assert row["seed"] == seed, (row["name"], seed)
      out[(n, seed)] = {"minutes": minutes / len(rows), "joint": row,
                        "member_dir": os.path.join(workdir, "members", row["name"])}
  print(f"population {'+'.join(names)} x seeds {seeds}: {minutes:.1f} min for {len(rows)} members "
        f"({minutes / len(rows):.1f} min per member)", flush=True)
  return out


def collect_population(args, seeds: list[int]) -> dict:
  """``--mode=population``: one population per family, then the stage runs per seed (``--jobs`` at a time)."""
  os.makedirs(args.root, exist_ok=True)
  needed = [n for n in RUNS if any(ROWS[r][0] == n for r in args.rows)]
  staged = [n for n in needed if "stages=" in RUNS[n][0] or RUNS[n][1]]
  trained = [n for n in needed if not RUNS[n][1]]  # the CE run's joint model trains in its family
  results = {}
  for fam in families(args, trained):
    results.update(run_population(args, fam, seeds))
  jobs = [(n, s) for n in staged for s in seeds]
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {pool.submit(run, args, n, s, results[("ce", s)]["member_dir"]): (n, s) for n, s in jobs}
    for fut in concurrent.futures.as_completed(futures):
      n, s = futures[fut]
      staged_out = fut.result()
      trained = results.get((n, s), {})  # the population's joint model and minutes, if it trained this run
      results[(n, s)] = {**staged_out, "joint": trained.get("joint", staged_out.get("joint")),
                         "minutes": trained.get("minutes", staged_out["minutes"])}
  return results


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
  p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (process mode; stage runs)")
  p.add_argument("--mode", default="population", choices=("population", "process"),
                 help="population: the seeds of each method family as one population (default); "
                      "process: one launch.py process per run and seed")
  p.add_argument("--plot", default="", help="PNG path for the bar chart (default: <root>/table.png)")
  args, args.overrides = p.parse_known_args()
  args.rows = [r for r in args.rows.split(",") if r]  # no row name contains a comma (asserted below ROWS)
  unknown = [r for r in args.rows if r not in ROWS]
  if unknown:
    p.error(f"unknown rows {unknown}; valid rows: {list(ROWS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = table(args, seeds, (collect_population if args.mode == "population" else collect)(args, seeds))
  title = f"{args.config}:{args.variant} seeds {seeds}, test set (mean ± std over seeds, %)"
  print_table(title, rows)
  with open(os.path.join(args.root, "table.json"), "w") as f:
    json.dump({"title": title, "rows": rows}, f, indent=2)
  plot(rows, args.plot or os.path.join(args.root, "table.png"), title)


if __name__ == "__main__":
  main()

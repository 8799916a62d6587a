r"""The test-agnostic table (SADE's protocol) of finished runs, mean ± std over seeds.

  python bench/test_agnostic.py --root=runs/reproduce --seeds=0,1,2

For every run ``<root>/<run>_seed<k>`` of :data:`ROWS`: the ``test_agnostic`` entry of its
``summary.json`` when the run had the evaluator (``test_agnostic`` variant; ``loss=sade`` always
has it), otherwise the evaluator (``lt_jax.train.evaluators.test_agnostic``, recall mode) is run
on the run's final checkpoint and written to ``<run dir>/test_agnostic.json``. This is exact for
models that do not adapt at test time (the protocol's accuracies follow from the per-class recall);
SADE's rows need the aggregation and come from its run. Prints a markdown table (%) and writes
``<root>/test_agnostic_table.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import ml_collections
import numpy as np

# table row -> (run, summary key prefix); "" = the model itself.
ROWS = {
    "CE": ("ce", ""),
    "CE + post-hoc LA to the known test prior": ("ce", "posthoc_"),
    "logit-adjusted loss": ("la", ""),
    "LA + known test prior (z + log pi')": ("la", "posthoc_"),
    "RIDE (3 experts)": ("ride", ""),
    "SADE: mean of experts (no aggregation)": ("sade", "no_aggregation_"),
    "SADE + test-time aggregation": ("sade", ""),
}


def evaluate_checkpoint(workdir: str) -> dict:
  """Runs the test-agnostic evaluator (recall mode) on the final checkpoint of the run in ``workdir``."""
  from lt_jax.train import config as config_lib, evaluators, trainer
  from lt_jax.train.state import make_mesh
  config = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
  mesh = make_mesh(1)
  ds = trainer.load_dataset(config)
  model = trainer.build_model(config, ds.num_classes)
  variables = trainer.load_variables(workdir, config, model, ds.train_images.shape[1:], mesh)
  ctx = evaluators.EvalContext(model=model, splits=evaluators.MemorySplits(ds), mesh=mesh, counts=np.asarray(ds.counts),
                               num_classes=ds.num_classes, mean=tuple(ds.mean), std=tuple(ds.std), batch_size=500,
                               block=False, log=print, outputs=evaluators.OutputCache())
  probe = ml_collections.ConfigDict({"loss": {"name": config.loss.name}, "augment": config.augment,
                                     "evals": ml_collections.ConfigDict()})
  config_lib.add_test_agnostic(probe)  # the same settings as the variant (train_prior_tau by loss)
  settings = probe.evals.test_agnostic.to_dict()
  for k in ("type", "every_steps"):
    settings.pop(k)
  return evaluators.make("test_agnostic", ctx, **settings).evaluate(variables).summary


def table_of(workdir: str) -> dict:
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  if "test_agnostic" in summary:
    return summary["test_agnostic"]
  path = os.path.join(workdir, "test_agnostic.json")
  if not os.path.exists(path):
    with open(path, "w") as f:
      json.dump(evaluate_checkpoint(workdir), f, indent=2)
  return json.load(open(path))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="runs/reproduce")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rows", default=",".join(ROWS))
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",")]
  rows = [r for r in a.rows.split(",") if r]
  out, names = {}, None
  for row in rows:
    run, prefix = ROWS[row]
    tables = [table_of(os.path.join(a.root, f"{run}_seed{s}")) for s in seeds
              if os.path.exists(os.path.join(a.root, f"{run}_seed{s}", "summary.json"))]
    if not tables:
      print(f"(no finished runs for {row!r})")
      continue
    dists = tables[0]["distributions"]
    names = names or dists
    out[row] = {d: [100 * t[prefix + d] for t in tables] for d in dists}
    if prefix == "" and "weights_" + dists[0] in tables[0]:
      out[row]["weights"] = {d: np.mean([t["weights_" + d] for t in tables], 0).round(3).tolist() for d in dists}
  print(f"\ntest-agnostic accuracy (%), {a.root}, seeds {seeds}: mean ± std")
  print("| method | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
  for row, cols in out.items():
    print(f"| {row} | " + " | ".join(f"{np.mean(cols[d]):.2f} ± {np.std(cols[d]):.2f}" if d in cols else "n/a"
                                     for d in names) + " |")
  for row, cols in out.items():
    if "weights" in cols:
      print(f"\n{row}: mean expert weights " + ", ".join(f"{d} {w}" for d, w in cols["weights"].items()))
  with open(os.path.join(a.root, "test_agnostic_table.json"), "w") as f:
    json.dump({"seeds": seeds, "rows": out}, f, indent=2)


if __name__ == "__main__":
  main()

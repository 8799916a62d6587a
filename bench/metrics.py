"""Benchmark: BER and macro-F1 of 1,000,000 predictions, lt_jax (jitted) vs scikit-learn.

Run from the repository root:

    python bench/metrics.py                  # 1M predictions, C = 1000 and 8142 (iNaturalist 2018)
    python bench/metrics.py --n 200000 --classes 100 1000 --repeats 3

Measured side by side in one process on the same data (uniform labels, ~60% correct):

* scikit-learn: ``1 - balanced_accuracy_score(y, yhat)`` and ``f1_score(y, yhat, average='macro')``
  on NumPy int32 arrays, best of ``--sk-repeats``.
* lt_jax ``counts``: :func:`lt_jax.metrics.per_class_counts` (three ``(C,)`` scatter-adds, no
  ``C x C`` matrix) then the metric, one jitted function per metric; best of ``--repeats``.
  Timed twice: inputs already on device (an eval loop that accumulates on device) and
  from NumPy (host-to-device copy included). The first call (trace + compile) is timed
  separately and excluded from the best-of.
* lt_jax ``dense``: :func:`lt_jax.metrics.confusion_matrix` (``4 C^2`` bytes, 265 MB at
  C = 8142) then the metric, device-resident inputs.

Values are checked against scikit-learn (|diff| < 1e-5). The speed ratio is sklearn time /
lt_jax time. Wall-clock on a shared machine is noisy: best-of is reported.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import jax
from sklearn.metrics import balanced_accuracy_score, f1_score

from lt_jax import metrics as M


def _best(fn, repeats: int) -> tuple[float, object]:
  best, out = float("inf"), None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


def _timed_first(fn) -> tuple[float, object]:
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def bench_one(n: int, C: int, repeats: int, sk_repeats: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  y = rng.integers(0, C, n).astype(np.int32)
  yhat = np.where(rng.random(n) < 0.6, y, rng.integers(0, C, n)).astype(np.int32)
  y_dev, yhat_dev = jax.device_put(y), jax.device_put(yhat)
  jax.block_until_ready((y_dev, yhat_dev))

  jax_fns = {
      "BER": {
          "counts": jax.jit(lambda a, b: M.balanced_error_rate(M.per_class_counts(a, b, C))),
          "dense": jax.jit(lambda a, b: M.balanced_error_rate(M.confusion_matrix(a, b, C))),
      },
      "macro-F1": {
          "counts": jax.jit(lambda a, b: M.macro_f1(M.per_class_counts(a, b, C))),
          "dense": jax.jit(lambda a, b: M.macro_f1(M.confusion_matrix(a, b, C))),
      },
  }
  sk_fns = {"BER": lambda: 1.0 - balanced_accuracy_score(y, yhat),
            "macro-F1": lambda: f1_score(y, yhat, average="macro")}

  rows = []
  for metric in ("BER", "macro-F1"):
    sk_t, sk_val = _best(sk_fns[metric], sk_repeats)
    row = {"metric": metric, "C": C, "n": n, "sklearn_s": sk_t, "sklearn_val": float(sk_val)}
    for path, f in jax_fns[metric].items():
      compile_t, val = _timed_first(lambda: float(f(y_dev, yhat_dev)))
      t_dev, val = _best(lambda: float(f(y_dev, yhat_dev)), repeats)
      if abs(val - sk_val) > 1e-5:
        raise AssertionError(f"{metric} C={C} {path}: lt_jax {val} != sklearn {sk_val}")
      row[f"{path}_first_s"] = compile_t
      row[f"{path}_s"] = t_dev
      row[f"{path}_val"] = val
      if path == "counts":
        row["counts_host_s"], _ = _best(lambda: float(f(y, yhat)), repeats)
    rows.append(row)
  return rows


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=1_000_000, help="number of predictions")
  ap.add_argument("--classes", type=int, nargs="+", default=[1000, 8142])
  ap.add_argument("--repeats", type=int, default=10, help="lt_jax best-of repeats")
  ap.add_argument("--sk-repeats", type=int, default=3, help="scikit-learn best-of repeats")
  args = ap.parse_args(argv)

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores; "
        f"n = {args.n:,} predictions; best of {args.sk_repeats} (sklearn) / {args.repeats} (lt_jax)")
  rows = [r for C in args.classes for r in bench_one(args.n, C, args.repeats, args.sk_repeats)]

  hdr = (f"{'metric':<9}{'C':>6} | {'sklearn':>9} | {'counts dev':>10} {'ratio':>7} | {'counts host':>11} "
         f"{'ratio':>7} | {'dense dev':>9} {'ratio':>6} | {'1st call (compile)':>18}")
  print()
  print(hdr)
  print("-" * len(hdr))
  ms = lambda s: f"{1e3 * s:8.1f}ms"  # noqa: E731
  for r in rows:
    print(f"{r['metric']:<9}{r['C']:>6} | {ms(r['sklearn_s']):>9} | {ms(r['counts_s']):>10} "
          f"{r['sklearn_s'] / r['counts_s']:>6.0f}x | {ms(r['counts_host_s']):>11} "
          f"{r['sklearn_s'] / r['counts_host_s']:>6.0f}x | {ms(r['dense_s']):>9} "
          f"{r['sklearn_s'] / r['dense_s']:>5.1f}x | counts {ms(r['counts_first_s']).strip()}, "
          f"dense {ms(r['dense_first_s']).strip()}")
  print()
  for r in rows:
    print(f"{r['metric']:<9}C={r['C']:<5} value sklearn {r['sklearn_val']:.7f}  lt_jax counts "
          f"{r['counts_val']:.7f}  dense {r['dense_val']:.7f}")


if __name__ == "__main__":
  main()

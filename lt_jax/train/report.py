"""Run outputs: JSON-lines metrics, TensorBoard summaries, summary table and PNG plots.

Only process 0 writes (the trainer passes ``enabled=False`` elsewhere).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class MetricWriter:
  """Appends ``{"step": s, "split": ..., **scalars}`` to ``metrics.jsonl`` and TensorBoard.

  One line per ``(step, split)``: a resumed run first drops the lines of the steps after its
  checkpoint (``resume(step)``: they are replayed), and a line already written for the same
  step and split (e.g. the final evaluation of a finished stage, re-run when stages are
  added) is not written again.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._seen: set[tuple[int, str]] = set()
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._path = os.path.join(workdir, "metrics.jsonl")
      self._seen = {(r["step"], r["split"]) for r in self._read()}
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _read(self) -> list[dict]:
    if not os.path.exists(self._path):
      return []
    out = []
    with open(self._path) as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: dropped
          pass
    return out

  def resume(self, step: int) -> None:
    """Drops the lines of steps after ``step`` (the run restarts from its checkpoint there)."""
    if not self.enabled:
      return
    keep = [r for r in self._read() if r["step"] <= step]
    lines = sum(1 for _ in open(self._path)) if os.path.exists(self._path) else 0
    if len(keep) != lines:  # later steps (or a cut line) to drop
      tmp = self._path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
      os.replace(tmp, self._path)
    self._seen = {(r["step"], r["split"]) for r in keep}

  def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
    if not self.enabled or (int(step), split) in self._seen:
      return
    self._seen.add((int(step), split))
    clean = {k: _to_python(v) for k, v in scalars.items()}
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
    for k, v in clean.items():
      if isinstance(v, (int, float)) and np.isfinite(v):
        self._tb.add_scalar(f"{split}/{k}", v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _to_python(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename), so readers never see half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=_to_python)
  os.replace(tmp, path)


SUMMARY_NAMES = (("accuracy", "top-1 accuracy"), ("balanced_accuracy", "balanced accuracy"),
                 ("balanced_error_rate", "BER"), ("macro_f1", "macro-F1"),
                 ("many_shot", "many-shot acc"), ("medium_shot", "medium-shot acc"),
                 ("few_shot", "few-shot acc"), ("ece", "ECE"), ("nll", "NLL"))


def summary_table(summary: dict[str, float], title: str) -> str:
  """A fixed-width table of the final evaluation metrics."""
  lines = [title, "-" * 34]
  for key, name in SUMMARY_NAMES:
    if key in summary:
      value = summary[key]
      lines.append(f"{name:<18} {value:>14.4f}" if np.isfinite(value) else f"{name:<18} {'n/a':>14}")
  lines.append("-" * 34)
  return "\n".join(lines)


def stages_table(summaries: dict[str, dict[str, float]]) -> str:
  """One row per stage (joint model first): top-1, BER and many/medium/few accuracy."""
  cols = (("accuracy", "top-1"), ("balanced_error_rate", "BER"), ("many_shot", "many"),
          ("medium_shot", "medium"), ("few_shot", "few"))
  width = max([10] + [len(stage) + 1 for stage in summaries])   # 'meta_sampler' is longer than 10
  lines = [f"{'stage':<{width}}" + "".join(f"{name:>9}" for _, name in cols)]
  for stage, s in summaries.items():
    cells = "".join(f"{s[k]:>9.4f}" if np.isfinite(s.get(k, np.nan)) else f"{'n/a':>9}" for k, _ in cols)
    lines.append(f"{stage:<{width}}{cells}")
  return "\n".join(lines)


def save_plots(workdir: str, counts: np.ndarray, per_class_acc: np.ndarray,
               weight_norms: np.ndarray | None, confusion: np.ndarray, class_names=None) -> list[str]:
  """Per-class accuracy and classifier weight norm against training count; confusion matrix."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  counts = np.asarray(counts)
  order = np.argsort(-counts, kind="stable")
  paths = []

  fig, ax = plt.subplots(figsize=(7, 4))
  ax2 = ax.twinx()
  ax2.bar(np.arange(len(counts)), counts[order], color="0.85", label="training count")
  ax2.set_yscale("log")
  ax2.set_ylabel("training examples (log)")
  ax.plot(np.arange(len(counts)), per_class_acc[order], "o-", color="C0", label="test accuracy")
  ax.set_ylim(0, 1)
  ax.set_zorder(ax2.get_zorder() + 1)
  ax.patch.set_visible(False)
  ax.set_xlabel("class, sorted by training count")
  ax.set_ylabel("per-class test accuracy")
  ax.set_title("Per-class accuracy vs class size")
  paths.append(_save(fig, workdir, "per_class_accuracy.png"))

  if weight_norms is not None:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(counts, weight_norms)
    ax.set_xscale("log")
    ax.set_xlabel("training examples of the class (log)")
    ax.set_ylabel("classifier weight norm ||w_c||")
    ax.set_title("Classifier norm vs class size")
    paths.append(_save(fig, workdir, "weight_norms.png"))

  fig, ax = plt.subplots(figsize=(5.5, 5))
  cm = np.asarray(confusion, np.float64)
  cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(im, ax=ax, fraction=0.046)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title("Confusion matrix (row-normalised)")
  if class_names is not None and len(class_names) <= 20:
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
  paths.append(_save(fig, workdir, "confusion_matrix.png"))
  return paths


def _save(fig, workdir: str, name: str) -> str:
  path = os.path.join(workdir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path

"""Classification evaluator: confusion-matrix, calibration and NLL sums -> every metric we report.

Top-1, balanced error rate, balanced accuracy, macro-F1, many/medium/few-shot accuracy, ECE
and NLL all derive from these additive sums (:func:`lt_jax.metrics.summarize`), accumulated on
device over padded, masked batches.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax import metrics as metrics_lib
from lt_jax.data import augment
from lt_jax.models import cpu_compiler_options
from lt_jax.train.evaluators.common import EvalResult, Evaluator


class EvalSums(NamedTuple):
  """Additive evaluation statistics (sums and counts, never averages)."""
  confusion: jax.Array                   # (C, C) int32, rows = true class
  calibration: metrics_lib.CalibrationCounts
  nll: metrics_lib.NLLSums


def sums_from_logits(logits: jax.Array, labels: jax.Array, num_classes: int, mask: jax.Array | None = None,
                     num_bins: int = 15) -> EvalSums:
  """:class:`EvalSums` of a batch of logits (confusion matrix, calibration bins, NLL sums)."""
  logits = logits.astype(jnp.float32)
  return EvalSums(
      confusion=metrics_lib.confusion_matrix(labels, jnp.argmax(logits, -1), num_classes, mask=mask),
      calibration=metrics_lib.calibration_counts(logits, labels, num_bins, mask=mask, from_logits=True),
      nll=metrics_lib.nll_sums(logits, labels, mask=mask, from_logits=True))


def summarize(sums: EvalSums, train_counts: np.ndarray) -> dict[str, Any]:
  """Scalar metrics (and per-class accuracy) from accumulated evaluation sums."""
  s = metrics_lib.summarize(sums.confusion, train_counts, calibration=sums.calibration, nll=sums.nll)
  return {k: float(v) for k, v in jax.device_get(s).items()}


def make_eval_step(model, num_classes: int, mean, std, num_bins: int = 15, logit_fn=None):
  """``eval_step(variables, images, labels, mask) -> EvalSums`` of one (sharded) batch, jitted.

  ``logit_fn``: model outputs -> ``(B, num_classes)`` class scores (default: the outputs).
  Inputs arrive batch-sharded; XLA reduces the sums across devices.
  """
  return jax.jit(eval_step_fn(model, num_classes, mean, std, num_bins, logit_fn),
                 compiler_options=cpu_compiler_options())


def eval_step_fn(model, num_classes: int, mean, std, num_bins: int = 15, logit_fn=None):
  """:func:`make_eval_step`'s function, not jitted (a population vmaps it over its members)."""
  def eval_step(variables, images, labels, mask):
    logits, _ = model.apply(variables, augment.normalize(images, mean, std), train=False)
    if logit_fn is not None:
      logits = logit_fn(logits)
    return sums_from_logits(logits, labels, num_classes, mask, num_bins)

  return eval_step


def result_of_logits(ctx, logits: np.ndarray, labels: np.ndarray) -> EvalResult:
  """The classification result of whole-split logits (sweep evaluators' chosen classifier)."""
  sums = sums_from_logits(jnp.asarray(logits), jnp.asarray(labels), ctx.num_classes)
  return EvalResult(summarize(sums, ctx.counts), sums)


class ClassificationEvaluator(Evaluator):
  """Settings: ``split`` (default ``'test'``), ``num_bins`` (ECE bins, 15)."""

  def __init__(self, ctx, split: str = "test", num_bins: int = 15):
    super().__init__(ctx, split=split, num_bins=num_bins)
    self.split = split
    self._step = make_eval_step(ctx.model, ctx.num_classes, ctx.mean, ctx.std, num_bins, ctx.logit_fn)

  def evaluate(self, variables) -> EvalResult:
    sums = self.ctx.sum_batches(self._step, variables, self.split)
    return EvalResult(summarize(sums, self.ctx.counts), sums)

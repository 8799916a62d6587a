"""DIR evaluator: per-bin sums of |e|, e², log|e| -> MAE / MSE / geometric-mean error overall and
for many / medium / few-shot target bins (Yang et al., "Delving into Deep Imbalanced
Regression", ICML 2021). Eval-mode BatchNorm, no FDS (FDS calibrates training features only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lt_jax import regression
from lt_jax.data import augment
from lt_jax.models import cpu_compiler_options
from lt_jax.train.evaluators.common import EvalResult, Evaluator


def make_eval_step(model, spec, num_bins: int):
  """``eval_step(variables, images, targets, mask) -> RegressionSums``."""
  from lt_jax.train.regression_trainer import features, predict
  edges = jnp.asarray(spec.edges, jnp.float32)

  def eval_step(variables, images, targets, mask):
    x = augment.normalize(images, spec.mean, spec.std)
    f, _ = features(model, variables["params"], variables["batch_stats"], x, train=False)
    pred = predict(variables["params"], f, spec)
    return regression.regression_sums(pred, targets, regression.bin_index(targets, edges), num_bins, mask)

  return jax.jit(eval_step, compiler_options=cpu_compiler_options())


class RegressionEvaluator(Evaluator):
  """Settings: ``split`` (``'val'`` or ``'test'``). Reads ``ctx.extra['spec']`` (bin edges, target
  scale) and ``ctx.extra['many']`` / ``['few']`` (shot thresholds per bin)."""

  def __init__(self, ctx, split: str = "test"):
    super().__init__(ctx, split=split)
    self.split = split
    spec = ctx.extra["spec"]
    self._step = make_eval_step(ctx.model, spec, len(spec.edges) - 1)

  def evaluate(self, variables) -> EvalResult:
    sums = self.ctx.sum_batches(self._step, variables, self.split)
    s = regression.regression_summary(sums, self.ctx.counts, self.ctx.extra["many"], self.ctx.extra["few"])
    return EvalResult({k: float(v) for k, v in jax.device_get(s).items()}, sums)

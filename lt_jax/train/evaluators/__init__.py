"""Evaluators as data: ``config.evals.<name> = dict(type=..., every_epochs=..., ...)``.

Each type is one file and one line of :data:`EVALUATORS`; the loop runs the ones with a
cadence during training (``every_epochs`` / ``every_steps``) and every one at the end. The
decoupling stages that train nothing (``tau_norm``, ``posthoc``, ``ncm`` in
``config.stages``) are these evaluators run on the current model.
"""

from __future__ import annotations

from lt_jax.train.evaluators.classification import (ClassificationEvaluator, EvalSums, eval_step_fn,
                                                    make_eval_step, sums_from_logits, summarize)
from lt_jax.train.evaluators.common import EvalContext, EvalResult, Evaluator, MemorySplits, OutputCache, \
    StreamSplits, padded_batches
from lt_jax.train.evaluators.ncm import NCMEvaluator
from lt_jax.train.evaluators.regression import RegressionEvaluator
from lt_jax.train.evaluators.sweeps import GRID, PosteriorRecalEvaluator, PosthocEvaluator, TauNormEvaluator
from lt_jax.train.evaluators.test_agnostic import TestAgnosticEvaluator

EVALUATORS = {
    "classification": ClassificationEvaluator,
    "tau_norm": TauNormEvaluator,
    "posthoc": PosthocEvaluator,
    "ncm": NCMEvaluator,
    "regression": RegressionEvaluator,
    "test_agnostic": TestAgnosticEvaluator,
    "posterior_recal": PosteriorRecalEvaluator,
}
# Evaluators that read whole in-memory splits (not available for streamed datasets).
NEEDS_MEMORY = ("tau_norm", "posthoc", "ncm", "posterior_recal")


def make(type_name: str, ctx: EvalContext, **settings) -> Evaluator:
  """The evaluator ``type_name`` with its settings (unknown names list the valid ones)."""
  if type_name not in EVALUATORS:
    raise ValueError(f"unknown evaluator type {type_name!r}; valid: {', '.join(EVALUATORS)}")
  return EVALUATORS[type_name](ctx, **settings)

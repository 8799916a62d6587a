"""Classifiers derived from a trained model without training, scored on a whole τ grid in one
jitted ``vmap`` and chosen on the validation split (never on test):

* ``tau_norm``: ``z = f · w_c / ||w_c||^τ`` (Kang et al., "Decoupling Representation and
  Classifier for Long-Tailed Recognition", ICLR 2020);
* ``posthoc``: ``argmax z − τ (log π − log π^t)`` (Menon et al., "Long-tail learning via logit
  adjustment", ICLR 2021), ``π^t`` a known target prior (default: balanced);
* ``posterior_recal``: posterior re-calibration ``p^(1−β) (p π^t / π)^β`` (Tian et al.,
  NeurIPS 2020), which is ``posthoc`` with ``τ = β`` (:func:`lt_jax.heads.posterior_recalibrate`).

Each returns the chosen classifier's test summary (plus ``tau``) and, as ``extra``, the full
val and test curves (``sweep.json``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax import decoupled, heads, priors
from lt_jax.train.evaluators.classification import result_of_logits
from lt_jax.train.evaluators.common import EvalResult, Evaluator

GRID = tuple(round(0.1 * i, 1) for i in range(21))  # linspace(0, 2, 21), the reference grid


def _sweep_record(taus, val: dict, test: dict, index: int, select: str) -> dict:
  lists = lambda d: {k: np.asarray(v).tolist() for k, v in jax.device_get(d).items()}
  return {"tau": [float(t) for t in taus], "selected_tau": float(taus[index]), "selected_on": "validation",
          "select": select, "val": lists(val), "test": lists(test)}


class _Sweep(Evaluator):
  name = ""
  grid_name = "tau"

  def __init__(self, ctx, taus=GRID, select: str = "balanced_error_rate", **settings):
    super().__init__(ctx, taus=taus, select=select, **settings)
    self.taus = np.asarray(taus, np.float32)
    self.select = select

  def _finish(self, val, test, logits_at) -> EvalResult:
    i = decoupled.select_on_validation(val, self.select)
    tau = float(self.taus[i])
    res = result_of_logits(self.ctx, np.asarray(logits_at(tau)), self.ctx.splits.arrays("test")[1])
    self.ctx.log(f"{self.name}: {self.grid_name}={self.taus[i]:.2f} chosen on validation")
    return EvalResult({**res.summary, "tau": tau}, res.sums, _sweep_record(self.taus, val, test, i, self.select))


class TauNormEvaluator(_Sweep):
  """Settings: ``taus``, ``select`` (a :data:`lt_jax.decoupled.SELECTION_KEYS` key), ``keep_bias``."""
  name = "tau_norm"

  def __init__(self, ctx, taus=GRID, select: str = "balanced_error_rate", keep_bias: bool = False):
    super().__init__(ctx, taus=taus, select=select, keep_bias=keep_bias)
    self.keep_bias = keep_bias

  def evaluate(self, variables) -> EvalResult:
    head = variables["params"]["head"]
    bias = head.get("bias") if self.keep_bias else None
    outputs = self.ctx.outputs.get(self.ctx, variables)
    kw = dict(bias=bias, train_counts=self.ctx.counts)
    (_, f_val), (_, f_test) = outputs("val"), outputs("test")
    y_val, y_test = self.ctx.splits.arrays("val")[1], self.ctx.splits.arrays("test")[1]
    val = decoupled.tau_norm_sweep(f_val, head["kernel"], y_val, self.taus, **kw)
    test = decoupled.tau_norm_sweep(f_test, head["kernel"], y_test, self.taus, **kw)

    def logits_at(tau):
      z = heads.tau_norm_logits(jnp.asarray(f_test), head["kernel"], tau)
      return z if bias is None else z + bias
    return self._finish(val, test, logits_at)


class PosthocEvaluator(_Sweep):
  """Settings: ``taus``, ``select``, ``target_prior`` (``None`` / empty: balanced target; else the
  target's ``C`` counts or prior, e.g. a known test label distribution)."""
  name = "posthoc"
  adjust = staticmethod(heads.posthoc_adjust)

  def __init__(self, ctx, taus=GRID, select: str = "balanced_error_rate", target_prior=None):
    super().__init__(ctx, taus=taus, select=select, **({} if target_prior is None else
                                                        {"target_prior": target_prior}))
    self.target_prior = None if target_prior is None or not len(target_prior) else \
        np.asarray(target_prior, np.float32)

  def evaluate(self, variables) -> EvalResult:
    outputs = self.ctx.outputs.get(self.ctx, variables)
    (z_val, _), (z_test, _) = outputs("val"), outputs("test")
    y_val, y_test = self.ctx.splits.arrays("val")[1], self.ctx.splits.arrays("test")[1]
    prior, tp = priors.prior(self.ctx.counts), self.target_prior
    val = decoupled.posthoc_sweep(z_val, y_val, prior, self.taus, tp, train_counts=self.ctx.counts)
    test = decoupled.posthoc_sweep(z_test, y_test, prior, self.taus, tp, train_counts=self.ctx.counts)
    return self._finish(val, test, lambda tau: self.adjust(jnp.asarray(z_test), prior, tau, tp))


class PosteriorRecalEvaluator(PosthocEvaluator):
  """Posterior re-calibration (Tian et al., NeurIPS 2020; GT-RIPL/UNO-IC): ``beta`` chosen on the
  validation split as the reference README does. Settings: ``betas``, ``select``, ``target_prior``.

  The same sweep as :class:`PosthocEvaluator` with ``tau = beta`` (the identity of
  :func:`lt_jax.heads.posterior_recalibrate`); the summary carries the chosen ``beta``.
  """
  name = "posterior_recal"
  grid_name = "beta"
  adjust = staticmethod(heads.posterior_recalibrate)

  def __init__(self, ctx, betas=GRID, select: str = "balanced_error_rate", target_prior=None):
    super().__init__(ctx, taus=betas, select=select, target_prior=target_prior)

  def evaluate(self, variables) -> EvalResult:
    res = super().evaluate(variables)
    res.extra["beta"], res.extra["selected_beta"] = res.extra["tau"], res.extra["selected_tau"]
    return EvalResult({**res.summary, "beta": res.summary["tau"]}, res.sums, res.extra)

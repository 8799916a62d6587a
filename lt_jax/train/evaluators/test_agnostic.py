"""Test-agnostic evaluation (SADE, NeurIPS 2022; BalPoE, CVPR 2023): accuracy under forward-LT,
uniform and backward-LT test label distributions (:mod:`lt_jax.test_agnostic`).

Settings: ``split`` ('test'), ``imbalances`` ((50, 25, 10, 5, 2)), ``seed`` (of the resampled
sets and the aggregation), ``train_prior_tau`` (1.0: the post-hoc row removes ``log pi_train``
from a CE model's logits; 0.0 for models trained with logit adjustment / Balanced Softmax),
``resample`` (False), ``aggregate`` (False) and SADE's aggregation settings (``epochs`` 5, ``lr``
0.1, ``batch_size`` 128, ``crop_pad`` 4, ``flip``, ``jitter`` 0.4), ``max_per_class`` (0: the
balanced split's per-class count is ``n_max`` of the resampled sets; > 0 caps it, e.g. in smoke runs).

* Default (a model that does not adapt at test time): one pass over the balanced split; each
  distribution's accuracy is ``sum_c pi'_c recall_c`` and the post-hoc row adjusts the logits to
  each known ``pi'`` before taking the recall.
* ``resample=True``: the same numbers measured on seeded resampled sets
  (:func:`lt_jax.test_agnostic.resampled_indices`); their mean over seeds is the default mode's value.
* ``aggregate=True`` (SADE; a ``*_experts`` model): on each resampled set the expert weights are
  learnt from the set's *images only* (:func:`lt_jax.test_agnostic.fit_aggregation`), then the
  aggregated logits ``sum_i a_i z_i`` are scored; ``no_aggregation_<d>`` is the plain model (mean
  over experts) on the same set, ``weights_<d>`` the learnt ``a``.

Summary keys: ``<d>`` (the model, aggregated with ``aggregate``), ``posthoc_<d>``,
(``no_aggregation_<d>``, ``weights_<d>``), ``distributions``, ``mode``. The trainer puts the whole
summary into ``summary.json`` under the evaluator's name (``in_summary``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax import test_agnostic as ta
from lt_jax.data import augment
from lt_jax.models import cpu_compiler_options
from lt_jax.train.evaluators.common import Evaluator, EvalResult, padded_batches
from lt_jax.train.state import batch_sharded, put_global


class TestAgnosticEvaluator(Evaluator):
  """See the module docstring."""

  in_summary = True  # the table goes into the stage's summary.json

  def __init__(self, ctx, split: str = "test", imbalances=ta.IMBALANCES, seed: int = 0,
               train_prior_tau: float = 1.0, resample: bool = False, aggregate: bool = False,
               epochs: int = 5, lr: float = 0.1, batch_size: int = 128, crop_pad: int = 4, flip: bool = True,
               jitter: float = 0.4, max_per_class: int = 0):
    super().__init__(ctx, split=split, imbalances=tuple(imbalances), seed=seed, train_prior_tau=train_prior_tau,
                     resample=resample, aggregate=aggregate, epochs=epochs, lr=lr, batch_size=batch_size,
                     crop_pad=crop_pad, flip=flip, jitter=jitter, max_per_class=max_per_class)
    self.max_per_class = int(max_per_class)
    self.split, self.seed, self.train_prior_tau = split, int(seed), float(train_prior_tau)
    self.names = ta.distribution_names(imbalances)
    self.resample, self.aggregate = bool(resample) or bool(aggregate), bool(aggregate)
    self.fit_kw = dict(epochs=int(epochs), lr=float(lr), batch_size=int(batch_size))
    self.view_kw = dict(pad=int(crop_pad), flip=bool(flip), jitter=float(jitter))
    model, mean, std = ctx.model, ctx.mean, ctx.std
    opts = cpu_compiler_options()
    self._experts = jax.jit(lambda v, x: model.apply(v, augment.normalize(x, mean, std), train=False,
                                                     experts=True)[0], compiler_options=opts)
    view_kw = self.view_kw
    self._view = jax.jit(lambda v, x, k: model.apply(
        v, augment.normalize(ta.augment_view(k, x, **view_kw), mean, std), train=False, experts=True)[0],
        compiler_options=opts)

  # ------------------------------------------------------------------ helpers
  def _batched(self, fn, images: np.ndarray, *args) -> np.ndarray:
    """``fn(..., batch)`` over padded, batch-sharded batches of ``images``, concatenated on the host."""
    sharding = batch_sharded(self.ctx.mesh)
    out = []
    for b, ((x,), n) in enumerate(padded_batches((images,), self.ctx.batch_size)):
      extra = tuple(jax.random.fold_in(a, b) for a in args)  # one key per batch
      out.append(np.asarray(jax.device_get(fn(put_global(x, sharding), *extra)), np.float32)[:n])
    return np.concatenate(out)

  def _scores(self, logits: np.ndarray) -> np.ndarray:
    fn = self.ctx.logit_fn
    return logits if fn is None else np.asarray(fn(jnp.asarray(logits)))

  def _aggregation_weights(self, variables, images: np.ndarray, key) -> np.ndarray:
    """SADE's test-time weights from the unlabelled ``images`` (no labels reach this function)."""
    def view_logits(k):
      return tuple(self._batched(lambda x, kk: self._view(variables, x, kk), images, jax.random.fold_in(k, v))
                   for v in (0, 1))
    weights, _ = ta.fit_aggregation(view_logits, len(images), key, num_experts=self._num_experts, **self.fit_kw)
    return weights

  # ------------------------------------------------------------------ evaluation
  def evaluate(self, variables) -> EvalResult:
    ctx = self.ctx
    images, labels = ctx.splits.arrays(self.split)
    labels = np.asarray(labels)
    C = ctx.num_classes
    n_max = int(np.min(np.bincount(labels, minlength=C)))
    if self.max_per_class > 0:  # resampled sets of at most this many per class (smoke runs)
      n_max = min(n_max, self.max_per_class)
    train_prior = np.asarray(ctx.counts, np.float64) / np.sum(ctx.counts)
    priors_ = {d: ta.target_prior(ctx.counts, n_max, d) for d in self.names}
    summary: dict = {"distributions": list(self.names), "mode": "recall"}
    if not self.resample:
      z = self._scores(ctx.outputs.get(ctx, variables)(self.split)[0])
      recall = ta.per_class_recall(z, labels, C)
      for d in self.names:
        summary[d] = ta.recall_accuracy(recall, priors_[d])
        adj = ta.posthoc_to_target(z, train_prior, priors_[d], self.train_prior_tau)
        summary[f"posthoc_{d}"] = ta.recall_accuracy(ta.per_class_recall(adj, labels, C), priors_[d])
    else:
      summary["mode"] = "aggregated" if self.aggregate else "resampled"
      if self.aggregate:
        zE = self._batched(lambda x: self._experts(variables, x), images)   # (N, E, C), unaugmented
        self._num_experts = zE.shape[1]
        z = zE.mean(axis=1)
      else:
        z = self._scores(ctx.outputs.get(ctx, variables)(self.split)[0])
      key = jax.random.key(self.seed)
      for i, d in enumerate(self.names):
        idx = ta.resampled_indices(labels, ta.target_counts(ctx.counts, n_max, d), self.seed)
        y = labels[idx]
        acc = lambda s: float(np.mean(np.argmax(s, -1) == y))
        plain = acc(z[idx])
        summary[f"posthoc_{d}"] = acc(ta.posthoc_to_target(z[idx], train_prior, priors_[d], self.train_prior_tau))
        if self.aggregate:
          w = self._aggregation_weights(variables, images[idx], jax.random.fold_in(key, i))
          summary[d] = acc(np.asarray(ta.aggregate(zE[idx], w)))
          summary[f"no_aggregation_{d}"] = plain
          summary[f"weights_{d}"] = [float(v) for v in w]
        else:
          summary[d] = plain
    ctx.log(self.table(summary))
    return EvalResult(summary)

  def table(self, s: dict) -> str:
    rows = [("model" + (" (aggregated)" if self.aggregate else ""), "")]
    if self.aggregate:
      rows.append(("no aggregation", "no_aggregation_"))
    rows.append((f"post-hoc LA to known prior (tau_train={self.train_prior_tau:g})", "posthoc_"))
    w = 16 if self.aggregate else 11
    lines = [f"test-agnostic accuracy ({s['mode']}), %", f"{'':<44}" + "".join(f"{d:>{w}}" for d in self.names)]
    lines += [f"{name:<44}" + "".join(f"{100 * s[p + d]:>{w}.2f}" for d in self.names) for name, p in rows]
    if self.aggregate:
      lines.append(f"{'expert weights':<44}" + "".join(
          (" " + "/".join(f"{v:.2f}" for v in s["weights_" + d])).rjust(w) for d in self.names))  # >= 1 space
    return "\n".join(lines)

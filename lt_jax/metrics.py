"""Classification metrics for long-tailed evaluation: sums and counts first, ratios last.

Every classification metric here is a function of three per-class integer vectors,
:class:`ClassCounts` ``(support, predicted, correct)`` = (row sums, column sums, diagonal)
of the confusion matrix. Two ways to get them, both vectorised scatter-adds (no Python
loop over classes), both int32, both accumulable over batches with ``+`` and across
devices with ``psum`` / a jitted sum over a sharded batch:

* :func:`confusion_matrix`: the dense ``(C, C)`` matrix (rows = true class, columns =
  predicted class, as scikit-learn). Needed for error analysis; ``4 C^2`` bytes
  (265 MB at C = 8142, iNaturalist 2018).
* :func:`per_class_counts`: the three ``(C,)`` vectors directly, ``O(B + C)``. Use this
  in eval loops when only the metrics below are needed; it is much faster at large C.

Metric functions (:func:`accuracy`, :func:`per_class_recall`, :func:`per_class_precision`,
:func:`balanced_accuracy`, :func:`balanced_error_rate`, :func:`macro_f1`,
:func:`shot_accuracy`, :func:`summarize`) accept either form and give identical results.

Calibration and likelihood are accumulated the same way: :func:`calibration_counts`
(per-bin count, summed confidence, summed correctness) and :func:`nll_sums` (total, count);
:func:`ece` and :func:`nll` are the one-shot versions. :func:`auc_ovr` needs every score at
once (ranks), so gather scores first.

Invalid examples: an example is counted only if its mask entry is true (``mask=None``:
all) and its label (and prediction) lies in ``[0, C)``, so a padded final batch can use
label ``-1`` or a mask.

Classes absent from the evaluation labels (``support = 0``): averages follow
scikit-learn. Balanced accuracy / BER average over classes present in the labels
(``balanced_accuracy_score``); macro-F1 averages over classes present in the labels *or*
the predictions (``f1_score(average='macro')`` with its default ``labels``); shot accuracy
averages over classes present in the labels (classifier-balancing ``shot_acc`` loops over
``np.unique(labels)``). On the usual balanced test set every class is present and these
are the plain ``1/C`` averages.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from lt_jax.priors import shot_groups

Array = jax.Array

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "balanced_error_rate", "macro_f1",
                "many_shot", "medium_shot", "few_shot", "ece", "nll")


def tuple_add(self, other):
  """Field-wise ``+`` for NamedTuples of sums (plain tuple ``+`` would concatenate).

  Use as ``__add__ = tuple_add`` and ``__radd__ = tuple_radd`` on a NamedTuple of arrays.
  """
  if not isinstance(other, type(self)):
    return NotImplemented
  return type(self)(*(a + b for a, b in zip(self, other)))


def tuple_radd(self, other):
  if isinstance(other, (int, float)) and other == 0:  # lets sum([...]) start from 0
    return self
  return tuple_add(self, other)


class ClassCounts(NamedTuple):
  """Per-class sufficient statistics of every classification metric here.

  ``support[c]`` = #examples with true class c (row sums of the confusion matrix),
  ``predicted[c]`` = #examples predicted as c (column sums), ``correct[c]`` = #examples of
  class c predicted as c (diagonal). All ``(C,)`` int32. ``a + b`` adds field-wise (not
  tuple concatenation), so batches accumulate with ``+`` and ``sum(...)``.
  """
  support: Array
  predicted: Array
  correct: Array

  __add__ = tuple_add
  __radd__ = tuple_radd


class CalibrationCounts(NamedTuple):
  """Per-confidence-bin sums for ECE: ``count`` (int32), ``sum_conf``, ``sum_correct`` (float32), each ``(M,)``.

  ``a + b`` adds field-wise.
  """
  count: Array
  sum_conf: Array
  sum_correct: Array

  __add__ = tuple_add
  __radd__ = tuple_radd


class NLLSums(NamedTuple):
  """``total`` = summed negative log-likelihood (float32), ``count`` = #examples (int32). ``+`` adds."""
  total: Array
  count: Array

  __add__ = tuple_add
  __radd__ = tuple_radd


# ----------------------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------------------

def _check_num_classes(num_classes) -> int:
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a static positive int, got {num_classes!r}")
  return int(num_classes)


def _int_labels(labels, name: str = "labels") -> Array:
  y = jnp.asarray(labels)
  if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"{name} must be a 1-D integer array of class ids, got shape {y.shape} "
                     f"dtype {y.dtype} (metrics take hard labels, not soft targets)")
  return y.astype(jnp.int32)


def _hard_preds(preds) -> Array:
  """Integer predictions; ``(B, C)`` scores are reduced with ``argmax`` (first max wins)."""
  p = jnp.asarray(preds)
  if p.ndim == 2:
    return jnp.argmax(p, axis=-1).astype(jnp.int32)
  return _int_labels(p, "preds")


def as_mask(mask, n: int) -> Array:
  """Boolean ``(n,)`` example mask (``None``: all valid); a wrong shape raises ``ValueError``."""
  if mask is None:
    return jnp.ones((n,), bool)
  m = jnp.asarray(mask)
  if m.shape != (n,):
    raise ValueError(f"mask must have shape ({n},), got {m.shape}")
  return m.astype(bool)


def _valid(labels, preds, num_classes, mask):
  y = _int_labels(labels)
  p = _hard_preds(preds)
  if p.shape != y.shape:
    raise ValueError(f"preds and labels disagree in length: {p.shape} vs {y.shape}")
  C = num_classes
  ok = as_mask(mask, y.shape[0]) & (y >= 0) & (y < C) & (p >= 0) & (p < C)
  return y, p, ok


# ----------------------------------------------------------------------------------------
# Counting.
# ----------------------------------------------------------------------------------------

def _valid_labels(labels, mask, num_classes: int) -> tuple[Array, Array]:
  """Int labels and which examples count: unmasked with a label in ``[0, C)``."""
  y = _int_labels(labels)
  return y, as_mask(mask, y.shape[0]) & (y >= 0) & (y < num_classes)


def confusion_matrix(labels: Array, preds: Array, num_classes: int, mask: Array | None = None) -> Array:
  """Confusion matrix ``M[i, j] = #{n : y_n = i, yhat_n = j}``, ``(C, C)`` int32.

  Rows are true classes, columns predicted classes: ``sklearn.metrics.confusion_matrix(y,
  yhat, labels=range(C))``. One scatter-add of ones at ``y * C + yhat`` (no loop over
  classes). ``preds`` may be int ``(B,)`` or scores ``(B, C)`` (argmax). Batches and devices
  combine by ``+``; under ``jit`` with the batch sharded over a mesh, XLA reduces the
  partial matrices across devices. Needs ``C^2 < 2^31`` (C <= 46340).
  """
  C = _check_num_classes(num_classes)
  if C * C >= 2**31:
    raise ValueError(f"confusion_matrix: C^2 must fit int32 (C <= 46340), got C={C}; use per_class_counts")
  y, p, ok = _valid(labels, preds, C, mask)
  flat = jnp.where(ok, y * C + p, C * C)  # invalid -> out of bounds -> dropped
  cm = jnp.zeros((C * C,), jnp.int32).at[flat].add(1, mode="drop")
  return cm.reshape(C, C)


def per_class_counts(labels: Array, preds: Array, num_classes: int, mask: Array | None = None) -> ClassCounts:
  """``ClassCounts(support, predicted, correct)`` without the ``C x C`` matrix: ``O(B + C)``.

  ``support = bincount(y)``, ``predicted = bincount(yhat)``, ``correct = bincount(y[y == yhat])``
  (valid examples only), computed as three weighted scatter-adds into ``C`` bins (indices
  clipped into range, weight 0 for invalid examples: measured faster on CPU than one
  scatter into ``3C`` bins or bincounts of out-of-range-dropped indices). Equal to the row
  sums, column sums and diagonal of :func:`confusion_matrix`. ``preds`` may be int or
  ``(B, C)`` scores.
  """
  C = _check_num_classes(num_classes)
  y, p, ok = _valid(labels, preds, C, mask)
  yc, pc = jnp.clip(y, 0, C - 1), jnp.clip(p, 0, C - 1)
  w = ok.astype(jnp.int32)
  hit = (ok & (y == p)).astype(jnp.int32)
  z = jnp.zeros((C,), jnp.int32)
  return ClassCounts(z.at[yc].add(w, mode="drop"), z.at[pc].add(w, mode="drop"),
                     z.at[yc].add(hit, mode="drop"))


def counts_from_confusion(cm: Array) -> ClassCounts:
  """``ClassCounts`` of a confusion matrix: row sums, column sums, diagonal."""
  cm = jnp.asarray(cm)
  return ClassCounts(cm.sum(axis=1, dtype=jnp.int32), cm.sum(axis=0, dtype=jnp.int32),
                     jnp.diagonal(cm).astype(jnp.int32))


def as_class_counts(cm_or_counts: Array | ClassCounts) -> ClassCounts:
  """Accept a ``(C, C)`` confusion matrix or a :class:`ClassCounts`."""
  if isinstance(cm_or_counts, ClassCounts):
    return cm_or_counts
  cm = jnp.asarray(cm_or_counts)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"expected a (C, C) confusion matrix or a ClassCounts, got shape {cm.shape}")
  return counts_from_confusion(cm)


def _safe_div(num: Array, den: Array, zero_division: float) -> Array:
  num = jnp.asarray(num, jnp.float32)
  den = jnp.asarray(den, jnp.float32)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.float32(zero_division))


def _masked_mean(x: Array, keep: Array, fill: float = float("nan")) -> Array:
  """Mean of ``x`` over ``keep``; ``fill`` (default NaN) when nothing is kept."""
  n = jnp.sum(keep)
  return jnp.where(n > 0, jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(n, 1), jnp.float32(fill))


# ----------------------------------------------------------------------------------------
# Metrics from counts.
# ----------------------------------------------------------------------------------------

def accuracy(cm: Array | ClassCounts) -> Array:
  """Top-1 accuracy ``sum_c M[c, c] / sum_{i,j} M[i, j]`` (``accuracy_score``); NaN if empty."""
  k = as_class_counts(cm)
  total = jnp.sum(k.support)
  return jnp.where(total > 0, jnp.sum(k.correct) / jnp.maximum(total, 1), jnp.nan).astype(jnp.float32)


def per_class_recall(cm: Array | ClassCounts, zero_division: float = 0.0) -> Array:
  """Per-class recall (= per-class accuracy) ``M[c, c] / sum_j M[c, j]``, ``(C,)``.

  ``recall_score(average=None)``; classes with no support get ``zero_division`` (0 as
  scikit-learn's default; pass ``float('nan')`` to mark them).
  """
  k = as_class_counts(cm)
  return _safe_div(k.correct, k.support, zero_division)


def per_class_precision(cm: Array | ClassCounts, zero_division: float = 0.0) -> Array:
  """Per-class precision ``M[c, c] / sum_i M[i, c]``, ``(C,)``.

  ``precision_score(average=None)``; never-predicted classes get ``zero_division``.
  """
  k = as_class_counts(cm)
  return _safe_div(k.correct, k.predicted, zero_division)


def balanced_accuracy(cm: Array | ClassCounts) -> Array:
  """Balanced accuracy ``1/|P| sum_{c in P} M[c, c] / n_c`` over classes ``P`` present in the labels.

  Mean per-class recall, i.e. top-1 accuracy on a class-balanced test distribution
  (Brodersen et al., ICPR 2010; Menon et al., ICLR 2021, "balanced error"). Equals
  ``sklearn.metrics.balanced_accuracy_score``, which drops classes absent from ``y_true``
  (and would average ``1/C`` over all of them when all are present). NaN if no label.
  """
  k = as_class_counts(cm)
  return _masked_mean(per_class_recall(k), k.support > 0)


def balanced_error_rate(cm: Array | ClassCounts) -> Array:
  """BER ``= 1/C sum_y P(yhat != y | y) = 1 - balanced_accuracy`` (Menon et al., ICLR 2021).

  Classes absent from the labels are left out of the average (their conditional error is
  undefined), as in ``1 - balanced_accuracy_score``. Seeds example: classes with 10 / 20 /
  30 instances and 1 / 10 / 20 correct give ``1 - (0.1 + 0.5 + 2/3) / 3``.
  """
  return 1.0 - balanced_accuracy(cm)


def macro_f1(cm: Array | ClassCounts) -> Array:
  """Macro-F1 ``1/|U| sum_{c in U} 2 TP_c / (2 TP_c + FP_c + FN_c)``.

  ``2 TP + FP + FN = support + predicted``, so ``F1_c = 2 M[c,c] / (n_c + m_c)``. ``U`` is the
  set of classes present in the labels or the predictions, which is scikit-learn's
  default ``labels`` for ``f1_score(average='macro')``; on ``U`` the denominator is positive,
  so ``zero_division`` never applies (a class only predicted, or only true, scores 0).
  NaN if no example.
  """
  k = as_class_counts(cm)
  den = k.support + k.predicted
  f1 = _safe_div(2 * k.correct, den, 0.0)
  return _masked_mean(f1, den > 0)


def shot_accuracy(cm: Array | ClassCounts, train_counts: Array, many: int = 100,
                  few: int = 20, empty_fill: float = float("nan")) -> dict[str, Array]:
  """Many / medium / few-shot accuracy: mean per-class recall within each group.

  Groups from training counts as in classifier-balancing ``utils.py:shot_acc`` (Liu et al.,
  OLTR, CVPR 2019; Kang et al., ICLR 2020), via :func:`lt_jax.priors.shot_groups`:
  many ``n_c > many``, few ``n_c < few``, medium the rest. Within a group the mean is over
  classes present in the evaluation labels (the reference iterates over
  ``np.unique(labels)``). A group with no such class is ``empty_fill``, by default ``NaN``
  (filter with ``jnp.isnan``), e.g. CIFAR-10-LT has no few-shot class at these thresholds. The
  reference returns 0.0 there instead (``shot_acc`` appends a 0 to an empty group before
  ``np.mean``), which reads as "0% accuracy"; lt_jax keeps NaN so that an absent group cannot be
  mistaken for a failed one, and ``empty_fill=0.0`` reproduces the reference's numbers.

  Returns ``{'many': ..., 'medium': ..., 'few': ...}`` float32 scalars.
  """
  k = as_class_counts(cm)
  tc = jnp.asarray(train_counts)
  if tc.shape != k.support.shape:
    raise ValueError(f"train_counts must have shape {k.support.shape}, got {tc.shape}")
  rec = per_class_recall(k)
  present = k.support > 0
  return {g: _masked_mean(rec, m & present, empty_fill) for g, m in shot_groups(tc, many, few).items()}


# ----------------------------------------------------------------------------------------
# Calibration and likelihood.
# ----------------------------------------------------------------------------------------

def _probs(x: Array, from_logits: bool) -> Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2:
    raise ValueError(f"expected (B, C) scores, got shape {x.shape}")
  return jax.nn.softmax(x, axis=-1) if from_logits else x


def calibration_counts(probs: Array, labels: Array, num_bins: int = 15, mask: Array | None = None,
                       *, from_logits: bool = False) -> CalibrationCounts:
  """Per-bin sums for the expected calibration error (Guo et al., ICML 2017).

  Confidence ``conf_n = max_c p_nc``, correctness ``[argmax_c p_nc = y_n]``. Equal-width bins
  ``B_m = ((m-1)/M, m/M]`` as in Guo et al.'s reference code (``conf > lower`` and
  ``conf <= upper``); a confidence of exactly 0 (impossible for a softmax) goes to the
  first bin. Returns ``(count_m, sum_{n in B_m} conf_n, sum_{n in B_m} correct_n)``; add
  batches with ``+`` and finish with :func:`ece_from_counts`. ``from_logits=True`` applies a
  softmax first.
  """
  if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"num_bins must be a static positive int, got {num_bins!r}")
  p = _probs(probs, from_logits)
  y, ok = _valid_labels(labels, mask, p.shape[-1])
  conf = jnp.max(p, axis=-1)
  correct = (jnp.argmax(p, axis=-1) == y).astype(jnp.float32)
  inner = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=jnp.float32)[1:-1]
  b = jnp.sum(conf[:, None] > inner[None, :], axis=-1)  # m-1 for conf in ((m-1)/M, m/M]
  b = jnp.where(ok, b, num_bins)
  zeros = jnp.zeros((num_bins,), jnp.float32)
  return CalibrationCounts(
      jnp.zeros((num_bins,), jnp.int32).at[b].add(1, mode="drop"),
      zeros.at[b].add(conf, mode="drop"),
      zeros.at[b].add(correct, mode="drop"))


def ece_from_counts(cc: CalibrationCounts) -> Array:
  """``ECE = sum_m |B_m|/N |acc(B_m) - conf(B_m)| = 1/N sum_m |sum_correct_m - sum_conf_m|``; NaN if empty."""
  n = jnp.sum(cc.count)
  return jnp.where(n > 0, jnp.sum(jnp.abs(cc.sum_correct - cc.sum_conf)) / jnp.maximum(n, 1), jnp.nan)


def ece(probs: Array, labels: Array, num_bins: int = 15, mask: Array | None = None,
        *, from_logits: bool = False) -> Array:
  """Expected calibration error with ``num_bins`` equal-width confidence bins (Guo et al., ICML 2017).

  One-shot form of :func:`calibration_counts` + :func:`ece_from_counts`.
  """
  return ece_from_counts(calibration_counts(probs, labels, num_bins, mask, from_logits=from_logits))


def nll_sums(logits_or_probs: Array, labels: Array, mask: Array | None = None,
             *, from_logits: bool = True) -> NLLSums:
  """Summed negative log-likelihood ``sum_n -log p_{n, y_n}`` and the example count.

  ``from_logits=True`` (default): ``-log_softmax(z)_y`` computed stably in float32.
  ``from_logits=False``: ``-log max(p_y, tiny)`` with ``tiny`` the smallest normal float32,
  so a zero probability costs about 87.3 nats instead of ``inf`` (scikit-learn clips at
  ``eps`` of the input dtype; identical away from 0 and 1).
  """
  x = jnp.asarray(logits_or_probs, jnp.float32)
  if x.ndim != 2:
    raise ValueError(f"expected (B, C) logits or probabilities, got shape {x.shape}")
  y, ok = _valid_labels(labels, mask, x.shape[-1])
  C = x.shape[-1]
  ys = jnp.clip(y, 0, C - 1)[:, None]
  if from_logits:
    per = -jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), ys, axis=-1)[:, 0]
  else:
    p = jnp.take_along_axis(x, ys, axis=-1)[:, 0]
    per = -jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny))
  return NLLSums(jnp.sum(jnp.where(ok, per, 0.0)), jnp.sum(ok, dtype=jnp.int32))


def nll(logits_or_probs: Array, labels: Array, mask: Array | None = None, *, from_logits: bool = True) -> Array:
  """Mean negative log-likelihood (cross-entropy, ``sklearn.metrics.log_loss``); NaN if empty.

  ``from_logits`` as in :func:`nll_sums` (pass ``from_logits=False`` for probabilities).
  """
  s = nll_sums(logits_or_probs, labels, mask, from_logits=from_logits)
  return nll_from_sums(s)


def nll_from_sums(s: NLLSums) -> Array:
  """``total / count``; NaN if no example."""
  return jnp.where(s.count > 0, s.total / jnp.maximum(s.count, 1), jnp.nan)


# ----------------------------------------------------------------------------------------
# Ranking.
# ----------------------------------------------------------------------------------------

def _auc_column(x: Array, pos: Array, valid: Array) -> Array:
  """Twice the Mann-Whitney U of one class: ``sum_{i pos} 2 #{neg < x_i} + #{neg = x_i}``."""
  x = jnp.where(valid, x, jnp.inf)  # invalid rows sort last and never tie a finite score
  s_all = jnp.sort(x)
  s_pos = jnp.sort(jnp.where(pos, x, jnp.inf))
  l_all = jnp.searchsorted(s_all, x, side="left")
  r_all = jnp.searchsorted(s_all, x, side="right")
  l_pos = jnp.searchsorted(s_pos, x, side="left")
  r_pos = jnp.searchsorted(s_pos, x, side="right")
  two_u = 2 * (l_all - l_pos) + (r_all - l_all) - (r_pos - l_pos)
  return jnp.sum(jnp.where(pos, two_u, 0).astype(jnp.float32))


def auc_ovr(probs: Array, labels: Array, mask: Array | None = None, average: str | None = "macro") -> Array:
  """One-vs-rest ROC AUC, macro-averaged over classes (Hand & Till 2001 style OvR; Fawcett 2006).

  For class c with ``P_c`` positives (``y = c``) and ``N_c`` negatives, by the Mann-Whitney
  identity ``AUC_c = (sum_{i: y_i = c} #{j: y_j != c, s_jc < s_ic} + 1/2 #{... = s_ic}) / (P_c N_c)``,
  i.e. ties count one half (average ranks), as ``sklearn.metrics.roc_auc_score``. All
  classes at once: one sort and four binary searches per column, ``O(B C log B)``.
  ``average='macro'`` equals ``roc_auc_score(y, probs, multi_class='ovr')`` when every class
  occurs in the labels; classes with no positive or no negative (AUC undefined; scikit-learn
  refuses them) are left out of the mean. ``average=None`` returns the ``(C,)`` per-class
  AUCs with NaN for undefined classes. Scores need not be normalised (any monotone score
  per class); they must be finite. Sums are float32, exact while ``2 P_c N_c < 2^24``.
  """
  if average not in ("macro", None):
    raise ValueError(f"auc_ovr: average must be 'macro' or None, got {average!r}")
  s = jnp.asarray(probs, jnp.float32)
  if s.ndim != 2:
    raise ValueError(f"probs must be (B, C), got shape {s.shape}")
  y, ok = _valid_labels(labels, mask, s.shape[-1])
  C = s.shape[-1]
  pos = (y[:, None] == jnp.arange(C)[None, :]) & ok[:, None]  # (B, C)
  two_u = jax.vmap(_auc_column, in_axes=(1, 1, None))(s, pos, ok)
  n_pos = jnp.sum(pos, axis=0).astype(jnp.float32)
  n_neg = jnp.sum(ok).astype(jnp.float32) - n_pos
  defined = (n_pos > 0) & (n_neg > 0)
  per = jnp.where(defined, two_u / jnp.where(defined, 2.0 * n_pos * n_neg, 1.0), jnp.nan)
  if average is None:
    return per
  return _masked_mean(jnp.where(defined, per, 0.0), defined)


# ----------------------------------------------------------------------------------------
# Everything at once.
# ----------------------------------------------------------------------------------------

def summarize(cm: Array | ClassCounts, train_counts: Array | None = None, *, many: int = 100, few: int = 20,
              calibration: CalibrationCounts | None = None, nll: NLLSums | None = None,
              empty_fill: float = float("nan")) -> dict[str, Array]:
  """Every classification metric from accumulated sums, as float32 scalars (jit-safe).

  Keys: ``accuracy``, ``balanced_accuracy``, ``balanced_error_rate``, ``macro_f1``; with
  ``train_counts`` also ``many_shot``, ``medium_shot``, ``few_shot`` (:func:`shot_accuracy`,
  ``empty_fill`` for an empty group, NaN by default, 0.0 as the reference); with ``calibration`` also ``ece``; with ``nll`` (an
  :class:`NLLSums`) also ``nll``. See :data:`SUMMARY_KEYS`.
  """
  k = as_class_counts(cm)
  out = {"accuracy": accuracy(k), "balanced_accuracy": balanced_accuracy(k),
         "balanced_error_rate": balanced_error_rate(k), "macro_f1": macro_f1(k)}
  if train_counts is not None:
    out.update({f"{g}_shot": v for g, v in shot_accuracy(k, train_counts, many, few, empty_fill).items()})
  if calibration is not None:
    out["ece"] = ece_from_counts(calibration)
  if nll is not None:
    out["nll"] = nll_from_sums(nll)
  return out

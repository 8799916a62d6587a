"""Tests for lt_jax.metrics against scikit-learn, NumPy loops and hand-worked cases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from sklearn import metrics as skm

from lt_jax import metrics as M

TOL = dict(rtol=1e-6, atol=1e-6)
C = 8


def _case(kind: str, n: int = 300, seed: int = 0):
  """Labels / predictions over C classes with chosen classes missing from either side."""
  rng = np.random.default_rng(seed)
  true_classes = {"all": range(C), "absent_in_preds": range(C), "absent_in_labels": range(2, C),
                  "both": range(0, 6)}[kind]
  pred_classes = {"all": range(C), "absent_in_preds": range(0, 5), "absent_in_labels": range(C),
                  "both": range(3, C)}[kind]
  y = rng.choice(list(true_classes), size=n)
  p = rng.choice(list(pred_classes), size=n)
  agree = rng.random(n) < 0.5  # make the classifier better than chance where it can be
  p = np.where(agree & np.isin(y, list(pred_classes)), y, p)
  return y.astype(np.int32), p.astype(np.int32)


KINDS = ["all", "absent_in_preds", "absent_in_labels", "both"]


@pytest.fixture(autouse=True)
def _quiet_sklearn():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
    warnings.simplefilter("ignore", skm._classification.UndefinedMetricWarning)
    yield


# ---------------------------------------------------------------- confusion matrix and counts

@pytest.mark.parametrize("kind", KINDS)
def test_confusion_matrix_matches_sklearn(kind):
  y, p = _case(kind)
  cm = M.confusion_matrix(y, p, C)
  assert cm.dtype == jnp.int32 and cm.shape == (C, C)
  np.testing.assert_array_equal(cm, skm.confusion_matrix(y, p, labels=np.arange(C)))
  k = M.per_class_counts(y, p, C)
  np.testing.assert_array_equal(k.support, np.asarray(cm).sum(1))
  np.testing.assert_array_equal(k.predicted, np.asarray(cm).sum(0))
  np.testing.assert_array_equal(k.correct, np.diag(np.asarray(cm)))
  assert all(a.dtype == jnp.int32 for a in k)


def test_scores_as_predictions():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(50, C)).astype(np.float32)
  y = rng.integers(0, C, 50)
  np.testing.assert_array_equal(M.confusion_matrix(y, logits, C),
                                skm.confusion_matrix(y, logits.argmax(1), labels=np.arange(C)))


@pytest.mark.parametrize("kind", KINDS)
def test_classification_metrics_match_sklearn(kind):
  y, p = _case(kind, seed=KINDS.index(kind))
  union = np.union1d(y, p)
  prec = skm.precision_score(y, p, average=None, zero_division=0)
  rec = skm.recall_score(y, p, average=None, zero_division=0)
  expected = {"accuracy": skm.accuracy_score(y, p),
              "balanced_accuracy": skm.balanced_accuracy_score(y, p),
              "balanced_error_rate": 1.0 - skm.balanced_accuracy_score(y, p),
              "macro_f1": skm.f1_score(y, p, average="macro")}
  cm = M.confusion_matrix(y, p, C)
  k = M.per_class_counts(y, p, C)
  for stats in (cm, k):  # matrix path and count path agree with sklearn and each other
    got = M.summarize(stats)
    for name, val in expected.items():
      np.testing.assert_allclose(float(got[name]), val, **TOL, err_msg=f"{kind}: {name}")
    np.testing.assert_allclose(np.asarray(M.per_class_precision(stats))[union], prec, **TOL)
    np.testing.assert_allclose(np.asarray(M.per_class_recall(stats))[union], rec, **TOL)


def test_zero_division_and_empty_inputs():
  y, p = _case("both")
  prec = np.asarray(M.per_class_precision(M.confusion_matrix(y, p, C), zero_division=float("nan")))
  assert np.all(np.isnan(prec[:3])) and not np.any(np.isnan(prec[3:]))
  empty = M.per_class_counts(np.zeros((0,), np.int32), np.zeros((0,), np.int32), C)
  for v in M.summarize(empty).values():
    assert np.isnan(float(v))


def test_seeds_ber_example():
  # classes with 10 / 20 / 30 instances, 1 / 10 / 20 correctly classified
  y = np.repeat([0, 1, 2], [10, 20, 30])
  p = np.concatenate([[0] * 1 + [1] * 9, [1] * 10 + [2] * 10, [2] * 20 + [0] * 10])
  cm = M.confusion_matrix(y, p, 3)
  expected = 1 - (0.1 + 0.5 + 20 / 30) / 3
  np.testing.assert_allclose(float(M.balanced_error_rate(cm)), expected, rtol=1e-6)
  np.testing.assert_allclose(float(M.balanced_error_rate(M.per_class_counts(y, p, 3))), expected, rtol=1e-6)
  np.testing.assert_allclose(float(M.accuracy(cm)), 31 / 60, rtol=1e-6)


def test_shot_accuracy_hand_worked():
  train = np.array([500, 101, 100, 50, 20, 19, 5, 3])
  # per-class test recall: 0.9, 0.7 | 0.6, 0.4, 0.2 | 0.1, 0.3, (class 7 absent from the test labels)
  correct = np.array([9, 7, 6, 4, 2, 1, 3, 0])
  y = np.repeat(np.arange(7), 10)
  p = np.concatenate([np.r_[np.full(c, k), np.full(10 - c, (k + 1) % 7)] for k, c in enumerate(correct[:7])])
  got = M.shot_accuracy(M.confusion_matrix(y, p, 8), train)
  np.testing.assert_allclose(float(got["many"]), (0.9 + 0.7) / 2, rtol=1e-6)     # n > 100
  np.testing.assert_allclose(float(got["medium"]), (0.6 + 0.4 + 0.2) / 3, rtol=1e-6)  # 20 <= n <= 100
  np.testing.assert_allclose(float(got["few"]), (0.1 + 0.3) / 2, rtol=1e-6)      # n < 20, class 7 left out
  # custom thresholds and an empty group
  got = M.shot_accuracy(M.per_class_counts(y, p, 8), train, many=1000, few=2)
  assert np.isnan(float(got["many"])) and np.isnan(float(got["few"]))
  np.testing.assert_allclose(float(got["medium"]), correct[:7].sum() / 70, rtol=1e-6)
  s = M.summarize(M.per_class_counts(y, p, 8), train)
  np.testing.assert_allclose([float(s[k]) for k in ("many_shot", "medium_shot", "few_shot")],
                             [0.8, 0.4, 0.2], rtol=1e-6)


# ---------------------------------------------------------------- accumulation, mask, devices

def test_accumulation_over_batches_equals_one_pass():
  rng = np.random.default_rng(2)
  y, p = _case("all", n=400, seed=3)
  logits = rng.normal(size=(400, C)).astype(np.float32) * 3
  cm = ks = cc = ns = None
  for sl in np.split(np.arange(400), 8):
    b_cm = M.confusion_matrix(y[sl], p[sl], C)
    b_k = M.per_class_counts(y[sl], p[sl], C)
    b_cc = M.calibration_counts(logits[sl], y[sl], from_logits=True)
    b_n = M.nll_sums(logits[sl], y[sl])
    cm, ks, cc, ns = ((b_cm, b_k, b_cc, b_n) if cm is None else (cm + b_cm, ks + b_k, cc + b_cc, ns + b_n))
  np.testing.assert_array_equal(cm, M.confusion_matrix(y, p, C))
  assert isinstance(ks, M.ClassCounts)
  for a, b in zip(ks, M.per_class_counts(y, p, C)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(float(M.ece_from_counts(cc)), float(M.ece(logits, y, from_logits=True)), **TOL)
  np.testing.assert_allclose(float(M.nll_from_sums(ns)), float(M.nll(logits, y)), **TOL)
  total = sum(M.per_class_counts(y[sl], p[sl], C) for sl in np.split(np.arange(400), 4))
  np.testing.assert_array_equal(total.correct, ks.correct)


def test_mask_and_invalid_labels():
  y, p = _case("all", n=200, seed=4)
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(200, C)).astype(np.float32)
  mask = rng.random(200) < 0.6
  ref_cm = M.confusion_matrix(y[mask], p[mask], C)
  np.testing.assert_array_equal(M.confusion_matrix(y, p, C, mask=mask), ref_cm)
  np.testing.assert_array_equal(M.per_class_counts(y, p, C, mask=mask).support, np.asarray(ref_cm).sum(1))
  # padding with label -1 is the same as masking it out
  y_pad = np.where(mask, y, -1).astype(np.int32)
  np.testing.assert_array_equal(M.confusion_matrix(y_pad, p, C), ref_cm)
  np.testing.assert_array_equal(M.per_class_counts(y_pad, p, C).correct, np.diag(np.asarray(ref_cm)))
  # the float metrics: masked full batch vs references on the kept rows (no second shape to compile)
  probs = np.asarray(jax.nn.softmax(logits))
  probs64 = probs.astype(np.float64) / probs.astype(np.float64).sum(1, keepdims=True)
  ref_nll = skm.log_loss(y[mask], y_proba=probs64[mask], labels=np.arange(C))
  np.testing.assert_allclose(float(M.nll(logits, y, mask)), ref_nll, **TOL)
  np.testing.assert_allclose(float(M.nll(logits, y_pad)), ref_nll, **TOL)
  np.testing.assert_allclose(float(M.ece(probs, y, mask=mask)), _ece_numpy_loop(probs[mask], y[mask], 15), **TOL)
  np.testing.assert_allclose(float(M.auc_ovr(probs, y, mask)),
                             skm.roc_auc_score(y[mask], probs64[mask], multi_class="ovr"), **TOL)


def test_jit_summarize():
  y, p = _case("all", seed=6)

  @jax.jit
  def evaluate(y, p, train):
    return M.summarize(M.per_class_counts(y, p, C), train)

  got = evaluate(y, p, jnp.arange(C) * 30)
  np.testing.assert_allclose(float(got["macro_f1"]), skm.f1_score(y, p, average="macro"), **TOL)
  assert set(got) == {"accuracy", "balanced_accuracy", "balanced_error_rate", "macro_f1",
                      "many_shot", "medium_shot", "few_shot"}


def test_sharded_batch_on_two_cpu_devices():
  # The confusion matrix / counts of a batch sharded over 2 devices equal the unsharded ones.
  code = textwrap.dedent("""
      import numpy as np, jax, jax.numpy as jnp
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from lt_jax import metrics as M
      assert len(jax.devices()) == 2
      rng = np.random.default_rng(0)
      y = rng.integers(0, 6, 64).astype(np.int32); p = rng.integers(0, 6, 64).astype(np.int32)
      sh = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("data",)), P("data"))
      ys, ps = jax.device_put(y, sh), jax.device_put(p, sh)
      cm = jax.jit(lambda a, b: M.confusion_matrix(a, b, 6))(ys, ps)
      k = jax.jit(lambda a, b: M.per_class_counts(a, b, 6))(ys, ps)
      ref = M.confusion_matrix(y, p, 6)
      assert np.array_equal(np.asarray(cm), np.asarray(ref))
      assert np.array_equal(np.asarray(k.correct), np.diag(np.asarray(ref)))
      print("OK")
  """)
  if len(jax.devices()) >= 2:  # tests/conftest.py emulates 2 CPU devices
    exec(code.replace("== 2", ">= 2"), {})
    return
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------- calibration, likelihood, ranking

def _ece_numpy_loop(probs, labels, num_bins):
  """Guo et al. (2017) reference: bins (lo, hi], ECE = sum_b |B|/N |acc - conf|."""
  conf = probs.max(1)
  correct = (probs.argmax(1) == labels).astype(np.float64)
  edges = np.linspace(0, 1, num_bins + 1, dtype=np.float32)
  total = 0.0
  for lo, hi in zip(edges[:-1], edges[1:]):
    in_bin = (conf > lo) & (conf <= hi)
    if in_bin.any():
      total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].astype(np.float64).mean())
  return total


@pytest.mark.parametrize("num_bins", [15, 10])
def test_ece_matches_numpy_loop(num_bins):
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(500, C)) * 2.5
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))
  y = np.where(rng.random(500) < 0.6, probs.argmax(1), rng.integers(0, C, 500))
  np.testing.assert_allclose(float(M.ece(probs, y, num_bins)), _ece_numpy_loop(probs, y, num_bins), **TOL)
  cc = M.calibration_counts(probs, y, num_bins)
  assert int(cc.count.sum()) == 500
  # perfectly calibrated toy case: confidence 0.75 in one bin, 3 of 4 correct -> ECE 0
  toy = np.tile([[0.75, 0.25]], (4, 1)).astype(np.float32)
  np.testing.assert_allclose(float(M.ece(toy, np.array([0, 0, 0, 1]))), 0.0, atol=1e-7)


def test_nll_matches_log_loss():
  rng = np.random.default_rng(8)
  logits = (rng.normal(size=(300, C)) * 3).astype(np.float32)
  y = rng.integers(0, C - 1, 300)  # class C-1 never occurs: labels= must be passed to sklearn
  probs64 = np.exp(logits - logits.max(1, keepdims=True)).astype(np.float64)
  probs64 /= probs64.sum(1, keepdims=True)
  ref = skm.log_loss(y, y_proba=probs64, labels=np.arange(C))
  np.testing.assert_allclose(float(M.nll(logits, y)), ref, **TOL)
  np.testing.assert_allclose(float(M.nll(probs64.astype(np.float32), y, from_logits=False)), ref, **TOL)
  # a zero probability stays finite
  assert np.isfinite(float(M.nll(np.array([[1.0, 0.0]]), np.array([1]), from_logits=False)))


def test_auc_ovr_matches_sklearn():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(400, C)) * 2
  y = rng.integers(0, C, 400)
  logits[np.arange(400), y] += 1.0
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32))).astype(np.float64)
  probs /= probs.sum(1, keepdims=True)
  ref = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
  np.testing.assert_allclose(float(M.auc_ovr(probs, y)), ref, **TOL)
  per = np.asarray(M.auc_ovr(probs, y, average=None))
  np.testing.assert_allclose(per, [skm.roc_auc_score(y == c, probs[:, c]) for c in range(C)], **TOL)


def test_auc_ovr_ties_and_absent_class():
  rng = np.random.default_rng(10)
  scores = np.round(rng.random((300, C)), 1)  # heavy ties: average ranks needed
  y = rng.integers(0, C - 1, 300)             # class C-1 absent: its AUC is undefined
  per = np.asarray(M.auc_ovr(scores, y, average=None))
  ref = np.array([skm.roc_auc_score(y == c, scores[:, c]) for c in range(C - 1)])
  np.testing.assert_allclose(per[:-1], ref, **TOL)
  assert np.isnan(per[-1])
  np.testing.assert_allclose(float(M.auc_ovr(scores, y)), ref.mean(), **TOL)


def test_bad_inputs_raise():
  y = np.array([0, 1, 2], np.int32)
  with pytest.raises(ValueError, match="num_classes"):
    M.confusion_matrix(y, y, 0)
  with pytest.raises(ValueError, match="integer"):
    M.per_class_counts(y.astype(np.float32), y, 3)
  with pytest.raises(ValueError, match="disagree"):
    M.confusion_matrix(y, y[:2], 3)
  with pytest.raises(ValueError, match="confusion matrix or a ClassCounts"):
    M.accuracy(jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="'macro' or None"):
    M.auc_ovr(np.eye(3), y, average="micro")
  with pytest.raises(ValueError, match="train_counts"):
    M.shot_accuracy(M.confusion_matrix(y, y, 3), np.ones(4))


def _np_shot_acc(preds, labels, train_counts, many=100, few=20):
  """classifier-balancing ``utils.py:shot_acc`` semantics re-derived in NumPy (0.0 for an empty group)."""
  groups = {"many": [], "medium": [], "few": []}
  for c in np.unique(labels):
    acc = np.mean(preds[labels == c] == c)
    n = train_counts[c]
    groups["many" if n > many else "few" if n < few else "medium"].append(acc)
  return {g: float(np.mean(v if v else [0.0])) for g, v in groups.items()}


def test_shot_accuracy_empty_fill_reproduces_reference_zero():
  """Empty shot groups: lt_jax NaN by default; ``empty_fill=0.0`` gives the reference's 0.0.

  The reference appends 0 to an empty group; lt_jax keeps NaN (an absent group is not a 0%
  group) and exposes the fill value.
  """
  rng = np.random.default_rng(5)
  train = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])  # CIFAR-10-LT: no few-shot class
  y = rng.integers(0, 10, 300)
  p = np.where(rng.uniform(size=300) < 0.7, y, rng.integers(0, 10, 300))
  ref = _np_shot_acc(p, y, train)
  assert ref["few"] == 0.0
  cm = M.confusion_matrix(y, p, 10)
  got = M.shot_accuracy(cm, train)
  assert np.isnan(float(got["few"]))
  for g in ("many", "medium"):
    np.testing.assert_allclose(float(got[g]), ref[g], rtol=1e-6)
  got0 = M.shot_accuracy(cm, train, empty_fill=0.0)
  for g in ("many", "medium", "few"):
    np.testing.assert_allclose(float(got0[g]), ref[g], rtol=1e-6, atol=1e-7)
  got_j = jax.jit(lambda c: M.shot_accuracy(c, train, empty_fill=-1.0))(cm)
  assert float(got_j["few"]) == -1.0

"""Tests for lt_jax.priors: published CIFAR-LT numbers, scikit-learn and hand-worked cases."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from sklearn.utils.class_weight import compute_class_weight

from lt_jax import priors

C10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


# ----------------------------------------------------------------------------- lt_counts


def test_lt_counts_exp_cifar10_ir100():
  c = priors.lt_counts(5000, 10, 100)
  assert c.dtype == np.int64
  np.testing.assert_array_equal(c, C10_IR100)
  assert int(c.sum()) == 12406


@pytest.mark.parametrize("n_max,num_classes,ir,total", [
    (5000, 10, 100, 12406), (5000, 10, 50, 13996), (5000, 10, 10, 20431),
    (500, 100, 100, 10847), (500, 100, 50, 12608), (500, 100, 10, 19573)])
def test_lt_counts_exp_totals(n_max, num_classes, ir, total):
  c = priors.lt_counts(n_max, num_classes, ir)
  assert int(c.sum()) == total
  assert c[0] == n_max and c[-1] == n_max // ir
  assert np.all(np.diff(c) <= 0)


def test_shot_groups_cifar100_ir100():
  g = priors.shot_groups(priors.lt_counts(500, 100, 100))
  assert {k: int(v.sum()) for k, v in g.items()} == {"many": 35, "medium": 35, "few": 30}
  # the three masks partition the classes
  np.testing.assert_array_equal(g["many"].astype(int) + g["medium"] + g["few"], np.ones(100, int))
  # thresholds: many > 100, few < 20, medium 20..100 inclusive
  g = priors.shot_groups(jnp.array([101, 100, 20, 19]))
  np.testing.assert_array_equal(g["many"], [True, False, False, False])
  np.testing.assert_array_equal(g["medium"], [False, True, True, False])
  np.testing.assert_array_equal(g["few"], [False, False, False, True])


def test_lt_counts_step_hand_worked():
  np.testing.assert_array_equal(priors.lt_counts(1000, 10, 10, "step"), [1000] * 5 + [100] * 5)
  np.testing.assert_array_equal(priors.lt_counts(500, 4, 100, "step", mu=0.25), [500, 500, 500, 5])
  np.testing.assert_array_equal(priors.lt_counts(50, 3, 7, "step", mu=0.0), [50, 50, 50])
  np.testing.assert_array_equal(priors.lt_counts(50, 3, 7, "step", mu=1.0), [7, 7, 7])
  with pytest.raises(ValueError):
    priors.lt_counts(50, 3, 7, "step", mu=1.5)


def test_lt_counts_pareto():
  for seed in (0, 1, 2):
    for ir in (10.0, 100.0, 256.0):
      c = priors.lt_counts(1280, 50, ir, "pareto", seed=seed)
      assert c.shape == (50,) and c.dtype == np.int64
      assert c[0] == 1280 and c[-1] == int(1280 / ir)
      assert np.all(np.diff(c) <= 0)
      assert np.all(c >= int(1280 / ir))
  a = priors.lt_counts(1280, 50, 256, "pareto", seed=3)
  np.testing.assert_array_equal(a, priors.lt_counts(1280, 50, 256, "pareto", seed=3))
  assert not np.array_equal(a, priors.lt_counts(1280, 50, 256, "pareto", seed=4))


def test_lt_counts_pareto_single_class():
  np.testing.assert_array_equal(priors.lt_counts(100, 1, 10, "pareto"), [100])


def test_lt_counts_single_class_exp_step():
  np.testing.assert_array_equal(priors.lt_counts(100, 1, 10, "exp"), [100])
  np.testing.assert_array_equal(priors.lt_counts(100, 1, 10, "step"), [100])


def test_lt_counts_invalid_inputs():
  for ir in (0.5, 0.0, -3.0, float("nan")):
    with pytest.raises(ValueError, match="imbalance_ratio"):
      priors.lt_counts(5000, 10, ir)
  with pytest.raises(ValueError) as e:
    priors.lt_counts(5000, 10, 100, "zipf")
  for name in ("exp", "step", "pareto"):
    assert name in str(e.value)
  with pytest.raises(ValueError):
    priors.lt_counts(5000, 0, 100)
  with pytest.raises(ValueError):
    priors.lt_counts(50, 10, 100)  # empty tail class
  # IR = 1 is balanced
  np.testing.assert_array_equal(priors.lt_counts(7, 3, 1), [7, 7, 7])


# ----------------------------------------------------------------------------- class weights


def test_class_weights_class_balanced_cifar10():
  w = np.asarray(priors.class_weights(jnp.array(C10_IR100), "effective_number", beta=0.9999))
  np.testing.assert_allclose(
      w, [0.051, 0.077, 0.121, 0.195, 0.319, 0.525, 0.868, 1.443, 2.409, 3.993], atol=6e-4)
  np.testing.assert_allclose(w.sum(), 10.0, rtol=1e-5)
  n = np.array(C10_IR100, np.float64)
  ref = (1 - 0.9999) / (1 - 0.9999 ** n)
  np.testing.assert_allclose(w, ref / ref.sum() * 10, rtol=1e-4)
  # default beta is 0.9999; other beta follows the formula
  np.testing.assert_allclose(priors.class_weights(jnp.array(C10_IR100), "effective_number"), w, rtol=1e-6)
  ref = (1 - 0.99) / (1 - 0.99 ** n)
  np.testing.assert_allclose(priors.class_weights(jnp.array(C10_IR100), "effective_number", beta=0.99),
                             ref / ref.sum() * 10, rtol=1e-4)


def test_effective_number_formula():
  n = np.array([1.0, 10.0, 1000.0])
  np.testing.assert_allclose(priors.effective_number(n, 0.9), (1 - 0.9 ** n) / 0.1, rtol=1e-5)
  np.testing.assert_allclose(priors.effective_number(n, 0.0), [1.0, 1.0, 1.0], rtol=1e-6)


def test_class_weights_balanced_equals_sklearn():
  counts = np.array([40, 7, 13, 1, 25])
  y = np.repeat(np.arange(5), counts)
  ref = compute_class_weight("balanced", classes=np.arange(5), y=y)
  np.testing.assert_allclose(priors.class_weights(jnp.array(counts), "balanced"), ref, rtol=1e-6)


def test_class_weights_inverse_sqrt_cost_sensitive():
  n = np.array([400.0, 100.0, 25.0])
  np.testing.assert_allclose(priors.class_weights(n, "inverse"), [1 / 16, 1 / 4, 1.0], rtol=1e-6)
  np.testing.assert_allclose(priors.class_weights(n, "sqrt_inverse"), [1 / 4, 1 / 2, 1.0], rtol=1e-6)
  np.testing.assert_allclose(priors.class_weights(n, "cost_sensitive", gamma=1.5),
                             [1 / 64, 1 / 8, 1.0], rtol=1e-6)
  np.testing.assert_allclose(priors.class_weights(n, "cost_sensitive"), [1 / 16, 1 / 4, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(priors.class_weights(n, "none"), [1.0, 1.0, 1.0])


def test_class_weights_errors():
  with pytest.raises(ValueError) as e:
    priors.class_weights(jnp.ones(3), "focal")
  for name in priors.WEIGHT_SCHEMES:
    assert name in str(e.value)
  with pytest.raises(TypeError):
    priors.class_weights(jnp.ones(3), "inverse", gamma=2.0)
  with pytest.raises(ValueError):
    priors.class_weights(jnp.ones(3), "effective_number", beta=1.0)
  with pytest.raises(ValueError):
    priors.class_weights(jnp.array([3, -1, 2]), "inverse")


# ----------------------------------------------------------------------------- counts and priors


def test_class_counts_equals_bincount():
  y = np.random.default_rng(0).integers(0, 7, size=200)
  np.testing.assert_array_equal(priors.class_counts(y, 7), np.bincount(y, minlength=7))
  np.testing.assert_array_equal(priors.class_counts(jnp.array([0, 0, 2]), 4), [2, 0, 1, 0])
  # a label >= num_classes is dropped
  np.testing.assert_array_equal(priors.class_counts(jnp.array([0, 4, 9]), 4), [1, 0, 0, 0])


def test_class_counts_ignores_negative_labels():
  np.testing.assert_array_equal(priors.class_counts(jnp.array([0, -1, 1]), 3), [1, 1, 0])


def test_class_weights_traced_beta():
  w = jax.jit(lambda b: priors.class_weights(jnp.array(C10_IR100), "effective_number", beta=b))(0.9999)
  np.testing.assert_allclose(w.sum(), 10.0, rtol=1e-5)


def test_prior_log_prior_and_imbalance_ratio():
  p = priors.prior(jnp.array(C10_IR100))
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(p, np.array(C10_IR100) / 12406, rtol=1e-6)
  np.testing.assert_allclose(priors.prior(p), p, rtol=1e-6)  # idempotent
  np.testing.assert_allclose(priors.log_prior(jnp.array([1, 3])), np.log([0.25, 0.75]), rtol=1e-6)
  np.testing.assert_allclose(priors.imbalance_ratio(jnp.array(C10_IR100)), 100.0, rtol=1e-6)
  assert np.isinf(priors.imbalance_ratio(jnp.array([5, 0, 1])))


def test_zero_count_rule_hand_worked():
  # rarest observed class has 4 -> zero classes get 2
  np.testing.assert_array_equal(priors.safe_counts(jnp.array([0, 4, 0, 6])), [2.0, 4.0, 2.0, 6.0])
  np.testing.assert_array_equal(priors.safe_counts(jnp.zeros(3)), [1.0, 1.0, 1.0])
  # (2, 4, 2, 6) / 14
  np.testing.assert_allclose(priors.prior(jnp.array([0, 4, 0, 6])), [1 / 7, 2 / 7, 1 / 7, 3 / 7], rtol=1e-6)
  np.testing.assert_allclose(priors.prior(jnp.zeros(4)), np.full(4, 0.25), rtol=1e-6)
  lp = priors.log_prior(jnp.array([0, 4, 0, 6]))
  np.testing.assert_allclose(lp, np.log([1 / 7, 2 / 7, 1 / 7, 3 / 7]), rtol=1e-6)
  # scale-free: same rule on the normalised prior
  np.testing.assert_allclose(priors.prior(jnp.array([0.0, 0.4, 0.6])), [0.2 / 1.2, 0.4 / 1.2, 0.6 / 1.2],
                             rtol=1e-6)
  w = priors.class_weights(jnp.array([0, 4, 8]), "inverse")  # n -> (2, 4, 8)
  np.testing.assert_allclose(w, [1.0, 0.5, 0.25], rtol=1e-6)
  with pytest.raises(ValueError):
    priors.safe_counts(jnp.array([1, -2]))


def test_jit_vmap_grad_safe():
  counts = jnp.array([50.0, 0.0, 10.0, 5.0])
  np.testing.assert_allclose(jax.jit(priors.safe_counts)(counts), priors.safe_counts(counts))
  np.testing.assert_allclose(jax.jit(priors.prior)(counts), priors.prior(counts), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(priors.log_prior)(counts), priors.log_prior(counts), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(priors.imbalance_ratio)(jnp.array(C10_IR100)), 100.0, rtol=1e-6)
  np.testing.assert_array_equal(jax.jit(priors.class_counts, static_argnums=1)(jnp.array([0, 2, 2]), 3),
                                [1, 0, 2])
  cw = jax.jit(priors.class_weights, static_argnames="scheme")
  for scheme in ("none", "inverse", "sqrt_inverse", "balanced"):
    np.testing.assert_allclose(cw(counts, scheme=scheme), priors.class_weights(counts, scheme), rtol=1e-6)
  # beta / gamma are validated in Python, so they must be static under jit
  cb = jax.jit(functools.partial(priors.class_weights, scheme="effective_number", beta=0.999))
  np.testing.assert_allclose(cb(counts), priors.class_weights(counts, "effective_number", beta=0.999),
                             rtol=1e-6)
  batch = jnp.array([[1.0, 0.0, 3.0], [2.0, 2.0, 0.0]])
  np.testing.assert_allclose(jax.vmap(priors.prior)(batch), [[2 / 9, 1 / 9, 6 / 9], [0.4, 0.4, 0.2]],
                             rtol=1e-6)
  g = jax.grad(lambda c: priors.log_prior(c).sum())(counts)
  assert np.all(np.isfinite(g))
  g = jax.grad(lambda c: priors.class_weights(c, "effective_number").sum())(counts)
  assert np.all(np.isfinite(g))


def _np_cb_weights(counts, beta):
  """Class-Balanced weights as the reference computes them (float64 NumPy, sum C)."""
  n = np.asarray(counts, np.float64)
  w = (1.0 - beta) / (1.0 - np.power(beta, n))
  return w / np.sum(w) * len(n)


@pytest.mark.parametrize("beta", [0.9, 0.99, 0.999, 0.9999])
@pytest.mark.parametrize("n_max,num_classes", [(5000, 10), (500, 100)])
@pytest.mark.parametrize("ir", [100, 10])
def test_class_weights_effective_number_float64_reference(beta, n_max, num_classes, ir):
  """Effective-number weights equal the reference's float64 formula to 1e-6 relative.

  lt_jax follows ``richardaecn/class-balanced-loss`` / LDAM-DRW (``np.power(beta, n)`` in
  float64): weights are a function of the counts, so they are computed once on the host in
  float64 from the Python beta; a float32 ``log(float32(beta))`` would be ~2e-5 off at 0.9999.
  """
  counts = priors.lt_counts(n_max, num_classes, ir)
  want = _np_cb_weights(counts, beta)
  for c in (counts, jnp.asarray(counts)):
    got = np.asarray(priors.class_weights(c, "effective_number", beta=beta))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # Closed-over counts under jit are concrete: the same float64 path.
  got = jax.jit(lambda: priors.class_weights(jnp.asarray(counts), "effective_number", beta=beta))()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Traced counts: float32 fallback with a float64-derived log(beta), still within 1e-6.
  got = jax.jit(lambda c: priors.class_weights(c, "effective_number", beta=beta))(jnp.asarray(counts))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  e = jax.jit(lambda c: priors.effective_number(c, beta))(jnp.asarray(counts))
  np.testing.assert_allclose(e, (1.0 - np.power(beta, counts.astype(np.float64))) / (1.0 - beta), rtol=1e-6)


def test_class_weights_effective_number_float32_log_beta_is_off():
  """The old float32 ``log(beta)`` misses the reference by more than the new tolerance."""
  counts = priors.lt_counts(5000, 10, 100)
  want = _np_cb_weights(counts, 0.9999)
  n = jnp.asarray(counts, jnp.float32)
  old = 1.0 / (-jnp.expm1(n * jnp.log(jnp.float32(0.9999))))
  old = np.asarray(old / jnp.sum(old) * 10)
  assert np.max(np.abs(old / want - 1)) > 1e-6

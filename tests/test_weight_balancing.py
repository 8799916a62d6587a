"""Weight balancing (Alshammari et al., CVPR 2022): MaxNorm projection, its radius, the optax
transformation in a partitioned optimiser, and the stage-2 loss (vandit15's CB "softmax")."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lt_jax import decoupled, losses, priors
from lt_jax import weight_balancing as wb


def _kernel(norms, dim=6, seed=0):
  """A (dim, C) kernel whose column c has norm norms[c] (random directions)."""
  r = np.random.default_rng(seed)
  k = r.normal(size=(dim, len(norms)))
  return (k / np.linalg.norm(k, axis=0) * np.asarray(norms)).astype(np.float32)


def test_radius_hand_worked():
  k = _kernel([1.0, 2.0, 5.0])
  np.testing.assert_allclose(wb.max_norm_radius(k, 0.1), 1.0 + 0.1 * 4.0, rtol=1e-6)
  np.testing.assert_allclose(wb.max_norm_radius(k, 0.0), 1.0, rtol=1e-6)
  np.testing.assert_allclose(wb.max_norm_radius(k, 1.0), 5.0, rtol=1e-6)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    wb.max_norm_radius(k, 1.5)


def test_projection_rows_above_land_on_radius_rows_below_untouched():
  norms = [0.5, 1.0, 1.5, 2.0, 3.0]
  k = _kernel(norms, seed=1)
  out = np.asarray(wb.max_norm_project(k, 1.5))
  np.testing.assert_allclose(np.linalg.norm(out, axis=0), [0.5, 1.0, 1.5, 1.5, 1.5], rtol=1e-6)
  np.testing.assert_array_equal(out[:, :3], k[:, :3])       # at or below the radius: bit-identical
  # above: the same direction, scaled by r / ||w_c|| (float64 re-derivation)
  np.testing.assert_allclose(out[:, 3:], k[:, 3:].astype(np.float64) * (1.5 / np.array([2.0, 3.0])), rtol=1e-6)
  with pytest.raises(ValueError, match="kernel"):
    wb.max_norm_project(k[0], 1.0)


def _params():
  r = np.random.default_rng(2)
  return {"fc": {"kernel": jnp.asarray(r.normal(size=(4, 6)), jnp.float32)},   # a 2-D backbone leaf
          "head": {"kernel": jnp.asarray(_kernel([0.4, 0.8, 1.6, 3.2], dim=6, seed=3)),
                   "bias": jnp.asarray([5.0, -5.0, 9.0, 0.1], jnp.float32)}}


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_max_norm_composes_with_any_optimiser_in_the_stage_partition(opt):
  """Every step: head columns over the radius land on it, the rest take the plain update, the
  bias is free, the frozen backbone does not move (the ``wb`` stage's optimiser)."""
  params = _params()
  base = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.9)) if opt == "sgd" \
      else optax.adam(0.05)
  radius = float(wb.max_norm_radius(params["head"]["kernel"], 0.1))   # 0.4 + 0.1 * 2.8 = 0.68
  np.testing.assert_allclose(radius, 0.68, rtol=1e-6)
  labels = decoupled.param_labels(params, "head")
  plain = optax.partition({"trainable": base, "frozen": optax.set_to_zero()}, labels)
  tx = optax.partition({"trainable": optax.chain(base, wb.max_norm(radius)), "frozen": optax.set_to_zero()},
                       labels)
  st, st_plain = tx.init(params), plain.init(params)
  r = np.random.default_rng(4)
  p = params
  for step in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), jnp.float32), p)
    u, st = tx.update(grads, st, p)
    u_plain, st_plain = plain.update(grads, st_plain, p)
    new = optax.apply_updates(p, u)
    free = optax.apply_updates(p, u_plain)   # the unconstrained step from the same point
    k_free = np.asarray(free["head"]["kernel"], np.float64)
    n_free = np.linalg.norm(k_free, axis=0)
    expect = k_free * np.minimum(1.0, radius / n_free)   # float64 projection of the plain step
    np.testing.assert_allclose(np.asarray(new["head"]["kernel"]), expect, rtol=2e-6, atol=1e-7)
    over = n_free > radius
    assert over.any() and (~over).any(), step          # both cases occur
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new["head"]["kernel"]), axis=0)[over], radius, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["head"]["bias"]), np.asarray(free["head"]["bias"]))
    np.testing.assert_array_equal(np.asarray(new["fc"]["kernel"]), np.asarray(params["fc"]["kernel"]))
    # the optimiser's own state is that of the plain chain (the projection keeps none)
    jax.tree.map(np.testing.assert_array_equal, st.inner_states["trainable"].inner_state[0],
                 st_plain.inner_states["trainable"].inner_state)
    p = new
  with pytest.raises(ValueError, match="params"):
    wb.max_norm(1.0).update(grads, wb.max_norm(1.0).init(params))


def _np_cb_softmax_bce(z, y, counts, beta=0.9999):
  """NumPy float64: vandit15 ``CB_loss(..., "softmax")`` per example (the batch mean is the loss)."""
  z = z.astype(np.float64)
  C = z.shape[1]
  w = (1 - beta) / (1 - np.power(beta, counts.astype(np.float64)))
  w = w / w.sum() * C
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  t = np.eye(C)[y]
  bce = -(t * np.maximum(np.log(p), -100) + (1 - t) * np.maximum(np.log(1 - p), -100))
  value = w[y] * bce.mean(1)
  # d/dz: dL/dp_c = w/C (-t_c/p_c + (1 - t_c)/(1 - p_c)), dp/dz = diag(p) - p p^T
  dp = w[y][:, None] / C * (-t / p + (1 - t) / (1 - p))
  dz = p * dp - p * np.sum(p * dp, 1, keepdims=True)
  return value, dz


def test_cb_softmax_bce_matches_the_reference_formula_value_and_gradient():
  r = np.random.default_rng(5)
  counts = np.array([500, 120, 40, 9, 3], np.float32)
  z = (2 * r.normal(size=(7, 5))).astype(np.float32)
  y = r.integers(0, 5, size=7).astype(np.int32)
  L = losses.make_loss("cb_softmax_bce")
  value, dz = _np_cb_softmax_bce(z, y, counts)
  out, _ = L.apply(z, y, counts, L.init(5))
  np.testing.assert_allclose(out, value, rtol=2e-5)
  g = jax.grad(lambda zz: losses.reduce_mean(L.apply(zz, y, counts, ())[0]))(jnp.asarray(z))
  np.testing.assert_allclose(g, dz / len(y), rtol=1e-4, atol=1e-7)
  # the weights are priors.class_weights(effective_number), as every CB entry
  w = np.asarray(priors.class_weights(counts, "effective_number", beta=0.9999))
  base = np.asarray(losses.softmax_bce_loss(z, y))
  np.testing.assert_allclose(out, w[y] * base, rtol=1e-6)
  # PyTorch's clamp: a confidently wrong class costs exactly 100 / C in its BCE term
  zz = np.array([[0.0, 200.0, 0.0]], np.float32)
  np.testing.assert_allclose(losses.softmax_bce_loss(zz, np.array([0])), (100 + 100 + 0) / 3, rtol=1e-6)

"""Weight balancing: the per-class MaxNorm constraint as an optax transformation.

Alshammari, Wang, Ramanan & Kong, "Long-Tailed Recognition via Weight Balancing", CVPR 2022
(reference code ``ShadeAlsha/LTR-weight-balancing``, ``utils/regularizers.py``). The method is
two stages: (1) plain cross-entropy with a tuned, larger weight decay (5e-3 instead of the
usual 5e-4), which alone balances the per-class classifier norms ``||w_c||`` much better;
(2) the classifier alone (backbone and BatchNorm frozen) is fine-tuned with a class-balanced
loss, a large weight decay (0.1) and **MaxNorm**: after every update, each class's weight row
whose norm exceeds a radius ``r`` is projected back onto the ball of radius ``r``,

    ``w_c <- w_c * min(1, r / ||w_c||_2)``,

with ``r = min_c ||w_c|| + thresh * (max_c ||w_c|| - min_c ||w_c||)`` (``thresh = 0.1``) set
*once* from the stage-1 weights (:func:`max_norm_radius`; the reference's
``MaxNorm_via_PGD.setPerLayerThresh``); the bias has an infinite radius (unconstrained).

:func:`max_norm` is an ``optax.GradientTransformation`` (it needs ``params``): put it last in a
chain, after any optimiser, and it turns the chain's update ``u`` into
``project(params + u) - params``, so ``optax.apply_updates`` lands on the projected weights.
It projects every 2-D leaf it sees column-wise (lt_jax's kernels are ``(D, C)``: column ``c`` is
``w_c``) and leaves other leaves (biases) alone, so wrap it in ``optax.masked`` /
``optax.partition`` to choose the leaves (the trainer's ``wb`` stage applies it to the
trainable classifier partition). Applied every step, as the paper and the author intend
(LTR-weight-balancing#5); the demo script calls the projection once per epoch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lt_jax import heads

Array = jax.Array

__all__ = ["max_norm_radius", "max_norm_project", "max_norm", "MaxNormState"]


def max_norm_radius(kernel: Array, thresh: float = 0.1) -> Array:
  """``r = min_c ||w_c|| + thresh (max_c ||w_c|| - min_c ||w_c||)`` of a ``(D, C)`` kernel.

  The reference's per-layer threshold (``setPerLayerThresh`` with ``thresh=0.1``, computed once
  from the stage-1 classifier before stage 2 starts). ``thresh = 0`` caps every class at the
  smallest norm, ``thresh = 1`` at the largest (no row moves at the start).
  """
  if not 0.0 <= float(thresh) <= 1.0:
    raise ValueError(f"max_norm thresh must be in [0, 1] (0: the smallest class norm, 1: the largest), "
                     f"got {thresh}")
  norms = heads.weight_norms(kernel)
  lo, hi = jnp.min(norms), jnp.max(norms)
  return lo + thresh * (hi - lo)


def max_norm_project(kernel: Array, radius: float | Array) -> Array:
  """Columns of a ``(D, C)`` kernel with ``||w_c|| > radius`` rescaled onto the radius.

  ``w_c * (radius / ||w_c||)`` where ``||w_c|| > radius``, ``w_c`` unchanged otherwise (the
  reference's ``MaxNorm_via_PGD.PGD`` with ``LpNorm=2, tau=1``). The norm is computed in
  float32; the result has the kernel's dtype.
  """
  k = jnp.asarray(kernel)
  if k.ndim != 2:
    raise ValueError(f"max_norm_project needs a (dim, num_classes) kernel, got shape {k.shape}")
  norms = heads.weight_norms(k)
  r = jnp.asarray(radius, jnp.float32)
  over = norms > r
  scale = jnp.where(over, r / jnp.where(over, norms, 1.0), 1.0)
  return (k.astype(jnp.float32) * scale[None, :]).astype(k.dtype)


class MaxNormState(NamedTuple):
  """No statistics: the radius is fixed when the transformation is built."""


def max_norm(radius: float | Array) -> optax.GradientTransformation:
  """MaxNorm by projected gradient descent, as the last link of an optax chain.

  ``update(u, state, params) -> project(params + u) - params`` for every 2-D leaf (column-wise,
  :func:`max_norm_project`); 1-D leaves (biases) and scalars pass ``u`` through (the
  reference's infinite bias radius). ``params + (project(params + u) - params)`` equals the
  projected weights up to one float rounding per entry (a relative error of about 1e-7).
  Composes with any optimiser: ``optax.chain(optax.sgd(lr, 0.9), max_norm(r))``,
  ``optax.chain(optax.adam(lr), max_norm(r))``; choose leaves with ``optax.masked``.
  ``radius`` is a float or a scalar array (e.g. :func:`max_norm_radius` of the stage-1 kernel).
  """
  r = jnp.asarray(radius, jnp.float32)

  def init_fn(params: Any) -> MaxNormState:
    del params
    return MaxNormState()

  def update_fn(updates: Any, state: MaxNormState, params: Any = None):
    if params is None:
      raise ValueError("max_norm projects the parameters: call update(updates, state, params)")

    def one(u, p):
      if u is None or jnp.ndim(p) != 2:
        return u
      new = max_norm_project(p + u, r)
      return (new - p).astype(u.dtype)

    return jax.tree.map(one, updates, params, is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(init_fn, update_fn)

"""BALMS Meta Sampler: learnt per-class sampling rates, meta-trained through one virtual step.

Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020 (reference
code ``jiawei-ren/BalancedMetaSoftmax-Classification``: ``data/MetaSampler.py``,
``run_networks.py::meta_forward``). In the decoupled stage a classifier is trained with the
Balanced Softmax loss on a frozen representation, and its training batches come from a learnt
sampler:

* **Sampler.** One logit ``phi_c`` per class; training example ``i`` has the unnormalised
  sampling weight ``sigmoid(phi_{y_i})`` (``SampleLearner``: ``Linear(C, 1, bias=False)`` on the
  one-hot label, then a sigmoid), initialised to ``phi_c = logit(q_c / (min q + max q))``,
  ``q_c = pi_c^{-init_pow}`` (:func:`init_logits`; the default ``init_pow = 0`` gives
  ``sigmoid(phi) = 1/2`` for every class: instance-balanced sampling). Each of the ``B`` batch
  positions draws one training example by a **hard Gumbel-softmax** over all ``N`` examples with
  logits ``log sigmoid(phi_{y_i})`` (temperature 1): ``i_b = argmax_i (log sigmoid(phi_{y_i}) + g_{b,i})``,
  ``g`` i.i.d. Gumbel (:func:`gumbel_draws`).
* **Straight-through weights.** Drawn example ``b`` enters the virtual step's loss with the
  weight ``w_b = 1 + p_b - stop_gradient(p_b)``, ``p_b = softmax_i(log sigmoid(phi_{y_i}) + g_{b,i})``
  at ``i_b`` (:func:`straight_through_weights`): its value is exactly 1 and its gradient is that
  of the soft sample, the reference's ``hard - soft.detach() + soft`` multiplied into the
  per-example loss (``forward_loss``: ``x * s.detach() * s`` summed over ``N``).
* **Meta step.** A virtual step of the classifier with the weighted Balanced Softmax loss, taken
  by the real optimiser itself (its learning rate, momentum state and weight decay: what
  ``higher.innerloop_ctx(classifier, model_optimizer)`` differentiates), the cross-entropy of the
  virtual classifier on a class-balanced meta batch, and its gradient with respect to ``phi``
  (:func:`meta_gradient`: ``jax.grad`` through one functional optax step, no extra library);
  Adam (lr 0.01) updates ``phi``. The real step then trains the classifier on the same batch
  with the plain (unweighted) Balanced Softmax loss (``batch_forward`` after ``meta_forward``),
  so the sampler's update only changes later batches.

**Cost of the draws.** The softmax denominators need ``B x N`` Gumbel variables per step, as in
the reference. Because ``phi`` enters only through the example's class, the per-class
log-sum-exps of the noise, ``L_{b,c} = logsumexp_{i: y_i = c} g_{b,i}``, are computed once
without gradient, and the differentiable part is ``B x C``:
``log p_b = a_{y_{i_b}} + g_{b,i_b} - logsumexp_c (a_c + L_{b,c})``, ``a = log sigmoid(phi)``,
which equals the reference's ``N``-way softmax exactly (tests/test_meta_sampler.py compares both).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
PyTree = Any

__all__ = ["MetaSamplerState", "init_logits", "GumbelDraws", "gumbel_draws", "soft_probability",
           "straight_through_weights", "meta_gradient", "sampling_probs"]


class MetaSamplerState(NamedTuple):
  """The sampler's learnable logits ``phi`` (``(C,)``) and their optimiser (Adam) state."""
  logits: Array
  opt_state: Any


def init_logits(counts, init_pow: float = 0.0) -> Array:
  """``phi_c = logit(q_c / (min q + max q))``, ``q_c = pi_c^{-init_pow}`` (``SampleLearner.init_weights_sampler``).

  ``init_pow = 0``: all zero (``sigmoid = 1/2``, instance-balanced draws); ``init_pow = 1``:
  ``sigmoid(phi_c) ∝ 1 / n_c`` up to the ``min + max`` normalisation (close to class-balanced).
  Empty classes (never drawn) get the logit of the smallest non-empty class.
  """
  n = np.asarray(counts, np.float64)
  present = n > 0
  if not present.any():
    raise ValueError("init_logits: every class is empty")
  pi = n / n.sum()
  q = np.where(present, np.where(present, pi, 1.0) ** -float(init_pow), np.nan)
  q = q / (np.nanmin(q) + np.nanmax(q))
  q = np.where(present, q, np.nanmin(q))
  return jnp.asarray(np.log(q) - np.log1p(-q), jnp.float32)


def sampling_probs(logits: Array, counts) -> Array:
  """Per-class probability of a draw: ``n_c sigmoid(phi_c) / sum_k n_k sigmoid(phi_k)`` (``(C,)``)."""
  w = jnp.asarray(counts, jnp.float32) * jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
  return w / jnp.sum(w)


class GumbelDraws(NamedTuple):
  """One batch of hard Gumbel-softmax draws and what the straight-through gradient needs."""
  indices: Array     # (B,) int32 drawn training examples i_b
  noise: Array       # (B,) g_{b, i_b}
  class_lse: Array   # (B, C) logsumexp of the noise over each class's examples (-inf: empty class)


def gumbel_draws(key: Array, logits: Array, labels: Array, num: int) -> GumbelDraws:
  """``num`` hard Gumbel-softmax draws over the ``N`` training examples (module docstring).

  ``labels``: ``(N,)`` int training labels. Costs ``num x N`` Gumbel variables (the reference's
  ``gumbel_softmax(log w.expand(B, N), hard=True)``); nothing here is differentiated.
  """
  labels = jnp.asarray(labels)
  C = logits.shape[0]
  a = jax.nn.log_sigmoid(jnp.asarray(logits, jnp.float32))[labels]          # (N,)
  g = jax.random.gumbel(key, (num, labels.shape[0]), jnp.float32)           # (B, N)
  idx = jnp.argmax(a[None, :] + g, axis=1).astype(jnp.int32)
  sel = jnp.take_along_axis(g, idx[:, None], axis=1)[:, 0]
  top = jnp.max(g, axis=1, keepdims=True)
  sums = jax.ops.segment_sum(jnp.exp(g - top).T, labels, num_segments=C)    # (C, B)
  lse = jnp.where(sums.T > 0, jnp.log(jnp.where(sums.T > 0, sums.T, 1.0)) + top, -jnp.inf)
  return GumbelDraws(idx, sel, lse)


def soft_probability(logits: Array, draws: GumbelDraws, drawn_labels: Array) -> Array:
  """``p_b``: the soft Gumbel-softmax probability of the drawn example ``i_b`` (``drawn_labels = y_{i_b}``).

  ``p_b = exp(a_{y_b} + g_b - logsumexp_c(a_c + L_{b,c}))``, ``a = log sigmoid(phi)``: the
  reference's ``softmax(log w + g)`` over the ``N`` examples at ``i_b``, grouped by class.
  Differentiable in ``logits`` (in their dtype).
  """
  a = jax.nn.log_sigmoid(jnp.asarray(logits))
  log_p = a[drawn_labels] + draws.noise - jax.nn.logsumexp(a[None, :] + draws.class_lse, axis=1)
  return jnp.exp(log_p)


def straight_through_weights(logits: Array, draws: GumbelDraws, drawn_labels: Array) -> Array:
  """``w_b = 1 + p_b - stop_gradient(p_b)``: value exactly 1, gradient of :func:`soft_probability`."""
  p = soft_probability(logits, draws, drawn_labels)
  return 1.0 + (p - jax.lax.stop_gradient(p))


def meta_gradient(logits: Array, params: PyTree, opt_state: Any, tx: optax.GradientTransformation,
                  train_loss: Callable[[PyTree, Array], Array], meta_loss: Callable[[PyTree], Array],
                  weights: Callable[[Array], Array]) -> tuple[Array, Array]:
  """``(meta loss, d meta loss / d phi)`` through one virtual step of the real optimiser.

  ``theta'(phi) = apply_updates(theta, tx.update(grad_theta train_loss(theta, w(phi)), opt_state, theta))``
  and the meta loss is ``meta_loss(theta'(phi))``; ``jax.value_and_grad`` differentiates through
  the inner gradient (a Hessian-vector product of the classifier loss) and the optimiser's
  update rule (momentum buffer, weight decay, the current learning rate), as ``higher`` does
  with the reference's ``model_optimizer``. ``train_loss(params, w)`` is the weighted batch loss,
  ``weights(phi)`` the straight-through weights of the drawn batch.
  """
  def outer(phi):
    g = jax.grad(train_loss)(params, weights(phi))
    updates, _ = tx.update(g, opt_state, params)
    return meta_loss(optax.apply_updates(params, updates))

  return jax.value_and_grad(outer)(logits)

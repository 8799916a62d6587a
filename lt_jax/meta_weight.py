"""Meta-Weight-Net: a learnt map from an example's loss to its weight (Shu et al., NeurIPS 2019).

Shu, Xie, Yi, Zhao, Zhou, Xu & Meng, "Meta-Weight-Net: Learning an Explicit Mapping For Sample
Weighting", NeurIPS 2019; reference ``xjtushujun/Meta-weight-net_class-imbalance``
(``meta-weight-net-class-imbalance.py``, ``resnet.py::VNet``). With model parameters ``θ``, the
per-example training losses ``ℓ_i(θ)`` of a batch, the weighting net ``V(·; φ)`` (an MLP
``1 → 100 → ReLU → 1 → sigmoid``) and the weights normalised by their batch sum,
``w_i(φ, ℓ) = V(ℓ_i; φ) / Σ_j V(ℓ_j; φ)``, one training step is::

    θ̂(φ) = θ − α ∇_θ Σ_i w_i(φ, ℓ(θ)) ℓ_i(θ)           virtual SGD step at the current lr α
    φ'   = optimiser step on ∇_φ CE_meta(θ̂(φ))           meta loss on a balanced meta batch
    θ'   = optimiser step on ∇_θ Σ_i sg(w_i(φ', ℓ)) ℓ_i(θ)  real step, weights without gradient

Everything here is a pure function: the bilevel step is ``jax.grad`` through one functional SGD
step (no ``higher``-style library). :func:`meta_gradient` is that definition written literally;
:func:`meta_weight_grads` computes the same quantities sharing one forward pass of the model: the
virtual gradient is ``J_ℓ(θ)ᵀ c(φ)`` with ``c = ∂(Σ w ℓ)/∂ℓ`` (a vector-Jacobian product whose
cotangent alone depends on ``φ``), and the real gradient is ``J_ℓ(θ)ᵀ w(φ')`` with the same
``jax.vjp``, so the model runs forward once on the training batch (the reference runs it twice,
on a copy and on the model, with identical results in train mode).

Conventions of the reference code, followed here where the paper differs or is silent:

* The virtual step differentiates the normalised weighted loss *through* the weights (the
  reference feeds the un-detached ``cost`` into ``VNet``); the paper's Eq. 4 treats the weights
  as constants in ``θ``. lt_jax follows the code.
* The virtual step is plain SGD ``θ − α g`` (``MetaModule.update_params``): no momentum, no
  weight decay; ``α`` is the model's current learning rate. (The reference computes its
  ``meta_lr`` from ``epoch`` while the real lr uses ``epoch + 1``, so in the epochs 79 and 89
  the two differ by 10x; lt_jax uses the schedule's lr of the step for both.)
* The weights are ``V / Σ V`` when ``Σ V ≠ 0``, else ``V`` (the reference's ``norm_c != 0``).
* ``V``'s layers are initialised as PyTorch's ``nn.Linear`` (weight and bias
  ``U(−1/√fan_in, 1/√fan_in)``), which the reference's ``MetaLinear`` copies.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any


def _torch_linear_init(fan_in: int):
  """``U(−1/√fan_in, 1/√fan_in)``: PyTorch ``nn.Linear``'s default for weight and bias."""
  bound = 1.0 / float(fan_in) ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class VNet(nn.Module):
  """The weighting net: ``V(ℓ) = sigmoid(W2 relu(W1 ℓ + b1) + b2)``, ``(B,) -> (B,)`` in ``(0, 1)``."""
  hidden: int = 100

  @nn.compact
  def __call__(self, loss: Array) -> Array:
    x = jnp.asarray(loss, jnp.float32)[:, None]
    x = nn.Dense(self.hidden, kernel_init=_torch_linear_init(1), bias_init=_torch_linear_init(1))(x)
    x = nn.relu(x)
    x = nn.Dense(1, kernel_init=_torch_linear_init(self.hidden), bias_init=_torch_linear_init(self.hidden))(x)
    return nn.sigmoid(x)[:, 0]


def init_vnet(key: jax.Array, hidden: int = 100) -> PyTree:
  """Fresh ``VNet`` parameters ``{'params': {'Dense_0': ..., 'Dense_1': ...}}``."""
  return VNet(hidden).init(key, jnp.zeros((1,), jnp.float32))


def example_weights(vnet_params: PyTree, per_example: Array) -> Array:
  """``w_i = V(ℓ_i) / Σ_j V(ℓ_j)`` (``V`` itself when the sum is 0, as the reference), float32 ``(B,)``."""
  hidden = vnet_params["params"]["Dense_0"]["kernel"].shape[-1]
  v = VNet(hidden).apply(vnet_params, per_example)
  s = jnp.sum(v)
  return jnp.where(s != 0, v / jnp.where(s != 0, s, 1.0), v)


def weighted_loss(vnet_params: PyTree, per_example: Array) -> Array:
  """The reference's ``l_f_meta = Σ_i ℓ_i w_i(φ, ℓ)`` (weights depend on the losses)."""
  return jnp.sum(per_example * example_weights(vnet_params, per_example))


def sgd_step(params: PyTree, grads: PyTree, lr: Array | float) -> PyTree:
  """The virtual step ``θ − α g`` (``MetaModule.update_params``)."""
  return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def meta_gradient(per_example_fn: Callable[[PyTree], Array], meta_loss_fn: Callable[[PyTree], Array],
                  params: PyTree, vnet_params: PyTree, lr: Array | float) -> tuple[Array, PyTree]:
  """``(CE_meta(θ̂), ∇_φ CE_meta(θ̂(φ)))``, the definition: ``jax.grad`` through one SGD step.

  ``per_example_fn(θ) -> (B,)`` training losses, ``meta_loss_fn(θ) ->`` scalar meta loss.
  (Differentiates ``jax.grad`` of the weighted loss; :func:`meta_weight_grads` computes the
  same with one forward pass.)
  """
  def objective(phi):
    g = jax.grad(lambda p: weighted_loss(phi, per_example_fn(p)))(params)
    return meta_loss_fn(sgd_step(params, g, lr))
  return jax.value_and_grad(objective)(vnet_params)


class MetaWeightOut(NamedTuple):
  grads: PyTree            # ∇_θ Σ_i w_i(φ') ℓ_i(θ), the real step's gradient
  vnet_params: PyTree      # φ'
  vnet_opt_state: PyTree
  aux: Any                 # per_example_fn's auxiliary output (e.g. new BatchNorm statistics)
  per_example: Array       # ℓ(θ), (B,)
  weights: Array           # w(φ', ℓ), (B,), sum 1
  meta_loss: Array         # CE_meta(θ̂(φ)) before the VNet update
  vnet_grads: PyTree       # ∇_φ CE_meta(θ̂(φ)), the meta-gradient


def meta_weight_grads(per_example_fn: Callable[[PyTree], tuple[Array, Any]],
                      meta_loss_fn: Callable[[PyTree], Array], params: PyTree, vnet_params: PyTree,
                      vnet_opt_state: PyTree, vnet_tx: optax.GradientTransformation,
                      lr: Array | float) -> MetaWeightOut:
  """One Meta-Weight-Net step up to the model's optimiser (see the module docstring).

  ``per_example_fn(θ) -> ((B,) losses, aux)`` runs the model once (its ``jax.vjp`` is shared by
  the virtual and the real step); ``meta_loss_fn(θ)`` is the meta loss of a model with
  parameters ``θ`` on the meta batch; ``vnet_tx`` updates ``φ`` (the reference: SGD 1e-5,
  momentum 0.9, Nesterov, weight decay 5e-4). The caller applies its optimiser to ``grads``.
  """
  per_example, vjp_fn, aux = jax.vjp(per_example_fn, params, has_aux=True)

  def objective(phi):
    cotangent = jax.grad(lambda l: weighted_loss(phi, l))(per_example)   # ∂(Σ w ℓ)/∂ℓ, depends on φ
    return meta_loss_fn(sgd_step(params, vjp_fn(cotangent)[0], lr))

  meta_loss, g_phi = jax.value_and_grad(objective)(vnet_params)
  updates, vnet_opt_state = vnet_tx.update(g_phi, vnet_opt_state, vnet_params)
  vnet_params = optax.apply_updates(vnet_params, updates)
  weights = jax.lax.stop_gradient(example_weights(vnet_params, per_example))
  grads = vjp_fn(weights)[0]
  return MetaWeightOut(grads, vnet_params, vnet_opt_state, aux, per_example, weights, meta_loss, g_phi)

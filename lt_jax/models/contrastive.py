"""Projection heads and the contrastive wrapper of any lt_jax backbone.

:class:`ContrastiveNet` wraps a model (``(x, train) -> (logits, features)``) and adds an
MLP projection head ``'proj'`` (and, for BCL, the class-centre MLP ``'centre_proj'``).
The backbone shares the wrapper's parameter scope (``nn.share_scope``), so the parameter
tree is the backbone's own plus ``proj`` (+ ``centre_proj``): ``params['head']`` is still
the classifier, so the decoupled stages (cRT, LWS, fine-tuning), the evaluators and
``init_from`` work on a contrastive model unchanged; its ``__call__`` *is* the backbone's.
:meth:`ContrastiveNet.contrast` returns everything a contrastive update needs in one pass.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lt_jax import heads as lt_heads
from lt_jax.models.layers import batch_norm

Array = jax.Array


def _torch_linear_init(key, shape, dtype=jnp.float32):
  """PyTorch ``nn.Linear``'s default: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (kernel ``(in, out)``)."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class _TorchLinear(nn.Module):
  """``y = x W + b`` with PyTorch's default initialisation of weight *and* bias."""
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", _torch_linear_init, (fan_in, self.features))
    bias = self.param("bias", lambda k, s: _torch_linear_init(k, (fan_in, *s))[0], (self.features,))
    return x.astype(jnp.float32) @ kernel + bias


class ProjectionHead(nn.Module):
  """MLP projection ``Linear(D, H) [-> BN] -> ReLU -> Linear(H, out)``.

  ``bn=False`` is SupContrast's ``head='mlp'`` (SimCLR / SupCon; Khosla et al., NeurIPS 2020);
  ``bn=True`` is the MoCo-v2-style head of PaCo (``moco/builder.py``, ``mlp=True``) and BCL
  (``BCLModel.head`` / ``head_fc``). ``hidden=0``: ``H = D`` (every reference). Linear
  layers use PyTorch's default initialisation (``U(+-1/sqrt(fan_in))`` weight and bias), BN
  PyTorch's defaults (momentum 0.1, eps 1e-5). Returns the *unnormalised* projection.
  """
  out: int
  hidden: int = 0
  bn: bool = False
  bn_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = x.astype(jnp.float32)
    h = _TorchLinear(self.hidden or x.shape[-1], name="fc1")(x)
    if self.bn:
      h = batch_norm(train, jnp.float32, "bn", self.bn_impl)(h)
    return _TorchLinear(self.out, name="fc2")(nn.relu(h))


class ContrastiveNet(nn.Module):
  """A backbone plus projection head(s); ``__call__`` is the backbone's ``(logits, features)``.

  Attributes:
    backbone: any lt_jax model (``lt_jax.models.get_model``).
    proj_dim: projection width (SupContrast 128; PaCo CIFAR ``moco-dim`` 32).
    proj_hidden: hidden width of the projection MLP (0: the feature width).
    proj_bn: BatchNorm in the projection MLP (PaCo, BCL: yes; SimCLR/SupCon reference: no).
    centres: BCL's class-complement centres ``normalize(MLP(W^T))`` over the classifier's
      ``(D, C)`` kernel (``BCLModel.head_fc(fc.weight.T)``, same MLP shape as ``proj``).
  """
  backbone: nn.Module
  proj_dim: int = 128
  proj_hidden: int = 0
  proj_bn: bool = False
  centres: bool = False
  bn_impl: str = "auto"

  def setup(self):
    nn.share_scope(self, self.backbone)  # backbone params at the top level, next to 'proj'
    self.proj = ProjectionHead(self.proj_dim, self.proj_hidden, self.proj_bn, self.bn_impl)
    if self.centres:
      self.centre_proj = ProjectionHead(self.proj_dim, self.proj_hidden, self.proj_bn, self.bn_impl)

  def __call__(self, x: Array, train: bool, **kw: Any) -> tuple[Array, Array]:
    logits, features = self.backbone(x, train, **kw)
    if self.is_initializing():  # create the projection parameters with the backbone's
      self._heads(features, train)
    return logits, features

  def _heads(self, features: Array, train: bool) -> dict[str, Array]:
    out = {"z": lt_heads._l2_normalize(self.proj(features, train), axis=-1)}
    if self.centres:
      kernel = self.backbone.variables["params"]["head"]["kernel"]  # (D, C), linear or cosine head
      out["centres"] = lt_heads._l2_normalize(self.centre_proj(kernel.T, train), axis=-1)
    return out

  def contrast(self, x: Array, train: bool) -> dict[str, Array]:
    """``{'logits', 'features', 'z'}`` (+ ``'centres'`` ``(C, proj_dim)``) for a batch, one pass.

    ``z = normalize(proj(features))``; the centres are ``normalize(centre_proj(W^T))`` with
    the centre MLP's BatchNorm over the ``C`` class rows in training (as ``BCLModel``).
    """
    logits, features = self.backbone(x, train)
    return {"logits": logits, "features": features, **self._heads(features, train)}

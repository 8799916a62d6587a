"""Multi-expert backbones (RIDE, SADE): a shared stem, then E experts as one ``nn.vmap``-ed module.

Wang et al., "Long-tailed Recognition by Routing Diverse Distribution-Aware Experts" (RIDE),
ICLR 2021, ``frank-xwang/RIDE-LongTailRecognition`` ``model/ldam_drw_resnets/ride_resnet_cifar.py``;
Zhang et al., "Self-Supervised Aggregation of Diverse Experts for Test-Agnostic Long-Tailed
Recognition" (SADE), NeurIPS 2022, ``Vanint/SADE-AgnosticLT``
``model/ldam_drw_resnets/expert_resnet_cifar.py`` (the same network):

* the stem and the first stage are shared; every expert has its own later stages, its own
  pooled feature ``f_i`` and its own classifier (a cosine classifier ``s * cos(f_i, w_ic)``
  with ``s = 30``, the reference's ``NormedLinear`` times ``self.s``; ``head='linear'`` is
  the reference's ``use_norm=False``);
* ``reduce_dimension`` (the reference CIFAR configs set it) narrows the expert stages by 3/4
  so that three experts cost about as much as 1.5 single networks: ResNet-32's stages 2/3
  become 24/48 channels instead of 32/64 (the reference's ``layer2_output_dim=24``,
  ``layer3_output_dim=48``); for the small Fashion-MNIST CNN the same 3/4 applies to its
  second conv stage and feature layer (64 -> 48 channels, 128 -> 96 features);
* the model's output is the **mean of the experts' logits** (the reference's
  ``torch.stack(outs, dim=1).mean(dim=1)``), so every evaluator scores the ensemble mean.

In JAX the E experts are *one* module vmapped over a leading expert axis
(``nn.vmap(..., variable_axes={'params': 0, 'batch_stats': 0}, split_rngs={'params': True})``):
every expert parameter and BatchNorm statistic has shape ``(E, ...)`` under
``params['experts']`` / ``batch_stats['experts']``, each expert is initialised with its own
key, and XLA runs the experts as one batched computation instead of E Python calls.

``__call__(x, train, experts=False)``: ``(mean logits (B, C), features (B, E*D))`` (the
experts' features concatenated); ``experts=True`` gives ``(expert logits (B, E, C),
features (B, E, D))``, which the multi-expert losses (``losses.ride_loss``,
``losses.sade_loss``) and SADE's test-time aggregation read. The reference's random expert
subset (``use_experts='rand'``) and the RIDE expert-assignment router are not implemented.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lt_jax.models.cnn import max_pool_2x2
from lt_jax.models.layers import (Backbone, Conv, batch_norm, global_avg_pool, kaiming_normal, make_head,
                                  resolve_conv_impl, resolve_dtype)
from lt_jax.models.resnet_cifar import BasicBlock, CIFAR_DEPTHS

Array = jax.Array

EXPERT_HEADS = ("cosine", "linear")


def reduced(width: int, reduce_dimension: bool) -> int:
  """An expert stage's width: ``3/4`` of the single network's with ``reduce_dimension`` (32 -> 24)."""
  return (3 * width) // 4 if reduce_dimension else width


class CNNExpert(nn.Module):
  """One expert of :class:`ExpertCNN`: the CNN's second conv stage, feature layer and head."""

  width: int
  feature_dim: int
  num_classes: int
  head: str
  cosine_scale: float
  head_bias: bool
  train: bool
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  bn_impl: str = "auto"

  @nn.compact
  def __call__(self, h: Array) -> tuple[Array, Array]:
    for k in (3, 4):  # conv3, conv4 of the single CNN (the names keep the parameter tree familiar)
      h = Conv(self.width, 3, 1, 1, conv_impl=self.conv_impl, dtype=self.dtype, name=f"conv{k}")(h)
      h = nn.relu(batch_norm(self.train, self.dtype, f"bn{k}", self.bn_impl)(h))
    h = max_pool_2x2(h).reshape(h.shape[0], -1)
    f = nn.Dense(self.feature_dim, use_bias=False, kernel_init=kaiming_normal, dtype=self.dtype,
                 param_dtype=jnp.float32, name="fc")(h)
    f = nn.relu(batch_norm(self.train, self.dtype, "bn_fc", self.bn_impl)(f)).astype(jnp.float32)
    z = make_head(self.head, self.num_classes, self.cosine_scale, self.head_bias)(f)
    return z, f


class ResNetExpert(nn.Module):
  """One expert of :class:`ExpertCifarResNet`: stages 2 and 3 of a CIFAR ResNet, pooling, head."""

  widths: tuple[int, int]
  blocks: int
  num_classes: int
  head: str
  cosine_scale: float
  head_bias: bool
  train: bool
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  bn_impl: str = "auto"

  @nn.compact
  def __call__(self, h: Array) -> tuple[Array, Array]:
    for s, planes in enumerate(self.widths):
      for k in range(self.blocks):
        h = BasicBlock(planes, 2 if k == 0 else 1, self.conv_impl, self.bn_impl, self.dtype,
                       name=f"stage{s + 2}_block{k}")(h, self.train)
    f = global_avg_pool(h)
    z = make_head(self.head, self.num_classes, self.cosine_scale, self.head_bias)(f)
    return z, f


def _vmapped(cls, num_experts: int):
  """``cls`` with a leading expert axis on its parameters and BN statistics; the input is shared."""
  return nn.vmap(cls, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True},
                 in_axes=None, out_axes=1, axis_size=num_experts)


def _combine(z: Array, f: Array, experts: bool) -> tuple[Array, Array]:
  """``(B, E, C), (B, E, D)`` -> the model's outputs (see the module docstring)."""
  if experts:
    return z, f
  return jnp.mean(z, axis=1), f.reshape(f.shape[0], -1)


class _ExpertBackbone(Backbone):
  num_experts: int = 3
  reduce_dimension: bool = True
  cosine_scale: float = 30.0
  head: str = "cosine"

  def _check(self) -> None:
    if not isinstance(self.num_experts, int) or self.num_experts < 1:
      raise ValueError(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
    if self.head not in EXPERT_HEADS:
      raise ValueError(f"a multi-expert model's head must be one of {EXPERT_HEADS}, got {self.head!r}")


class ExpertCNN(_ExpertBackbone):
  """The small Fashion-MNIST CNN (:class:`lt_jax.models.SmallCNN`) with E experts.

  Shared: ``conv1, bn1, conv2, bn2`` and 2x2 pooling (the first stage). Per expert (leading
  axis E under ``params['experts']``): ``conv3, bn3, conv4, bn4`` (``widths[1]`` channels, 3/4
  of it with ``reduce_dimension``), pooling, ``fc, bn_fc`` (``feature_dim``, 3/4 of it) and
  ``head``. Defaults: 3 experts, reduced (48 channels, 96 features per expert), cosine head s=30.
  """

  widths: tuple[int, int] = (32, 64)
  feature_dim: int = 128

  @nn.compact
  def __call__(self, x: Array, train: bool, experts: bool = False) -> tuple[Array, Array]:
    self._check()
    impl, dtype = resolve_conv_impl(self.conv_impl), resolve_dtype(self.dtype)
    if x.ndim == 3:
      x = x[..., None]
    h = x.astype(dtype)
    for k in (1, 2):
      h = Conv(self.widths[0], 3, 1, 1, conv_impl=impl, dtype=dtype, name=f"conv{k}")(h)
      h = nn.relu(batch_norm(train, dtype, f"bn{k}", self.bn_impl)(h))
    h = max_pool_2x2(h)
    z, f = _vmapped(CNNExpert, self.num_experts)(
        reduced(self.widths[1], self.reduce_dimension), reduced(self.feature_dim, self.reduce_dimension),
        self.num_classes, self.head, self.cosine_scale, self.head_bias, train, dtype, impl, self.bn_impl,
        name="experts")(h)
    return _combine(z, f, experts)


class ExpertCifarResNet(_ExpertBackbone):
  """A CIFAR ResNet (option-A shortcuts, :class:`lt_jax.models.CifarResNet`) with E experts.

  Shared: ``conv_init, bn_init`` and stage 1 (``widths[0]`` channels). Per expert: stages 2 and
  3 (``widths[1:]``, 24/48 for ResNet-32 with ``reduce_dimension`` as the RIDE/SADE CIFAR
  configs), global pooling and ``head``. The option-A shortcut pads ``(planes - in) // 2``
  zero channels on each side, as the reference's RIDE variant (16 -> 24: 4 + 4).
  """

  depth: int = 32
  widths: tuple[int, int, int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: Array, train: bool, experts: bool = False) -> tuple[Array, Array]:
    self._check()
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. {CIFAR_DEPTHS}), got {self.depth}")
    n = (self.depth - 2) // 6
    impl, dtype = resolve_conv_impl(self.conv_impl), resolve_dtype(self.dtype)
    h = Conv(self.widths[0], 3, 1, 1, conv_impl=impl, dtype=dtype, name="conv_init")(x.astype(dtype))
    h = nn.relu(batch_norm(train, dtype, "bn_init", self.bn_impl)(h))
    for k in range(n):
      h = BasicBlock(self.widths[0], 1, impl, self.bn_impl, dtype, name=f"stage1_block{k}")(h, train)
    widths = tuple(reduced(w, self.reduce_dimension) for w in self.widths[1:])
    z, f = _vmapped(ResNetExpert, self.num_experts)(
        widths, n, self.num_classes, self.head, self.cosine_scale, self.head_bias, train, dtype, impl,
        self.bn_impl, name="experts")(h)
    return _combine(z, f, experts)


def param_count_expert_resnet(depth: int = 32, num_classes: int = 10, num_experts: int = 3,
                              reduce_dimension: bool = True, head: str = "cosine") -> int:
  """Closed-form parameter count of :class:`ExpertCifarResNet` (a test checks it on the tree).

  Shared stem + stage 1 of the single network, plus E times (stages 2, 3 at the expert widths +
  a ``w3 x C`` cosine kernel, ``+ C`` bias for a linear head). ResNet-32, C = 10, 3 reduced
  experts: 464 + 23,360 + 3 * (50,592 + 197,952 + 480) = 770,896.
  """
  n = (depth - 2) // 6
  w1 = 16
  total = 9 * 3 * w1 + 2 * w1 + n * (2 * 9 * w1 * w1 + 4 * w1)
  w2, w3 = reduced(32, reduce_dimension), reduced(64, reduce_dimension)
  expert, cin = 0, w1
  for w in (w2, w3):
    for _ in range(n):
      expert += 9 * cin * w + 9 * w * w + 4 * w
      cin = w
  expert += w3 * num_classes + (num_classes if head == "linear" else 0)
  return total + num_experts * expert

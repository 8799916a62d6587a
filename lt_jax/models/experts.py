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

The experts' convolutions are :func:`expert_conv2d`: ``vmap`` turns a convolution whose input
and kernel both carry the expert axis into one grouped convolution (``feature_group_count=E``),
whose XLA:CPU forward + backward was measured 5-10x slower than E separate convolutions (3 experts
of the CNN's stage 2, batch 128: 0.7-2.4 s against 0.14-0.26 s); :func:`expert_conv2d` gives the
convolution (and its two gradients, through a ``custom_vjp``) a batching rule that runs one
ordinary convolution per expert. Same math (gradients agree to 3e-7 relative).

``__call__(x, train, experts=False)``: ``(mean logits (B, C), features (B, E*D))`` (the
experts' features concatenated); ``experts=True`` gives ``(expert logits (B, E, C),
features (B, E, D))``, which the multi-expert losses (``losses.ride_loss``,
``losses.sade_loss``) and SADE's test-time aggregation read. The reference's random expert
subset (``use_experts='rand'``) and the RIDE expert-assignment router are not implemented.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lt_jax.models.cnn import max_pool_2x2
from lt_jax.models.layers import (Backbone, Conv, batch_norm, global_avg_pool, kaiming_normal, make_head,
                                  resolve_conv_impl, resolve_dtype)
from lt_jax.models.resnet_cifar import BasicBlock, option_a_shortcut

Array = jax.Array

EXPERT_HEADS = ("cosine", "linear")


def _conv(x: Array, w: Array, stride: int, padding: int) -> Array:
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding), (padding, padding)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _per_slice(fn):
  """``fn`` whose ``vmap`` runs ``fn`` once per index of the mapped axis (then stacks)."""
  f = jax.custom_batching.custom_vmap(fn)

  @f.def_vmap
  def rule(axis_size, in_batched, *args):
    outs = [f(*[a[i] if b else a for a, b in zip(args, in_batched)]) for i in range(axis_size)]
    return jnp.stack(outs), True
  return f


@functools.lru_cache(maxsize=None)
def _conv_fns(stride: int, padding: int):
  """The convolution and its input / kernel gradients, each batched one expert at a time."""
  fwd = _per_slice(lambda x, w: _conv(x, w, stride, padding))
  dx = _per_slice(lambda x, w, g: jax.vjp(lambda x: _conv(x, w, stride, padding), x)[1](g)[0])
  dw = _per_slice(lambda x, w, g: jax.vjp(lambda w: _conv(x, w, stride, padding), w)[1](g)[0])
  return fwd, dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def expert_conv2d(x: Array, w: Array, stride: int = 1, padding: int = 0) -> Array:
  """:func:`lt_jax.models.layers.conv2d` (NHWC, HWIO, symmetric padding) for inputs that ``vmap``
  batches over experts: one ordinary convolution per expert instead of a grouped convolution.

  Un-batched it is exactly ``conv2d``; under ``vmap`` the forward and both gradients loop over
  the mapped axis (a ``custom_vjp`` whose three functions have ``custom_vmap`` rules, since
  ``custom_vmap`` alone does not support reverse-mode differentiation).
  """
  return _conv_fns(stride, padding)[0](x, w)


def _expert_conv_fwd(x, w, stride, padding):
  return expert_conv2d(x, w, stride, padding), (x, w)


def _expert_conv_bwd(stride, padding, res, g):
  x, w = res
  _, dx, dw = _conv_fns(stride, padding)
  return dx(x, w, g), dw(x, w, g)


expert_conv2d.defvjp(_expert_conv_fwd, _expert_conv_bwd)


class ExpertConv(Conv):
  """:class:`lt_jax.models.layers.Conv` (same parameter) computed with :func:`expert_conv2d`."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.groups != 1:
      raise ValueError("ExpertConv supports groups=1 only")
    k = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                   jnp.float32)
    return expert_conv2d(x.astype(self.dtype), k.astype(self.dtype), self.stride, self.padding)


class ExpertBasicBlock(BasicBlock):
  """:class:`lt_jax.models.resnet_cifar.BasicBlock` (same parameters) with :class:`ExpertConv`."""

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = lambda s, name: ExpertConv(self.planes, 3, s, 1, dtype=self.dtype, name=name)
    y = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_impl)(conv(self.stride, "conv1")(x)))
    y = batch_norm(train, self.dtype, "bn2", self.bn_impl)(conv(1, "conv2")(y))
    return nn.relu(y + option_a_shortcut(x, self.planes, self.stride).astype(y.dtype))


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
      h = ExpertConv(self.width, 3, 1, 1, dtype=self.dtype, name=f"conv{k}")(h)
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
        h = ExpertBasicBlock(planes, 2 if k == 0 else 1, self.conv_impl, self.bn_impl, self.dtype,
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
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. 20, 32, 44, 56), got {self.depth}")
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

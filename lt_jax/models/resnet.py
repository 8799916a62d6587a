"""ImageNet-style ResNet-50 and ResNeXt-50 (32x4d) for ImageNet-LT / iNaturalist-scale inputs.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (bottleneck
ResNet-50) and Xie et al., "Aggregated Residual Transformations for Deep Neural
Networks", CVPR 2017 (ResNeXt: grouped 3x3 convs), in the torchvision layout used by the
long-tail code bases (classifier-balancing, RIDE, MiSLAS):

* stem: conv7x7(3 -> 64, stride 2, pad 3) -> BN -> ReLU -> maxpool3x3(stride 2, pad 1);
* stages of [3, 4, 6, 3] bottleneck blocks with ``planes`` 64 / 128 / 256 / 512 and
  expansion 4; stride 2 at the first block of stages 2-4, placed on the 3x3 conv
  ("ResNet v1.5", torchvision); projection shortcut conv1x1(stride) + BN where the
  shape changes;
* bottleneck: ``relu(BN(conv1x1(relu(BN(conv3x3_s,g(relu(BN(conv1x1(x)))))))) + sc(x))``
  with inner width ``int(planes * width_per_group / 64) * groups`` (64 / 1 for ResNet-50,
  4 / 32 for ResNeXt-50 32x4d);
* global average pooling -> 2048-d features -> head.

Init as torchvision: Kaiming-normal with ``mode='fan_out'`` for convs, BN scale 1 /
bias 0 (``zero_init_residual=True`` zeroes the last BN scale of each block); the head
uses :func:`lt_jax.models.layers.make_head` (Kaiming-normal fan_in, zero bias).
Parameter count with a 1000-class linear head: 25,557,032 (ResNet-50) and 25,028,904
(ResNeXt-50 32x4d), the torchvision numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from lt_jax.models.layers import (Backbone, Conv, batch_norm, global_avg_pool, kaiming_normal_fan_out,
                                  resolve_conv_impl, resolve_dtype)

Array = jax.Array


class Bottleneck(nn.Module):
  """Bottleneck block (1x1 -> 3x3 (stride, groups) -> 1x1 x4) with projection shortcut."""

  planes: int
  stride: int = 1
  groups: int = 1
  width_per_group: int = 64
  zero_init_residual: bool = False
  conv_impl: str = "xla"
  bn_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
    out_ch = self.planes * 4
    conv = lambda f, k, s, p, name, g=1: Conv(f, k, s, p, g, conv_impl=self.conv_impl, dtype=self.dtype,
                                              kernel_init=kaiming_normal_fan_out, name=name)
    bn = lambda name, zero=False: batch_norm(
        train, self.dtype, name, self.bn_impl,
        scale_init=nn.initializers.zeros_init() if zero else nn.initializers.ones_init())
    y = nn.relu(bn("bn1")(conv(width, 1, 1, 0, "conv1")(x)))
    y = nn.relu(bn("bn2")(conv(width, 3, self.stride, 1, "conv2", self.groups)(y)))
    y = bn("bn3", self.zero_init_residual)(conv(out_ch, 1, 1, 0, "conv3")(y))
    if self.stride != 1 or x.shape[-1] != out_ch:
      # 1x1 stride-s projection (torchvision's downsample) = subsample then 1x1 conv.
      x = bn("downsample_bn")(conv(out_ch, 1, 1, 0, "downsample_conv")(x[:, ::self.stride, ::self.stride, :]))
    return nn.relu(y + x.astype(y.dtype))


class ResNet(Backbone):
  """Bottleneck ResNet / ResNeXt; ``__call__(x, train) -> (logits (B, C), features (B, 2048))``.

  Attributes:
    num_classes: classifier outputs ``C`` (1000 for ImageNet-LT, 8142 for iNat18).
    stage_sizes: blocks per stage ([3, 4, 6, 3] = 50 layers).
    groups, width_per_group: 1 / 64 for ResNet, 32 / 4 for ResNeXt-50 32x4d.
    head, cosine_scale, head_bias: classifier (:func:`lt_jax.models.layers.make_head`).
    dtype: compute dtype (``'float32'`` | ``'bfloat16'``); params and logits float32.
    conv_impl, bn_impl: see :mod:`lt_jax.models.layers`.
    zero_init_residual: zero-init the last BN scale of every block (torchvision flag).

  Input ``(B, H, W, 3)`` NHWC, 224x224 for ImageNet (any size >= 32 works). Parameter
  tree: ``{'conv_init', 'bn_init', 'stage{1..4}_block{k}', 'head'}``.
  """

  num_classes: int = 1000
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  groups: int = 1
  width_per_group: int = 64
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool) -> tuple[Array, Array]:
    impl = resolve_conv_impl(self.conv_impl)
    dtype = resolve_dtype(self.dtype)
    x = Conv(64, 7, 2, 3, conv_impl=impl, dtype=dtype, kernel_init=kaiming_normal_fan_out,
             name="conv_init")(x.astype(dtype))
    x = nn.relu(batch_norm(train, dtype, "bn_init", self.bn_impl)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, n in enumerate(self.stage_sizes):
      for k in range(n):
        x = Bottleneck(64 * 2 ** s, 2 if (s > 0 and k == 0) else 1, self.groups, self.width_per_group,
                       self.zero_init_residual, impl, self.bn_impl, dtype,
                       name=f"stage{s + 1}_block{k}")(x, train)
    features = global_avg_pool(x)
    logits = self.head_module()(features)
    return logits, features

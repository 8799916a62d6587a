"""CIFAR ResNets (ResNet-20/32/44/56/110) with option-A shortcuts, and the BBN variant.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2, as used
by Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss",
NeurIPS 2019 (LDAM-DRW ``models/resnet_cifar.py``; REFERENCE.md §1c):

* ``conv3x3(3 -> 16)`` -> BN -> ReLU, then 3 stages of ``n = (depth - 2) / 6`` basic
  blocks with 16 / 32 / 64 channels, stride 2 in the first block of stages 2 and 3;
  global average pooling -> 64-d features -> head.
* Basic block: ``relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x))``; convs are
  bias-free with padding 1.
* Option-A (parameter-free) shortcut where the shape changes: ``x[:, ::2, ::2, :]``
  zero-padded with ``planes // 4`` channels on *each* side (the reference pads the
  channel axis symmetrically, so the identity channels sit in the middle).
* Init: Kaiming-normal (fan_in, gain sqrt 2, untruncated) for every conv and the linear
  classifier (the reference's ``_weights_init`` applies ``kaiming_normal_`` to
  ``nn.Conv2d`` and ``nn.Linear``); BN scale 1, bias 0; classifier bias 0 (the
  reference keeps PyTorch's uniform bias init; a zero bias is the usual JAX choice).
* BatchNorm: momentum 0.9 (PyTorch 0.1), eps 1e-5, statistics in ``batch_stats``.

Parameter count: with a 10-class linear head ResNet-32 has exactly 464,154 parameters
(:func:`param_count_cifar_resnet` derives it; the test checks it against the tree).

BBN (Zhou et al., "BBN: Bilateral-Branch Network with Cumulative Learning for
Long-Tailed Visual Recognition", CVPR 2020; REFERENCE.md §3): with ``bbn=True`` the last
block of stage 3 is duplicated into ``cb_block`` (conventional branch) and ``rb_block``
(re-balancing branch) on a shared trunk; each branch is pooled to 64-d and the head sees
the 128-d concatenation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lt_jax.models.layers import (Backbone, Conv, batch_norm, bbn_features, check_no_bbn_args,
                                  global_avg_pool, resolve_conv_impl, resolve_dtype)

Array = jax.Array

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def option_a_shortcut(x: Array, planes: int, stride: int) -> Array:
  """Parameter-free shortcut of He et al. (2016), "option A", as in the LDAM-DRW code.

  ``y = pad_C(x[:, ::s, ::s, :], lo, hi)`` with ``lo = (planes - C_in) // 2`` and
  ``hi = planes - C_in - lo`` zero channels (``planes // 4`` on each side for the usual
  doubling ``planes = 2 C_in``, i.e. ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4,
  planes // 4))`` in NCHW). Identity when neither stride nor width changes.
  """
  cin = x.shape[-1]
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  if planes != cin:
    if planes < cin:
      raise ValueError(f"option-A shortcut cannot shrink channels ({cin} -> {planes})")
    lo = (planes - cin) // 2
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, planes - cin - lo)))
  return x


class BasicBlock(nn.Module):
  """``relu(BN(conv(relu(BN(conv_s(x))))) + option_a_shortcut(x))`` (He et al. 2016)."""

  planes: int
  stride: int = 1
  conv_impl: str = "xla"
  bn_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = lambda s, name: Conv(self.planes, 3, s, 1, conv_impl=self.conv_impl, dtype=self.dtype,
                                name=name)
    y = conv(self.stride, "conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1", self.bn_impl)(y))
    y = conv(1, "conv2")(y)
    y = batch_norm(train, self.dtype, "bn2", self.bn_impl)(y)
    return nn.relu(y + option_a_shortcut(x, self.planes, self.stride).astype(y.dtype))


class CifarResNet(Backbone):
  """ResNet-{20,32,44,56,110} for 32x32 inputs; ``__call__(x, train) -> (logits, features)``.

  Attributes:
    num_classes: classifier outputs ``C``.
    depth: ``6 n + 2``; ``n`` basic blocks per stage.
    head: ``'linear'`` | ``'cosine'`` | ``'lws'`` (see :func:`layers.make_head`).
    cosine_scale: scale of the cosine head (1.0 = LDAM ``NormedLinear``).
    head_bias: bias of the linear / LWS head.
    dtype: compute dtype of convs and BN (``'float32'`` or ``'bfloat16'``); params, BN
      statistics, features and logits stay float32.
    conv_impl: ``'auto'`` | ``'xla'`` (:mod:`lt_jax.models.layers`).
    bn_impl: ``'auto'`` (default: ``'fused'`` on CPU, ``'flax'`` elsewhere) | ``'fused'``
      (hand-written BN backward) | ``'flax'`` (``nn.BatchNorm``).
    bbn: build the BBN two-branch variant (``cb_block`` / ``rb_block``).
    widths: channels of the three stages.

  Input ``x``: ``(B, H, W, 3)`` NHWC (32x32 for CIFAR). Parameter tree:
  ``{'conv_init', 'bn_init', 'stage{1,2,3}_block{k}', ['cb_block', 'rb_block'], 'head'}``.
  """

  depth: int = 32
  bbn: bool = False
  widths: tuple[int, int, int] = (16, 32, 64)

  def _blocks_per_stage(self) -> int:
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. {CIFAR_DEPTHS}), got {self.depth}")
    return (self.depth - 2) // 6

  def _trunk_layers(self, train: bool, impl: str, dtype: Any) -> tuple[list, int]:
    """Trunk modules: stem conv and BN, then the blocks (all but the last with ``bbn``).

    Built once per call and applied to one or two inputs, so BBN's two trunk passes
    share parameters. Returns ``(layers, stride of the last block)``.
    """
    n = self._blocks_per_stage()
    layers = [Conv(self.widths[0], 3, 1, 1, conv_impl=impl, dtype=dtype, name="conv_init"),
              batch_norm(train, dtype, "bn_init", self.bn_impl)]
    last_stride = 1
    for s, planes in enumerate(self.widths):
      for k in range(n):
        stride = 2 if (s > 0 and k == 0) else 1
        if self.bbn and s == len(self.widths) - 1 and k == n - 1:
          last_stride = stride
          break
        layers.append(BasicBlock(planes, stride, impl, self.bn_impl, dtype,
                                 name=f"stage{s + 1}_block{k}"))
    return layers, last_stride

  @staticmethod
  def _apply_trunk(layers: list, x: Array, train: bool, dtype: Any) -> Array:
    conv, bn, *blocks = layers
    x = nn.relu(bn(conv(x.astype(dtype))))
    for block in blocks:
      x = block(x, train)
    return x

  @nn.compact
  def __call__(self, x: Array, train: bool, x_rb: Array | None = None,
               alpha: Array | float | None = None) -> tuple[Array, Array]:
    """Logits ``(B, C)`` float32 and features ``(B, 64)`` (``(B, 128)`` with ``bbn``).

    BBN (``bbn=True``; Zhou et al., CVPR 2020, ``combiner.py`` ``bbn_mix``): the shared
    trunk runs on ``x`` (uniform sampler) and on ``x_rb`` (reversed sampler; ``None``
    reuses ``x``'s trunk output), ``f_cb = pool(cb_block(trunk(x)))``,
    ``f_rb = pool(rb_block(trunk(x_rb)))``, and

    * ``alpha`` given (training): ``features = [2 alpha f_cb ; 2 (1 - alpha) f_rb]``,
    * ``alpha=None`` (test): ``features = [f_cb ; f_rb]`` (equal to ``alpha = 0.5``),

    ``logits = head(features)``. The BBN loss ``alpha CE(z, y_cb) + (1 - alpha)
    CE(z, y_rb)`` and the schedule ``alpha = 1 - (T / T_max)^2`` are the trainer's. The
    two trunk passes are separate calls, so each input batch gets its own BN statistics
    (as the reference's two forward calls); running statistics see ``x`` then ``x_rb``.
    """
    impl = resolve_conv_impl(self.conv_impl)
    dtype = resolve_dtype(self.dtype)
    layers, last_stride = self._trunk_layers(train, impl, dtype)
    if not self.bbn:
      check_no_bbn_args(x_rb, alpha)
      features = global_avg_pool(self._apply_trunk(layers, x, train, dtype))
    else:
      planes = self.widths[-1]
      cb_block = BasicBlock(planes, last_stride, impl, self.bn_impl, dtype, name="cb_block")
      rb_block = BasicBlock(planes, last_stride, impl, self.bn_impl, dtype, name="rb_block")
      h_cb = self._apply_trunk(layers, x, train, dtype)
      h_rb = h_cb if x_rb is None else self._apply_trunk(layers, x_rb, train, dtype)
      f_cb = global_avg_pool(cb_block(h_cb, train))
      f_rb = global_avg_pool(rb_block(h_rb, train))
      features = bbn_features(f_cb, f_rb, alpha)
    logits = self.head_module()(features)
    return logits, features


def param_count_cifar_resnet(depth: int = 32, num_classes: int = 10,
                             widths: tuple[int, int, int] = (16, 32, 64)) -> int:
  """Closed-form parameter count of :class:`CifarResNet` with a linear head (with bias).

  Stem ``3*3*3*w1`` conv + ``2*w1`` BN; each block ``9*c_in*w + 9*w*w`` (two bias-free
  3x3 convs) ``+ 4*w`` (two BN scale/bias pairs); option-A shortcuts have none; head
  ``w3*C + C``. Depth 32 (n = 5), C = 10::

    stem      432 + 32                                  =     464
    stage 1   5 * (2304 + 2304 + 64)                    =  23,360
    stage 2   (4608 + 9216 + 128) + 4 * (2 * 9216 + 128) =  88,192
    stage 3   (18432 + 36864 + 256) + 4 * (2 * 36864 + 256) = 351,488
    head      64 * 10 + 10                              =     650
    total                                               = 464,154
  """
  n = (depth - 2) // 6
  total = 9 * 3 * widths[0] + 2 * widths[0]
  cin = widths[0]
  for w in widths:
    for _ in range(n):
      total += 9 * cin * w + 9 * w * w + 4 * w
      cin = w
  return total + widths[-1] * num_classes + num_classes

"""Small CNN for 28x28x1 inputs (Fashion-MNIST / MNIST-LT experiments).

A VGG-style network: two stages of two 3x3 conv-BN-ReLU layers (32 then 64 channels)
each followed by 2x2 max pooling (28 -> 14 -> 7), then a 128-unit dense layer with BN
and ReLU whose output is the 128-d feature vector fed to the head::

    conv3x3(1->32)-BN-ReLU, conv3x3(32->32)-BN-ReLU, maxpool2
    conv3x3(32->64)-BN-ReLU, conv3x3(64->64)-BN-ReLU, maxpool2
    flatten(7*7*64) -> dense(128, no bias)-BN-ReLU = features -> head

This is the usual "simple CNN" baseline for Fashion-MNIST (about 93% test accuracy after
a few epochs of SGD/Adam on the balanced set). Convs and the dense layer use Kaiming-
normal (fan_in) init like the CIFAR ResNets; BN momentum 0.9, eps 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from lt_jax.models.layers import (Backbone, Conv, batch_norm, bbn_features, check_no_bbn_args,
                                  kaiming_normal, resolve_conv_impl, resolve_dtype)

Array = jax.Array


def max_pool_2x2(x: Array) -> Array:
  """2x2 max pooling with stride 2 (NHWC, even H and W) as a reshape + max.

  ``y[b, h, w, c] = max_{i,j in {0,1}} x[b, 2h + i, 2w + j, c]``; the same values as
  ``nn.max_pool(x, (2, 2), (2, 2))`` but with a cheaper backward on XLA:CPU (an
  elementwise mask instead of select-and-scatter).
  """
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"max_pool_2x2 needs even spatial sizes, got {(h, w)}")
  return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class SmallCNN(Backbone):
  """``__call__(x, train) -> (logits (B, C) float32, features (B, feature_dim) float32)``.

  Attributes:
    num_classes: classifier outputs ``C``.
    head: ``'linear'`` | ``'cosine'`` | ``'lws'``; ``cosine_scale``, ``head_bias`` as in
      :func:`lt_jax.models.layers.make_head`.
    dtype: compute dtype (``'float32'`` | ``'bfloat16'``).
    conv_impl, bn_impl: see :mod:`lt_jax.models.layers`.
    widths: channels of the two conv stages; ``feature_dim``: width of the feature layer.

  Input ``(B, 28, 28, 1)`` NHWC (any H, W divisible by 4). Parameter tree:
  ``{'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'conv4', 'bn4', 'fc', 'bn_fc', 'head'}``.
  """

  widths: tuple[int, int] = (32, 64)
  feature_dim: int = 128
  bbn: bool = False

  def _trunk_layers(self, train: bool, impl: str, dtype) -> list:
    """The conv trunk's modules, created once so BBN's two inputs share them."""
    layers, k = [], 0
    for width in self.widths:
      for _ in range(2):
        k += 1
        layers.append((Conv(width, 3, 1, 1, conv_impl=impl, dtype=dtype, name=f"conv{k}"),
                       batch_norm(train, dtype, f"bn{k}", self.bn_impl)))
    return layers

  @staticmethod
  def _trunk(layers: list, x: Array, dtype) -> Array:
    if x.ndim == 3:  # (B, H, W) grey images
      x = x[..., None]
    x = x.astype(dtype)
    for i, (conv, bn) in enumerate(layers):
      x = nn.relu(bn(conv(x)))
      if i % 2 == 1:  # two convs per stage, then 2x2 max pooling
        x = max_pool_2x2(x)
    return x.reshape(x.shape[0], -1)

  def _branch(self, h: Array, train: bool, dtype, suffix: str) -> Array:
    h = nn.Dense(self.feature_dim, use_bias=False, kernel_init=kaiming_normal, dtype=dtype,
                 param_dtype=jnp.float32, name=f"fc{suffix}")(h)
    return nn.relu(batch_norm(train, dtype, f"bn_fc{suffix}", self.bn_impl)(h)).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: Array, train: bool, x_rb: Array | None = None,
               alpha: Array | float | None = None) -> tuple[Array, Array]:
    """Logits and features; with ``bbn=True`` the BBN two-branch form.

    BBN (Zhou et al., CVPR 2020; REFERENCE.md §3): the conv trunk is shared, the feature
    layer is split into a conventional branch (``fc``/``bn_fc``, input ``x``) and a
    re-balancing branch (``fc_rb``/``bn_fc_rb``, input ``x_rb``; ``None`` reuses ``x``),
    and ``features = [2 alpha f_cb ; 2 (1 - alpha) f_rb]`` in training, ``[f_cb ; f_rb]``
    (``alpha = 0.5``) at test, exactly as :class:`lt_jax.models.CifarResNet` splits its last
    residual block.
    """
    impl = resolve_conv_impl(self.conv_impl)
    dtype = resolve_dtype(self.dtype)
    layers = self._trunk_layers(train, impl, dtype)
    if not self.bbn:
      check_no_bbn_args(x_rb, alpha)
      features = self._branch(self._trunk(layers, x, dtype), train, dtype, "")
    else:
      f_cb = self._branch(self._trunk(layers, x, dtype), train, dtype, "")
      h_rb = self._trunk(layers, x if x_rb is None else x_rb, dtype)
      f_rb = self._branch(h_rb, train, dtype, "_rb")
      features = bbn_features(f_cb, f_rb, alpha)
    logits = self.head_module()(features)
    return logits, features

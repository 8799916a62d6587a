"""Backbones with selectable classifier heads: ``get_model(name, **kw)``.

Every model is a ``flax.linen`` module with ``__call__(x, train: bool) -> (logits,
features)``: ``x`` is NHWC, ``logits`` ``(B, C)`` float32, ``features`` ``(B, D)``
float32. Parameters: the classifier is the top-level submodule ``'head'`` (so
``params['head']`` is the classifier and everything else the backbone, for optax
partitioning); BatchNorm statistics live in the ``batch_stats`` collection.

=============  ==========================================  ===========  ========
name           architecture                                input        D
=============  ==========================================  ===========  ========
resnet20/32/   CIFAR ResNet, option-A shortcuts             32x32x3      64
44/56          (LDAM-DRW), ``bbn=True`` for BBN             (128 BBN)
cnn            4-conv VGG-style CNN                         28x28x1      128
resnet50       bottleneck ResNet-50 (torchvision v1.5)      224x224x3    2048
resnext50      ResNeXt-50 32x4d                             224x224x3    2048
cnn_experts    the CNN, E experts after stage 1 (RIDE/SADE)  28x28x1      E*96
resnet20_/32_  ResNet-20/32, E experts after stage 1         32x32x3      E*48
experts        (``lt_jax.models.experts``)
=============  ==========================================  ===========  ========

Common keyword arguments: ``num_classes``, ``head`` ('linear' | 'cosine' | 'lws'),
``cosine_scale``, ``head_bias``, ``dtype`` ('float32' | 'bfloat16'), ``conv_impl``
('auto' | 'xla'), ``bn_impl`` ('auto' | 'fused' | 'flax'; 'auto' is fused on CPU, flax elsewhere). Training steps on CPU should
be jitted with ``compiler_options=cpu_compiler_options()`` (see
:mod:`lt_jax.models.layers`).
"""

from __future__ import annotations

from typing import Any

from lt_jax.models.cnn import SmallCNN
from lt_jax.models.experts import ExpertCifarResNet, ExpertCNN, param_count_expert_resnet
from lt_jax.models.layers import (BN_IMPLS, CONV_IMPLS, HEADS, BatchNorm, Conv, conv2d,
                                  cpu_compiler_options, resolve_bn_impl, resolve_conv_impl)
from lt_jax.models.resnet import ResNet
from lt_jax.models.resnet_cifar import CifarResNet, option_a_shortcut, param_count_cifar_resnet

MODELS = ("cnn", "resnet20", "resnet32", "resnet44", "resnet56", "resnet50", "resnext50",
          "cnn_experts", "resnet20_experts", "resnet32_experts")
# Multi-expert models (RIDE / SADE): the single model each one splits into experts.
EXPERT_MODELS = {"cnn_experts": "cnn", "resnet20_experts": "resnet20", "resnet32_experts": "resnet32"}

_CIFAR_DEPTH = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}


def get_model(name: str, num_classes: int = 10, head: str = "linear", **kw: Any):
  """Builds the model called ``name`` (one of :data:`MODELS`).

  Keyword arguments go to the module (``cosine_scale``, ``head_bias``, ``dtype``,
  ``conv_impl``, ``bn_impl``; ``bbn`` for the CIFAR ResNets; ``zero_init_residual`` for
  resnet50/resnext50; ``widths``/``feature_dim`` for the CNN; ``num_experts``/``reduce_dimension`` for the
  ``*_experts`` models; RIDE/SADE use ``head='cosine', cosine_scale=30``). ``conv_impl='auto'`` is
  resolved here with ``jax.default_backend()``; ``bn_impl='auto'`` when the model is traced. Unknown names, heads, or keywords the
  model does not take raise ``ValueError`` naming the valid choices.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid names: {MODELS}")
  if head not in HEADS:
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")
  kw["conv_impl"] = resolve_conv_impl(kw.get("conv_impl", "auto"))
  if "bn_impl" in kw and kw["bn_impl"] not in BN_IMPLS:
    raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {kw['bn_impl']!r}")
  if name in _CIFAR_DEPTH:
    cls, kw = CifarResNet, dict(kw, depth=_CIFAR_DEPTH[name])
  elif name == "cnn":
    cls = SmallCNN
  elif name == "cnn_experts":
    cls = ExpertCNN
  elif name in EXPERT_MODELS:
    cls, kw = ExpertCifarResNet, dict(kw, depth=_CIFAR_DEPTH[EXPERT_MODELS[name]])
  elif name == "resnet50":
    cls = ResNet
  else:  # resnext50
    cls, kw = ResNet, dict(kw, groups=32, width_per_group=4)
  valid = set(cls.__dataclass_fields__) - {"parent", "name"}
  bad = sorted(set(kw) - valid)
  if bad:
    raise ValueError(f"model {name!r} does not take {bad}; valid keywords: {sorted(valid)}")
  return cls(num_classes=num_classes, head=head, **kw)


__all__ = ["MODELS", "EXPERT_MODELS", "ExpertCNN", "ExpertCifarResNet", "param_count_expert_resnet", "HEADS", "CONV_IMPLS", "BN_IMPLS", "get_model", "CifarResNet", "SmallCNN",
           "ResNet", "Conv", "BatchNorm", "conv2d", "cpu_compiler_options", "resolve_bn_impl", "option_a_shortcut",
           "param_count_cifar_resnet"]

"""Shared building blocks of the lt_jax backbones: convolution, BatchNorm, heads, CPU options.

Convolution (``conv_impl``): ``'xla'`` is ``jax.lax.conv_general_dilated`` (NHWC /
HWIO) with XLA's own transposed convolutions for both gradients; ``'auto'`` (default)
resolves to the fastest implementation measured per backend (:func:`resolve_conv_impl`),
today ``'xla'`` everywhere. (An im2col weight-gradient path, one matmul per kernel tap,
was measured 1.5-3x slower than XLA's conv-backprop-filter on the 2-core CPU in every
formulation tried once YNNPACK is kept off convolutions, and was removed.)

BatchNorm (``bn_impl``): ``'fused'`` is :class:`BatchNorm` (hand-written backward),
``'flax'`` is ``flax.linen.BatchNorm``; ``'auto'`` (default) resolves with
``jax.default_backend()`` when the module is traced (:func:`resolve_bn_impl`): ``'fused'``
on CPU, where it was measured faster (bench/train_step.py), ``'flax'`` elsewhere.

Why XLA:CPU was slow (measured, jax 0.10.2, ResNet-32 batch 128): by default XLA:CPU
hands convolutions to YNNPACK ("ynn_fusion"); its conv-backprop-filter takes 24-27 ms
per 3x3 conv where the Eigen path takes 4-16 ms, and it is 2x slower for forward/input
gradients at 16x16 and 8x8. :func:`cpu_compiler_options` keeps YNNPACK for dots,
reductions and elementwise fusions but not for convolutions; pass it to ``jax.jit``
(``jax.jit(step, compiler_options=cpu_compiler_options())``). Together with
:class:`BatchNorm` (hand-written backward) this took a ResNet-32 training step (batch 128)
from 1.16 s to 0.56 s on this machine (PyTorch 2.13 CPU: 0.47 s); see bench/train_step.py.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen as nn

from lt_jax import heads as lt_heads

Array = jax.Array
Dtype = Any

CONV_IMPLS = ("auto", "xla")
BN_IMPLS = ("auto", "fused", "flax")
HEADS = ("linear", "cosine", "lws")
_DN = ("NHWC", "HWIO", "NHWC")

# Kaiming (He) normal, gain sqrt(2), untruncated: std = sqrt(2 / fan), exactly
# torch.nn.init.kaiming_normal_ (He et al., "Delving Deep into Rectifiers", ICCV 2015).
# For an HWIO kernel fan_in = kh * kw * C_in / groups and fan_out = kh * kw * C_out;
# for a (D, C) dense kernel fan_in = D.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# XLA:CPU library-fusion types kept on YNNPACK; convolutions are left to XLA's Eigen path.
_CPU_YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_ELTWISE", "LIBRARY_FUSION_TYPE_REDUCE",
                         "LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")


@functools.lru_cache(maxsize=None)
def _cpu_options_supported(backend: str) -> bool:
  """Whether this jaxlib accepts the option (probe-compiles a tiny function once)."""
  if backend != "cpu":
    return False
  opts = {"xla_cpu_experimental_ynn_fusion_type": ",".join(_CPU_YNN_FUSION_TYPES)}
  try:
    jax.jit(lambda x: x + 1, compiler_options=opts).lower(jnp.zeros((2,))).compile()
  except Exception:  # unknown flag or enum value in another jaxlib: fall back to defaults
    return False
  return True


def cpu_compiler_options(backend: str | None = None) -> dict[str, str]:
  """Per-executable XLA options that make conv nets fast on XLA:CPU ({} elsewhere).

  Returns ``{'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_ELTWISE,...'}``
  (YNNPACK for elementwise, reduction and dot fusions, *not* for convolutions) when
  ``backend`` (default ``jax.default_backend()``) is ``'cpu'`` and the installed jaxlib
  accepts the option; ``{}`` on GPU/TPU or when the option is unknown. Use as
  ``jax.jit(train_step, compiler_options=cpu_compiler_options())``: the option is
  scoped to that executable (no process-wide ``XLA_FLAGS``). It changes which kernel
  library runs each op, not the math (float32 results agree to round-off).
  """
  backend = jax.default_backend() if backend is None else backend
  if not _cpu_options_supported(backend):
    return {}
  return {"xla_cpu_experimental_ynn_fusion_type": ",".join(_CPU_YNN_FUSION_TYPES)}


def resolve_dtype(dtype: Any) -> Dtype:
  """``'float32'``/``'bfloat16'`` strings or jnp dtypes -> jnp dtype (else ValueError)."""
  valid = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if isinstance(dtype, str):
    if dtype not in valid:
      raise ValueError(f"dtype must be one of {tuple(valid)}, got {dtype!r}")
    return valid[dtype]
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in valid:
    raise ValueError(f"dtype must be one of {tuple(valid)}, got {dtype!r}")
  return valid[name]


# Fastest measured implementation per backend: XLA's native convolutions (Eigen on CPU
# with cpu_compiler_options(), cuDNN, TPU convolution units); module docstring.
_FASTEST_CONV_IMPL = {"cpu": "xla", "gpu": "xla", "cuda": "xla", "rocm": "xla", "tpu": "xla"}


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
  """``'auto'`` -> the fastest implementation measured for ``backend``; others unchanged.

  ``backend=None`` means ``jax.default_backend()``. While every backend has the same
  choice (today ``'xla'``) no backend is queried, so building a model does not
  initialise JAX's backends (a trainer may still set ``jax_num_cpu_devices`` afterwards).
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  if conv_impl != "auto":
    return conv_impl
  choices = set(_FASTEST_CONV_IMPL.values())
  if backend is None and len(choices) == 1:
    return choices.pop()
  backend = jax.default_backend() if backend is None else backend
  return _FASTEST_CONV_IMPL.get(backend, "xla")


# ---------------------------------------------------------------------------------------
# Convolution.


def _xla_conv(x: Array, w: Array, stride: int, padding: int, groups: int) -> Array:
  return lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
      dimension_numbers=_DN, feature_group_count=groups)


def conv2d(x: Array, w: Array, stride: int = 1, padding: int = 0, groups: int = 1,
           impl: str = "xla") -> Array:
  """2-D cross-correlation, NHWC input, HWIO kernel, symmetric zero ``padding``.

  ``y[b, h, w, o] = sum_{i,j,c} x_pad[b, s*h + i, s*w + j, c] * W[i, j, c, o]``
  (PyTorch ``nn.Conv2d(padding=p, stride=s, groups=g, bias=False)`` semantics, also for
  even inputs with stride 2, where XLA's ``'SAME'`` would pad asymmetrically).
  ``impl``: ``'xla'`` (the only implementation; ``'auto'`` is resolved by
  :func:`resolve_conv_impl` before this is called).
  """
  if impl == "xla":
    return _xla_conv(x, w, stride, padding, groups)
  raise ValueError(f"impl must be one of ('xla',), got {impl!r}")


class Conv(nn.Module):
  """Bias-free 2-D convolution (NHWC), ``conv_impl`` as in :func:`conv2d`.

  Parameter ``kernel`` ``(kh, kw, C_in / groups, features)`` float32, Kaiming-normal
  (fan_in) by default. Computes in ``dtype`` (input and kernel cast), returns ``dtype``.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  groups: int = 1
  conv_impl: str = "xla"
  dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Array] = kaiming_normal

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cin = x.shape[-1]
    if cin % self.groups or self.features % self.groups:
      raise ValueError(f"groups={self.groups} must divide the in ({cin}) and out "
                       f"({self.features}) channels")
    k = self.param("kernel", self.kernel_init,
                   (self.kernel_size, self.kernel_size, cin // self.groups, self.features),
                   jnp.float32)
    return conv2d(x.astype(self.dtype), k.astype(self.dtype), self.stride, self.padding,
                  self.groups, self.conv_impl)


# ---------------------------------------------------------------------------------------
# BatchNorm.


def _bn_stats(x: Array) -> tuple[Array, Array]:
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axes)
  var = jnp.maximum(jnp.mean(xf * xf, axes) - mean * mean, 0.0)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, Array, Array]:
  """Training-mode BatchNorm with a hand-written backward pass.

  Forward (Ioffe & Szegedy, "Batch Normalization", ICML 2015), statistics over all
  axes but the last, in float32: ``mu = E[x]``, ``var = max(E[x^2] - mu^2, 0)`` (biased,
  as ``flax.linen.BatchNorm`` with ``use_fast_variance``), ``x_hat = (x - mu) / sqrt(var +
  eps)``, ``y = scale * x_hat + bias``. Returns ``(y in x.dtype, mu, var)``.

  Backward, with ``n`` elements per channel and ``r = 1 / sqrt(var + eps)``:
  ``dbias = sum dy``, ``dscale = sum dy * x_hat``,
  ``dx = scale * r / n * (n dy - dbias - x_hat * dscale)`` (the mean and variance
  paths folded in; gradients reaching ``mu``/``var`` outputs are ignored, they only feed
  running averages under ``stop_gradient``). Two passes over the activation instead of
  the several that autodiff of the forward produces on XLA:CPU; values match autodiff
  of ``nn.BatchNorm`` to float32 round-off (tests/test_models.py).
  """
  return _bn_fwd(x, scale, bias, eps)[0]


def _bn_fwd(x, scale, bias, eps):
  mean, var = _bn_stats(x)
  rstd = lax.rsqrt(var + eps)
  a = scale * rstd
  y = (x.astype(jnp.float32) * a + (bias - mean * a)).astype(x.dtype)
  return (y, mean, var), (x, mean, rstd, scale)


def _bn_bwd(eps, res, g):
  del eps
  dy = g[0]
  x, mean, rstd, scale = res
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dyf = dy.astype(jnp.float32)
  dbias = jnp.sum(dyf, axes)
  dscale = jnp.sum(dyf * xhat, axes)
  dx = (scale * rstd / n) * (n * dyf - dbias - xhat * dscale)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis, drop-in for ``nn.BatchNorm`` (same variables).

  Variables: params ``scale`` (ones), ``bias`` (zeros); ``batch_stats`` ``mean`` (zeros),
  ``var`` (ones), updated in training as ``s <- momentum * s + (1 - momentum) * s_batch``
  (biased batch variance, as flax; PyTorch stores the unbiased one, a factor
  ``n / (n - 1)`` that is 1 + 8e-6 for a 128x32x32 CIFAR batch). Training uses
  :func:`batch_norm_train` (hand-written backward); evaluation the running statistics.
  Under ``jit`` over a device mesh the batch statistics are global (XLA reduces over the
  sharded batch axis), i.e. synchronised BN, as ``nn.BatchNorm`` without ``axis_name``.
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Callable[..., Array] = nn.initializers.ones_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      a = scale * lax.rsqrt(ra_var.value + self.epsilon)
      return (x.astype(jnp.float32) * a + (bias - ra_mean.value * a)).astype(self.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1.0 - m) * lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1.0 - m) * lax.stop_gradient(var)
    return y.astype(self.dtype)


# Fastest measured BatchNorm per backend: the hand-written backward on CPU (ResNet-32 step
# 1.16 s -> 0.56 s together with cpu_compiler_options(); bench/train_step.py), flax's
# (XLA fuses it well) on GPU/TPU, where the fused variant was not measured faster.
_FASTEST_BN_IMPL = {"cpu": "fused"}


def resolve_bn_impl(bn_impl: str, backend: str | None = None) -> str:
  """``'auto'`` -> ``'fused'`` on CPU, ``'flax'`` on any other backend; others unchanged.

  ``backend=None`` means ``jax.default_backend()``, queried when called: the modules call
  this from ``__call__`` (trace time), so building a model does not initialise JAX's
  backends. Unknown names raise ``ValueError`` listing :data:`BN_IMPLS`.
  """
  if bn_impl not in BN_IMPLS:
    raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {bn_impl!r}")
  if bn_impl != "auto":
    return bn_impl
  backend = jax.default_backend() if backend is None else backend
  return _FASTEST_BN_IMPL.get(backend, "flax")


def batch_norm(train: bool, dtype: Dtype, name: str | None = None, bn_impl: str = "auto",
               scale_init: Callable[..., Array] = nn.initializers.ones_init()) -> nn.Module:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5).

  Ioffe & Szegedy, ICML 2015: ``y = gamma (x - mu_B) / sqrt(var_B + eps) + beta``.
  ``bn_impl='fused'``: :class:`BatchNorm` (hand-written backward, faster on CPU);
  ``'flax'``: ``flax.linen.BatchNorm``; ``'auto'``: :func:`resolve_bn_impl` (fused on
  CPU, flax elsewhere). Both keep ``params/{scale,bias}`` and ``batch_stats/{mean,var}``
  and compute statistics in float32.
  """
  bn_impl = resolve_bn_impl(bn_impl)
  if bn_impl == "fused":
    return BatchNorm(not train, 0.9, 1e-5, dtype, scale_init, name=name)
  if bn_impl == "flax":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, scale_init=scale_init, name=name)
  raise ValueError(f"bn_impl must be one of {BN_IMPLS}, got {bn_impl!r}")


# ---------------------------------------------------------------------------------------
# Heads.


def make_head(head: str, num_classes: int, cosine_scale: float = 1.0, head_bias: bool = True,
              name: str = "head") -> nn.Module:
  """The classifier submodule, named ``'head'`` so its params live at ``params['head']``.

  * ``'linear'``: :class:`lt_jax.heads.LinearHead`, Kaiming-normal kernel (LDAM-DRW's
    ``_weights_init`` applies ``kaiming_normal_`` to ``nn.Linear``), zero bias.
  * ``'cosine'``: :class:`lt_jax.heads.CosineHead` with ``scale=cosine_scale`` (LDAM's
    ``NormedLinear`` is ``cosine_scale=1``; the LDAM loss applies ``s=30`` itself).
  * ``'lws'``: :class:`lt_jax.heads.LWSHead` (``kernel``, ``bias``, per-class ``scales``).
  """
  if head == "linear":
    return lt_heads.LinearHead(num_classes, use_bias=head_bias, kernel_init=kaiming_normal, name=name)
  if head == "cosine":
    return lt_heads.CosineHead(num_classes, scale=cosine_scale, name=name)
  if head == "lws":
    return lt_heads.LWSHead(num_classes, use_bias=head_bias, kernel_init=kaiming_normal, name=name)
  raise ValueError(f"head must be one of {HEADS}, got {head!r}")


class Backbone(nn.Module):
  """Fields every lt_jax model shares: classifier head choice, compute dtype, conv/BN kernels.

  Subclasses add their architecture fields and return ``(logits, features)`` from
  ``__call__``, building the classifier with :meth:`head_module` (named ``'head'``).
  """

  num_classes: int = 10
  head: str = "linear"
  cosine_scale: float = 1.0
  head_bias: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  bn_impl: str = "auto"

  def head_module(self) -> nn.Module:
    return make_head(self.head, self.num_classes, self.cosine_scale, self.head_bias)


def bbn_features(f_cb: Array, f_rb: Array, alpha: Array | float | None) -> Array:
  """BBN feature mixing (Zhou et al., CVPR 2020, ``combiner.py`` ``bbn_mix``; REFERENCE.md §3).

  Training (``alpha`` given): ``[2 alpha f_cb ; 2 (1 - alpha) f_rb]``; test (``alpha=None``):
  ``[f_cb ; f_rb]``, which equals ``alpha = 0.5``. Used by every BBN backbone.
  """
  if alpha is None:
    return jnp.concatenate([f_cb, f_rb], axis=-1)
  a = jnp.asarray(alpha, jnp.float32)
  return jnp.concatenate([2.0 * a * f_cb, 2.0 * (1.0 - a) * f_rb], axis=-1)


def check_no_bbn_args(x_rb: Array | None, alpha: Array | float | None) -> None:
  """A backbone built without ``bbn=True`` refuses BBN's second batch and ``alpha``."""
  if x_rb is not None or alpha is not None:
    raise ValueError("x_rb / alpha are only used by the BBN variant (bbn=True)")


def global_avg_pool(x: Array) -> Array:
  """Mean over H and W in float32: ``(B, H, W, C) -> (B, C)``."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

"""On-device batch augmentation: random crop with zero padding, horizontal flip, normalisation;
SimCLR views (random resized crop, flip, colour jitter, grayscale) for contrastive methods.

The CIFAR recipe of the LDAM-DRW code (Cao et al., NeurIPS 2019, ``cifar_train.py``;
also Cui et al. 2019, He et al. 2016): ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip()`` on the raw image, then ``ToTensor()`` (``/255``) and
``Normalize(mean, std)``. Apply :func:`random_crop_flip` to the ``uint8`` batch and
:func:`normalize` afterwards, in that order: the padding is black (0) in pixel space,
exactly as torchvision pads the PIL image before normalising, so padded pixels become
``-mean/std``, not 0.

Everything is a pure function of ``(key, images)``: jit- and vmap-safe, no Python
loop over examples. Keys come from the caller (the trainer folds the step in).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def random_crop_flip(key: Array, images: Array, pad: int = 4, flip: bool = True) -> Array:
  """Per-example random ``H x W`` crop of the zero-padded image, then a random h-flip.

  For every example ``i`` independently: pad ``pad`` zero pixels on each side of the
  two spatial axes, draw offsets ``dy_i, dx_i ~ U{0, ..., 2*pad}`` and take
  ``padded[i, dy_i:dy_i+H, dx_i:dx_i+W, :]``; then with probability 1/2 reverse the
  width axis. Equals torchvision ``RandomCrop(H, padding=pad)`` +
  ``RandomHorizontalFlip(0.5)`` in distribution.

  Args:
    key: ``jax.random.key``; split internally into a crop key and a flip key.
    images: ``(B, H, W, C)`` of any dtype (``uint8`` recommended: augment first,
      normalise second). ``pad`` and ``flip`` are static.
    pad: zero padding per side (0 = no crop).
    flip: whether to apply the random horizontal flip.

  Returns the augmented batch, same shape and dtype.

  The crop is ``vmap(lax.dynamic_slice)`` over the padded batch (one gather);
  draws: ``offsets = randint(k_crop, (B, 2), 0, 2*pad+1)`` (column 0 = dy, 1 = dx),
  ``flips = bernoulli(k_flip, 0.5, (B,))``.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
  if int(pad) != pad or pad < 0:
    raise ValueError(f"pad must be a non-negative integer, got {pad!r}")
  pad = int(pad)
  B, H, W, C = images.shape
  k_crop, k_flip = jax.random.split(key)
  out = images
  if pad > 0:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_crop, (B, 2), 0, 2 * pad + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (H, W, C))
    out = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(k_flip, 0.5, (B,))
    out = jnp.where(flips[:, None, None, None], out[:, :, ::-1, :], out)
  return out


def normalize(images: Array, mean, std) -> Array:
  """``(images / 255 - mean) / std`` in float32, per channel (torchvision ToTensor+Normalize).

  ``images`` is ``uint8`` (or a float in [0, 255]) ``(..., C)``; ``mean``/``std`` have
  shape ``(C,)`` and are given on the ``[0, 1]`` scale (e.g. ``LTDataset.mean``).
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if mean.shape != std.shape or mean.ndim != 1 or mean.shape[0] != images.shape[-1]:
    raise ValueError(f"mean and std must have shape ({images.shape[-1]},) (one per channel), "
                     f"got {mean.shape} and {std.shape}")
  x = images.astype(jnp.float32) * (1.0 / 255.0)
  return (x - mean) / std


# ---------------------------------------------------------------------------------------
# SimCLR-style augmentation (contrastive views): random resized crop, flip, colour jitter,
# random grayscale. Chen et al., "A Simple Framework for Contrastive Learning of Visual
# Representations" (SimCLR), ICML 2020, Appendix A; the CIFAR pipelines of the contrastive
# long-tail references (SupContrast ``main_supcon.py``, PaCo ``augmentation_sim_cifar``,
# BCL ``augmentation_sim``): ``RandomResizedCrop(size, scale=(0.2, 1))``,
# ``RandomHorizontalFlip()``, ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``,
# ``RandomGrayscale(p=0.2)``.

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision ``rgb_to_grayscale`` (tensor path)


def random_resized_crop_boxes(key: Array, batch: int, height: int, width: int,
                              scale: tuple[float, float] = (0.2, 1.0),
                              ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> Array:
  """``(B, 4)`` int32 crop boxes ``(top, left, h, w)``: torchvision ``RandomResizedCrop.get_params``.

  For each example independently, up to ``attempts`` (10, as torchvision) candidates
  ``A ~ U(scale) * H * W``, ``r = exp(U(log ratio))``, ``w = round(sqrt(A r))``,
  ``h = round(sqrt(A / r))`` (round half to even, as Python's ``round``); the first with
  ``0 < w <= W`` and ``0 < h <= H`` is used, with ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``.
  If none fits, torchvision's fallback: the central crop of the whole image clamped to
  the ratio range. The rejection loop is vectorised (all candidates drawn at once, the
  first valid one selected), so the distribution is exactly torchvision's.
  """
  lo, hi = float(scale[0]), float(scale[1])
  if not 0 < lo <= hi <= 1:
    raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (batch, attempts), minval=lo, maxval=hi)
  log_r = jax.random.uniform(k_ratio, (batch, attempts), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  r = jnp.exp(log_r)
  w = jnp.round(jnp.sqrt(area * r)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / r)).astype(jnp.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(ok, axis=1)
  any_ok = jnp.any(ok, axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  # torchvision's fallback (a static function of the image shape and ratio range)
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    fh, fw = height, int(round(height * ratio[1]))
  else:
    fw, fh = width, height
  h = jnp.where(any_ok, pick(h), fh)
  w = jnp.where(any_ok, pick(w), fw)
  top_u = jax.random.uniform(k_top, (batch,))
  left_u = jax.random.uniform(k_left, (batch,))
  top = jnp.where(any_ok, jnp.floor(top_u * (height - h + 1)).astype(jnp.int32), (height - fh) // 2)
  left = jnp.where(any_ok, jnp.floor(left_u * (width - w + 1)).astype(jnp.int32), (width - fw) // 2)
  return jnp.stack([top, left, h, w], axis=1).astype(jnp.int32)


def resized_crop(images: Array, boxes: Array) -> Array:
  """Crop ``boxes`` (``(B, 4)``: top, left, h, w) and resize each crop back to ``H x W``, bilinear.

  Half-pixel centres with the source coordinate clamped inside the crop:
  ``src = clip((y + 0.5) h / H - 0.5, 0, h - 1)`` per axis, then linear interpolation
  between ``floor(src)`` and the next pixel. This is ``F.interpolate(crop, mode='bilinear',
  align_corners=False)`` on the cropped image, and equals PIL's bilinear ``resize`` for
  the up-sampling a crop of the image to the image's size always is (torchvision
  ``F.resized_crop``; no pixel outside the crop is read). Returns float32 in the input's
  value range.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
  _, H, W, _ = images.shape

  def axis(n_out, start, size):
    src = jnp.clip((jnp.arange(n_out, dtype=jnp.float32) + 0.5) * size / n_out - 0.5,
                   0.0, (size - 1).astype(jnp.float32))
    i0 = jnp.floor(src)
    frac = src - i0
    i0 = i0.astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, size - 1)
    return start + i0, start + i1, frac

  def one(img, box):
    y0, y1, fy = axis(H, box[0], box[2])
    x0, x1, fx = axis(W, box[1], box[3])
    img = img.astype(jnp.float32)
    rows = img[y0] * (1.0 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1.0 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]

  return jax.vmap(one)(images, boxes)


def grayscale(images: Array) -> Array:
  """``(..., 1)`` luma ``0.2989 R + 0.587 G + 0.114 B`` (torchvision); 1-channel images unchanged."""
  if images.shape[-1] == 1:
    return images
  if images.shape[-1] != 3:
    raise ValueError(f"grayscale needs 1 or 3 channels, got {images.shape[-1]}")
  return jnp.sum(images * jnp.asarray(GRAY_WEIGHTS, images.dtype), axis=-1, keepdims=True)


def adjust_colour(images: Array, brightness: Array, contrast: Array, saturation: Array,
                  max_value: float = 255.0) -> Array:
  """Brightness, then contrast, then saturation with per-example factors ``(B,)``, clamped.

  torchvision's tensor ``adjust_brightness`` / ``adjust_contrast`` / ``adjust_saturation``
  on a ``[0, max_value]`` scale: ``x <- clip(b x)``; ``x <- clip(c x + (1 - c) mean(gray(x)))``
  (the mean over the whole image); ``x <- clip(s x + (1 - s) gray(x))`` (a no-op for
  1-channel images). ``images`` float ``(B, H, W, C)``, C = 1 or 3.
  """
  f = lambda v: jnp.asarray(v, jnp.float32)[:, None, None, None]
  clip = lambda x: jnp.clip(x, 0.0, max_value)
  x = clip(images * f(brightness))
  mean = jnp.mean(grayscale(x), axis=(1, 2, 3), keepdims=True)
  x = clip(f(contrast) * x + (1.0 - f(contrast)) * mean)
  if x.shape[-1] == 3:
    x = clip(f(saturation) * x + (1.0 - f(saturation)) * grayscale(x))
  return x


def color_jitter(key: Array, images: Array, strength: float = 0.4, prob: float = 0.8,
                 grayscale_prob: float = 0.2, max_value: float = 255.0) -> Array:
  """``RandomApply([ColorJitter(s, s, s)], p=prob)`` then ``RandomGrayscale(grayscale_prob)``.

  Factors ``b, c, s ~ U[max(0, 1 - strength), 1 + strength]`` per example, applied with
  probability ``prob`` by :func:`adjust_colour`. Saturation and grayscale act on colour
  images only; on grayscale (1-channel) images the jitter is brightness and contrast.
  Conventions vs torchvision: a fixed order (brightness, contrast, saturation) instead of a
  random permutation per call, no hue jitter (the references use hue 0.1 on colour images),
  and float arithmetic instead of PIL's uint8 rounding after each operation.
  """
  B = images.shape[0]
  k_apply, k_b, k_c, k_s, k_gray = jax.random.split(key, 5)
  lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
  u = lambda k: jax.random.uniform(k, (B,), minval=lo, maxval=hi)
  jittered = adjust_colour(images, u(k_b), u(k_c), u(k_s), max_value)
  apply = jax.random.bernoulli(k_apply, prob, (B,))[:, None, None, None]
  x = jnp.where(apply, jittered, images)
  if x.shape[-1] == 3 and grayscale_prob > 0:
    gray = jax.random.bernoulli(k_gray, grayscale_prob, (B,))[:, None, None, None]
    x = jnp.where(gray, jnp.broadcast_to(grayscale(x), x.shape), x)
  return x


def simclr_augment(key: Array, images: Array, scale: tuple[float, float] = (0.2, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, jitter: float = 0.4,
                   jitter_prob: float = 0.8, grayscale_prob: float = 0.2) -> Array:
  """One SimCLR view of a ``uint8`` batch: random resized crop, flip, colour jitter, grayscale.

  :func:`random_resized_crop_boxes` + :func:`resized_crop` (bilinear, back to ``H x W``),
  a horizontal flip with probability 1/2, then :func:`color_jitter`. Returns float32 in
  ``[0, 255]``; apply :func:`normalize` next. No Gaussian blur (SimCLR omits it on
  CIFAR-sized images, Appendix B.9; PaCo's CIFAR key view has it with p = 0.5).
  ``jitter=0`` or ``jitter_prob=0`` turns the colour jitter off.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
  B, H, W, _ = images.shape
  k_box, k_flip, k_col = jax.random.split(key, 3)
  x = resized_crop(images, random_resized_crop_boxes(k_box, B, H, W, scale, ratio))
  if flip:
    flips = jax.random.bernoulli(k_flip, 0.5, (B,))
    x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
  if (jitter > 0 and jitter_prob > 0) or (grayscale_prob > 0 and images.shape[-1] == 3):
    x = color_jitter(k_col, x, jitter, jitter_prob if jitter > 0 else 0.0, grayscale_prob)
  return x

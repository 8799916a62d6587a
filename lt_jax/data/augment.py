"""On-device batch augmentation: random crop with zero padding, horizontal flip, normalisation.

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

"""Host image transforms of the streaming pipeline: decode + augment one example with PIL.

ImageNet-style random-resized-crop + flip (:func:`random_resized_crop_box`), CIFAR-style
pad-crop-flip, and the resize + centre-crop evaluation transform. The random geometry
(:func:`plan_transform`) is drawn from the image header's size before decoding, from a
per-example generator the pipeline seeds with ``(seed, step, global row)``.

JPEG draft decoding: before decoding a JPEG larger than needed, PIL's ``draft`` lets
libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling) when the crop still has at least
the output size in pixels; the crop box is computed on the full-size geometry first,
so the sampled crops are the same, and only the resampling source differs slightly
(``draft=False`` turns it off).
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple, Sequence

import numpy as np

from lt_jax.data.prepare import DatasetFormatError

TRANSFORMS = ("random_resized_crop", "pad_crop", "center_crop", "resize")


class Transform(NamedTuple):
  """Host image transform, one of :data:`TRANSFORMS`, output ``(size, size, 3)`` uint8.

  * ``random_resized_crop``: torchvision ``RandomResizedCrop(size, scale, ratio)``
    (:func:`random_resized_crop_box`, bilinear) + ``RandomHorizontalFlip`` if ``flip``;
    the ImageNet-LT / iNat training recipe (classifier-balancing, Kang et al. 2020).
  * ``pad_crop``: resize to ``size`` if needed, zero-pad ``pad`` per side, random
    ``size x size`` crop, flip (the CIFAR recipe, as :func:`lt_jax.data.augment.random_crop_flip`).
  * ``center_crop``: ``Resize(round(size / crop_fraction))`` of the shorter side, then
    ``CenterCrop(size)`` (evaluation; 256 -> 224 at the default 0.875).
  * ``resize``: plain ``size x size`` bilinear resize (evaluation of small images).
  """
  kind: str = "random_resized_crop"
  size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  pad: int = 4
  crop_fraction: float = 0.875
  draft: bool = True

  def validate(self) -> "Transform":
    if self.kind not in TRANSFORMS:
      raise ValueError(f"unknown transform {self.kind!r}; valid transforms: {', '.join(TRANSFORMS)}")
    if self.size < 1 or self.pad < 0 or not 0 < self.crop_fraction <= 1:
      raise ValueError(f"bad transform geometry: size={self.size}, pad={self.pad}, "
                       f"crop_fraction={self.crop_fraction} (need size >= 1, pad >= 0, 0 < crop_fraction <= 1)")
    if not (0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]):
      raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                       f"got scale={self.scale}, ratio={self.ratio}")
    return self

  @property
  def train(self) -> bool:
    return self.kind in ("random_resized_crop", "pad_crop")


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Crop box ``(x0, y0, w, h)`` of torchvision's ``RandomResizedCrop.get_params``.

  Szegedy et al., "Going deeper with convolutions", CVPR 2015 (Inception crops), as in
  torchvision: up to 10 attempts of ``area = W H U(scale)``, ``log aspect ~
  U(log ratio)``, ``w = round(sqrt(area aspect))``, ``h = round(sqrt(area / aspect))``,
  accepted when ``0 < w <= W`` and ``0 < h <= H``, at ``x0 ~ U{0..W-w}``, ``y0 ~ U{0..H-h}``.
  Otherwise the fallback is the central crop of the whole image with its aspect clamped to
  ``ratio`` (``W/H < ratio[0]``: ``w = W, h = round(W / ratio[0])``; ``> ratio[1]``:
  ``h = H, w = round(H ratio[1])``).
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: int, crop_fraction: float) -> tuple[float, float, float, float]:
  """``Resize(round(size / crop_fraction))`` (shorter side) + ``CenterCrop(size)`` as one source box.

  Returns ``(x0, y0, w, h)`` in source pixels: the region that lands in the output, so a
  single resize of that box equals torchvision's resize-then-crop up to resampling.
  """
  short = int(round(size / crop_fraction))
  s = short / min(width, height)  # resize factor
  w = h = size / s
  return (width - w) / 2, (height - h) / 2, w, h


def _open_image(data: bytes | np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(data, np.ndarray):
    return Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1 else data)
  return Image.open(io.BytesIO(data))


def _resized_box(img, box: tuple[float, float, float, float], size: int, draft: bool) -> np.ndarray:
  """Bilinear resize of ``box = (x0, y0, w, h)`` of ``img`` to ``size x size`` RGB (JPEG draft aware)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  x0, y0, w, h = box
  W, H = img.size
  if draft and img.format == "JPEG" and min(w, h) > 2 * size:
    # Decode at the smallest DCT scale that keeps >= size pixels across the crop.
    img.draft("RGB", (math.ceil(W * size / w), math.ceil(H * size / h)))
    sx, sy = img.size[0] / W, img.size[1] / H
    x0, y0, w, h = x0 * sx, y0 * sy, w * sx, h * sy
  if img.mode != "RGB":
    img = img.convert("RGB")
  out = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
  return np.asarray(out, np.uint8)


class Plan(NamedTuple):
  """The random geometry of one example, drawn before decoding (from the header's size)."""
  box: tuple[float, float, float, float]  # (x0, y0, w, h) source region resized to size x size
  dy: int                                  # pad_crop offsets into the padded image
  dx: int
  flip: bool


def image_size(data: bytes | np.ndarray) -> tuple[int, int]:
  """``(width, height)`` of encoded bytes (header only) or of a decoded ``(H, W[, C])`` array."""
  if isinstance(data, np.ndarray):
    return int(data.shape[1]), int(data.shape[0])
  return _open_image(data).size


def plan_transform(size_wh: tuple[int, int], t: Transform, rng: np.random.Generator | None) -> Plan:
  """Draws the crop box, pad offsets and flip of ``t`` for an image of ``size_wh`` from ``rng``.

  Draw order: the random-resized-crop box (:func:`random_resized_crop_box`), then the
  pad-crop offsets ``(dy, dx) ~ U{0..2 pad}^2``, then the flip (``U(0, 1) < 1/2``).
  """
  W, H = size_wh
  dy = dx = 0
  if t.kind == "random_resized_crop":
    box = random_resized_crop_box(rng, W, H, t.scale, t.ratio)
  elif t.kind == "center_crop":
    box = center_crop_box(W, H, t.size, t.crop_fraction)
  else:
    box = (0, 0, W, H)
  if t.kind == "pad_crop" and t.pad:
    dy, dx = (int(v) for v in rng.integers(0, 2 * t.pad + 1, size=2))
  flip = bool(t.train and t.flip and rng.random() < 0.5)
  return Plan(tuple(float(v) for v in box), dy, dx, flip)


def apply_transform(data: bytes | np.ndarray, t: Transform, rng: np.random.Generator | None) -> np.ndarray:
  """Decodes ``data`` (encoded bytes or a ``uint8`` image) and applies ``t`` with PIL: ``(size, size, 3)`` uint8."""
  img = _open_image(data)
  p = plan_transform(img.size, t, rng)
  if t.kind == "pad_crop" and img.size == (t.size, t.size):
    out = np.asarray(img.convert("RGB"), np.uint8)
  else:
    out = _resized_box(img, p.box, t.size, t.draft and t.kind != "pad_crop")
  if t.kind == "pad_crop" and t.pad:
    out = np.pad(out, ((t.pad, t.pad), (t.pad, t.pad), (0, 0)))[p.dy:p.dy + t.size, p.dx:p.dx + t.size]
  if p.flip:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def decode_example(source, i: int, t: Transform, rng: np.random.Generator | None) -> np.ndarray:
  """``apply_transform(source.load(i), ...)``; a corrupt or truncated image stops the run.

  lt_jax stops (``DatasetFormatError`` naming the file) rather than skip-and-count: skipping
  would change the batches a step sees and break the exact-resume guarantee. Fix or remove
  the file (and its split-list line) and rerun; the run resumes from its last checkpoint.
  """
  data = source.load(i)
  try:
    return apply_transform(data, t, rng)
  except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, "image file is truncated"
    where = source.describe(i) if hasattr(source, "describe") else f"example {i} of {source!r}"
    raise DatasetFormatError(f"image {where} cannot be decoded ({type(e).__name__}: {e}); fix or remove it "
                             "and rerun to resume") from None


def transforms_from_config(c) -> tuple[Transform, Transform]:
  """``(train, eval)`` transforms from ``config.input`` and ``config.dataset.image_size``."""
  i, size = c.input, int(c.dataset.image_size)
  train = Transform(i.train_transform, size, scale=(float(i.min_scale), 1.0), flip=bool(c.augment.flip),
                    pad=int(c.augment.crop_pad), draft=bool(i.jpeg_draft))
  test = Transform(i.eval_transform, size, crop_fraction=float(i.crop_fraction), draft=bool(i.jpeg_draft))
  return train.validate(), test.validate()

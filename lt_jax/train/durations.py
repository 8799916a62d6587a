"""Durations: ``*_epochs`` | ``*_steps`` | ``*_examples`` -> steps, converted here and only here.

With re-sampling, "an epoch" is defined once: ``steps_per_epoch = N // batch_size`` steps
(drop-last), where N is the number of long-tailed training examples (big_vision's
``utils.steps``; Kang et al. 2020 define a class-balanced epoch the same way).

One rounding rule for every conversion: the nearest step, halves rounded up
(``floor(x + 0.5)``). Every duration the configs set (integer epochs; the ``epochs=N``
variant's scaled warmup/decay epochs) is converted by this rule; cadences
(``log_every``, ``eval_every``, ``checkpoint_every``) are at least one step.

A field ``<prefix>_steps`` or ``<prefix>_examples`` set to a value (they default to
``None``) takes precedence over ``<prefix>_epochs``: e.g. ``--config.eval_every_steps=100``.
"""

from __future__ import annotations

import math
from typing import Any


class DurationError(ValueError):
  """A duration field is missing, negative or not a number."""


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """``floor(epochs * steps_per_epoch + 0.5)``: the one rounding rule."""
  x = float(epochs) * int(steps_per_epoch)
  if not math.isfinite(x):
    raise DurationError(f"duration {epochs!r} epochs is not a finite number")
  return int(math.floor(x + 0.5))


def examples_to_steps(examples: float, batch_size: int) -> int:
  return int(math.floor(float(examples) / int(batch_size) + 0.5))


def steps(prefix: str, config: Any, steps_per_epoch: int, batch_size: int, *, cadence: bool = False) -> int:
  """Steps of the duration ``prefix`` in ``config`` (a ConfigDict or dict).

  Reads ``<prefix>_steps``, else ``<prefix>_examples``, else ``<prefix>_epochs``.
  ``cadence=True``: a period, at least one step.
  """
  get = config.get
  value = get(f"{prefix}_steps")
  if value is not None:
    out = int(value)
  elif get(f"{prefix}_examples") is not None:
    out = examples_to_steps(get(f"{prefix}_examples"), batch_size)
  elif get(f"{prefix}_epochs") is not None:
    out = epochs_to_steps(get(f"{prefix}_epochs"), steps_per_epoch)
  else:
    raise DurationError(f"no duration for {prefix!r}: set {prefix}_epochs, {prefix}_steps or {prefix}_examples")
  if out < 0:
    raise DurationError(f"{prefix} must not be negative, got {out} steps")
  return max(out, 1) if cadence else out


def itstime(step: int, every: int, last: int) -> bool:
  """``True`` at multiples of ``every`` and at the last step (big_vision's ``itstime``)."""
  return (every > 0 and step % every == 0) or step == last

"""Learning-rate schedules and optax optimizers from a config (epochs -> steps by :mod:`durations`)."""

from __future__ import annotations

import ml_collections
import optax

from lt_jax.train.durations import epochs_to_steps


def make_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int,
                  lr=None) -> optax.Schedule:
  """Per-step learning rate.

  ``step`` (Cao et al. 2019; Cui et al. 2019): linear warmup over ``warmup_epochs`` from
  ``lr/warmup_steps`` to ``lr``, then ``lr * decay_factor^k`` after the k-th epoch in
  ``decay_epochs`` (the LDAM-DRW recipe: 0.1, x0.01 at 160, x0.0001 at 180 for 200 epochs).
  ``cosine``: warmup then cosine decay to 0 at ``num_epochs`` (Kang et al. 2020).
  ``constant``: warmup then ``lr``.

  ``lr`` (default ``optim.lr``) may be traced: a population member's learning rate
  (:mod:`lt_jax.train.population`).
  """
  lr = float(optim.lr) if lr is None else lr
  warmup = epochs_to_steps(optim.warmup_epochs, steps_per_epoch)
  total = num_epochs * steps_per_epoch
  if optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  elif optim.schedule == "step":
    boundaries: dict[int, float] = {}
    for e in optim.decay_epochs:  # equal epochs compound, as two drops at the same step
      b = epochs_to_steps(e, steps_per_epoch) - warmup
      boundaries[b] = boundaries.get(b, 1.0) * float(optim.decay_factor)
    after = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    after = optax.constant_schedule(lr)
  if warmup == 0:
    return after
  # Step s (0-based) of the warmup uses lr*(s+1)/warmup, so the first update is not zero.
  ramp = optax.linear_schedule(lr / warmup, lr, warmup - 1) if warmup > 1 else optax.constant_schedule(lr)
  return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule,
                   weight_decay=None) -> optax.GradientTransformation:
  """SGD (PyTorch semantics: wd added to the gradient of every parameter, then momentum) or AdamW.

  ``weight_decay`` (default ``optim.weight_decay``) may be traced (a population member's).
  """
  weight_decay = float(optim.weight_decay) if weight_decay is None else weight_decay
  if optim.name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=float(optim.momentum) or None,
                                 nesterov=bool(optim.nesterov)))
  return optax.adamw(schedule, weight_decay=weight_decay)

"""orbax checkpoints of the train state plus JSON metadata, with resume from the workdir.

Saves are atomic (orbax writes to a temporary directory and renames), so a run killed
at any point resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lt_jax.train import config as config_lib


class ResumeError(RuntimeError):
  """The workdir's checkpoint was made by an incompatible config."""


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, config: dict):
  """Returns ``(state, meta)`` of the latest checkpoint, or ``(None, None)`` if none.

  ``abstract_state`` is a state of the right structure (its arrays' shapes, dtypes and
  shardings are the restore target).

  Refuses (``ResumeError``) a checkpoint whose config differs in any field that changes
  the training trajectory (see ``config.RESUMABLE_FIELDS`` for those that may change).
  """
  step = mngr.latest_step()
  if step is None:
    return None, None
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  diff = config_lib.incompatible_fields(meta["config"], config)
  if diff:
    raise ResumeError(
        f"refusing to resume from {mngr.directory} (step {step}): the config changed in a way that "
        "changes training:\n  " + "\n  ".join(diff) +
        "\nUse a new --workdir, or restore the original values.")
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        abstract_state)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored["state"], meta

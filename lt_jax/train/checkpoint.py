"""orbax checkpoints of the train state plus JSON metadata, with resume from the workdir.

Saves are atomic (orbax writes to a temporary directory and renames), so a run killed
at any point resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
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
  meta = restore_meta(mngr, step)
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


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON metadata (config record, step, sampler position, metrics) of ``step``."""
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_arrays(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The saved state of ``step`` as a nested dict of host NumPy arrays (no target needed).

  Used to take the parameters of another run (``init_from``), whose optimiser state may
  have any structure.
  """
  meta = mngr.item_metadata(step)["state"]
  target = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  with warnings.catch_warnings():  # host arrays have no sharding to restore
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=None, restore_args=target)))
  return restored["state"]

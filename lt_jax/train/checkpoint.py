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
  """The workdir's checkpoint was made by an incompatible config, or none of its checkpoints is readable."""


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, config: dict, log=None):
  """Returns ``(state, meta)`` of the newest readable checkpoint, or ``(None, None)`` if none.

  ``abstract_state`` is a state of the right structure (its arrays' shapes, dtypes and
  shardings are the restore target).

  Refuses (``ResumeError``) a checkpoint whose config differs in any field that changes
  the training trajectory (see ``config.RESUMABLE_FIELDS`` for those that may change).
  A checkpoint that cannot be read (truncated or garbled files, an empty or stray step
  folder) is moved aside to ``<step>.unreadable`` with a warning naming it, and the next
  older one is tried; if there are checkpoints but none is readable the run stops
  (``ResumeError``) rather than start from scratch over existing results.
  """
  log = log or (lambda *a: warnings.warn(" ".join(map(str, a))))
  steps = sorted(mngr.all_steps(), reverse=True)
  skipped = []
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
  defaults = config_lib.base_config().to_dict()  # fields a later version added are compatible at these
  for step in steps:
    try:
      meta = restore_meta(mngr, step)
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file: orbax raises many kinds)
      skipped.append((step, e))
      continue
    diff = config_lib.incompatible_fields(meta["config"], config, defaults=defaults)
    if diff:
      raise ResumeError(
          f"refusing to resume from {mngr.directory} (step {step}): the config changed in a way that "
          "changes training:\n  " + "\n  ".join(diff) +
          "\nUse a new --workdir, or restore the original values.")
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # pylint: disable=broad-except
      skipped.append((step, e))
      continue
    _set_aside(mngr, skipped, log, f"resuming from step {step}")
    return restored["state"], meta
  if skipped:
    names = ", ".join(str(s) for s, _ in skipped)
    raise ResumeError(f"no readable checkpoint in {mngr.directory}: step(s) {names} cannot be read "
                      f"({type(skipped[0][1]).__name__}: {str(skipped[0][1])[:200]}). Move them away "
                      f"(e.g. mv {mngr.directory}/{skipped[0][0]} /tmp/) to start this workdir from scratch.")
  return None, None


def _set_aside(mngr: ocp.CheckpointManager, skipped, log, what: str) -> None:
  """Renames unreadable step folders to ``<step>.unreadable`` (so later saves of that step work)."""
  for step, err in skipped:
    src = os.path.join(str(mngr.directory), str(step))
    dst, n = f"{src}.unreadable", 1
    while os.path.exists(dst):
      dst, n = f"{src}.unreadable{n}", n + 1
    if os.path.exists(src):
      os.replace(src, dst)
    log(f"warning: checkpoint step {step} in {mngr.directory} is unreadable ({type(err).__name__}); "
        f"moved to {os.path.basename(dst)}, {what}")
  if skipped:
    mngr.reload()


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

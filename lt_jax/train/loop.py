"""The one training loop (big_vision ``train.py`` shape), used by every task and stage.

A :class:`Run` says what to train: the initial state, the jitted update
(``update(state, *batch) -> (state, metrics)``), the input (an object whose
``batches(start, end)`` yields the update's ``*batch`` arguments), the periodic evaluators,
the hooks run after a step (e.g. DIR's end-of-epoch FDS pass) and where it is recorded. The
loop:

  #### resume: the run's own workdir checkpoint (a config that changed training is refused)
  #### for step, batch in input: update; every log step read the metrics (one host copy),
       check them for NaN/inf, write them; hooks; evaluators at their cadence; checkpoint
  #### final checkpoint; return the state

**Asynchronous dispatch.** The host does not wait for a step: metrics stay on device and are
read only at log, evaluation and checkpoint steps (one ``device_get`` of all steps since the
last read). The NaN/inf check (loss and gradient norm of every step) runs there, before any
checkpoint is written, so a non-finite run stops naming its first bad step and the last good
checkpoint stays the newest. A population (:mod:`lt_jax.train.population`) is a Run whose
state has a member axis: its step freezes a non-finite member itself and reports the mean over
the live members, so this same check stops it only when no member is left (``Run.watch`` sees
the read metrics first and names the frozen members). ``host_sync``: ``"auto"`` blocks on every
step only where PLATFORM.md's deadlock needs it (several emulated CPU devices: queued
all-reduces of a 2-core host time out), ``"always"`` / ``"never"`` override.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lt_jax.train import checkpoint, durations, report

HOST_SYNC = ("auto", "always", "never")


class NonFiniteLossError(FloatingPointError):
  """The training loss, gradient or parameters became NaN or inf; the last good checkpoint is kept."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. the disk is full); the previous checkpoint is intact."""


def _no_space(e: BaseException) -> bool:
  while e is not None:
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


@contextlib.contextmanager
def _writing_checkpoint(mngr, step: int, name: str):
  """Turns a failed (possibly asynchronous) orbax write into one clear :class:`CheckpointWriteError`."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (orbax wraps OSError in several types)
    if not isinstance(e, OSError) and not _no_space(e):
      raise
    good = [s for s in mngr.all_steps() if s != step]
    kept = f"the last good checkpoint (step {max(good)}) is intact" if good else "no earlier checkpoint exists"
    why = "no space left on device" if _no_space(e) else f"{type(e).__name__}: {e}"
    raise CheckpointWriteError(f"cannot write the step-{step} checkpoint of {name} to {mngr.directory} ({why}); "
                               f"{kept}: free space and rerun the same command to resume") from None


class Interrupted(Exception):
  """SIGINT / SIGTERM: the loop stopped at ``step`` after finishing the in-flight checkpoint save."""

  def __init__(self, step: int, name: str):
    super().__init__(f"interrupted at step {step} of {name}; rerun the same command to resume")
    self.step = step


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def blocks_every_step(host_sync: str, mesh) -> bool:
  """Whether the loop waits for each step (see the module docstring)."""
  if host_sync not in HOST_SYNC:
    raise ValueError(f"unknown host_sync {host_sync!r}; valid: {', '.join(HOST_SYNC)}")
  if host_sync == "auto":
    return jax.default_backend() == "cpu" and mesh.size > 1
  return host_sync == "always"


class Periodic(NamedTuple):
  """An evaluator run every ``every`` steps during training (not at the last step)."""
  every: int
  split_name: str            # the metrics.jsonl ``split`` of its lines
  run: Callable[[Any], dict]  # state -> scalar summary
  message: Callable[[int, dict], str] | None = None  # progress-bar line


class Run(NamedTuple):
  name: str
  workdir: str
  record: dict                     # the settings a resumed checkpoint must match
  state: Any                       # initial state (also the restore target)
  update: Callable                 # jitted, state donated
  input: Any                       # .batches(start_step, end_step) -> iterator of argument tuples
  last_step: int
  batch_size: int                  # global examples per step (for images/s)
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  evals: Sequence[Periodic] = ()
  hooks: Sequence[Callable[[Any, int], Any]] = ()   # (state, step) -> state, after each step
  meta: Callable[[int, dict], dict] | None = None   # extra checkpoint metadata
  postfix: Sequence[str] = ("loss",)                # metrics shown on the progress bar
  checked: Sequence[str] = ("loss", "grad_norm")    # metrics that must stay finite
  # Sees every read step's host metrics before the finite check (a population reports the
  # members its step froze; :mod:`lt_jax.train.population`).
  watch: Callable[[list[tuple[int, dict]]], None] | None = None


class Env(NamedTuple):
  """How the loop talks to the world: process role, logging, progress bars, syncing."""
  is_main: bool
  quiet: bool
  log: Callable[..., None]
  block_each_step: bool
  transfer_guard: bool = False   # every step under jax.transfer_guard("disallow_explicit") (tests)


def _first_bad(pending: list[tuple[int, dict]], keys: Sequence[str]):
  for step, m in pending:
    for k in keys:
      if k in m and not np.all(np.isfinite(m[k])):
        return step, k, m[k]
  return None


def train(run: Run, env: Env, writer: report.MetricWriter) -> tuple[Any, int]:
  """Trains ``run`` from its latest checkpoint (if any) to ``run.last_step``; returns (state, step)."""
  mngr = checkpoint.manager(run.workdir, run.keep_checkpoints)
  state = run.state
  restored, meta = checkpoint.restore_latest(mngr, state, run.record, log=env.log)
  if restored is not None:
    state = restored
    env.log(f"{run.name}: resumed from {mngr.directory} at step {int(state.step)} (epoch {meta['epoch']:.2f})")
  if env.is_main:  # after the resume check: a refused resume leaves the workdir's record intact
    report.write_json(os.path.join(run.workdir, "config.json"), run.record)

  step = int(jax.device_get(state.step))
  writer.resume(step)
  bar = None
  if not env.quiet and env.is_main and step < run.last_step:
    from tqdm.auto import tqdm
    bar = tqdm(total=run.last_step, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout, desc=run.name)
  pending: list[tuple[int, Any]] = []
  last: dict[str, float] = {}
  t0, seen0 = time.time(), step

  def fail(what: str, at: int) -> None:
    mngr.wait_until_finished()
    good = mngr.latest_step()
    where = f"the last good checkpoint (step {good}) is kept in {mngr.directory}" if good is not None else \
        "no checkpoint was written before it"
    raise NonFiniteLossError(f"non-finite training {what} at step {at} of {run.name}; {where}")

  def flush() -> None:
    """Reads the metrics of the steps since the last read and checks them (one host copy)."""
    nonlocal last
    if not pending:
      return
    got = jax.device_get(pending)
    pending.clear()
    if run.watch is not None:
      run.watch(got)
    bad = _first_bad(got, run.checked)
    if bad is not None:
      fail(f"{bad[1]} ({bad[2]})", bad[0])
    last = {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in got[-1][1].items()}
    if bar is not None:
      bar.set_postfix({k: f"{last[k]:.3g}" for k in run.postfix if k in last}, refresh=False)

  guard = (lambda: jax.transfer_guard("disallow_explicit")) if env.transfer_guard else contextlib.nullcontext
  batches = iter(run.input.batches(step, run.last_step))
  try:
    while step < run.last_step:
      with guard():
        args = next(batches)
        state, m = run.update(state, *args)
      step += 1
      pending.append((step, m))
      if env.block_each_step:
        jax.block_until_ready(m)
      if bar is not None:
        bar.update(1)
      if step % run.log_every == 0:
        flush()
        rate = (step - seen0) * run.batch_size / max(time.time() - t0, 1e-9)
        writer.write(step, "train", {**last, "images_per_sec": rate})
      for hook in run.hooks:
        state = hook(state, step)
      for ev in run.evals:
        if step % ev.every == 0 and step < run.last_step:
          flush()
          summary = ev.run(state)
          writer.write(step, ev.split_name, summary)
          if bar is not None and ev.message is not None:
            bar.write(ev.message(step, summary))
      if durations.itstime(step, run.checkpoint_every, run.last_step):
        flush()  # never checkpoint a state whose steps were not checked
        if not bool(jax.device_get(_all_finite((state.params, state.batch_stats)))):
          fail("parameters (NaN/inf)", step)
        extra = run.meta(step, last) if run.meta is not None else {}
        with _writing_checkpoint(mngr, step, run.name):
          mngr.wait_until_finished()  # the previous (asynchronous) save's error surfaces here
          checkpoint.save(mngr, step, state, {"config": run.record, "step": step,
                                              "epoch": extra.pop("epoch", 0.0), **extra, "metrics": last})
    flush()
  except KeyboardInterrupt:
    if bar is not None:
      bar.close()
    mngr.wait_until_finished()  # an in-flight save completes (orbax renames it into place)
    mngr.close()
    raise Interrupted(step, run.name) from None
  if bar is not None:
    bar.close()
  with _writing_checkpoint(mngr, step, run.name):
    mngr.wait_until_finished()
  mngr.close()
  return state, step


class DeviceInput:
  """The in-memory dataset on device: the update draws, gathers and augments its batch itself,
  so each step's argument is the same device pytree (no host work, no transfer)."""

  def __init__(self, data: Any):
    self.data = data

  def batches(self, start: int, end: int) -> Iterable[tuple]:
    for _ in range(start, end):
      yield (self.data,)


class StreamInput:
  """The host pipeline (:mod:`lt_jax.data.streaming`): global batches drawn by host samplers
  that are pure functions of ``(seed, step)``; the pipeline's position is the step."""

  def __init__(self, make_iterator: Callable[[int, int], Iterable[dict]]):
    self._make = make_iterator

  def batches(self, start: int, end: int) -> Iterable[tuple]:
    for b in self._make(start, end):
      yield (b["image"], b["label"])

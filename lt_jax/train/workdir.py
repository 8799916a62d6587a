"""One run per workdir: an exclusive ``flock`` on ``workdir/.lt_jax.lock`` held by process 0.

Two runs writing one workdir would interleave checkpoints and metrics; the second one to
start refuses at once, naming the holder. The lock belongs to the open file, so the kernel
releases it when the holder exits or is killed: a stale lock file left by a crash never blocks
the next run (its pid/host lines are just overwritten).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket

LOCK_NAME = ".lt_jax.lock"


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir's lock."""


def check(workdir: str) -> None:
  """A usable run directory: a non-empty path that is a directory or does not exist yet."""
  from lt_jax.train.config import ConfigError  # pylint: disable=g-import-not-at-top
  if not workdir or not str(workdir).strip():
    raise ConfigError("--workdir is empty; pass the run directory (checkpoints, metrics, plots)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir {workdir} exists and is not a directory")


@contextlib.contextmanager
def locked(workdir: str, enabled: bool = True):
  """Holds the workdir lock for the ``with`` block (a no-op when ``enabled`` is false)."""
  check(workdir)
  if not enabled:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").split()
      pid, host = (holder + ["?", "?"])[:2]
      raise WorkdirInUseError(f"workdir {workdir} is in use by pid {pid} on host {host}; wait for that run "
                              "or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock

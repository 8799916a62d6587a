"""Multi-process training: two ``launch.py`` processes over jax.distributed equal one process.

PLATFORM.md: ``jax.distributed.initialize`` over 127.0.0.1 works on CPU (gloo
collectives); a process whose peer never starts aborts after the timeout, so every
process here runs under ``timeout``.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESS_TIMEOUT_S = 200


def _launch_module():
  """``launch.py`` as the module ``launch`` (once: it defines absl flags at import)."""
  if "launch" in sys.modules:
    return sys.modules["launch"]
  spec = importlib.util.spec_from_file_location("launch", os.path.join(ROOT, "launch.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sys.modules["launch"] = module
  return module


launch = _launch_module()


def test_distributed_kwargs_from_flags_and_env():
  assert launch.distributed_kwargs(False, env={}) is None
  assert launch.distributed_kwargs(True, env={}) == {}  # TPU pod / Slurm: JAX detects the cluster
  assert launch.distributed_kwargs(False, env={"LT_JAX_DISTRIBUTED": "1"}) == {}
  want = {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  assert launch.distributed_kwargs(False, "127.0.0.1:1234", 2, 1, env={}) == want
  env = {"LT_JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "LT_JAX_NUM_PROCESSES": "2", "LT_JAX_PROCESS_ID": "1"}
  assert launch.distributed_kwargs(False, env=env) == want
  assert launch.distributed_kwargs(False, process_id=0, env=env)["process_id"] == 0  # flags win
  with pytest.raises(ValueError, match="also pass --num_processes, --process_id"):
    launch.distributed_kwargs(True, "127.0.0.1:1234", env={})
  with pytest.raises(ValueError, match="0 <= process_id < num_processes"):
    launch.distributed_kwargs(True, "127.0.0.1:1234", 2, 2, env={})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, devices: int, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             CI="true", TF_CPP_MIN_LOG_LEVEL="3")
  cmd = ["timeout", str(PROCESS_TIMEOUT_S), sys.executable, os.path.join(ROOT, "launch.py"),
         "--config=" + os.path.join(ROOT, "configs", "fashion_mnist_lt.py") + ":smoke",
         f"--workdir={workdir}", "--config.quiet=true", *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _restore_state(path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def test_two_processes_equal_one_process(tmp_path):
  from lt_jax.data import sources  # pylint: disable=g-import-not-at-top
  from lt_jax.data.prepare import DataUnavailableError  # pylint: disable=g-import-not-at-top
  try:  # build (and cache) Fashion-MNIST once here, so the processes do not race on it
    for split in ("train", "test"):
      sources.load_arrays("fashion_mnist", split)
  except DataUnavailableError as e:
    pytest.skip(f"Fashion-MNIST not available offline: {e}")

  port = _free_port()
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  procs = [_start(multi, 1, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}"]) for i in range(2)]
  # Same global batch (32) on one process; one device, so no in-process all-reduce rendezvous
  # (PLATFORM.md: emulated devices can deadlock on a loaded 2-core machine).
  procs.append(_start(single, 1))
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=PROCESS_TIMEOUT_S + 20)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "jax.distributed with 2 processes, 2 devices (1 per process)" in outs[0]
  assert "top-1 accuracy" in outs[0] and "top-1 accuracy" not in outs[1]  # summary printed once

  # Written once, by process 0: one test line, one summary.
  lines = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
  assert [(x["step"], x["split"]) for x in lines if x["split"] == "test"] == [(5, "test")]
  a = json.loads((single / "summary.json").read_text())
  b = json.loads((multi / "summary.json").read_text())
  assert a["step"] == b["step"] == 5
  for key in ("accuracy", "balanced_error_rate", "many_shot", "medium_shot"):
    assert b[key] == pytest.approx(a[key], abs=1e-4), key
  for key in ("nll", "ece", "macro_f1"):
    assert b[key] == pytest.approx(a[key], rel=1e-3), key
  np.testing.assert_allclose(b["per_class_accuracy"], a["per_class_accuracy"], atol=1e-4)

  # orbax wrote the checkpoint from both processes; final parameters agree.
  state_dir = multi / "checkpoints" / "5" / "state"
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  sa, sb = _restore_state(single / "checkpoints" / "5" / "state"), _restore_state(state_dir)
  assert int(sa["step"]) == int(sb["step"]) == 5
  for x, y in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"])):
    np.testing.assert_allclose(y, x, atol=5e-5, rtol=1e-4)


def test_a_process_that_never_joins_gives_one_error_line(tmp_path):
  port = _free_port()
  p = _start(tmp_path, 1, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
                           "--distributed_timeout=5"])
  out = p.communicate(timeout=PROCESS_TIMEOUT_S)[0]
  assert p.returncode == 2, out[-3000:]
  assert f"lt_jax: waiting up to 5 s for 2 processes at 127.0.0.1:{port} (this is process 0)" in out
  last = out.strip().splitlines()[-1]
  assert last.startswith("error: jax.distributed: not every process joined within 5 s") and "Traceback" not in out

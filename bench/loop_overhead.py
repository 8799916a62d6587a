"""The whole training loop's steps/s against the bare jitted step, side by side (benchmark, not a test).

The same classification update (``lt_jax.train.steps.make_train_step``: on-device sampling,
augmentation, forward/backward, SGD) on synthetic in-memory data, run (a) as a bare Python
``for`` loop over the jitted step, blocking once at the end, and (b) through
``lt_jax.train.loop.train``: input iterator, asynchronous metrics read at log steps with the
NaN/inf check, progress accounting, and the final orbax checkpoint. Rounds alternate (a) and
(b) so both see the same machine load; medians are reported, with the loop overhead
``1 - loop_steps_per_s / bare_steps_per_s``.

  python bench/loop_overhead.py                       # small CNN, 28x28x1, batch 128, 200 steps x 3
  python bench/loop_overhead.py --model=resnet32 --steps=30 --rounds=2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from lt_jax import losses
from lt_jax.models import get_model
from lt_jax.train import loop, report, steps
from lt_jax.train.state import create_state, make_mesh, put_global, replicated

import common  # bench/common.py


def setup(model_name: str, batch: int, num_train: int):
  mesh = make_mesh(1)
  shape, _, labels, data = common.synthetic_data(model_name, [num_train // 10] * 10, mesh)
  model = get_model(model_name, num_classes=10)
  spe, schedule, tx = common.sgd(batch, len(labels))
  loss = losses.make_loss("ce")
  sc = common.step_config(batch, spe, shape)
  counts = put_global(np.bincount(labels, minlength=10).astype(np.float32), replicated(mesh))
  update = steps.make_train_step(model, tx, loss, schedule, counts, sc, mesh)
  fresh = lambda: create_state(model, tx, loss, 10, shape, 0, mesh)
  return update, fresh, data


def looped(update, state, data, n: int, batch: int) -> float:
  env = loop.Env(is_main=True, quiet=True, log=lambda *a: None, block_each_step=False)
  with tempfile.TemporaryDirectory() as d:
    run = loop.Run(name="bench", workdir=d, record={}, state=state, update=update, input=loop.DeviceInput(data),
                   last_step=n, batch_size=batch, log_every=50, checkpoint_every=10 ** 9, keep_checkpoints=1)
    t = time.perf_counter()
    state, _ = loop.train(run, env, report.MetricWriter(d, enabled=False))
    jax.block_until_ready(state)
    return n / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="cnn")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()
  update, fresh, data = setup(a.model, a.batch, 4000)
  common.timed(update, fresh(), (data,), 3)  # compile
  b, l = [], []
  for r in range(a.rounds):
    b.append(common.timed(update, fresh(), (data,), a.steps)[1])
    l.append(looped(update, fresh(), data, a.steps, a.batch))
    print(f"round {r}: bare {b[-1]:.2f} steps/s, loop {l[-1]:.2f} steps/s", flush=True)
  mb, ml = statistics.median(b), statistics.median(l)
  print(f"{a.model} batch {a.batch}, {a.steps} steps, {jax.default_backend()}: bare jitted step {mb:.2f} steps/s, "
        f"whole loop {ml:.2f} steps/s (incl. the final checkpoint); loop overhead {100 * (1 - ml / mb):.1f}%")


if __name__ == "__main__":
  main()

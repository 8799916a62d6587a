r"""Population training vs sequential single runs: images/s and wall time, side by side in one run.

Benchmark, not a test. For N = 1, 2, 4, 8 members (seeds 0..N-1, CE) of

* the small Fashion-MNIST CNN on 28x28x1 synthetic data (``configs/fashion_mnist_lt.py``), and
* ResNet-32 on CIFAR-shaped 32x32x3 synthetic data (``configs/cifar_lt.py``),

it times the population's jitted step (:func:`lt_jax.train.population.make_population_step`,
the on-device sampling, augmentation, loss and SGD of the real recipe at batch 128 per member)
against the single run's step (:func:`lt_jax.train.steps.make_train_step`), all in one process so
they see the same machine load. "sequential" is N single runs one after another:
``N x (compile + steps x step time)`` of the single run, measured once per model (the N runs are
the same program; a separate process per run would also pay start-up and data loading, not
counted here). "population" is one compile and ``steps`` population steps. Both execution modes
of the member axis are timed (``vmap``: one batched program; ``unroll``: the members' programs
side by side in one step). Median step time over ``--steps`` steps after ``--warmup``.

  python bench/population.py                       # CNN N=1,2,4,8 and ResNet-32 N=1,2,4,8
  python bench/population.py --models=cnn --members=1,2,4 --steps=10

Prints one table per model and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lt_jax import priors, samplers  # noqa: E402
from lt_jax.train import config as config_lib, optim, population, steps, trainer  # noqa: E402
from lt_jax.train import state as state_lib  # noqa: E402

MODELS = {  # name -> (config file, variant, image shape, head-class size: Fashion-MNIST-LT / CIFAR-10-LT IR 100)
    "cnn": ("configs/fashion_mnist_lt.py", "", (28, 28, 1), 6000),
    "resnet32": ("configs/cifar_lt.py", "", (32, 32, 3), 5000),
}


def load_config(path: str, variant: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_cfg", os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant or None)


def synthetic_data(shape, n_max: int, num_classes: int, mesh):
  """A long-tailed (IR 100, exp) training set of random uint8 images on device, and its counts."""
  counts = np.asarray(priors.lt_counts(n_max, num_classes, 100.0), np.int64)
  labels = np.repeat(np.arange(num_classes), counts).astype(np.int32)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8)
  rep = state_lib.replicated(mesh)
  data = steps.TrainData(images=state_lib.put_global(images, rep), labels=state_lib.put_global(labels, rep),
                         index=jax.device_put(samplers.build_index(labels, num_classes), rep))
  return data, counts


def timed_steps(update, state, data, steps_: int, warmup: int):
  """``(median step seconds, state)`` after ``warmup`` untimed steps."""
  for _ in range(warmup):
    state, m = update(state, data)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps_):
    t = time.perf_counter()
    state, m = update(state, data)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return float(np.median(times)), state


def bench_model(name: str, members_list: list[int], steps_: int, warmup: int, modes: list[str]) -> dict:
  path, variant, shape, n = MODELS[name]
  c = load_config(path, variant)
  mesh = state_lib.make_mesh(1)
  data, counts = synthetic_data(shape, n, 10, mesh)
  spe = config_lib.steps_per_epoch(len(np.asarray(data.labels)), c.batch_size)
  counts_dev = jnp.asarray(counts, jnp.float32)
  ctx = trainer.Context(c, trainer.Data(name, 10, shape, (), counts, (0.5,) * shape[-1], (0.25,) * shape[-1],
                                        int(counts.sum()), 0, 0, None, data), mesh, spe, counts_dev, None)
  spec = trainer.joint_spec(ctx, "/tmp")
  out = {"model": name, "batch_per_member": c.batch_size, "steps": steps_, "rows": []}

  # The single run: compile once, time its steps.
  t = time.perf_counter()
  schedule = optim.make_schedule(c.optim, spe, c.num_epochs)
  tx = optim.make_optimizer(c.optim, schedule)
  st = state_lib.create_state(spec.model, tx, spec.loss, 10, shape, 0, mesh)
  update = steps.make_train_step(spec.model, tx, spec.loss, schedule, counts_dev, spec.step_config, mesh)
  st, m = update(st, data)
  jax.block_until_ready(m)
  single_compile = time.perf_counter() - t
  single_step, _ = timed_steps(update, st, data, steps_, warmup)
  out["single"] = {"compile_s": single_compile, "step_s": single_step,
                   "images_per_s": c.batch_size / single_step}
  print(f"\n{name}: single run compile+first step {single_compile:.1f} s, step {single_step * 1e3:.0f} ms "
        f"({c.batch_size / single_step:.0f} images/s)", flush=True)

  for n_members in members_list:
    pc = c.copy_and_resolve_references()
    pc.population.seeds = ",".join(str(s) for s in range(n_members))
    ms = population.members(pc)
    plan = population.make_plan(ms)
    row = {"members": n_members}
    seq_wall = n_members * (single_compile + steps_ * single_step)
    row["sequential"] = {"wall_s": seq_wall, "images_per_s": c.batch_size / single_step}
    pmesh = population.population_mesh(n_members, 1)
    pdata, _ = synthetic_data(shape, MODELS[name][3], 10, pmesh)
    for mode in modes:
      t = time.perf_counter()
      ps, shardings = population.init_population(plan, spec.model, 10, shape, pmesh, spe)
      pupdate = population.make_population_step(plan, spec.model, counts_dev, spec.step_config, spe, c.num_epochs,
                                                pmesh, shardings, False, mode)
      ps, m = pupdate(ps, pdata)
      jax.block_until_ready(m)
      compile_s = time.perf_counter() - t
      step_s, _ = timed_steps(pupdate, ps, pdata, steps_, warmup)
      ips = n_members * c.batch_size / step_s
      row[mode] = {"compile_s": compile_s, "step_s": step_s, "images_per_s": ips,
                   "wall_s": compile_s + steps_ * step_s,
                   "speedup_vs_sequential": (n_members * single_step) / step_s}
      print(f"  N={n_members} {mode:>6}: compile {compile_s:5.1f} s, step {step_s * 1e3:7.0f} ms, "
            f"{ips:6.0f} images/s = {row[mode]['speedup_vs_sequential']:.2f}x sequential "
            f"(sequential {n_members} runs: {n_members * single_step * 1e3:.0f} ms per step of all)", flush=True)
    out["rows"].append(row)
  return out


def print_table(res: dict) -> None:
  modes = [k for k in res["rows"][0] if k not in ("members", "sequential")]
  print(f"\n{res['model']} (batch {res['batch_per_member']} per member, {res['steps']} timed steps; "
        f"single run: {res['single']['images_per_s']:.0f} images/s, compile {res['single']['compile_s']:.1f} s)")
  head = "| N | sequential images/s | sequential wall (s) | " + " | ".join(
      f"{m} images/s | {m} wall (s) | {m} vs sequential" for m in modes) + " |"
  print(head)
  print("|---" * (3 + 3 * len(modes)) + "|")
  for r in res["rows"]:
    cells = [f"{r['members']}", f"{r['sequential']['images_per_s']:.0f}", f"{r['sequential']['wall_s']:.1f}"]
    for m in modes:
      cells += [f"{r[m]['images_per_s']:.0f}", f"{r[m]['wall_s']:.1f}", f"{r[m]['speedup_vs_sequential']:.2f}x"]
    print("| " + " | ".join(cells) + " |")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="cnn,resnet32")
  p.add_argument("--members", default="1,2,4,8")
  p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (ResNet-32: --resnet_steps)")
  p.add_argument("--resnet_steps", type=int, default=2)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--modes", default="vmap,unroll", help="population.vectorize modes to time")
  p.add_argument("--out", default="/tmp/bench_population.json")
  args = p.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s): "
        f"{jax.devices()[0].device_kind}", flush=True)
  results = []
  for name in args.models.split(","):
    n_steps = args.resnet_steps if name.startswith("resnet") else args.steps
    results.append(bench_model(name, [int(x) for x in args.members.split(",")], n_steps, args.warmup,
                               args.modes.split(",")))
  for res in results:
    print_table(res)
  with open(args.out, "w") as f:
    json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "results": results}, f,
              indent=2)


if __name__ == "__main__":
  main()

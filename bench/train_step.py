"""Training-step throughput: lt_jax (JAX/XLA) vs a plain PyTorch implementation, side by side.

Benchmark, not a test. ResNet-32 (CIFAR, option-A shortcuts, 0.46M params) on 32x32x3
batches and the small Fashion-MNIST CNN on 28x28x1 batches; one step = forward, softmax
cross-entropy, backward, SGD (momentum 0.9, weight decay 2e-4 added to the gradient as in
torch.optim.SGD). JAX steps are ``jax.jit`` with the state donated; compile time (lower +
compile) is reported separately and excluded, as are ``--warmup`` steps. All variants are
timed round-robin in one process so they see the same machine load (the 2 CPU cores are
shared); medians over ``--steps`` rounds are reported.

lt_jax variants (ResNet-32):
  lt_jax            conv_impl='xla', bn_impl='fused', jit(compiler_options=cpu_compiler_options())
                    -- the recommended CPU setup
  xla+flaxBN/noopt  conv_impl='xla', bn_impl='flax', default XLA options (the naive port)
  xla+fusedBN/noopt conv_impl='xla', bn_impl='fused', default XLA options
  xla+flaxBN/opt    conv_impl='xla', bn_impl='flax', cpu_compiler_options()

torch: ``pip install torch==2.13.0`` (not a project requirement); without it only JAX numbers
are printed.

Reproduce:  python bench/train_step.py            (about 3 minutes on 2 cores)
            python bench/train_step.py --steps 10 --skip-cnn
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax

from lt_jax.models import get_model
from lt_jax.models.layers import cpu_compiler_options

LR, MOMENTUM, WD = 0.1, 0.9, 2e-4


# ---------------------------------------------------------------------------------------
# JAX.


def make_jax_step(model, input_shape, batch, compiler_options):
  """Returns (compiled step, initial state, inputs, compile seconds)."""
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((2, *input_shape)), train=False))(jax.random.key(0))
  tx = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  def step(state, x, y):
    params, batch_stats, opt_state = state

    def loss_fn(p):
      (logits, _), upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                     mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, *input_shape)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0, compiler_options=compiler_options or None).lower(
      state, x, y).compile()
  compile_s = time.perf_counter() - t0
  return compiled, state, (x, y), compile_s


class JaxRunner:
  def __init__(self, name, model, input_shape, batch, compiler_options):
    self.name = name
    self.step, self.state, self.data, self.compile_s = make_jax_step(model, input_shape, batch,
                                                                     compiler_options)
    self.times = []

  def run(self, record: bool):
    t0 = time.perf_counter()
    self.state, loss = self.step(self.state, *self.data)
    loss.block_until_ready()
    if record:
      self.times.append(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------
# PyTorch (optional).


def torch_models():
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F

  class Block(tnn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      self.c1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.b1 = tnn.BatchNorm2d(planes)
      self.c2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.b2 = tnn.BatchNorm2d(planes)
      self.stride, self.lo, self.hi = stride, (planes - cin) // 2, planes - cin - (planes - cin) // 2

    def forward(self, x):
      y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
      sc = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
      if self.lo or self.hi:
        sc = F.pad(sc, (0, 0, 0, 0, self.lo, self.hi))   # option A: zero-pad channels
      return F.relu(y + sc)

  class ResNet32(tnn.Module):
    def __init__(self, n=5, num_classes=10):
      super().__init__()
      self.conv = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn = tnn.BatchNorm2d(16)
      blocks, cin = [], 16
      for s, planes in enumerate((16, 32, 64)):
        for k in range(n):
          blocks.append(Block(cin, planes, 2 if (s > 0 and k == 0) else 1))
          cin = planes
      self.blocks = tnn.Sequential(*blocks)
      self.fc = tnn.Linear(64, num_classes)
      for m in self.modules():
        if isinstance(m, (tnn.Conv2d, tnn.Linear)):
          tnn.init.kaiming_normal_(m.weight)

    def forward(self, x):
      return self.fc(self.blocks(F.relu(self.bn(self.conv(x)))).mean((2, 3)))

  def cnn(num_classes=10):
    cbr = lambda i, o: [tnn.Conv2d(i, o, 3, 1, 1, bias=False), tnn.BatchNorm2d(o), tnn.ReLU()]
    return tnn.Sequential(*cbr(1, 32), *cbr(32, 32), tnn.MaxPool2d(2), *cbr(32, 64), *cbr(64, 64),
                          tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(7 * 7 * 64, 128, bias=False),
                          tnn.BatchNorm1d(128), tnn.ReLU(), tnn.Linear(128, num_classes))

  return torch, ResNet32, cnn


class TorchRunner:
  def __init__(self, name, torch, model, input_shape_nchw, batch):
    import torch.nn.functional as F
    self.name, self.torch, self.compile_s = name, torch, 0.0
    self.model = model.train()
    self.opt = torch.optim.SGD(self.model.parameters(), LR, momentum=MOMENTUM, weight_decay=WD)
    g = torch.Generator().manual_seed(0)
    self.x = torch.randn(batch, *input_shape_nchw, generator=g)
    self.y = torch.randint(0, 10, (batch,), generator=g)
    self.F = F
    self.times = []

  def run(self, record: bool):
    t0 = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    loss = self.F.cross_entropy(self.model(self.x), self.y)
    loss.backward()
    self.opt.step()
    if record:
      self.times.append(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------


def measure(runners, steps: int, warmup: int):
  for _ in range(warmup):
    for r in runners:
      r.run(record=False)
  for _ in range(steps):          # round-robin: every variant sees the same load
    for r in runners:
      r.run(record=True)


def report(title, runners, batch, ref_name):
  print(f"\n== {title} (batch {batch}; median over {len(runners[0].times)} interleaved steps) ==")
  ref = next((r for r in runners if r.name == ref_name), None)
  ref_ips = batch / np.median(ref.times) if ref else None
  print(f"{'variant':<20} {'compile s':>9} {'step ms':>9} {'min ms':>8} {'steps/s':>8} {'img/s':>8}"
        + (f" {'vs ' + ref_name:>10}" if ref else ""))
  for r in runners:
    med = float(np.median(r.times))
    ips = batch / med
    comp = "-" if isinstance(r, TorchRunner) else f"{r.compile_s:.1f}"
    line = (f"{r.name:<20} {comp:>9} {1e3 * med:9.1f} {1e3 * min(r.times):8.1f} "
            f"{1 / med:8.2f} {ips:8.1f}")
    if ref:
      line += f" {ips / ref_ips:9.2f}x"
    print(line)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (default 6)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--skip-cnn", action="store_true")
  ap.add_argument("--skip-resnet", action="store_true")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--variants", default="lt_jax,xla+flaxBN/noopt,xla+fusedBN/noopt,xla+flaxBN/opt",
                  help="comma-separated lt_jax variants for ResNet-32")
  args = ap.parse_args(argv)

  opts = cpu_compiler_options()
  print(f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.devices()}")
  print(f"cpu_compiler_options() = {opts}")
  torch_mod = None
  if not args.no_torch:
    try:
      torch_mod = torch_models()
      print(f"torch {torch_mod[0].__version__}, {torch_mod[0].get_num_threads()} threads")
    except ImportError:
      print("torch is not installed: reporting lt_jax numbers only "
            "(pip install torch==2.13.0 for the PyTorch reference)")

  specs = {
      "lt_jax": dict(conv_impl="xla", bn_impl="fused", opts=opts),
      "xla+flaxBN/noopt": dict(conv_impl="xla", bn_impl="flax", opts={}),
      "xla+fusedBN/noopt": dict(conv_impl="xla", bn_impl="fused", opts={}),
      "xla+flaxBN/opt": dict(conv_impl="xla", bn_impl="flax", opts=opts),
  }
  if not args.skip_resnet:
    runners = []
    for name in args.variants.split(","):
      if name not in specs:
        raise ValueError(f"unknown variant {name!r}; valid: {tuple(specs)}")
      s = specs[name]
      model = get_model("resnet32", num_classes=10, conv_impl=s["conv_impl"], bn_impl=s["bn_impl"])
      runners.append(JaxRunner(name, model, (32, 32, 3), args.batch, s["opts"]))
      print(f"compiled {name} in {runners[-1].compile_s:.1f} s", flush=True)
    if torch_mod:
      torch, resnet32, _ = torch_mod
      torch.manual_seed(0)
      runners.append(TorchRunner("torch", torch, resnet32(), (3, 32, 32), args.batch))
    measure(runners, args.steps, args.warmup)
    report("ResNet-32 CIFAR training step", runners, args.batch, "torch" if torch_mod else "lt_jax")

  if not args.skip_cnn:
    runners = [JaxRunner("lt_jax cnn", get_model("cnn", num_classes=10), (28, 28, 1), args.batch, opts),
               JaxRunner("lt_jax cnn/noopt", get_model("cnn", num_classes=10, bn_impl="flax"), (28, 28, 1),
                         args.batch, {})]
    if torch_mod:
      torch, _, cnn = torch_mod
      torch.manual_seed(0)
      runners.append(TorchRunner("torch cnn", torch, cnn(), (1, 28, 28), args.batch))
    measure(runners, 3 * args.steps, args.warmup)
    report("Small CNN (Fashion-MNIST) training step", runners, args.batch,
           "torch cnn" if torch_mod else "lt_jax cnn")


if __name__ == "__main__":
  main()

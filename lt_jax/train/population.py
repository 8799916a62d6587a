r"""Population training: many seeds and method variants trained as one jitted program over a member axis.

Long-tail results move by a point or more between seeds (the tail classes have tens of
images), so a table needs several seeds per method. A *population* trains them together: its
members share the dataset, the model architecture and the schedule, and differ in

* the seed (initialisation, sampling, augmentation; with ``population.subset_seeds`` also the
  long-tailed subset draw),
* numeric hyper-parameters (``optim.lr``, ``optim.weight_decay``, ``mix.alpha`` and the loss's
  own, e.g. LA's ``tau``, focal ``gamma``, CB ``beta``, LDAM ``max_m``): a list or a grid,
  ``--config.population.grid.loss.tau=0.5,1.0,1.5``,
* the loss itself (``population.losses=ce,la,bs``: any registry loss, alias or recipe whose
  model is the shared one) and the sampler (``population.samplers=instance,class_balanced``).

  python launch.py --config=configs/fashion_mnist_lt.py:seeds=0+1+2,losses=ce+la+bs --workdir=/tmp/pop

**One program.** Every member is a complete single-run config (:func:`members`); the
population's update is the single run's update function (:func:`lt_jax.train.steps.train_step_fn`)
``vmap``-ed over a leading *member* axis of the state, jitted once with the state donated and
trained by the one loop (:func:`lt_jax.train.loop.train`: checkpoints, exact resume, cadences).
A hyper-parameter enters the step as an array (``PopulationState.hparams``, one entry per
member) only where the members' values differ; shared values stay the Python constants of the
single run, so a population of seeds is exactly the single run's program, vmapped. The member's
loss is ``lax.switch(loss_index, branches)`` over the distinct losses (and its sampler likewise):
under ``vmap`` every branch is evaluated and the member's own selected, which costs a loss
evaluation per branch (small next to the backbone) and changes nothing in the selected value or
gradient. Deviations from an independent single run, all at float32 round-off level: vmapped
convolutions and the traced learning rate change summation and rounding order (see
``tests/test_population.py`` for the measured size); a *varying* CB ``beta`` uses the float32
effective number (a Python ``beta`` uses float64, :func:`lt_jax.priors.effective_number`), a
varying ``mix.alpha`` the general Beta draw (a Python ``alpha = 1`` draws uniforms).

**vmap or unroll** (``population.vectorize``). Under ``vmap`` a convolution of N members is one
grouped convolution: one kernel launch on an accelerator, but XLA:CPU runs grouped convolutions
2-4x slower than N separate ones (``bench/population.py``). ``'unroll'`` places the members' own
single-run updates (their Python constants, loss and sampler; no switch) side by side in the same
jitted step over the same state: bit-identical to independent single runs, as fast as running
them one after another (or a little faster: independent members keep both cores busy), and one
compilation per member. ``'auto'`` (default): ``'unroll'`` on CPU, ``'vmap'`` elsewhere.

**Devices.** The mesh is ``('members', 'data')``: members over devices as far as the member count
allows (``gcd(N, devices)``), data parallel inside a member for the rest (``vmap`` with
``spmd_axis_name='members'``), so the same config runs on 1 CPU, 2 emulated CPU devices or a pod.

**Non-finite members.** The single run stops at a non-finite loss, gradient or parameter. The
population's step checks each member on device and *freezes* one that goes non-finite at its last
finite state (``alive`` / ``frozen_at`` in the state; masked updates), while the others continue.
The loop's own finite check then sees the mean over the live members, so it stops (with its usual
message and the last good checkpoint kept) only when no member is left; its ``watch`` reports
each frozen member when the step's metrics are read. The summary marks frozen members and leaves
them out of the mean ± std.

Outputs (``workdir``): ``population_summary.json`` (each member's row and mean ± std over seeds
per variant, also printed), ``per_class_accuracy.png`` (per-class accuracy vs class size, error
bars over seeds), and per member ``members/<name>/``: ``summary.json``, ``confusion.npy`` and a
single-run checkpoint (a decoupled stage can start from it: ``--config.init_from=<that folder>``).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lt_jax import losses as losses_lib
from lt_jax import metrics as metrics_lib, priors, samplers as samplers_lib
from lt_jax.models import cpu_compiler_options
from lt_jax.train import checkpoint, config as config_lib, durations, evaluators, loop, optim, report, steps
from lt_jax.train import state as state_lib
from lt_jax.train import workdir as workdir_lib
from lt_jax.train.config import ConfigError

# Fields a member may set on its own; every other trajectory field is shared by the population.
PER_MEMBER = ("seed", "dataset.subset_seed", "loss", "sampler.name", "optim.lr", "optim.weight_decay", "mix.alpha")
# Numeric fields that enter the step as arrays when the members' values differ.
ARRAY_FIELDS = ("optim.lr", "optim.weight_decay", "mix.alpha")
VECTORIZE = ("auto", "vmap", "unroll")
# Metrics averaged over members in the variant table (the rest are in each member's row).
TABLE_KEYS = (("accuracy", "top-1"), ("balanced_error_rate", "BER"), ("macro_f1", "macro-F1"),
              ("many_shot", "many"), ("medium_shot", "medium"), ("few_shot", "few"), ("ece", "ECE"))


class Member(NamedTuple):
  """One member: its equivalent single-run config and how it is named."""
  name: str        # unique and directory-safe: '<variant>_seed<k>'
  variant: str     # everything but the seed, e.g. 'la tau=1.5' (the mean ± std groups)
  seed: int
  config: ml_collections.ConfigDict


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config.population`` names any member list (else the config is one run)."""
  p = config.get("population")
  if p is None:
    return False
  grid = [p.grid[g][k] for g in p.grid for k in p.grid[g]]
  return any(str(v).strip() for v in [p.seeds, p.losses, p.samplers, *grid])


def _split(text, what: str, kind=str) -> list:
  items = [t.strip() for t in str(text).replace("+", ",").split(",") if t.strip()]
  try:
    return [kind(t) for t in items]
  except ValueError:
    raise ConfigError(f"population.{what}={text!r}: expected a comma-separated list of "
                      f"{'integers' if kind is int else 'numbers'}") from None


def _get(c: ml_collections.ConfigDict, dotted: str):
  node = c
  for part in dotted.split("."):
    node = node[part]
  return node


def _set(c: ml_collections.ConfigDict, dotted: str, value) -> None:
  *path, last = dotted.split(".")
  node = c
  for part in path:
    node = node[part]
  node[last] = value


def _fmt(v: float) -> str:
  return f"{v:g}"


def members(config: ml_collections.ConfigDict) -> list[Member]:
  """The population's members: ``losses x samplers x grid points x seeds``, variant-major.

  Each member's config is the single run it stands for (``population`` emptied). A grid key
  ``loss.<k>`` applies to the members whose loss has the hyper-parameter ``k`` (others get one
  member, not one per value). Raises :class:`ConfigError` for bad lists, duplicates, or members
  that do not share the dataset, model and schedule (e.g. ``ldam_drw``'s cosine head with
  linear-head losses: run it as a population of its own).
  """
  p = config.population
  base = config.copy_and_resolve_references()
  with base.unlocked():
    base.population = config_lib.population_fields()
  seeds = _split(p.seeds, "seeds", int) or [int(config.seed)]
  if len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ConfigError(f"population.seeds must be distinct integers >= 0, got {p.seeds!r}")
  loss_names = _split(p.losses, "losses") or [None]
  sampler_names = _split(p.samplers, "samplers") or [None]
  grid = {}
  for key in config_lib.POPULATION_GRID:
    values = _split(_get(p.grid, key), f"grid.{key}", float)
    if values:
      grid[key] = values
  out, seen = [], set()
  for loss in loss_names:
    c1 = base.copy_and_resolve_references()
    if loss is not None:
      config_lib.set_loss(c1, loss)
    for sampler in sampler_names:
      c2 = c1.copy_and_resolve_references()
      if sampler is not None:
        c2.sampler.name = config_lib.SAMPLER_ALIASES.get(sampler, sampler)
      keys = [k for k in grid if not k.startswith("loss.") or k[5:] in c2.loss.hparams]
      for point in itertools.product(*(grid[k] for k in keys)):
        c3 = c2.copy_and_resolve_references()
        for key, value in zip(keys, point):
          _set(c3, "loss.hparams." + key[5:] if key.startswith("loss.") else key, value)
        parts = [loss or c3.loss.name] + ([c3.sampler.name] if sampler is not None else []) + \
            [f"{k.split('.')[-1]}={_fmt(v)}" for k, v in zip(keys, point)]
        variant = " ".join(parts)
        for seed in seeds:
          c4 = c3.copy_and_resolve_references()
          c4.seed = seed
          if p.subset_seeds:
            c4.dataset.subset_seed = seed
          name = f"{variant.replace(' ', '_').replace('/', '-')}_seed{seed}"
          if name in seen:
            raise ConfigError(f"population member {name!r} appears twice; list each loss, sampler and value once")
          seen.add(name)
          out.append(Member(name, variant, seed, c4))
  _check_shared(out)
  return out


def _per_member(dotted: str) -> bool:
  return any(dotted == f or dotted.startswith(f + ".") for f in PER_MEMBER)


def shared_differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
  """The trajectory fields two single-run configs differ in that one population must share
  (empty: they can be members of one population)."""
  return [d for d in config_lib.incompatible_fields(a.to_dict(), b.to_dict()) if not _per_member(d.split(":")[0])]


def _check_shared(ms: list[Member]) -> None:
  for m in ms[1:]:
    diff = shared_differences(ms[0].config, m.config)
    if diff:
      hint = ""
      if any(d.startswith("model.head") for d in diff):
        hint = (" (a cosine-head loss such as ldam_drw cannot share one program with linear-head losses: "
                "run it as a population of its own, e.g. losses=ldam_drw)")
      raise ConfigError(f"population members {ms[0].name!r} and {m.name!r} differ in shared settings{hint}; "
                        f"members share everything but {', '.join(PER_MEMBER)}:\n  " + "\n  ".join(diff))


def validate(config: ml_collections.ConfigDict, ms: list[Member], data_devices: int) -> None:
  """Every member is a valid single run, and the population supports what they use."""
  c = config
  resolve_vectorize(c.population.vectorize)
  if c.dataset.get("source", "memory") != "memory":
    raise ConfigError("population training needs an in-memory dataset (fashion_mnist, cifar10, cifar100); "
                      f"dataset.source={c.dataset.source!r} streams from the host")
  if c.stages or c.init_from:
    raise ConfigError("a population trains the joint stage only: drop stages/init_from and run the stages "
                      "per member afterwards with --config.init_from=<workdir>/members/<name>")
  own_update = [what for what, on in (
      (f"contrastive.method={c.contrastive.method!r}", c.get("contrastive") and c.contrastive.method != "none"),
      ("meta_weight (Meta-Weight-Net)", c.get("meta_weight") and c.meta_weight.enabled),
      (f"the multi-expert loss {c.loss.name!r}", c.loss.name in losses_lib.EXPERT_LOSSES)) if on]
  if own_update:
    raise ConfigError(f"a population wraps the classification update only; {own_update[0]} has its own "
                      "update function: train it as single runs (one per seed)")
  for name, entry in c.evals.items():
    if entry.get("type") != "classification":
      raise ConfigError(f"evals.{name}: a population evaluates with 'classification' evaluators only "
                        f"(got {entry.get('type')!r})")
  for m in ms:
    try:
      config_lib.validate(m.config, num_devices=data_devices)
    except ConfigError as e:
      raise ConfigError(f"population member {m.name!r}: {e}") from None


def population_mesh(num_members: int, num_devices: int = 0) -> Mesh:
  """``('members', 'data')`` over the first ``num_devices`` devices (0: all): ``gcd(N, devices)``
  member groups, data parallel inside a member over the rest."""
  devices = state_lib.make_mesh(num_devices).devices.reshape(-1)
  m = math.gcd(num_members, len(devices))
  return Mesh(devices.reshape(m, len(devices) // m), ("members", "data"))


@flax.struct.dataclass
class PopulationState:
  """The state of N members: every leaf of ``members`` has a leading member axis.

  ``hparams``: the arrays the step reads per member (loss / sampler branch index, and each
  numeric field whose value differs between members). ``alive``: members still training;
  ``frozen_at``: the step whose update went non-finite (0 while alive); a frozen member keeps
  the state of the step before it.
  """
  step: jax.Array
  members: state_lib.TrainState
  hparams: dict
  alive: jax.Array
  frozen_at: jax.Array

  @property
  def params(self):
    return self.members.params

  @property
  def batch_stats(self):
    return self.members.batch_stats


class _Branch(NamedTuple):
  config: ml_collections.ConfigDict   # the first member's config of this loss
  traced: tuple[str, ...]             # loss hparams that enter as arrays


class Plan(NamedTuple):
  """What is shared, what branches and which numbers enter the step as arrays."""
  members: list[Member]
  branches: list[_Branch]
  samplers: tuple[str, ...]
  hparams: dict[str, np.ndarray]      # (N,) per key: 'loss', 'sampler', 'optim_lr', 'loss0_tau', ...
  arrays: tuple[str, ...]             # ARRAY_FIELDS whose values differ


def _is_float(v) -> bool:
  return isinstance(v, float)


def _loss_key(c) -> tuple:
  hp = c.loss.hparams.to_dict()
  structural = tuple(sorted((k, repr(v)) for k, v in hp.items() if not _is_float(v)))
  return c.loss.name, float(c.loss.drw_epoch), structural, tuple(sorted(k for k, v in hp.items() if _is_float(v)))


def make_plan(ms: list[Member]) -> Plan:
  """Groups the members' losses into ``lax.switch`` branches and collects the per-member arrays."""
  keys, branch_of = [], []
  for m in ms:
    key = _loss_key(m.config)
    if key not in keys:
      keys.append(key)
    branch_of.append(keys.index(key))
  hparams = {"loss": np.asarray(branch_of, np.int32)}
  branches = []
  for b, key in enumerate(keys):
    mine = [m for m, i in zip(ms, branch_of) if i == b]
    traced = tuple(k for k in key[3] if len({m.config.loss.hparams[k] for m in mine}) > 1)
    for k in traced:  # other branches' members carry this branch's first value (valid, never selected)
      hparams[f"loss{b}_{k}"] = np.asarray(
          [m.config.loss.hparams[k] if i == b else mine[0].config.loss.hparams[k] for m, i in zip(ms, branch_of)],
          np.float32)
    branches.append(_Branch(mine[0].config, traced))
  names = tuple(dict.fromkeys(m.config.sampler.name for m in ms))
  hparams["sampler"] = np.asarray([names.index(m.config.sampler.name) for m in ms], np.int32)
  arrays = tuple(f for f in ARRAY_FIELDS if len({float(_get(m.config, f)) for m in ms}) > 1)
  for f in arrays:
    hparams[f.replace(".", "_")] = np.asarray([float(_get(m.config, f)) for m in ms], np.float32)
  return Plan(ms, branches, names, hparams, arrays)


def member_loss(plan: Plan, spe: int, hp: dict | None) -> losses_lib.Loss:
  """A member's loss: its branch of ``lax.switch`` over the population's losses.

  ``hp`` (one member's slice of ``PopulationState.hparams``, traced) supplies the branch index
  and the varying hyper-parameters; ``None`` builds the branches with their first member's
  numbers (for ``init``: the state's structure does not depend on them). With one loss the
  member's loss is that registry loss itself (the single run's state structure).
  """
  from lt_jax.train import trainer  # the config -> loss rule (DRW epochs -> steps) lives there
  built = []
  for b, br in enumerate(plan.branches):
    over = {} if hp is None else {k: hp[f"loss{b}_{k}"] for k in br.traced}
    built.append(trainer.make_loss(br.config, spe, **over))
  if len(built) == 1:
    return built[0]

  def init(num_classes: int):
    return tuple(l.init(num_classes) for l in built)

  def apply(logits, labels, counts, state):
    def branch(b):
      def run(z, y, st):
        per, new = built[b].apply(z, y, counts, st[b])
        return per, st[:b] + (new,) + st[b + 1:]
      return run
    index = jnp.int32(0) if hp is None else hp["loss"]
    return jax.lax.switch(index, [branch(b) for b in range(len(built))], logits, labels, state)

  return losses_lib.Loss("population", init, apply)


def _own_loss(plan: Plan, spe: int, i: int) -> losses_lib.Loss:
  """Member ``i``'s registry loss with its own numbers, its state placed in the population's
  loss-state structure (a tuple over the branches when there are several)."""
  from lt_jax.train import trainer
  b = int(plan.hparams["loss"][i])
  mine = trainer.make_loss(plan.members[i].config, spe)
  if len(plan.branches) == 1:
    return mine

  def apply(logits, labels, counts, state):
    per, new = mine.apply(logits, labels, counts, state[b])
    return per, state[:b] + (new,) + state[b + 1:]
  return losses_lib.Loss(mine.name, None, apply)


def member_indices(plan: Plan, hp: dict):
  """``indices_fn`` of :func:`steps.train_step_fn`: the member's sampler by ``lax.switch`` (None: one sampler)."""
  if len(plan.samplers) == 1:
    return None

  def indices(key, step, data, counts, sc):
    fns = [lambda k, s, name=name: steps.batch_indices(k, s, data, counts, sc, sampler=name) for name in plan.samplers]
    return jax.lax.switch(hp["sampler"], fns, key, step)

  return indices


def _per_member_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.bool_(True)
  oks = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in leaves]
  return jnp.all(jnp.stack(oks), axis=0)


def resolve_vectorize(vectorize: str, backend: str | None = None) -> str:
  """``'auto'``: ``'unroll'`` on CPU, ``'vmap'`` elsewhere (see :func:`make_population_step`)."""
  if vectorize not in VECTORIZE:
    raise ConfigError(f"unknown population.vectorize {vectorize!r}; valid: {', '.join(VECTORIZE)}")
  if vectorize != "auto":
    return vectorize
  return "unroll" if (backend or jax.default_backend()) == "cpu" else "vmap"


def _member(tree, i: int):
  return jax.tree.map(lambda a: a[i], tree)


def _stack(trees: list):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def over_members(fn, vectorize: str, n: int, batched: tuple[bool, ...]):
  """``fn`` applied to every member: ``jax.vmap`` (one batched program) or ``'unroll'`` (the
  members' programs side by side in one jitted step, ``fn(i, ...)`` for member ``i``)."""
  if vectorize == "vmap":
    vm = jax.vmap(lambda *a: fn(None, *a), in_axes=tuple(0 if b else None for b in batched),
                  spmd_axis_name="members")
    return vm

  def unrolled(*args):
    return _stack([fn(i, *(_member(a, i) if b else a for a, b in zip(args, batched))) for i in range(n)])
  return unrolled


def make_population_step(plan: Plan, model, counts: jax.Array, sc: steps.StepConfig, spe: int, num_epochs: int,
                         mesh: Mesh, shardings: PopulationState, member_data: bool, vectorize: str = "vmap"):
  """``step(state, data) -> (state, metrics)``: the single run's update over the members,
  non-finite members frozen, jitted with the state donated.

  ``vectorize='vmap'``: the update is ``vmap``-ed over the member axis (hyper-parameters that
  differ enter as the arrays of ``state.hparams``, the loss and sampler by ``lax.switch``): one
  batched program, where a convolution of N members is one grouped convolution (fast on GPU/TPU).
  ``'unroll'``: the members' own single-run updates (their own Python constants, loss and sampler)
  side by side in the same jitted step over the same state; XLA:CPU runs grouped convolutions
  4x slower than N separate ones (measured, ``bench/population.py``), so this is the CPU default.
  """
  shared = plan.members[0].config

  def member_update(i, st, hp, data):
    if i is not None:  # unrolled: exactly the single run of member i
      c = plan.members[i].config
      schedule = optim.make_schedule(c.optim, spe, num_epochs)
      tx = optim.make_optimizer(c.optim, schedule)
      sc_m = sc._replace(sampler=c.sampler.name, mix_alpha=float(c.mix.alpha))
      fn = steps.train_step_fn(model, tx, _own_loss(plan, spe, i), schedule, counts, sc_m, mesh)
      return fn(st, data)
    schedule = optim.make_schedule(shared.optim, spe, num_epochs, lr=hp.get("optim_lr"))
    tx = optim.make_optimizer(shared.optim, schedule, weight_decay=hp.get("optim_weight_decay"))
    sc_m = sc._replace(mix_alpha=hp["mix_alpha"]) if "mix_alpha" in hp else sc
    fn = steps.train_step_fn(model, tx, member_loss(plan, spe, hp), schedule, counts, sc_m, mesh,
                             indices_fn=member_indices(plan, hp))
    return fn(st, data)

  all_members = over_members(member_update, vectorize, len(plan.members), (True, True, member_data))

  def step(ps: PopulationState, data):
    new, m = all_members(ps.members, ps.hparams, data)
    ok = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"]) & _per_member_finite((new.params, new.batch_stats))
    alive = ps.alive & ok

    def keep(n, o):  # a frozen member keeps its last finite state
      return jnp.where(alive.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    members = jax.tree.map(keep, new, ps.members).replace(step=new.step)
    frozen_at = jnp.where(ps.alive & ~ok, ps.step + 1, ps.frozen_at)
    n_alive = jnp.sum(alive)

    def mean_alive(x):  # NaN once no member is left: the loop's finite check stops the run
      return jnp.sum(jnp.where(alive, x, 0.0)) / n_alive

    metrics = {"loss": mean_alive(m["loss"]), "accuracy": mean_alive(m["accuracy"]),
               "grad_norm": mean_alive(m["grad_norm"]), "member_loss": m["loss"], "member_accuracy": m["accuracy"],
               "member_grad_norm": m["grad_norm"], "lr": m["lr"], "members_alive": n_alive, "frozen_at": frozen_at}
    out = PopulationState(step=ps.step + 1, members=members, hparams=ps.hparams, alive=alive, frozen_at=frozen_at)
    return jax.lax.with_sharding_constraint(out, shardings), metrics

  return jax.jit(step, donate_argnums=(0,), compiler_options=cpu_compiler_options())


def init_population(plan: Plan, model, num_classes: int, image_shape: tuple, mesh: Mesh, spe: int
                    ) -> tuple[PopulationState, PopulationState]:
  """``(state, shardings)``: every member's single-run initial state (:func:`state.init_state`
  vmapped over the seeds), members sharded over the ``members`` mesh axis."""
  shared = plan.members[0].config
  schedule = optim.make_schedule(shared.optim, spe, shared.num_epochs)
  tx = optim.make_optimizer(shared.optim, schedule)  # the optimiser state's structure (no numbers)
  loss = member_loss(plan, spe, None)
  n = len(plan.members)
  seeds = np.asarray([m.seed for m in plan.members], np.int32)

  def init(seeds, hparams):
    st = jax.vmap(lambda s: state_lib.init_state(model, tx, loss, num_classes, image_shape, s))(seeds)
    return PopulationState(step=jnp.zeros((), jnp.int32), members=st, hparams=hparams,
                           alive=jnp.ones((n,), bool), frozen_at=jnp.zeros((n,), jnp.int32))

  hparams = {k: jnp.asarray(v) for k, v in plan.hparams.items()}
  abstract = jax.eval_shape(init, seeds, hparams)
  by_member, rep = NamedSharding(mesh, P("members")), NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda x: by_member if x.ndim else rep, abstract)
  return jax.jit(init, out_shardings=shardings)(seeds, hparams), shardings


def member_variables(ps: PopulationState) -> dict:
  return {"params": ps.members.params, "batch_stats": ps.members.batch_stats}


class PopulationEvaluator:
  """A classification evaluator vmapped over the members: per-member evaluation sums
  (confusion matrix, calibration bins, NLL) in one pass over the split, then every metric."""

  def __init__(self, ctx: evaluators.EvalContext, num_members: int, vectorize: str = "vmap", split: str = "test",
               num_bins: int = 15):
    self.ctx, self.split = ctx, split
    one = evaluators.eval_step_fn(ctx.model, ctx.num_classes, ctx.mean, ctx.std, num_bins, ctx.logit_fn)
    fn = over_members(lambda i, *a: one(*a), vectorize, num_members, (True, False, False, False))
    self._step = jax.jit(fn, compiler_options=cpu_compiler_options())

  def evaluate(self, variables) -> list[evaluators.EvalResult]:
    sums = jax.device_get(self.ctx.sum_batches(self._step, variables, self.split))
    n = jax.tree.leaves(sums)[0].shape[0]
    out = []
    for i in range(n):
      mine = jax.tree.map(lambda a: a[i], sums)
      out.append(evaluators.EvalResult(evaluators.summarize(mine, self.ctx.counts), mine))
    return out


def _lists(results: list[evaluators.EvalResult]) -> dict[str, list]:
  return {k: [r.summary[k] for r in results] for k in results[0].summary}


def load_data(plan: Plan, workdir: str, mesh: Mesh):
  """``(Data of the first member, training data on device, whether it has a member axis)``.

  With ``subset_seeds`` every distinct subset seed draws its own long-tailed training set
  (same counts, other images), stacked on a member axis sharded like the members.
  """
  from lt_jax.train import trainer
  data = trainer.open_data(plan.members[0].config, workdir, mesh)
  subset = [int(m.config.dataset.subset_seed) for m in plan.members]
  if len(set(subset)) == 1:
    return data, data.device, False
  sets = {}
  for s in dict.fromkeys(subset):
    c = plan.members[subset.index(s)].config
    ds = trainer.load_dataset(c)
    if not np.array_equal(np.asarray(ds.counts), data.counts):
      raise ConfigError(f"population.subset_seeds: subset seed {s} gives other class counts than seed {subset[0]}")
    sets[s] = ds
  stack = lambda f: np.stack([f(sets[s]) for s in subset])
  by_member = NamedSharding(mesh, P("members"))
  labels = stack(lambda d: d.train_labels)
  device = steps.TrainData(
      images=state_lib.put_global(stack(lambda d: d.train_images), by_member),
      labels=state_lib.put_global(labels, by_member),
      index=jax.tree.map(lambda *xs: state_lib.put_global(np.stack([np.asarray(x) for x in xs]), by_member),
                         *[samplers_lib.build_index(y, data.num_classes) for y in labels]))
  return data, device, True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the population of ``config`` in ``workdir`` (resuming if checkpoints are there).

  Returns ``{'step', 'state', 'members': [Member], 'results': [summary dict per member],
  'summary': population_summary.json's content, 'variables': per-member variables (member axis)}``.
  """
  ms = members(config)
  mesh = population_mesh(len(ms), config.num_devices)
  validate(config, ms, mesh.shape["data"])
  from lt_jax.train import trainer
  env = trainer.make_env(config, mesh)
  with workdir_lib.locked(workdir, enabled=env.is_main):
    return _train_and_evaluate(config, ms, workdir, mesh, env)


def _train_and_evaluate(config, ms: list[Member], workdir: str, mesh: Mesh, env: loop.Env) -> dict[str, Any]:
  from lt_jax.train import trainer
  plan = make_plan(ms)
  c0 = ms[0].config
  data, train_data, member_data = load_data(plan, workdir, mesh)
  spe = config_lib.steps_per_epoch(data.num_train, c0.batch_size)
  env.log(f"lt_jax population: {len(ms)} members ({len({m.variant for m in ms})} variants x seeds), "
          f"{data.name}-LT IR={priors.imbalance_ratio(data.counts):.0f}, model={c0.model.name}/{c0.model.head}, "
          f"mesh members={mesh.shape['members']} x data={mesh.shape['data']}, "
          f"{resolve_vectorize(config.population.vectorize)}, {spe} steps/epoch x {c0.num_epochs} "
          f"epochs; losses {len(plan.branches)}, samplers {len(plan.samplers)}, arrays "
          f"{sorted(k for k in plan.hparams if k not in ('loss', 'sampler')) or 'none'}")
  ctx = trainer.Context(c0, data, mesh, spe, state_lib.put_global(data.counts.astype(np.float32),
                                                                   state_lib.replicated(mesh)), env)
  if env.is_main:
    report.write_json(os.path.join(workdir, "train_counts.json"),
                      {"counts": data.counts.tolist(), "prior": np.asarray(priors.prior(data.counts)).tolist()})
  spec = trainer.joint_spec(ctx, workdir)  # the shared model and step settings (member 0's)
  sc = spec.step_config
  state, shardings = init_population(plan, spec.model, data.num_classes, data.image_shape, mesh, spe)
  vectorize = resolve_vectorize(config.population.vectorize)
  update = make_population_step(plan, spec.model, ctx.counts_dev, sc, spe, c0.num_epochs, mesh, shardings,
                                member_data, vectorize)

  ectx = trainer.eval_context(ctx, spec.model)
  evs = []
  for name, entry in config.evals.items():
    entry = entry.to_dict()
    entry.pop("type")
    cadence = {k: entry.pop(k) for k in ("every_epochs", "every_steps") if k in entry}
    evs.append((name, PopulationEvaluator(ectx, len(ms), vectorize, **entry), cadence))
  periodic = []
  for name, ev, cadence in evs:
    every = durations.steps("every", cadence, spe, c0.batch_size, cadence=True) if cadence else \
        durations.steps("eval_every", config, spe, c0.batch_size, cadence=True)
    periodic.append(loop.Periodic(every, name, lambda st, ev=ev: _lists(ev.evaluate(member_variables(st))),
                                  lambda step, s: f"population step {step}: test top-1 mean "
                                  f"{np.mean(s['accuracy']):.4f}, BER mean {np.mean(s['balanced_error_rate']):.4f}"
                                  if "accuracy" in s else None))
  reported: set[int] = set()

  def watch(got):
    for step, m in got:
      for i in np.flatnonzero(np.asarray(m["frozen_at"]) > 0):
        if i not in reported:
          reported.add(i)
          env.log(f"population: member {ms[i].name} went non-finite at step {int(m['frozen_at'][i])} "
                  f"(loss {float(m['member_loss'][i]):.4g}); frozen at its step-{int(m['frozen_at'][i]) - 1} "
                  "state, the others continue")

  total = durations.epochs_to_steps(c0.num_epochs, spe)
  last_step = total if c0.max_steps < 0 else min(total, c0.max_steps)
  record = {"population": [config_lib.trajectory_fields(m.config.to_dict()) for m in ms],
            "names": [m.name for m in ms]}
  run = loop.Run(
      name="population", workdir=workdir, record=record, state=state, update=update,
      input=loop.DeviceInput(train_data), last_step=last_step, batch_size=c0.batch_size * len(ms),
      log_every=int(config.log_every_steps),
      checkpoint_every=durations.steps("checkpoint_every", config, spe, c0.batch_size, cadence=True),
      keep_checkpoints=config.keep_checkpoints, evals=periodic,
      meta=lambda step, last: {"epoch": step / spe, "members": [m.name for m in ms]},
      postfix=("loss", "accuracy", "members_alive"), watch=watch)
  writer = report.MetricWriter(workdir, enabled=env.is_main)
  t0 = time.time()
  try:
    state, step = loop.train(run, env, writer)
  finally:
    writer.close()
  train_seconds = time.time() - t0
  variables = member_variables(state)
  first = None
  writer = report.MetricWriter(workdir, enabled=env.is_main)
  for name, ev, _ in evs:
    res = ev.evaluate(variables)
    first = first or res
    writer.write(step, name, _lists(res))
  writer.close()
  frozen = np.asarray(jax.device_get(state.frozen_at))
  summary = summarize(ms, plan, [r.summary for r in first], [np.asarray(r.sums.confusion) for r in first],
                      frozen, data.counts, step, train_seconds)
  if env.is_main:
    write_outputs(workdir, config, ms, state, summary, first, data, spe, step, env.log)
  return {"step": step, "state": state, "members": ms, "results": [r.summary for r in first], "summary": summary,
          "variables": variables}


def summarize(ms: list[Member], plan: Plan, results: list[dict], confusions: list[np.ndarray], frozen_at: np.ndarray,
              counts: np.ndarray, step: int, train_seconds: float) -> dict:
  """``population_summary.json``: each member's row, and per variant the mean ± std over its
  finite members (population std, ``ddof=0``, as ``bench/reproduce.py``)."""
  rows = []
  for i, (m, r, cm) in enumerate(zip(ms, results, confusions)):
    per_class = np.asarray(metrics_lib.per_class_recall(cm)).tolist()
    rows.append({"name": m.name, "variant": m.variant, "seed": m.seed, "loss": m.config.loss.name,
                 "loss_hparams": m.config.loss.hparams.to_dict(), "drw_epoch": m.config.loss.drw_epoch,
                 "sampler": m.config.sampler.name, "lr": m.config.optim.lr, "weight_decay": m.config.optim.weight_decay,
                 "subset_seed": m.config.dataset.subset_seed,
                 "frozen_at_step": int(frozen_at[i]) if frozen_at[i] > 0 else None,
                 **r, "per_class_accuracy": per_class})
  variants = {}
  for v in dict.fromkeys(m.variant for m in ms):
    mine = [row for row in rows if row["variant"] == v]
    ok = [row for row in mine if row["frozen_at_step"] is None]
    entry = {"seeds": [row["seed"] for row in mine], "finite_members": len(ok),
             "frozen_members": [row["name"] for row in mine if row["frozen_at_step"] is not None]}
    for k in [k for k in results[0] if not isinstance(results[0][k], list)]:
      vals = [row[k] for row in ok if np.isfinite(row[k])]
      entry[k] = {"mean": float(np.mean(vals)) if vals else float("nan"),
                  "std": float(np.std(vals)) if vals else float("nan"), "values": [row[k] for row in ok]}
    pcs = np.asarray([row["per_class_accuracy"] for row in ok]) if ok else np.full((1, len(counts)), np.nan)
    entry["per_class_accuracy"] = {"mean": pcs.mean(0).tolist(), "std": pcs.std(0).tolist()}
    variants[v] = entry
  return {"step": step, "train_seconds": train_seconds, "num_members": len(ms), "counts": np.asarray(counts).tolist(),
          "arrays": sorted(k for k in plan.hparams if k not in ("loss", "sampler")),
          "members": rows, "variants": variants}


def summary_table(summary: dict) -> str:
  """Members, then variants (mean ± std over seeds, %), as fixed-width text."""
  cols = [k for k, _ in TABLE_KEYS if k in summary["members"][0]]
  names = dict(TABLE_KEYS)
  w = max(len(r["name"]) for r in summary["members"]) + 2
  lines = [f"population at step {summary['step']}: {summary['num_members']} members "
           f"({summary['train_seconds'] / 60:.1f} min of training)", f"{'member':<{w}}" +
           "".join(f"{names[k]:>10}" for k in cols)]
  for r in summary["members"]:
    cells = "".join(f"{100 * r[k]:>10.2f}" if np.isfinite(r[k]) else f"{'n/a':>10}" for k in cols)
    lines.append(f"{r['name']:<{w}}{cells}" + (f"  frozen at step {r['frozen_at_step']} (non-finite)"
                                                if r["frozen_at_step"] else ""))
  head = "variant (mean ± std over seeds, %)"
  wv = max(len(head), *(len(v) for v in summary["variants"])) + 2
  lines.append(f"{head:<{wv}}" + "".join(f"{names[k]:>16}" for k in cols))
  for v, e in summary["variants"].items():
    cells = "".join(f"{100 * e[k]['mean']:>8.2f} ± {100 * e[k]['std']:<5.2f}" if np.isfinite(e[k]["mean"])
                    else f"{'n/a':>16}" for k in cols)
    note = f"  ({e['finite_members']}/{len(e['seeds'])} finite; frozen: {', '.join(e['frozen_members'])})" \
        if e["frozen_members"] else ""
    lines.append(f"{v:<{wv}}{cells}{note}")
  return "\n".join(lines)


def plot_per_class(summary: dict, path: str, class_names=None) -> str:
  """Per-class test accuracy vs training count, one line per variant, error bars = std over seeds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  counts = np.asarray(summary["counts"])
  order = np.argsort(-counts, kind="stable")
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  n = len(summary["variants"])
  for j, (v, e) in enumerate(summary["variants"].items()):
    mean, std = np.asarray(e["per_class_accuracy"]["mean"]), np.asarray(e["per_class_accuracy"]["std"])
    shift = 1.0 + 0.04 * (j - (n - 1) / 2)  # a small horizontal offset so the bars stay readable
    ax.errorbar(counts[order] * shift, mean[order], yerr=std[order], fmt="o-", ms=3, capsize=2, lw=1,
                label=f"{v} (n={e['finite_members']})")
  ax.set_xscale("log")
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("training examples of the class (log)")
  ax.set_ylabel("per-class test accuracy")
  ax.set_title("Per-class accuracy vs class size (mean ± std over seeds)", fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_outputs(workdir: str, config, ms: list[Member], state: PopulationState, summary: dict, results,
                  data, spe: int, step: int, log) -> None:
  """``population_summary.json``, the table on stdout, the PNG, and per member a ``summary.json``
  and a single-run checkpoint (``members/<name>``: usable as ``init_from`` of a decoupled stage)."""
  report.write_json(os.path.join(workdir, "population_summary.json"), summary)
  log(summary_table(summary))
  if config.plots:
    log("plot: " + plot_per_class(summary, os.path.join(workdir, "per_class_accuracy.png"), data.class_names))
  host = jax.device_get(state.members)
  for i, m in enumerate(ms):
    mdir = os.path.join(workdir, "members", m.name)
    os.makedirs(mdir, exist_ok=True)
    row = summary["members"][i]
    report.write_json(os.path.join(mdir, "summary.json"),
                      {"step": step, **results[i].summary, "per_class_accuracy": row["per_class_accuracy"],
                       "frozen_at_step": row["frozen_at_step"]})
    report.write_json(os.path.join(mdir, "config.json"), m.config.to_dict())
    np.save(os.path.join(mdir, "confusion.npy"), np.asarray(results[i].sums.confusion))  # rows: true class
    mngr = checkpoint.manager(mdir, 1)
    if mngr.latest_step() != step:
      one = jax.tree.map(lambda a: np.asarray(a[i]), host)
      checkpoint.save(mngr, step, one, {"config": m.config.to_dict(), "step": step, "epoch": step / spe,
                                        "population": workdir})
      mngr.wait_until_finished()
    mngr.close()

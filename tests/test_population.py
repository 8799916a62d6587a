"""Population training: members, plan, equivalence with single runs, frozen members, SIGKILL resume.

Runs on the session's 2 emulated CPU devices (conftest.py): 6 members put 3 on each device
(``members`` mesh axis), 1 member is data parallel over both.
"""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import optax

from lt_jax import losses
from lt_jax.train import config as config_lib, loop, population
from lt_jax.train.state import create_state
from lt_jax.train.trainer import build_model, train_and_evaluate

from configs import cifar_lt, fashion_mnist_lt  # installed (requirements.txt: -e .) or the cwd
from test_train import run_killed_after_first_save, set_fields

MOCK_EXAMPLES = 400
STEPS = 6


def tiny_config(variant: str = "smoke", **overrides):
  """A CNN on mock cifar10 (IR 4, batch 16): STEPS steps, checkpoints every 3, quiet, no plots."""
  c = cifar_lt.get_config(variant)
  c.model.name = "cnn"
  c.dataset.imbalance_ratio = 4.0
  c.batch_size = 16
  c.eval_batch_size = 100
  c.num_epochs = 2
  c.max_steps = STEPS
  c.quiet = True
  c.optim.warmup_epochs = 0.5
  c.optim.decay_epochs = (1, 2)
  c.checkpoint_every_steps = 3
  return set_fields(c, overrides)


def pop_config(**overrides):
  """6 members: CE, LA tau 0.5, LA tau 1.5 (tau enters the vmapped step as an array) x seeds 0, 1."""
  c = tiny_config("smoke,losses=ce+la,seeds=0+1", **overrides)
  c.population.grid.loss.tau = "0.5,1.5"
  c.population.vectorize = "vmap"
  return c


def leaves(tree):
  return jax.tree.leaves(jax.device_get(tree))


def member(tree, i):
  return jax.tree.map(lambda a: np.asarray(a)[i], jax.device_get(tree))


# ----------------------------------------------------------------------------------------- config only


def test_members_are_the_product_and_grid_keys_apply_per_loss():
  c = fashion_mnist_lt.get_config("smoke,losses=ce+la+ldam_drw,seeds=0+2")
  c.population.grid.loss.tau = "0.5,1.5"
  with pytest.raises(config_lib.ConfigError, match="run it as a population of its own"):
    population.members(c)  # ldam_drw's cosine head vs the linear head of ce / la
  c.population.losses = "ce,la"
  ms = population.members(c)
  assert [m.name for m in ms] == ["ce_seed0", "ce_seed2", "la_tau=0.5_seed0", "la_tau=0.5_seed2",
                                  "la_tau=1.5_seed0", "la_tau=1.5_seed2"]
  assert [m.config.loss.hparams.get("tau") for m in ms] == [None, None, 0.5, 0.5, 1.5, 1.5]
  assert [m.config.seed for m in ms] == [0, 2, 0, 2, 0, 2] and all(m.config.dataset.subset_seed == 0 for m in ms)
  assert not population.enabled(ms[0].config)  # a member is a single run
  plan = population.make_plan(ms)
  assert list(plan.hparams["loss"]) == [0, 0, 1, 1, 1, 1] and plan.samplers == ("instance",)
  np.testing.assert_array_equal(plan.hparams["loss1_tau"], [0.5, 0.5, 0.5, 0.5, 1.5, 1.5])  # ce rows: filler
  assert plan.arrays == () and "optim_lr" not in plan.hparams  # shared numbers stay Python constants
  c.population.grid.optim.lr = "0.1,0.05"
  c.population.subset_seeds = True
  c.population.samplers = "instance,cb"
  ms = population.members(c)
  assert len(ms) == 2 * 2 * (1 + 2) * 2 and ms[1].config.dataset.subset_seed == 2
  plan = population.make_plan(ms)
  assert plan.arrays == ("optim.lr",) and plan.samplers == ("instance", "class_balanced")
  assert population.population_mesh(6).shape == {"members": 2, "data": 1}
  assert population.population_mesh(3).shape == {"members": 1, "data": 2}


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.population, "seeds", "0,0"), "distinct integers"),
    (lambda c: setattr(c.population, "seeds", "a"), "expected a comma-separated list of integers"),
    (lambda c: setattr(c.population, "losses", "ce,nope"), "unknown loss 'nope'"),
    (lambda c: setattr(c.population.grid.optim, "lr", "0.1,-1"), "optim.lr must be a finite number > 0"),
    (lambda c: setattr(c, "stages", "crt"), "trains the joint stage only"),
    (lambda c: setattr(c.population, "vectorize", "pmap"), "valid: auto, vmap, unroll"),
])
def test_population_config_errors(mutate, message, tmp_path):
  c = fashion_mnist_lt.get_config("smoke,seeds=0+1")
  mutate(c)
  with pytest.raises(config_lib.ConfigError, match=message):
    train_and_evaluate(c, str(tmp_path))


# ----------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 6-member population (vmap, 3 members per device, plots on) and two of its members as
  independent single runs on one device."""
  root = tmp_path_factory.mktemp("population")
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    pop = train_and_evaluate(pop_config(plots=True), str(root / "pop"))
    singles = {}
    for name, variant in (("ce_seed1", "smoke,loss=ce,seed=1"), ("la_tau=1.5_seed0", "smoke,loss=la,seed=0")):
      c = tiny_config(variant, num_devices=1)
      if "la" in name:
        c.loss.hparams.tau = 1.5
      singles[name] = train_and_evaluate(c, str(root / name))
  return {"pop": pop, "single": singles, "root": root}


def test_members_equal_independent_single_runs(runs):
  pop = runs["pop"]
  names = [m.name for m in pop["members"]]
  assert pop["step"] == STEPS
  for name, one in runs["single"].items():
    i = names.index(name)
    # vmap turns each convolution of the 6 members into one grouped convolution and tau into a traced
    # float32 array, so the summation and rounding order differ from the single run: per-step float32
    # round-off (eps 1.2e-7, x sqrt of the ~1e3-term sums of a conv gradient) that 6 SGD steps amplify.
    # Measured here: max |diff| / max |param| <= 3e-6 per leaf; 1e-4 leaves a 30x margin while a wrong
    # seed, loss, tau or learning rate moves the parameters by 1e-2 or more (asserted below).
    worst = max(np.max(np.abs(a - b)) / np.max(np.abs(a)) for a, b in zip(
        leaves(one["state"].params), leaves(member(pop["state"].members.params, i))))
    print(f"{name}: max |diff| / max |param| over leaves = {worst:.2e}")
    for a, b in zip(leaves(one["state"].params), leaves(member(pop["state"].members.params, i))):
      assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(a)), (name, np.max(np.abs(a - b)) / np.max(np.abs(a)))
    for a, b in zip(leaves(one["state"].batch_stats), leaves(member(pop["state"].members.batch_stats, i))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key in ("accuracy", "balanced_error_rate", "macro_f1", "ece"):
      # Metrics count argmax decisions on 100-odd test images: equal unless a logit pair is within round-off.
      assert pop["results"][i][key] == pytest.approx(one[key], abs=1 / 100), key
    assert pop["results"][i]["nll"] == pytest.approx(one["nll"], rel=1e-3)
  # The members really differ (the tolerance above could not hide a wrong seed / loss / tau).
  p = [leaves(member(pop["state"].members.params, names.index(n))) for n in ("ce_seed0", "ce_seed1", "la_tau=0.5_seed0",
                                                                            "la_tau=1.5_seed0")]
  assert max(np.max(np.abs(a - b)) for a, b in zip(p[0], p[1])) > 1e-2
  head = lambda ps: ps[-1]  # the head bias: CE vs LA tau 0.5 vs 1.5 after the same seed's 6 steps
  assert np.max(np.abs(head(p[2]) - head(p[3]))) > 1e-3 and np.max(np.abs(head(p[0]) - head(p[2]))) > 1e-3


def test_population_summary_json_and_plot(runs):
  root = runs["root"] / "pop"
  s = json.load(open(root / "population_summary.json"))
  assert s["num_members"] == 6 and s["step"] == STEPS and s["arrays"] == ["loss1_tau"]
  assert list(s["variants"]) == ["ce", "la tau=0.5", "la tau=1.5"]
  for v, e in s["variants"].items():
    vals = [r["balanced_error_rate"] for r in s["members"] if r["variant"] == v]
    assert e["seeds"] == [0, 1] and e["finite_members"] == 2
    assert e["balanced_error_rate"]["mean"] == pytest.approx(np.mean(vals))
    assert e["balanced_error_rate"]["std"] == pytest.approx(np.std(vals))
    pcs = np.asarray([r["per_class_accuracy"] for r in s["members"] if r["variant"] == v])
    np.testing.assert_allclose(e["per_class_accuracy"]["std"], pcs.std(0), atol=1e-12)
  # Per-class accuracy is the confusion matrix's diagonal over its row sums: top-1 on a balanced-by-
  # class count check (macro recall = balanced accuracy).
  r = s["members"][3]
  assert np.mean(r["per_class_accuracy"]) == pytest.approx(r["balanced_accuracy"], abs=1e-6)
  assert open(root / "per_class_accuracy.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  one = json.load(open(root / "members" / "la_tau=1.5_seed1" / "summary.json"))
  assert one["accuracy"] == s["members"][5]["accuracy"] and one["frozen_at_step"] is None
  cm = np.load(root / "members" / "la_tau=1.5_seed1" / "confusion.npy")
  np.testing.assert_allclose(np.diag(cm) / cm.sum(1), s["members"][5]["per_class_accuracy"], rtol=1e-6)
  assert np.trace(cm) / cm.sum() == pytest.approx(s["members"][5]["accuracy"], abs=1e-6)
  lines = [json.loads(l) for l in open(root / "metrics.jsonl")]
  assert any(l["split"] == "test" and len(l["accuracy"]) == 6 for l in lines)


def frozen_config():
  """2 members, unrolled (each its own single-run program): LA seed 0 with tau 1.5, and with tau 3e38,
  whose float32 adjustment ``tau log pi`` overflows to -inf: its loss is non-finite at step 1."""
  c = tiny_config("smoke,loss=la", quiet=False)
  c.population.grid.loss.tau = "1.5,3e38"
  c.population.vectorize = "unroll"
  return c


def test_frozen_member_and_sigkill_resume(runs, tmp_path, capsys):
  """A population with a member frozen at step 1 is killed by SIGKILL after its first checkpoint
  (step 3) and resumed: the live member equals its uninterrupted single run bit for bit, the frozen
  one kept its initial state, and the summary and the log say which member was frozen and when."""
  workdir = tmp_path / "killed"
  proc = run_killed_after_first_save("tests.test_population.frozen_config()", workdir)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert "member logit_adjusted_tau=3e+38_seed0 went non-finite at step 1" in proc.stdout
  assert sorted(s for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == ["3"]
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    pop = train_and_evaluate(frozen_config(), str(workdir))
  out = capsys.readouterr().out
  assert "resumed from" in out and "at step 3" in out
  np.testing.assert_array_equal(np.asarray(pop["state"].frozen_at), [0, 1])
  np.testing.assert_array_equal(np.asarray(pop["state"].alive), [True, False])
  assert "member logit_adjusted_tau=3e+38_seed0 went non-finite at step 1" in out and "frozen at step 1" in out
  assert pop["step"] == STEPS
  for a, b in zip(leaves(runs["single"]["la_tau=1.5_seed0"]["state"].params), leaves(member(pop["state"].params, 0))):
    np.testing.assert_array_equal(a, b)
  init = create_state(build_model(frozen_config(), 10), optax.sgd(0.1), losses.make_loss("ce"), 10, (32, 32, 3), 0,
                      population.population_mesh(1, 1))
  for a, b in zip(leaves(init.params), leaves(member(pop["state"].params, 1))):  # its last finite state
    np.testing.assert_array_equal(a, b)
  s = pop["summary"]
  assert s["variants"]["logit_adjusted tau=3e+38"]["finite_members"] == 0
  assert s["variants"]["logit_adjusted tau=3e+38"]["frozen_members"] == ["logit_adjusted_tau=3e+38_seed0"]
  assert s["members"][1]["frozen_at_step"] == 1 and s["members"][0]["frozen_at_step"] is None
  assert s["variants"]["logit_adjusted tau=1.5"]["accuracy"]["values"] == [runs["single"]["la_tau=1.5_seed0"]["accuracy"]]


def test_a_population_with_no_finite_member_stops_like_a_single_run(tmp_path):
  c = tiny_config("smoke,seeds=0", **{"optim.lr": 1e30, "optim.warmup_epochs": 0.0})  # 1 member: data parallel
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    with pytest.raises(loop.NonFiniteLossError, match=r"at step [12] of population; no checkpoint was written"):
      train_and_evaluate(c, str(tmp_path))

"""Config schema, variants and validation for ``launch.py`` runs.

A run config is an ``ml_collections.ConfigDict`` built by ``base_config()`` and a
dataset file in ``configs/`` (``get_config(arg)`` with ``key=value`` variants). Every
field can be overridden on the command line (``--config.optim.lr=0.05``); unknown keys
are rejected by ``ml_collections`` and bad values by :func:`validate`.

Durations are stated in epochs and converted to steps in one place
(:func:`steps_per_epoch`): with re-sampling, "an epoch" is always ``N // batch_size``
steps, where N is the number of long-tailed training examples.
"""

from __future__ import annotations

import math
import os

import ml_collections

from lt_jax import losses as _losses
from lt_jax import samplers as _samplers
from lt_jax import models as _models
from lt_jax.models import layers as _layers

# One vocabulary per kind, read from its registry (tests/test_vocabulary.py checks they agree):
DATASETS = ("fashion_mnist", "cifar10", "cifar100")   # = lt_jax.data.sources.IN_MEMORY_DATASETS
MODELS = _models.MODELS
HEADS = _layers.HEADS
SAMPLERS = _samplers.SAMPLERS
SCHEDULES = ("step", "cosine", "constant")
PROFILES = ("exp", "step", "pareto")
MIXES = ("none", "mixup", "cutmix", "remix")
# Stages that train: a frozen-backbone classifier (crt, lws, bags; wb: weight balancing's stage 2,
# MaxNorm + WD + CB; smote_crt / meta_sampler on cached features) or the whole network (finetune).
# Append only: a stage's position seeds its head initialisation (trainer.stage_variables) and stream.
TRAIN_STAGES = ("crt", "lws", "bags", "wb", "smote_crt", "meta_sampler", "finetune")
# training stages on cached frozen features (= lt_jax.train.feature_stages), in-memory datasets only
FEATURE_STAGES = ("smote_crt", "meta_sampler")
EVAL_STAGES = ("tau_norm", "posthoc", "ncm",  # stages that derive a classifier without training
               "posterior_recal")
STAGES = TRAIN_STAGES + EVAL_STAGES
BBN_MODELS = ("cnn", "resnet20", "resnet32", "resnet44", "resnet56")
# Contrastive joint-stage methods (lt_jax.train.contrastive.METHODS; "none": the classification step).
CONTRASTIVE_METHODS = ("none", "simclr", "supcon", "bcl", "paco")

LOSS_ALIASES = {"la": "logit_adjusted", "bs": "balanced_softmax", "cb": "cb_softmax",
                "wce": "weighted_ce", "ls": "label_smoothing"}
# Named recipes that are a loss plus settings (set_loss).
LOSS_RECIPES = ("ldam_drw", "focal_drw", "wce_sqrt", "ce_drw", "ride_drw")
SAMPLER_ALIASES = {"cb": "class_balanced", "class": "class_balanced", "balanced": "class_balanced",
                   "sqrt_balanced": "sqrt", "aware": "class_aware", "ib": "instance",
                   "under": "random_under", "over": "random_over"}



def base_config() -> ml_collections.ConfigDict:
  """The full schema with the standard CIFAR-LT recipe (REFERENCE.md section 1c)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = ml_collections.ConfigDict(dict(
      name="cifar10", imbalance_ratio=100.0, profile="exp", subset_seed=0, mu=0.5,
      pareto_shape=6.0, data_dir="", val_per_class=0))
  c.model = ml_collections.ConfigDict(dict(name="resnet32", head="linear", cosine_scale=16.0,
                                           dtype="float32"))
  c.model.bbn = False         # BBN two-branch model and two-sampler training (Zhou et al. 2020)
  c.model.bbn_div_epoch = 0   # BBN alpha divisor T_div; 0: the reference rule (decoupled.bbn_div_epoch)
  # drw_epoch >= 0: deferred re-weighting, the loss's weights switch on at this epoch (-1: always)
  c.loss = ml_collections.ConfigDict(dict(name="ce", hparams=ml_collections.ConfigDict(), drw_epoch=-1.0))
  # defer_epochs > 0: deferred re-sampling (DRS), instance sampling before this epoch
  c.sampler = ml_collections.ConfigDict(dict(name="instance", k_per_class=4, defer_epochs=0))
  # random_under / random_over: target_count T per class (0: n_min / n_max); redraw: a new
  # resampled set every pass over it (False: drawn once for the run; lt_jax.samplers.SAMPLERS)
  c.sampler.target_count = 0
  c.sampler.redraw = False
  c.augment = ml_collections.ConfigDict(dict(crop_pad=4, flip=True))
  c.mix = ml_collections.ConfigDict(dict(name="none", alpha=1.0, kappa=3.0, tau=0.5))
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=2e-4, schedule="step",
      warmup_epochs=5.0, decay_epochs=(160, 180), decay_factor=0.01))
  run_fields(c, batch_size=128, num_epochs=200, eval_every_epochs=10, log_every_steps=50)
  # Multi-stage runs: the fields above describe the joint stage; `stages` lists the stages
  # that follow it, in order (comma-separated names from STAGES). Each training stage starts
  # from the previous training stage (the joint model first); tau_norm / posthoc / ncm
  # evaluate the current model. `init_from`: workdir of a finished run whose final model
  # replaces the joint stage (same dataset and model config required).
  # Meta-Weight-Net (Shu et al., NeurIPS 2019) in the joint stage: a VNet (1 -> hidden -> 1, sigmoid)
  # maps each example's loss to its weight, meta-learnt on the balanced meta set, which is the
  # validation split carved from the training data (dataset.val_per_class; the reference: 10 per
  # class). meta_batch_size 0: batch_size (at most the meta set). optim: the VNet's optimiser, the
  # reference's SGD 1e-5, momentum 0.9, Nesterov, wd 5e-4, constant.
  c.meta_weight = ml_collections.ConfigDict(dict(
      enabled=False, hidden=100, meta_batch_size=0,
      optim=ml_collections.ConfigDict(dict(name="sgd", lr=1e-5, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                           schedule="constant", warmup_epochs=0.0, decay_epochs=(),
                                           decay_factor=0.1))))
  c.stages = ""
  c.init_from = ""
  c.stage = ml_collections.ConfigDict()
  for name, sampler in (("crt", "class_balanced"), ("lws", "class_aware")):
    c.stage[name] = ml_collections.ConfigDict(dict(
        num_epochs=10, sampler=sampler, loss="ce",
        optim=ml_collections.ConfigDict(dict(
            name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="cosine",
            warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1))))
  # BAGS: a fresh group-softmax head (classes binned by training count at bin_split).
  c.stage.bags = ml_collections.ConfigDict(dict(
      num_epochs=10, sampler="instance", loss="ce", bin_split=(10.0, 100.0, 1000.0),
      optim=c.stage.crt.optim.copy_and_resolve_references()))
  # Weight balancing's stage 2 (Alshammari et al., CVPR 2022, demo2_second-stage-training.py): the
  # stage-1 classifier fine-tuned (not re-initialised) with vandit15's CB "softmax" loss, wd 0.1,
  # lr 0.01 cosine, and MaxNorm every step at radius min + max_norm_thresh (max - min) of the
  # stage-1 class norms (lt_jax.weight_balancing). The `wb` variant also sets stage 1's wd 5e-3.
  c.stage.wb = ml_collections.ConfigDict(dict(
      num_epochs=10, sampler="instance", loss="cb_softmax_bce", max_norm_thresh=0.1,
      optim=ml_collections.ConfigDict(dict(
          name="sgd", lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.1, schedule="cosine",
          warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1))))
  # Cached-feature stages (lt_jax.train.feature_stages), a fresh classifier with cRT's optimiser.
  # smote_crt: SMOTE (imbalanced-learn semantics) on the frozen training features, then `sampler`.
  c.stage.smote_crt = ml_collections.ConfigDict(dict(
      num_epochs=10, sampler="instance", loss="ce", k_neighbors=5, sampling_strategy="auto",
      optim=c.stage.crt.optim.copy_and_resolve_references()))
  # meta_sampler: BALMS (Ren et al., NeurIPS 2020): Balanced Softmax on batches of the learnt
  # sampler; `sampler` draws the meta batches (class-aware over the training features, the
  # reference's CIFAR recipe); Adam meta_lr on the sampler logits, initialised with init_pow;
  # meta_batch_size 0: batch_size.
  c.stage.meta_sampler = ml_collections.ConfigDict(dict(
      num_epochs=10, sampler="class_aware", loss="balanced_softmax", meta_lr=0.01, meta_batch_size=0,
      init_pow=0.0, optim=c.stage.crt.optim.copy_and_resolve_references()))
  grid = tuple(round(0.1 * i, 1) for i in range(21))  # linspace(0, 2, 21), the reference grid
  c.stage.tau_norm = ml_collections.ConfigDict(dict(taus=grid, keep_bias=False, select="balanced_error_rate"))
  c.stage.posthoc = ml_collections.ConfigDict(dict(taus=grid, select="balanced_error_rate"))
  c.stage.ncm = ml_collections.ConfigDict()  # cl2n features, squared L2 (no settings)
  # Full fine-tuning of the whole network from the previous training stage (e.g. after a
  # SimCLR / SupCon joint stage): every parameter trains, BatchNorm in training mode.
  c.stage.finetune = ml_collections.ConfigDict(dict(
      num_epochs=10, sampler="instance", loss="ce",
      optim=ml_collections.ConfigDict(dict(
          name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="cosine",
          warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1))))
  # Contrastive joint stage (set_contrastive sets a method with its reference's settings):
  # multi-view input, a projection head on the backbone, the method's update function. The loss
  # is scaled by temperature / base_temperature (SupContrast); base_temperature = 0: no scaling.
  c.contrastive = ml_collections.ConfigDict(dict(
      method="none", temperature=0.07, base_temperature=0.07, proj_dim=128, proj_hidden=0, proj_bn=False,
      alpha=1.0, beta=0.35, gamma=1.0, supt=1.0, momentum=0.999, queue_size=1024,
      aug=ml_collections.ConfigDict(dict(scale_min=0.2, jitter=0.4, jitter_prob=0.8, grayscale_prob=0.2))))
  # Posterior re-calibration (Tian et al., NeurIPS 2020) = post-hoc LA with tau = beta; target_prior:
  # () = balanced, else the target's C counts or prior.
  c.stage.posterior_recal = ml_collections.ConfigDict(dict(betas=grid, select="balanced_error_rate",
                                                           target_prior=()))
  # Evaluators as data (lt_jax.train.evaluators.EVALUATORS): run every eval_every_epochs during
  # training (or their own every_epochs / every_steps) and at the end of every training stage.
  # The first one's result is the stage's summary.json.
  c.evals = ml_collections.ConfigDict({"test": ml_collections.ConfigDict(dict(type="classification",
                                                                              split="test"))})
  c.population = population_fields()
  return c


# Population grid keys (lt_jax.train.population): dotted config fields, "loss.<k>" = loss.hparams.<k>.
POPULATION_GRID = ("optim.lr", "optim.weight_decay", "mix.alpha", "loss.tau", "loss.gamma", "loss.beta",
                   "loss.max_m", "loss.s", "loss.epsilon")


def population_fields() -> ml_collections.ConfigDict:
  """``config.population``: members trained as one jitted program (:mod:`lt_jax.train.population`).

  Members are the product of ``losses`` (registry names, aliases or recipes; empty: the config's
  loss) x ``samplers`` x the ``grid`` points x ``seeds``, each a comma-separated list (``+`` in
  variants). ``grid.<field>``: values of a numeric field, e.g. ``grid.loss.tau="0.5,1.0,1.5"``
  (a loss field applies to the members whose loss has it). ``subset_seeds``: each member draws its
  long-tailed subset with its own seed (``dataset.subset_seed = seed``). All empty: a single run.
  ``vectorize``: how the step runs the member axis (``'auto'``: ``'unroll'`` on CPU, ``'vmap'`` elsewhere).
  """
  grid = ml_collections.ConfigDict()
  for key in POPULATION_GRID:
    group, name = key.split(".")
    if group not in grid:
      grid[group] = ml_collections.ConfigDict()
    grid[group][name] = ""
  return ml_collections.ConfigDict(dict(seeds="", losses="", samplers="", subset_seeds=False, grid=grid,
                                        vectorize="auto"))


def run_fields(c: ml_collections.ConfigDict, *, batch_size: int, num_epochs: int, eval_every_epochs: int,
               log_every_steps: int) -> None:
  """The run-control fields every task's schema shares (batching, evaluation, checkpoints)."""
  c.batch_size = batch_size
  c.num_epochs = num_epochs
  c.eval_batch_size = 500
  c.eval_every_epochs = eval_every_epochs
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 2
  c.log_every_steps = log_every_steps
  c.max_steps = -1            # stop early after this many steps (-1: the full schedule)
  c.multihost = False
  c.num_devices = 0           # devices on the data mesh (0: all global devices)
  c.quiet = False
  c.plots = True
  # Durations: a *_steps (or *_examples) value, when set, replaces the *_epochs one (durations.py).
  for prefix in ("eval_every", "checkpoint_every"):
    c[f"{prefix}_steps"] = ml_collections.config_dict.placeholder(int)
    c[f"{prefix}_examples"] = ml_collections.config_dict.placeholder(int)
  # "auto": wait for every step only on several emulated CPU devices (PLATFORM.md's deadlock);
  # "always" / "never" override (loop.blocks_every_step).
  c.host_sync = "auto"
  c.transfer_guard = False    # run the hot loop under jax.transfer_guard("disallow") (a test's check)


class ConfigError(ValueError):
  """A config value is invalid (the message names the valid choices)."""


def parse_variant(arg: str | None) -> dict[str, str | bool]:
  """``"dataset=cifar100,ir=50,smoke"`` -> ``{"dataset": "cifar100", "ir": "50", "smoke": True}``."""
  out: dict[str, str | bool] = {}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    out[key.strip()] = value.strip() if sep else True
  return out


def apply_common_variants(c: ml_collections.ConfigDict, variant: dict, allowed: tuple[str, ...]):
  """Applies the ``ir``/``loss``/``sampler``/``seed``/``head`` variant keys shared by configs."""
  unknown = set(variant) - set(allowed)
  if unknown:
    raise ConfigError(f"unknown config variant key(s) {sorted(unknown)}; valid keys: {', '.join(allowed)}")
  if "epochs" in variant:  # first: the DRW recipes defer to the (scaled) first decay
    set_epochs(c, variant_number(variant, "epochs", int))
  if "ir" in variant:
    c.dataset.imbalance_ratio = variant_number(variant, "ir", float)
  if "seed" in variant:
    c.seed = variant_number(variant, "seed", int)
  if "head" in variant:
    c.model.head = str(variant["head"])
  if "sampler" in variant:
    c.sampler.name = SAMPLER_ALIASES.get(variant["sampler"], variant["sampler"])
  if "contrastive" in variant:  # before loss: `contrastive=bcl,loss=ce` swaps BCL's LA-CE for CE
    set_contrastive(c, str(variant["contrastive"]))
  if "loss" in variant:
    set_loss(c, str(variant["loss"]))
  if "mix" in variant:
    c.mix.name = str(variant["mix"])
  if "bbn" in variant:
    c.model.bbn = True
  if "wb" in variant:  # weight balancing: stage 1 = CE with wd 5e-3, then the wb stage
    c.optim.weight_decay = 5e-3
    c.stages = "wb"
  if "stages" in variant:  # commas separate variant keys, so stages are joined by '+'
    c.stages = str(variant["stages"]).replace("+", ",")
  for key in ("seeds", "losses", "samplers"):  # a population (lt_jax.train.population), '+'-joined
    if key in variant:
      c.population[key] = str(variant[key]).replace("+", ",")
  if "test_agnostic" in variant and "test_agnostic" not in c.evals:
    add_test_agnostic(c)
  if variant.get("smoke") and "test_agnostic" in c.evals:  # a smoke run takes seconds: one small table
    c.evals.test_agnostic.update(dict(imbalances=(10,), epochs=1, max_per_class=20))
  if "mwnet" in variant:  # Meta-Weight-Net; its meta set is the validation split (reference: 10 per class)
    c.meta_weight.enabled = True
    c.dataset.val_per_class = c.dataset.val_per_class or 10
  return c


def variant_number(variant: dict, key: str, kind=float):
  """``variant[key]`` as a number, or a :class:`ConfigError` naming the key."""
  try:
    return kind(variant[key])
  except (TypeError, ValueError):
    raise ConfigError(f"config variant {key}={variant[key]!r}: expected {'an integer' if kind is int else 'a number'}"
                      ) from None


COMMON_VARIANTS = ("ir", "loss", "sampler", "head", "seed", "mix", "bbn", "stages", "epochs", "test_agnostic",
                   "contrastive", "wb", "mwnet", "seeds", "losses", "samplers")


def set_epochs(c: ml_collections.ConfigDict, num_epochs: float) -> None:
  """Sets ``num_epochs``, scaling warmup, decay and evaluation epochs by the same factor."""
  f = float(num_epochs) / c.num_epochs
  c.num_epochs = int(num_epochs)
  c.optim.warmup_epochs = c.optim.warmup_epochs * f
  c.optim.decay_epochs = tuple(e * f for e in c.optim.decay_epochs)
  c.eval_every_epochs = max(int(round(c.eval_every_epochs * f)), 1)


def set_loss(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets ``c.loss`` to ``name`` (aliases allowed) with its default hyper-parameters.

  Recipes (:data:`LOSS_RECIPES`): ``ldam_drw`` is LDAM (cosine head) with Class-Balanced
  weights (beta 0.9999, normalised by the batch's weights) deferred to 80% of
  ``num_epochs`` (epoch 160 of 200, Cao et al., NeurIPS 2019); ``ce_drw`` the same with
  CE; ``focal_drw`` the same with LDAM-DRW's softmax focal (gamma 1) in its ``FocalLoss(weight=w)``
  convention (``form='ldam_drw'``, batch mean without weight normalisation, see
  ``losses.focal_loss``); ``wce_sqrt`` weighted CE with ``(n_min / n_c)^(1/2)``; ``ride_drw`` the RIDE
  loss (Wang et al., ICLR 2021) with the same deferred CB weights (and per-class diversity
  temperatures) as ``ldam_drw``, the reference's ``reweight_epoch=160``. The multi-expert losses
  (``ride``, ``ride_drw``, ``sade``) switch the model to its multi-expert version (:func:`use_experts`);
  ``sade`` also adds the test-agnostic evaluator with test-time aggregation. Set ``num_epochs`` first.
  """
  recipe = name
  name = {"ldam_drw": "ldam", "focal_drw": "focal", "ce_drw": "ce", "ride_drw": "ride",
          "wce_sqrt": "weighted_ce"}.get(name, LOSS_ALIASES.get(name, name))
  if name not in _losses.LOSSES:
    raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(_losses.LOSSES)} "
                     f"(aliases: {', '.join(f'{k}={v}' for k, v in LOSS_ALIASES.items())}; "
                     f"recipes: {', '.join(LOSS_RECIPES)})")
  c.loss.name = name
  c.loss.hparams = ml_collections.ConfigDict(_losses.default_hparams(name))
  c.loss.drw_epoch = -1.0
  if recipe in ("ldam_drw", "ce_drw", "focal_drw", "ride_drw"):
    c.loss.hparams.update(weights="effective_number", beta=0.9999, weight_norm="batch")
    if recipe == "focal_drw":  # LDAM-DRW FocalLoss(weight=w): w_y CE inside (1-exp(-.))^gamma, plain mean
      c.loss.hparams.update(form="ldam_drw", weight_norm="none")
    first_decay = min(c.optim.decay_epochs, default=c.num_epochs) if c.optim.schedule == "step" else c.num_epochs
    c.loss.drw_epoch = float(first_decay if first_decay < c.num_epochs else 0.8 * c.num_epochs)
  if recipe == "wce_sqrt":
    c.loss.hparams.weights = "sqrt_inverse"
  if name == "ldam":  # LDAM uses a cosine classifier (NormedLinear), scale s in the loss
    c.model.head = "cosine"
    c.model.cosine_scale = 1.0
  if name in _losses.EXPERT_LOSSES:  # RIDE / SADE read the experts' logits: a multi-expert model
    use_experts(c)
  if name == "sade" and "test_agnostic" not in c.evals:  # its test-time aggregation is the method
    add_test_agnostic(c, aggregate=True)


EXPERT_MODELS = _models.EXPERT_MODELS


def use_experts(c: ml_collections.ConfigDict, num_experts: int = 3) -> None:
  """Switches ``c.model`` to the multi-expert version of its backbone (``cnn`` -> ``cnn_experts``,
  ``resnet32`` -> ``resnet32_experts``) with the RIDE/SADE CIFAR settings: ``num_experts`` experts
  narrowed by ``reduce_dimension``, a cosine head per expert with ``cosine_scale = 30`` (the
  reference's ``NormedLinear`` times ``s``). Adds ``model.num_experts`` / ``model.reduce_dimension``.
  """
  single = {v: k for k, v in EXPERT_MODELS.items()}
  if c.model.name not in EXPERT_MODELS:
    if c.model.name not in single:
      raise ConfigError(f"no multi-expert version of model {c.model.name!r}; multi-expert models: "
                        f"{', '.join(f'{k} (from {v})' for k, v in EXPERT_MODELS.items())}")
    c.model.name = single[c.model.name]
  c.model.head = "cosine"
  c.model.cosine_scale = 30.0
  if "num_experts" not in c.model:
    c.model.num_experts = num_experts
    c.model.reduce_dimension = True


def add_test_agnostic(c: ml_collections.ConfigDict, aggregate: bool = False) -> None:
  """Adds the test-agnostic evaluator (``lt_jax.train.evaluators.test_agnostic``) as ``evals.test_agnostic``.

  It runs once, at the end of the stage (``every_steps`` beyond any run), and its table goes into
  ``summary.json``. ``aggregate`` (SADE): test-time aggregation of the experts on each resampled
  test set. The post-hoc row removes ``log pi_train`` from CE-like logits (``train_prior_tau=1``),
  not from those of the logit-adjusted loss or Balanced Softmax (0), whose logits are balanced.
  Call after the loss is set (``loss=`` is applied first among the variants).
  """
  balanced_logits = c.loss.name in ("logit_adjusted", "balanced_softmax")
  c.evals.test_agnostic = ml_collections.ConfigDict(dict(
      type="test_agnostic", split="test", aggregate=bool(aggregate), every_steps=10 ** 9,
      train_prior_tau=0.0 if balanced_logits else 1.0, crop_pad=int(c.augment.crop_pad)))


def set_contrastive(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets ``c.contrastive`` to method ``name`` with its reference's settings (README methods table).

  * ``simclr``: NT-Xent on two SimCLR views, no labels; T = 0.5, T_base = 0.07, MLP head
    128-d without BN (SupContrast ``main_supcon.py --method SimCLR --temp 0.5``).
  * ``supcon``: SupCon on two SimCLR views; T = 0.1, T_base = 0.07 (SupContrast README).
    Both train only the representation: follow with ``stages=crt`` / ``finetune`` / ``ncm``.
  * ``bcl``: logit-adjusted CE (tau = 1) on a standard view + 0.35 x BalSCL on two SimCLR
    views, T = 0.07, cosine classifier with s = 30, BN MLP heads (BCL ``main.py``, ``BCLModel``).
  * ``paco``: PaCo with a momentum key encoder (m = 0.999) and a queue of K = 1024 keys;
    alpha = 0.01, beta = gamma = 1, T = 0.05, 32-d BN MLP head
    (``PaCo/LT/sh/CIFAR100_train_imb0.01.sh``); query: standard view, key: SimCLR view.
  ``none`` turns the contrastive stage off.
  """
  if name not in CONTRASTIVE_METHODS:
    raise ConfigError(f"unknown contrastive method {name!r}; valid methods: {', '.join(CONTRASTIVE_METHODS)}")
  k = c.contrastive
  k.method = name
  k.base_temperature = 0.07
  k.proj_hidden = 0
  if name in ("simclr", "supcon"):
    k.temperature = 0.5 if name == "simclr" else 0.1
    k.proj_dim, k.proj_bn = 128, False
  elif name == "bcl":
    k.temperature, k.alpha, k.beta = 0.07, 1.0, 0.35
    k.proj_dim, k.proj_bn = 128, True
    set_loss(c, "la")
    c.model.head, c.model.cosine_scale = "cosine", 30.0   # NormedLinear with s = 30
  elif name == "paco":
    k.temperature, k.alpha, k.beta, k.gamma, k.supt = 0.05, 0.01, 1.0, 1.0, 1.0
    k.momentum, k.queue_size = 0.999, 1024
    k.proj_dim, k.proj_bn = 32, True
    k.base_temperature = 0.0  # T_base = T (the reference's base_temperature=None): no loss rescaling


def validate_contrastive(c: ml_collections.ConfigDict) -> None:
  """``c.contrastive``: a known method, positive temperatures, and what each method needs."""
  k = c.contrastive
  _choice(k.method, CONTRASTIVE_METHODS, "contrastive.method")
  if k.method == "none":
    return
  if c.dataset.get("source", "memory") != "memory":
    raise ConfigError(f"contrastive.method={k.method!r} needs the dataset in memory (its views are "
                      "augmented on device); streamed datasets train the classification step only")
  if c.model.bbn or c.mix.name != "none":
    raise ConfigError(f"contrastive.method={k.method!r} cannot be combined with model.bbn or mix")
  _positive({"contrastive.temperature": k.temperature, "contrastive.supt": k.supt})
  if not (_finite(k.base_temperature) and k.base_temperature >= 0):
    raise ConfigError(f"contrastive.base_temperature must be >= 0 (0: equal to the temperature), got "
                      f"{k.base_temperature}")
  if not isinstance(k.proj_dim, int) or k.proj_dim < 1 or not isinstance(k.proj_hidden, int) or k.proj_hidden < 0:
    raise ConfigError(f"contrastive.proj_dim must be an int >= 1 and proj_hidden an int >= 0 (0: the feature "
                      f"width), got {k.proj_dim!r} and {k.proj_hidden!r}")
  a = k.aug
  if not (0 < a.scale_min <= 1 and a.jitter >= 0 and 0 <= a.jitter_prob <= 1 and 0 <= a.grayscale_prob <= 1):
    raise ConfigError(f"contrastive.aug needs 0 < scale_min <= 1, jitter >= 0 and probabilities in [0, 1], "
                      f"got {a.to_dict()}")
  if k.method == "bcl" and (k.alpha < 0 or k.beta < 0):
    raise ConfigError(f"contrastive.alpha and beta (loss weights) must be >= 0, got {k.alpha}, {k.beta}")
  if k.method == "paco":
    if not 0 <= k.momentum < 1:
      raise ConfigError(f"contrastive.momentum must be in [0, 1), got {k.momentum}")
    if not isinstance(k.queue_size, int) or k.queue_size < 1 or k.queue_size % c.batch_size:
      raise ConfigError(f"contrastive.queue_size={k.queue_size!r} must be a positive multiple of the global "
                        f"batch_size={c.batch_size} (PaCo enqueues whole batches, as the reference asserts "
                        "K % batch_size == 0)")
    if min(k.alpha, k.beta, k.gamma) < 0 or k.alpha + k.beta <= 0:
      raise ConfigError(f"contrastive.alpha, beta, gamma must be >= 0 with alpha + beta > 0, got "
                        f"{k.alpha}, {k.beta}, {k.gamma}")


def _choice(value, valid, what):
  if value not in valid:
    raise ConfigError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, valid))}")


def _finite(x) -> bool:
  try:
    return math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


def validate_run_fields(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """The fields every task shares: batching, cadences, checkpoints, the optimiser's numbers."""
  for key in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "keep_checkpoints"):
    if not isinstance(c[key], int) or c[key] < 1:
      raise ConfigError(f"{key} must be an integer >= 1, got {c[key]!r}")
  for prefix in ("eval_every", "checkpoint_every"):
    for unit in ("epochs", "steps", "examples"):
      v = c.get(f"{prefix}_{unit}")
      if v is not None and not (_finite(v) and v > 0):
        raise ConfigError(f"{prefix}_{unit} must be > 0, got {v!r}")
  for key in ("batch_size", "eval_batch_size"):
    if c[key] % num_devices:
      raise ConfigError(f"{key}={c[key]} is not divisible by the number of devices ({num_devices}); "
                        f"use a multiple of {num_devices}")
  validate_optim(c.optim, c.num_epochs, "optim")
  from lt_jax.train.loop import HOST_SYNC  # the setting lives with the loop
  _choice(c.host_sync, HOST_SYNC, "host_sync")


def validate_data_dir(data_dir: str) -> None:
  """``dataset.data_dir`` is empty (tfds's default) or a directory (created if missing)."""
  if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ConfigError(f"dataset.data_dir={data_dir!r} is a file, not a directory (the tfds data directory)")


def validate_optim(o: ml_collections.ConfigDict, num_epochs: float, where: str) -> None:
  _choice(o.schedule, SCHEDULES, f"{where}.schedule")
  _choice(o.name, ("sgd", "adamw"), f"{where}.name")
  if not (_finite(o.lr) and o.lr > 0):
    raise ConfigError(f"{where}.lr must be a finite number > 0, got {o.lr}")
  if not (_finite(o.weight_decay) and o.weight_decay >= 0):
    raise ConfigError(f"{where}.weight_decay must be a finite number >= 0, got {o.weight_decay}")
  if not (_finite(o.warmup_epochs) and 0 <= o.warmup_epochs <= num_epochs):
    raise ConfigError(f"{where}.warmup_epochs must be in [0, num_epochs={num_epochs}], got {o.warmup_epochs}")
  if not all(_finite(e) and e >= 0 for e in o.decay_epochs) or list(o.decay_epochs) != sorted(o.decay_epochs):
    raise ConfigError(f"{where}.decay_epochs must be increasing epochs >= 0, got {tuple(o.decay_epochs)}")


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Rejects bad values with a message naming the valid choices."""
  validate_run_fields(c, num_devices)
  if c.dataset.get("source", "memory") != "memory":  # host input pipeline: configs/imagenet_lt.py, inat18.py
    from lt_jax.data import streaming  # the source names live with the pipeline
    _choice(c.dataset.source, streaming.STREAM_SOURCES, "dataset.source")
    unsupported = [s for s in stage_names(c) if s in EVAL_STAGES + FEATURE_STAGES] + (
        ["model.bbn"] if c.model.bbn else [])
    if unsupported:
      raise ConfigError(f"not available for streamed datasets: {', '.join(unsupported)} (they need the "
                        "dataset in memory); streamed datasets support "
                        f"the joint stage and the training stages {', '.join(TRAIN_STAGES)}")
    if c.dataset.source == "fixture" and c.dataset.num_classes != c.dataset.fixture.num_classes:
      raise ConfigError(f"dataset.num_classes={c.dataset.num_classes} but the generated fixture has "
                        f"dataset.fixture.num_classes={c.dataset.fixture.num_classes} classes; set "
                        "dataset.fixture.num_classes (the smoke data is generated from it)")
  else:
    _choice(c.dataset.name, DATASETS, "dataset")
  validate_data_dir(c.dataset.get("data_dir", ""))
  _choice(c.dataset.profile, PROFILES, "long-tail profile")
  _choice(c.model.name, MODELS, "model")
  _choice(c.model.head, HEADS, "head")
  _choice(c.sampler.name, SAMPLERS, "sampler")
  _choice(c.model.dtype, ("float32", "bfloat16"), "model dtype")
  if c.loss.name not in _losses.LOSSES:
    raise ConfigError(f"unknown loss {c.loss.name!r}; valid losses: {', '.join(_losses.LOSSES)}")
  try:
    _losses.make_loss(c.loss.name, **c.loss.hparams.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"bad hyper-parameters for loss {c.loss.name!r}: {e}") from e
  if not (_finite(c.dataset.imbalance_ratio) and c.dataset.imbalance_ratio >= 1):
    raise ConfigError(f"dataset.imbalance_ratio must be >= 1 and finite, got {c.dataset.imbalance_ratio}")
  for key in ("val_per_class", "subset_seed"):
    if c.dataset[key] < 0:
      raise ConfigError(f"dataset.{key} must be >= 0, got {c.dataset[key]}")
  if c.augment.crop_pad < 0:
    raise ConfigError(f"augment.crop_pad must be >= 0, got {c.augment.crop_pad}")
  if c.sampler.k_per_class < 1:
    raise ConfigError(f"sampler.k_per_class must be >= 1, got {c.sampler.k_per_class}")
  if not isinstance(c.sampler.target_count, int) or c.sampler.target_count < 0:
    raise ConfigError(f"sampler.target_count must be an int >= 0 (0: n_min for random_under, n_max for "
                      f"random_over), got {c.sampler.target_count!r}")
  _choice(c.mix.name, MIXES, "mix")
  if c.mix.name != "none" and not c.mix.alpha > 0:
    raise ConfigError(f"mix.alpha must be > 0, got {c.mix.alpha}")
  if c.loss.drw_epoch >= 0:
    if "weights" not in c.loss.hparams:
      raise ConfigError("loss.drw_epoch (deferred re-weighting) needs loss.hparams.weights, e.g. "
                        "'effective_number'; or use loss=ldam_drw / ce_drw")
    if c.loss.drw_epoch >= c.num_epochs:
      raise ConfigError(f"loss.drw_epoch={c.loss.drw_epoch} must be < num_epochs={c.num_epochs}")
  if not 0 <= c.sampler.defer_epochs < c.num_epochs:
    raise ConfigError(f"sampler.defer_epochs must be in [0, num_epochs), got {c.sampler.defer_epochs}")
  if c.model.bbn:
    if c.model.name not in BBN_MODELS:
      raise ConfigError(f"model.bbn needs one of {', '.join(BBN_MODELS)}, got {c.model.name!r}")
    if c.mix.name != "none":
      raise ConfigError("model.bbn and mix cannot be combined (BBN mixes features of two samplers)")
  validate_meta_weight(c)
  validate_stages(c)
  validate_evals(c)
  validate_experts(c)
  if "contrastive" in c:
    validate_contrastive(c)
  own_update = [what for what, on in (
      (f"contrastive.method={c.contrastive.method!r}", c.get("contrastive") and c.contrastive.method != "none"),
      ("meta_weight.enabled (Meta-Weight-Net)", c.get("meta_weight") and c.meta_weight.enabled),
      (f"loss={c.loss.name!r} (multi-expert)", c.loss.name in _losses.EXPERT_LOSSES)) if on]
  if len(own_update) > 1:
    raise ConfigError(f"{' and '.join(own_update)} each bring their own update function; choose one")


def validate_experts(c: ml_collections.ConfigDict) -> None:
  """Multi-expert models and losses (RIDE, SADE) and the test-agnostic evaluator's needs."""
  expert_model = c.model.name in EXPERT_MODELS
  if c.loss.name in _losses.EXPERT_LOSSES and not expert_model:
    raise ConfigError(f"loss {c.loss.name!r} takes the experts' logits: model.name must be a multi-expert "
                      f"model ({', '.join(EXPERT_MODELS)}); loss={c.loss.name} as a variant switches it")
  if expert_model:
    from lt_jax.models.experts import EXPERT_HEADS
    _choice(c.model.head, EXPERT_HEADS, "head of a multi-expert model")
    n = c.model.get("num_experts", 3)
    if not isinstance(n, int) or n < 1:
      raise ConfigError(f"model.num_experts must be an integer >= 1, got {n!r}")
    if c.loss.name == "sade" and n != 3:
      raise ConfigError(f"loss 'sade' trains exactly 3 experts (forward, uniform, backward), model.num_experts={n}")
    if c.model.bbn:
      raise ConfigError("model.bbn and a multi-expert model cannot be combined")
    bad = [s for s in stage_names(c) if s in ("crt", "lws", "bags", "tau_norm")]
    if bad:
      raise ConfigError(f"stages {', '.join(bad)} retrain or rescale params['head'], which a multi-expert model "
                        "does not have (one head per expert); posthoc and ncm work on its mean logits / features")
    if c.loss.name == "ride" and c.model.head == "cosine" and c.loss.hparams.s != c.model.cosine_scale:
      raise ConfigError(f"loss.hparams.s={c.loss.hparams.s} must equal model.cosine_scale={c.model.cosine_scale}: "
                        "RIDE's margins are s * m_y on the experts' s-scaled cosine logits")
  names = list(c.evals.keys())
  for name, entry in c.evals.items():
    if entry.get("type") != "test_agnostic":
      continue
    if name == names[0]:
      raise ConfigError(f"evals.{name}: the test-agnostic evaluator cannot be the first (primary) evaluator; "
                        "put a classification evaluator first")
    if c.dataset.get("source", "memory") != "memory":
      raise ConfigError(f"evals.{name}: the test-agnostic evaluator resamples the test split in memory; "
                        "streamed datasets are not supported")
    if entry.get("aggregate", False) and not expert_model:
      raise ConfigError(f"evals.{name}.aggregate (SADE's test-time aggregation) needs a multi-expert model "
                        f"({', '.join(EXPERT_MODELS)})")


def validate_meta_weight(c: ml_collections.ConfigDict) -> None:
  """Meta-Weight-Net needs the in-memory dataset, a meta set (``dataset.val_per_class``) and plain batches."""
  m = c.meta_weight
  if not m.enabled:
    return
  if c.dataset.get("source", "memory") != "memory":
    raise ConfigError("meta_weight (Meta-Weight-Net) needs an in-memory dataset: its meta set is the "
                      "validation split carved from the training data")
  if c.dataset.val_per_class < 1:
    raise ConfigError("meta_weight (Meta-Weight-Net) learns on a balanced meta set, the validation split: set "
                      "dataset.val_per_class, e.g. 10 (the reference's num_meta)")
  if c.mix.name != "none" or c.model.bbn:
    raise ConfigError("meta_weight (Meta-Weight-Net) weights each example's own loss: it cannot be combined "
                      "with mix or model.bbn")
  if not isinstance(m.hidden, int) or m.hidden < 1:
    raise ConfigError(f"meta_weight.hidden must be an int >= 1, got {m.hidden!r}")
  if not isinstance(m.meta_batch_size, int) or m.meta_batch_size < 0:
    raise ConfigError(f"meta_weight.meta_batch_size must be an int >= 0 (0: batch_size), got {m.meta_batch_size!r}")
  validate_optim(m.optim, c.num_epochs, "meta_weight.optim")


def validate_evals(c: ml_collections.ConfigDict) -> None:
  """``config.evals`` entries: a known evaluator ``type`` and a split the dataset has."""
  from lt_jax.train import evaluators  # the registry of evaluator types
  streamed = c.dataset.get("source", "memory") != "memory"
  if not len(c.evals):
    raise ConfigError("config.evals is empty: a run needs at least one evaluator (its summary.json)")
  for name, entry in c.evals.items():
    _choice(entry.get("type"), tuple(evaluators.EVALUATORS), f"evals.{name}.type")
    split = entry.get("split", "test")
    _choice(split, ("test",) if streamed else ("train", "val", "test"), f"evals.{name}.split")
    if split == "val" and c.dataset.get("val_per_class", 0) < 1:
      raise ConfigError(f"evals.{name} reads the validation split: set dataset.val_per_class, e.g. 20")
    if streamed and entry.type in evaluators.NEEDS_MEMORY:
      raise ConfigError(f"evals.{name}: {entry.type} needs the dataset in memory")


def stage_names(c: ml_collections.ConfigDict) -> list[str]:
  """The ``stages`` field as a list of names (empty: joint training only)."""
  return [s.strip() for s in c.stages.split(",") if s.strip()]


def validate_stages(c: ml_collections.ConfigDict) -> None:
  """Stage names, per-stage settings and what each stage needs from the joint model."""
  names = stage_names(c)
  for name in names:
    _choice(name, STAGES, "stage")
  if len(set(names)) != len(names):
    raise ConfigError(f"stages must not repeat a name, got {c.stages!r}")
  if c.init_from and not names:
    raise ConfigError("init_from loads a finished model for later stages: also set stages, e.g. "
                      "--config.stages=crt")
  for name in set(names) & set(TRAIN_STAGES):
    s = c.stage[name]
    _choice(s.sampler, SAMPLERS, f"stage.{name}.sampler")
    validate_optim(s.optim, s.num_epochs, f"stage.{name}.optim")
    if LOSS_ALIASES.get(s.loss, s.loss) not in _losses.LOSSES:
      raise ConfigError(f"unknown stage.{name}.loss {s.loss!r}; valid losses: {', '.join(_losses.LOSSES)}")
    if int(s.num_epochs) < 1 or not s.optim.lr > 0:
      raise ConfigError(f"stage.{name} needs num_epochs >= 1 and optim.lr > 0")
  if ("lws" in names or "tau_norm" in names) and c.model.head != "linear":
    raise ConfigError(f"lws and tau_norm rescale a linear classifier; model.head is {c.model.head!r}")
  if "bags" in names and names[-1] != "bags":
    raise ConfigError("bags must be the last stage: its group-softmax head has C + G outputs that "
                      "the other stages do not read")
  if "bags" in names and c.model.head != "linear":
    raise ConfigError(f"bags trains a linear group-softmax head; model.head is {c.model.head!r}")
  validate_new_stages(c, names)
  if "lws" in names and "crt" in names and names.index("lws") < names.index("crt"):
    raise ConfigError("lws before crt: cRT re-initialises the classifier LWS learnt scales for")
  for name in ("tau_norm", "posthoc", "posterior_recal"):
    if name in names:
      s = c.stage[name]
      grid_key = "betas" if name == "posterior_recal" else "taus"
      if not len(s[grid_key]) or min(s[grid_key]) < 0:
        raise ConfigError(f"stage.{name}.{grid_key} must be a non-empty grid of values >= 0")
      if name == "posterior_recal" and len(s.target_prior) and (
          min(s.target_prior) < 0 or not sum(s.target_prior) > 0):
        raise ConfigError("stage.posterior_recal.target_prior must be () (balanced) or C counts / "
                          f"probabilities >= 0 with a positive sum, got {tuple(s.target_prior)}")
      from lt_jax import decoupled  # the selection keys live with the selection function
      _choice(s.select, tuple(decoupled.SELECTION_KEYS), f"stage.{name}.select")
      if c.dataset.val_per_class < 1:
        raise ConfigError(f"stage {name!r} selects tau on a validation split carved from the training "
                          "data (never on test): set dataset.val_per_class, e.g. 20")


def validate_new_stages(c: ml_collections.ConfigDict, names: list[str]) -> None:
  """Settings of the weight-balancing and cached-feature stages (wb, smote_crt, meta_sampler)."""
  if "wb" in names:
    if c.model.head != "linear":
      raise ConfigError(f"wb (MaxNorm) constrains the rows of a linear classifier; model.head is {c.model.head!r}")
    if not (_finite(c.stage.wb.max_norm_thresh) and 0 <= c.stage.wb.max_norm_thresh <= 1):
      raise ConfigError(f"stage.wb.max_norm_thresh must be in [0, 1], got {c.stage.wb.max_norm_thresh}")
    if "lws" in names and names.index("lws") < names.index("wb"):
      raise ConfigError("lws before wb: weight balancing fine-tunes a linear classifier, not LWS scales")
  if "smote_crt" in names:
    from lt_jax import smote  # the strategy names live with the function
    s = c.stage.smote_crt
    _choice(s.sampling_strategy, smote.SAMPLING_STRATEGIES, "stage.smote_crt.sampling_strategy")
    if not isinstance(s.k_neighbors, int) or s.k_neighbors < 1:
      raise ConfigError(f"stage.smote_crt.k_neighbors must be an int >= 1, got {s.k_neighbors!r}")
  if "meta_sampler" in names:
    s = c.stage.meta_sampler
    if not (_finite(s.meta_lr) and s.meta_lr >= 0):
      raise ConfigError(f"stage.meta_sampler.meta_lr must be a finite number >= 0, got {s.meta_lr}")
    if not _finite(s.init_pow):
      raise ConfigError(f"stage.meta_sampler.init_pow must be a finite number, got {s.init_pow}")
    if not isinstance(s.meta_batch_size, int) or s.meta_batch_size < 0:
      raise ConfigError(f"stage.meta_sampler.meta_batch_size must be an int >= 0 (0: batch_size), "
                        f"got {s.meta_batch_size!r}")
    name = LOSS_ALIASES.get(s.loss, s.loss)
    if _losses.make_loss(name, **_losses.default_hparams(name)).init(2) != ():
      raise ConfigError(f"stage.meta_sampler.loss must be a stateless loss (its state slot holds the sampler), "
                        f"got {s.loss!r}")


# ============================================================================ deep imbalanced regression

DIR_DATASETS = ("rotated_fashion_mnist", "csv")
DIR_LOSSES = ("mse", "l1", "huber", "focal_r", "balanced_mse", "balanced_mse_gai", "balanced_mse_bni")
DIR_METHODS = ("vanilla", "sqinv", "lds", "fds", "lds_fds", "balanced_mse", "balanced_mse_gai", "balanced_mse_bni")
BALANCED_MSE = ("balanced_mse", "balanced_mse_gai", "balanced_mse_bni")  # BMC, GAI, BNI (Ren et al. 2022)


def regression_config() -> ml_collections.ConfigDict:
  """The regression schema (``task='regression'``), defaults = the rotated Fashion-MNIST DIR recipe.

  ``lds.reweight`` ('none' | 'sqrt_inv' | 'inverse') turns on per-example weights,
  ``lds.enabled`` smooths the density first (LDS); ``fds.enabled`` turns on FDS. Unset string /
  size fields of ``dataset`` ('' / 0) mean "not used" (the CSV loader's options).
  """
  c = ml_collections.ConfigDict()
  c.task = "regression"
  c.seed = 0
  c.dataset = ml_collections.ConfigDict(dict(
      name="rotated_fashion_mnist", data_dir="", max_angle=90, n_max=400, imbalance_ratio=100.0,
      val_per_bin=10, test_per_bin=30, subset_seed=0,
      csv="", image_root="", arrays="", target_col="", image_size=(0, 0), channels=0))
  c.bins = ml_collections.ConfigDict(dict(start=0.0, stop=90.0, width=1.0, many=100, few=20))
  c.model = ml_collections.ConfigDict(dict(name="cnn", dtype="float32", normalize_targets=True))
  c.loss = ml_collections.ConfigDict(dict(
      name="mse", huber_beta=1.0, focal_kind="l1", focal_beta=0.2, focal_gamma=1.0,
      focal_activation="sigmoid", noise_sigma=8.0, learn_noise=True, sigma_lr=0.05))
  # Balanced MSE GAI: components of the GMM fitted to the training targets (the reference's K);
  # BNI: smooth the bucket histogram with the LDS window (lds.kernel / ks / sigma), the reference's --lds.
  c.loss.gmm_components = 8
  c.loss.bni_smooth = False
  c.lds = ml_collections.ConfigDict(dict(reweight="none", enabled=False, kernel="gaussian", ks=5, sigma=2.0,
                                         clip=(5.0, 1000.0), truncate=False))  # True: reference int64 density
  c.fds = ml_collections.ConfigDict(dict(enabled=False, kernel="gaussian", ks=5, sigma=2.0, momentum=0.9,
                                         start_update=0, start_smooth=1, clip=(0.1, 10.0),
                                         reference_lag=True))  # True: the reference's one-epoch lag
  c.augment = ml_collections.ConfigDict(dict(crop_pad=2))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, momentum=0.9, nesterov=False, weight_decay=0.0, schedule="cosine",
      warmup_epochs=0.0, decay_epochs=(1000,), decay_factor=0.1))
  run_fields(c, batch_size=128, num_epochs=3, eval_every_epochs=1, log_every_steps=20)
  return c


def set_dir_method(c: ml_collections.ConfigDict, method: str) -> None:
  """``vanilla`` (plain loss), ``sqinv`` (sqrt-inverse weights), ``lds``, ``fds``, ``lds_fds``, ``balanced_mse``
  (BMC), ``balanced_mse_gai``, ``balanced_mse_bni`` (the Balanced MSE loss of that name, no re-weighting)."""
  if method not in DIR_METHODS:
    raise ConfigError(f"unknown DIR method {method!r}; valid methods: {', '.join(DIR_METHODS)}")
  c.lds.reweight = "sqrt_inv" if method in ("sqinv", "lds", "lds_fds") else "none"
  c.lds.enabled = method in ("lds", "lds_fds")
  c.fds.enabled = method in ("fds", "lds_fds")
  if method in BALANCED_MSE:
    c.loss.name = method


def _positive(values: dict) -> None:
  for key, value in values.items():
    if not (_finite(value) and value > 0):
      raise ConfigError(f"{key} must be > 0, got {value}")


def validate_regression(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Rejects bad regression configs with :class:`ConfigError` naming valid choices."""
  from lt_jax import regression  # the kernel / re-weighting names live with the functions
  from lt_jax.models import MODELS
  if c.get("task", "classification") != "regression":
    raise ConfigError(f"task must be 'regression' for train_and_evaluate_regression, got {c.get('task')!r}")
  d = c.dataset
  _choice(d.name, DIR_DATASETS, "regression dataset")
  if d.name == "csv":
    if not d.csv:
      raise ConfigError("dataset.name='csv' needs dataset.csv (a CSV of path/index, target, split rows)")
    if bool(d.image_root) == bool(d.arrays):
      raise ConfigError("dataset.name='csv' needs exactly one of dataset.image_root (image folder) or "
                        "dataset.arrays (.npz of images)")
    _choice(d.channels, (0, 1, 3), "dataset.channels (0 = auto)")
  _choice(c.model.name, MODELS, "model")
  _choice(c.model.dtype, ("float32", "bfloat16"), "model dtype")
  _choice(c.loss.name, DIR_LOSSES, "regression loss")
  _choice(c.loss.focal_kind, regression.FOCAL_KINDS, "loss.focal_kind")
  _choice(c.loss.focal_activation, regression.FOCAL_ACTIVATIONS, "loss.focal_activation")
  _choice(c.lds.reweight, regression.REWEIGHTS, "lds.reweight")
  _choice(c.lds.kernel, regression.KERNELS, "lds.kernel")
  _choice(c.fds.kernel, regression.KERNELS, "fds.kernel")
  validate_run_fields(c, num_devices)
  if c.lds.enabled and c.lds.reweight == "none":
    raise ConfigError("lds.enabled needs lds.reweight='sqrt_inv' or 'inverse' (LDS smooths the density the "
                      "weights invert), got 'none'")
  for key in ("lds.ks", "fds.ks"):
    ks = c[key.split(".")[0]].ks
    if not isinstance(ks, int) or ks < 1 or ks % 2 == 0:
      raise ConfigError(f"{key} must be an odd positive int (e.g. 5), got {ks!r}")
  _positive({"bins.width": c.bins.width, "bins.stop - bins.start": c.bins.stop - c.bins.start,
             "lds.sigma": c.lds.sigma, "fds.sigma": c.fds.sigma, "loss.huber_beta": c.loss.huber_beta,
             "loss.focal_beta": c.loss.focal_beta, "loss.focal_gamma": c.loss.focal_gamma,
             "loss.noise_sigma": c.loss.noise_sigma, "loss.sigma_lr": c.loss.sigma_lr,
             "dataset.imbalance_ratio": c.dataset.imbalance_ratio})
  if not 0.0 <= c.fds.momentum <= 1.0:
    raise ConfigError(f"fds.momentum must be in [0, 1], got {c.fds.momentum}")
  if c.fds.start_update < 0 or c.fds.start_smooth < 0:
    raise ConfigError(f"fds.start_update and fds.start_smooth must be >= 0, got {c.fds.start_update}, "
                      f"{c.fds.start_smooth}")
  if d.name == "rotated_fashion_mnist":
    if not isinstance(d.max_angle, int) or not 2 <= d.max_angle <= 360:
      raise ConfigError(f"dataset.max_angle must be an int in [2, 360] (one bin per degree), got {d.max_angle!r}")
    if not (_finite(d.imbalance_ratio) and 1 <= d.imbalance_ratio <= d.n_max):
      raise ConfigError(f"dataset.imbalance_ratio must be in [1, n_max={d.n_max}] (the rarest angle bin gets "
                        f"n_max / imbalance_ratio >= 1 training images), got {d.imbalance_ratio}")
  validate_data_dir(d.get("data_dir", ""))
  lo, hi = c.fds.clip
  if not 0 < lo <= hi:
    raise ConfigError(f"fds.clip must be (lo, hi) with 0 < lo <= hi, got {tuple(c.fds.clip)}")
  if not c.bins.many >= c.bins.few >= 0:
    raise ConfigError(f"bins.many must be >= bins.few >= 0, got {c.bins.many}, {c.bins.few}")
  if not isinstance(c.loss.gmm_components, int) or c.loss.gmm_components < 1:
    raise ConfigError(f"loss.gmm_components must be an int >= 1, got {c.loss.gmm_components!r}")
  if c.loss.name == "balanced_mse" and c.batch_size < 2:
    raise ConfigError("balanced_mse contrasts each prediction with the batch's other targets: batch_size >= 2")


# ============================================================================ streamed datasets


def add_streaming_fields(c, *, name: str, tfds_name: str, num_classes: int, train_split: str, test_split: str,
                         image_size: int = 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
  """Adds the streaming-dataset fields to a run config ``c`` (``configs/imagenet_lt.py``, ``inat18.py``).

  ``c.dataset``: ``source`` (``lt_jax.data.streaming.STREAM_SOURCES``), ``tfds_name``, ``root``,
  ``train_split`` / ``test_split`` (tfds split names or split-list files), ``num_classes``,
  ``image_size``, ``mean`` / ``std`` (on pixel / 255), ``fixture`` (settings of the
  generated ``smoke`` data). ``c.input``: ``num_threads`` (0: CPU count), ``prefetch``,
  ``train_transform`` / ``eval_transform`` (``lt_jax.data.streaming.TRANSFORMS``), ``min_scale``
  of the random-resized crop, ``crop_fraction`` of the evaluation centre crop, ``jpeg_draft``.
  """
  d = c.dataset
  d.name, d.source, d.tfds_name, d.root = name, "tfds", tfds_name, ""
  d.train_split, d.test_split, d.num_classes, d.image_size = train_split, test_split, num_classes, image_size
  d.mean, d.std = tuple(mean), tuple(std)
  d.fixture = ml_collections.ConfigDict(dict(num_classes=12, max_per_class=40, imbalance_ratio=10.0,
                                             test_per_class=6, size=32, seed=0))
  c.input = ml_collections.ConfigDict(dict(num_threads=0, prefetch=2, train_transform="random_resized_crop",
                                           eval_transform="center_crop", min_scale=0.08, crop_fraction=0.875,
                                           jpeg_draft=True))
  return c


# ============================================================================ durations and resuming


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """One epoch = one pass worth of the long-tailed training set, drop-last."""
  if num_train < batch_size:
    raise ConfigError(f"batch_size {batch_size} exceeds the training set size {num_train}")
  return num_train // batch_size


# Fields that may differ between a checkpointed run and its resumption.
# Stages are recorded by each stage's own checkpoints, so adding one keeps the joint run.
RESUMABLE_FIELDS = ("quiet", "plots", "log_every_steps", "eval_every_epochs", "max_steps",
                    "keep_checkpoints", "checkpoint_every_epochs", "eval_batch_size", "multihost", "num_devices",
                    "dataset.data_dir", "stages", "stage", "init_from", "eval_every_steps", "eval_every_examples",
                    "checkpoint_every_steps", "checkpoint_every_examples", "host_sync", "transfer_guard", "evals",
                    "population")  # a single run's is empty; a population records its members itself


def trajectory_fields(d: dict, drop: tuple[str, ...] = ()) -> dict:
  """``d`` (a config dict) without :data:`RESUMABLE_FIELDS` and the top-level keys ``drop``."""
  out = {k: v for k, v in d.items() if k not in RESUMABLE_FIELDS and k not in drop}
  for dotted in RESUMABLE_FIELDS:
    head, _, tail = dotted.partition(".")
    if tail and isinstance(out.get(head), dict):
      out[head] = {k: v for k, v in out[head].items() if k != tail}
  return out


_MISSING = "<missing>"


def incompatible_fields(saved: dict, current: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
  """Dotted keys whose values differ and that change the training trajectory.

  ``defaults`` (a config dict, e.g. ``base_config().to_dict()``): a key the saved config lacks is
  compatible when the current value is its default there — a field added by a later lt_jax version
  at its default changes nothing, so a run started before the upgrade still resumes.
  """
  out = []
  for key in sorted(set(saved) | set(current)):
    dotted = f"{prefix}{key}"
    if dotted in RESUMABLE_FIELDS:
      continue
    a, b = saved.get(key, _MISSING), current.get(key, _MISSING)
    d = defaults.get(key, _MISSING) if isinstance(defaults, dict) else _MISSING
    if isinstance(a, dict) and isinstance(b, dict):
      out += incompatible_fields(a, b, dotted + ".", d if isinstance(d, dict) else None)
    elif a is _MISSING and d is not _MISSING and _normalise(b) == _normalise(d):
      continue
    elif _normalise(a) != _normalise(b):
      out.append(f"{dotted}: checkpoint has {a!r}, config has {b!r}")
  return out


def _normalise(v):
  if isinstance(v, (list, tuple)):
    return [_normalise(x) for x in v]
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return float(v)
  return v

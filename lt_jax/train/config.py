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

import ml_collections

DATASETS = ("fashion_mnist", "cifar10", "cifar100")
MODELS = ("cnn", "resnet20", "resnet32", "resnet44", "resnet56", "resnet50", "resnext50")
HEADS = ("linear", "cosine", "lws")
SAMPLERS = ("instance", "class_balanced", "sqrt", "progressive", "class_aware", "reversed")
SCHEDULES = ("step", "cosine", "constant")
PROFILES = ("exp", "step", "pareto")
MIXES = ("none", "mixup", "cutmix", "remix")
TRAIN_STAGES = ("crt", "lws", "bags")    # stages that train (a frozen-backbone classifier)
EVAL_STAGES = ("tau_norm", "posthoc", "ncm")  # stages that derive a classifier without training
STAGES = TRAIN_STAGES + EVAL_STAGES
BBN_MODELS = ("cnn", "resnet20", "resnet32", "resnet44", "resnet56")

LOSS_ALIASES = {"la": "logit_adjusted", "bs": "balanced_softmax", "cb": "cb_softmax",
                "wce": "weighted_ce", "ls": "label_smoothing"}
# Named recipes that are a loss plus settings (set_loss).
LOSS_RECIPES = ("ldam_drw", "focal_drw", "wce_sqrt", "ce_drw")
SAMPLER_ALIASES = {"cb": "class_balanced", "class": "class_balanced", "balanced": "class_balanced",
                   "sqrt_balanced": "sqrt", "aware": "class_aware", "ib": "instance"}

# Default hyper-parameters per loss (REFERENCE.md section 3); the config carries them so
# that each one is overridable as --config.loss.hparams.<name>=<value>.
LOSS_DEFAULTS = {
    "ce": {},
    "weighted_ce": {"weights": "inverse"},
    "label_smoothing": {"epsilon": 0.1},
    "focal": {"gamma": 1.0},
    "sigmoid_focal": {"gamma": 2.0},
    "cb_softmax": {"beta": 0.9999},
    "cb_sigmoid": {"beta": 0.9999},
    "cb_focal": {"beta": 0.9999, "gamma": 0.5},
    "ldam": {"max_m": 0.5, "s": 30.0},
    "logit_adjusted": {"tau": 1.0},
    "balanced_softmax": {},
    "generalized_la": {},
    "eql": {},
    "seql": {},
    "eqlv2": {},
    "seesaw": {},
}


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
  grid = tuple(round(0.1 * i, 1) for i in range(21))  # linspace(0, 2, 21), the reference grid
  c.stage.tau_norm = ml_collections.ConfigDict(dict(taus=grid, keep_bias=False, select="balanced_error_rate"))
  c.stage.posthoc = ml_collections.ConfigDict(dict(taus=grid, select="balanced_error_rate"))
  c.stage.ncm = ml_collections.ConfigDict()  # cl2n features, squared L2 (no settings)
  return c


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
    set_epochs(c, int(variant["epochs"]))
  if "ir" in variant:
    c.dataset.imbalance_ratio = float(variant["ir"])
  if "seed" in variant:
    c.seed = int(variant["seed"])
  if "head" in variant:
    c.model.head = str(variant["head"])
  if "sampler" in variant:
    c.sampler.name = SAMPLER_ALIASES.get(variant["sampler"], variant["sampler"])
  if "loss" in variant:
    set_loss(c, str(variant["loss"]))
  if "mix" in variant:
    c.mix.name = str(variant["mix"])
  if "bbn" in variant:
    c.model.bbn = True
  if "stages" in variant:  # commas separate variant keys, so stages are joined by '+'
    c.stages = str(variant["stages"]).replace("+", ",")
  return c


COMMON_VARIANTS = ("ir", "loss", "sampler", "head", "seed", "mix", "bbn", "stages", "epochs")


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
  ``losses.focal_loss``); ``wce_sqrt`` weighted CE with ``(n_min / n_c)^(1/2)``. Set ``num_epochs`` first.
  """
  recipe = name
  name = {"ldam_drw": "ldam", "focal_drw": "focal", "ce_drw": "ce",
          "wce_sqrt": "weighted_ce"}.get(name, LOSS_ALIASES.get(name, name))
  if name not in LOSS_DEFAULTS:
    raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(LOSS_DEFAULTS)} "
                     f"(aliases: {', '.join(f'{k}={v}' for k, v in LOSS_ALIASES.items())}; "
                     f"recipes: {', '.join(LOSS_RECIPES)})")
  c.loss.name = name
  c.loss.hparams = ml_collections.ConfigDict(dict(LOSS_DEFAULTS[name]))
  c.loss.drw_epoch = -1.0
  if recipe in ("ldam_drw", "ce_drw", "focal_drw"):
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


def _choice(value, valid, what):
  if value not in valid:
    raise ConfigError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, valid))}")


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Rejects bad values with a message naming the valid choices."""
  from lt_jax import losses  # local import: the registry is the source of truth
  if c.dataset.get("source", "memory") != "memory":  # host input pipeline: configs/imagenet_lt.py, inat18.py
    from lt_jax.data import streaming  # the source names live with the pipeline
    _choice(c.dataset.source, streaming.STREAM_SOURCES, "dataset.source")
    unsupported = [s for s in stage_names(c) if s in EVAL_STAGES] + (["model.bbn"] if c.model.bbn else [])
    if unsupported:
      raise ConfigError(f"not available for streamed datasets: {', '.join(unsupported)} (they need the "
                        "dataset in memory); streamed datasets support "
                        f"the joint stage and the training stages {', '.join(TRAIN_STAGES)}")
  else:
    _choice(c.dataset.name, DATASETS, "dataset")
  _choice(c.dataset.profile, PROFILES, "long-tail profile")
  _choice(c.model.name, MODELS, "model")
  _choice(c.model.head, HEADS, "head")
  _choice(c.sampler.name, SAMPLERS, "sampler")
  _choice(c.optim.schedule, SCHEDULES, "lr schedule")
  _choice(c.optim.name, ("sgd", "adamw"), "optimizer")
  _choice(c.model.dtype, ("float32", "bfloat16"), "model dtype")
  if c.loss.name not in losses.LOSSES:
    raise ConfigError(f"unknown loss {c.loss.name!r}; valid losses: {', '.join(losses.LOSSES)}")
  try:
    losses.make_loss(c.loss.name, **c.loss.hparams.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"bad hyper-parameters for loss {c.loss.name!r}: {e}") from e
  if not c.dataset.imbalance_ratio >= 1:
    raise ConfigError(f"dataset.imbalance_ratio must be >= 1, got {c.dataset.imbalance_ratio}")
  positive = {"batch_size": c.batch_size, "eval_batch_size": c.eval_batch_size, "num_epochs": c.num_epochs,
              "log_every_steps": c.log_every_steps, "sampler.k_per_class": c.sampler.k_per_class}
  for key, value in positive.items():
    if int(value) < 1:
      raise ConfigError(f"{key} must be >= 1, got {value}")
  for key in ("batch_size", "eval_batch_size"):
    if c[key] % num_devices:
      raise ConfigError(f"{key}={c[key]} is not divisible by the number of devices ({num_devices}); "
                       f"use a multiple of {num_devices}")
  if c.optim.lr <= 0:
    raise ConfigError(f"optim.lr must be > 0, got {c.optim.lr}")
  if c.optim.warmup_epochs < 0 or c.optim.warmup_epochs > c.num_epochs:
    raise ConfigError(f"optim.warmup_epochs must be in [0, num_epochs], got {c.optim.warmup_epochs}")
  if list(c.optim.decay_epochs) != sorted(c.optim.decay_epochs):
    raise ConfigError(f"optim.decay_epochs must be increasing, got {c.optim.decay_epochs}")
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
  validate_stages(c)


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
    _choice(s.optim.schedule, SCHEDULES, f"stage.{name}.optim.schedule")
    _choice(s.optim.name, ("sgd", "adamw"), f"stage.{name}.optim.name")
    set_loss_check = LOSS_ALIASES.get(s.loss, s.loss)
    if set_loss_check not in LOSS_DEFAULTS:
      raise ConfigError(f"unknown stage.{name}.loss {s.loss!r}; valid losses: {', '.join(LOSS_DEFAULTS)}")
    if int(s.num_epochs) < 1 or not s.optim.lr > 0:
      raise ConfigError(f"stage.{name} needs num_epochs >= 1 and optim.lr > 0")
  if ("lws" in names or "tau_norm" in names) and c.model.head != "linear":
    raise ConfigError(f"lws and tau_norm rescale a linear classifier; model.head is {c.model.head!r}")
  if "bags" in names and names[-1] != "bags":
    raise ConfigError("bags must be the last stage: its group-softmax head has C + G outputs that "
                      "the other stages do not read")
  if "bags" in names and c.model.head != "linear":
    raise ConfigError(f"bags trains a linear group-softmax head; model.head is {c.model.head!r}")
  if "lws" in names and "crt" in names and names.index("lws") < names.index("crt"):
    raise ConfigError("lws before crt: cRT re-initialises the classifier LWS learnt scales for")
  for name in ("tau_norm", "posthoc"):
    if name in names:
      s = c.stage[name]
      if not len(s.taus) or min(s.taus) < 0:
        raise ConfigError(f"stage.{name}.taus must be a non-empty grid of values >= 0")
      from lt_jax import decoupled  # the selection keys live with the selection function
      _choice(s.select, tuple(decoupled.SELECTION_KEYS), f"stage.{name}.select")
      if c.dataset.val_per_class < 1:
        raise ConfigError(f"stage {name!r} selects tau on a validation split carved from the training "
                          "data (never on test): set dataset.val_per_class, e.g. 20")


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """One epoch = one pass worth of the long-tailed training set, drop-last."""
  if num_train < batch_size:
    raise ConfigError(f"batch_size {batch_size} exceeds the training set size {num_train}")
  return num_train // batch_size


# Fields that may differ between a checkpointed run and its resumption.
# Stages are recorded by each stage's own checkpoints, so adding one keeps the joint run.
RESUMABLE_FIELDS = ("quiet", "plots", "log_every_steps", "eval_every_epochs", "max_steps",
                    "keep_checkpoints", "checkpoint_every_epochs", "eval_batch_size", "multihost", "num_devices",
                    "dataset.data_dir", "stages", "stage", "init_from")


def trajectory_fields(d: dict, drop: tuple[str, ...] = ()) -> dict:
  """``d`` (a config dict) without :data:`RESUMABLE_FIELDS` and the top-level keys ``drop``."""
  out = {k: v for k, v in d.items() if k not in RESUMABLE_FIELDS and k not in drop}
  for dotted in RESUMABLE_FIELDS:
    head, _, tail = dotted.partition(".")
    if tail and isinstance(out.get(head), dict):
      out[head] = {k: v for k, v in out[head].items() if k != tail}
  return out


def incompatible_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """Dotted keys whose values differ and that change the training trajectory."""
  out = []
  for key in sorted(set(saved) | set(current)):
    dotted = f"{prefix}{key}"
    if dotted in RESUMABLE_FIELDS:
      continue
    a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += incompatible_fields(a, b, dotted + ".")
    elif _normalise(a) != _normalise(b):
      out.append(f"{dotted}: checkpoint has {a!r}, config has {b!r}")
  return out


def _normalise(v):
  if isinstance(v, (list, tuple)):
    return [_normalise(x) for x in v]
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return float(v)
  return v

"""The loss registry: ``make_loss(name, **hparams) -> Loss(name, init, apply)``, the names and their defaults."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple
import numpy as np
import jax
import jax.numpy as jnp
from lt_jax import priors
from lt_jax.losses.functions import (
    Array, FOCAL_FORMS, PyTree, _check_logits, _f32, as_targets, balanced_softmax_loss,
    eqlv2_class_weights, eqlv2_grad_stats, eqlv2_loss, equalization_loss, focal_loss, focal_modulate,
    generalized_logit_adjusted_loss, label_smoothing_cross_entropy, ldam_loss, logit_adjusted_loss,
    resolve_class_weights, seesaw_loss, sigmoid_cross_entropy, sigmoid_focal_loss,
    softmax_bce_loss, softmax_cross_entropy, softmax_equalization_loss)
from lt_jax.losses.experts import check_expert_logits, ride_loss, sade_loss


class Loss(NamedTuple):
  """A named loss: ``init(num_classes) -> state``; ``apply(logits, labels, prior_or_counts, state)
  -> (per_example (B,), new_state)``. Stateless losses use ``state = ()``."""
  name: str
  init: Callable[[int], PyTree]
  apply: Callable[[Array, Array, Array, PyTree], tuple[Array, PyTree]]


class _Spec(NamedTuple):
  defaults: dict          # the loss's own hparams and their defaults
  weighting: str          # 'optional' | 'required' (weighted_ce) | 'cb' (intrinsic CB weights)
  build: Callable         # hp -> core(z, labels, t, prior, state, ex_w) -> (loss, state updates)
  state: Callable | None  # (num_classes, hp) -> dict of running statistics, or None
  needs_step: Callable    # hp -> whether the state carries a step counter
  experts: bool = False   # logits are (B, E, C) expert logits (lt_jax.losses.experts)


def _scale(loss: Array, ex_w: Array | None) -> Array:
  return loss if ex_w is None else loss * ex_w


def _stateless(fn):
  def build(hp):
    def core(z, labels, t, prior, state, ex_w):
      return _scale(fn(z, labels, prior, hp), ex_w), {}
    return core
  return build


def _build_seql(hp):
  def core(z, labels, t, prior, state, ex_w):
    key = None
    if hp["stochastic"]:
      key = jax.random.fold_in(jax.random.key(hp["seed"]), state["step"])
    loss = softmax_equalization_loss(z, labels, prior, lam=hp["lam"], gamma=hp["gamma"], key=key)
    return _scale(loss, ex_w), {}
  return core


def _build_eqlv2(hp):
  def core(z, labels, t, prior, state, ex_w):
    r, q = eqlv2_class_weights(state["pos_grad"], state["neg_grad"], gamma=hp["gamma"],
                               mu=hp["mu"], alpha=hp["alpha"], initialized=state["step"] > 0)
    loss = _scale(eqlv2_loss(z, labels, pos_weight=r, neg_weight=q), ex_w)
    pg, ng = eqlv2_grad_stats(z, labels, pos_weight=r, neg_weight=q, example_weights=ex_w)
    return loss, {"pos_grad": state["pos_grad"] + pg, "neg_grad": state["neg_grad"] + ng}
  return core


def _build_seesaw(hp):
  def core(z, labels, t, prior, state, ex_w):
    if hp["online"]:
      cum = state["cum_counts"] + jnp.sum(t, axis=0)  # counts first, then the loss (as mmdet)
      loss = seesaw_loss(z, labels, cum_counts=cum, p=hp["p"], q=hp["q"], eps=hp["eps"])
      return _scale(loss, ex_w), {"cum_counts": cum}
    loss = seesaw_loss(z, labels, prior, p=hp["p"], q=hp["q"], eps=hp["eps"])
    return _scale(loss, ex_w), {}
  return core


def _build_focal(hp):
  def core(z, labels, t, prior, state, ex_w):
    if hp["form"] == "ldam_drw":  # the per-example weight goes inside the modulating factor
      ce = focal_loss(z, t, gamma=0.0, alpha=hp["alpha"])
      return focal_modulate(ce if ex_w is None else ce * ex_w, hp["gamma"]), {}
    return _scale(focal_loss(z, labels, gamma=hp["gamma"], alpha=hp["alpha"]), ex_w), {}
  return core


def _build_ride(hp):
  def core(z, labels, t, prior, state, ex_w):
    # RIDE switches its CE weights and its per-class diversity temperatures together: both are on
    # whenever the (deferred) class weights are (RIDELoss._hook_before_epoch).
    if ex_w is None:
      on = False
    elif hp["drw_start"] is None:
      on = True
    else:
      on = state["step"] >= hp["drw_start"]
    loss = ride_loss(z, labels, prior, max_m=hp["max_m"], s=hp["s"], diversity_factor=hp["diversity_factor"],
                     diversity_temperature=hp["diversity_temperature"], reweight_factor=hp["reweight_factor"],
                     example_weights=ex_w, reweighted=on)
    return loss, {}
  return core


def _no_step(hp):
  return False


_SPECS: dict[str, _Spec] = {
    "ce": _Spec({}, "optional", _stateless(lambda z, y, pr, hp: softmax_cross_entropy(z, y)),
                None, _no_step),
    "weighted_ce": _Spec({}, "required",
                         _stateless(lambda z, y, pr, hp: softmax_cross_entropy(z, y)),
                         None, _no_step),
    "label_smoothing": _Spec(
        {"epsilon": 0.1}, "optional",
        _stateless(lambda z, y, pr, hp: label_smoothing_cross_entropy(z, y, epsilon=hp["epsilon"])),
        None, _no_step),
    "focal": _Spec({"gamma": 1.0, "alpha": None, "form": "paper"}, "optional", _build_focal,
                   None, _no_step),
    "bce": _Spec({}, "optional", _stateless(lambda z, y, pr, hp: sigmoid_cross_entropy(z, y)),
                 None, _no_step),
    "sigmoid_focal": _Spec(
        {"gamma": 2.0, "alpha": None}, "optional",
        _stateless(lambda z, y, pr, hp: sigmoid_focal_loss(z, y, gamma=hp["gamma"],
                                                           alpha=hp["alpha"])),
        None, _no_step),
    "cb_softmax": _Spec({"beta": 0.9999}, "cb",
                        _stateless(lambda z, y, pr, hp: softmax_cross_entropy(z, y)),
                        None, _no_step),
    "cb_sigmoid": _Spec({"beta": 0.9999}, "cb",
                        _stateless(lambda z, y, pr, hp: sigmoid_cross_entropy(z, y)),
                        None, _no_step),
    # gamma 0.5: the CB-Focal setting of Cui et al. 2019 tabulated by BagofTricks-LT (REFERENCE.md).
    "cb_focal": _Spec({"beta": 0.9999, "gamma": 0.5}, "cb",
                      _stateless(lambda z, y, pr, hp: sigmoid_focal_loss(z, y, gamma=hp["gamma"])),
                      None, _no_step),
    # Weight balancing's stage-2 loss: the vandit15 port's CB "softmax" = BCE of softmax probabilities.
    "cb_softmax_bce": _Spec({"beta": 0.9999}, "cb",
                            _stateless(lambda z, y, pr, hp: softmax_bce_loss(z, y)),
                            None, _no_step),
    "ldam": _Spec({"max_m": 0.5, "s": 30.0}, "optional",
                  _stateless(lambda z, y, pr, hp: ldam_loss(z, y, pr, max_m=hp["max_m"],
                                                            s=hp["s"])),
                  None, _no_step),
    "logit_adjusted": _Spec({"tau": 1.0}, "optional",
                            _stateless(lambda z, y, pr, hp: logit_adjusted_loss(z, y, pr,
                                                                                tau=hp["tau"])),
                            None, _no_step),
    "balanced_softmax": _Spec({}, "optional",
                              _stateless(lambda z, y, pr, hp: balanced_softmax_loss(z, y, pr)),
                              None, _no_step),
    "generalized_la": _Spec(
        {"tau": 1.0, "delta": None, "alpha": None}, "optional",
        _stateless(lambda z, y, pr, hp: generalized_logit_adjusted_loss(
            z, y, pr, delta=hp["delta"], tau=hp["tau"], alpha=hp["alpha"])),
        None, _no_step),
    "eql": _Spec({"lam": 0.00177}, "optional",
                 _stateless(lambda z, y, pr, hp: equalization_loss(z, y, pr, lam=hp["lam"])),
                 None, _no_step),
    "seql": _Spec({"lam": 0.005, "gamma": 0.9, "stochastic": True, "seed": 0}, "optional",
                  _build_seql, None, lambda hp: bool(hp["stochastic"])),
    "eqlv2": _Spec({"gamma": 12.0, "mu": 0.8, "alpha": 4.0}, "optional", _build_eqlv2,
                   lambda C, hp: {"pos_grad": jnp.zeros((C,), jnp.float32),
                                  "neg_grad": jnp.zeros((C,), jnp.float32)},
                   lambda hp: True),
    "seesaw": _Spec({"p": 0.8, "q": 2.0, "eps": 1e-2, "online": True}, "optional", _build_seesaw,
                    lambda C, hp: ({"cum_counts": jnp.zeros((C,), jnp.float32)}
                                   if hp["online"] else None),
                    _no_step),
    # Multi-expert losses: logits (B, E, C) from a *_experts model (lt_jax.losses.experts).
    "ride": _Spec({"max_m": 0.5, "s": 30.0, "diversity_factor": -0.45, "diversity_temperature": 1.0,
                   "reweight_factor": 0.05}, "optional", _build_ride, None, _no_step, experts=True),
    "sade": _Spec({"tau": 2.0}, "optional",
                  _stateless(lambda z, y, pr, hp: sade_loss(z, y, pr, tau=hp["tau"])),
                  None, _no_step, experts=True),
}


LOSSES: tuple[str, ...] = tuple(_SPECS)
# Losses of (B, E, C) expert logits: the train step calls the model with experts=True for them.
EXPERT_LOSSES: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.experts)


def default_hparams(name: str) -> dict[str, Any]:
  """The hyper-parameters a run config carries for loss ``name``, with their registry defaults.

  Every one is overridable as ``--config.loss.hparams.<key>=<value>``; hparams whose default is
  ``None`` (per-class vectors such as focal's ``alpha``, generalised LA's ``delta``) are left out
  (they are arrays when given). ``weighted_ce`` carries its weighting scheme, ``'inverse'``.
  This is the only place loss defaults live: ``lt_jax.train.config`` reads it.
  """
  if name not in _SPECS:
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
  spec = _SPECS[name]
  out = {k: v for k, v in spec.defaults.items() if v is not None}
  if spec.weighting == "required":
    out["weights"] = "inverse"
  return out


# hparams every entry with class weighting accepts (besides the loss's own).
_WEIGHT_HPARAMS = ("weights", "weight_kwargs", "weight_norm", "drw_start")


_SCHEME_KWARGS = ("beta", "gamma")  # priors.class_weights kwargs, routed when not the loss's own


_WEIGHT_NORMS = ("none", "batch")


def _validate_own(name: str, hp: dict, explicit: set) -> None:
  """Check the loss's own hparams (in place: array hparams become float32 arrays)."""
  def need(cond, msg):
    if not cond:
      raise ValueError(f"make_loss({name!r}): {msg}")

  if name == "seql":
    need(0.0 <= hp["gamma"] <= 1.0, f"gamma (Bernoulli probability) must be in [0, 1], "
                                    f"got {hp['gamma']}")
    need(isinstance(hp["seed"], (int, np.integer)), f"seed must be an int, got {hp['seed']!r}")
  elif "gamma" in hp:
    need(hp["gamma"] >= 0, f"gamma must be >= 0, got {hp['gamma']}")
  if "beta" in hp:
    need(0.0 <= hp["beta"] < 1.0, f"beta must be in [0, 1), got {hp['beta']}")
  if "epsilon" in hp:
    need(0.0 <= hp["epsilon"] <= 1.0, f"epsilon must be in [0, 1], got {hp['epsilon']}")
  if name == "focal":
    need(hp["form"] in FOCAL_FORMS, f"unknown form {hp['form']!r}; valid forms: {', '.join(FOCAL_FORMS)}")
  if name in ("ldam", "ride"):
    need(hp["max_m"] > 0 and hp["s"] > 0, f"max_m and s must be > 0, got {hp['max_m']}, {hp['s']}")
  if name == "ride":
    need(hp["diversity_temperature"] > 0, f"diversity_temperature must be > 0, got {hp['diversity_temperature']}")
    need(0.0 <= hp["reweight_factor"] < 1.0, f"reweight_factor must be in [0, 1) (temperatures stay > 0), "
                                             f"got {hp['reweight_factor']}")
    need(np.isfinite(hp["diversity_factor"]), f"diversity_factor must be finite, got {hp['diversity_factor']}")
  if name == "seesaw":
    need(hp["p"] >= 0 and hp["q"] >= 0 and hp["eps"] > 0,
         f"need p >= 0, q >= 0, eps > 0, got {hp['p']}, {hp['q']}, {hp['eps']}")
  if "tau" in hp:
    need(np.isfinite(hp["tau"]), f"tau must be finite, got {hp['tau']}")
  if name == "generalized_la" and hp["delta"] is not None:
    need("tau" not in explicit, "give either delta (a (C, C) matrix) or tau, not both")
    hp["delta"] = _f32(hp["delta"])
    need(hp["delta"].ndim == 2 and hp["delta"].shape[0] == hp["delta"].shape[1],
         f"delta must be a square (C, C) matrix, got shape {hp['delta'].shape}")
  if name in ("focal", "sigmoid_focal", "generalized_la") and hp["alpha"] is not None:
    hp["alpha"] = _f32(hp["alpha"])
    if name != "sigmoid_focal":
      need(hp["alpha"].ndim == 1, f"alpha must be a per-class (C,) vector, "
                                  f"got shape {hp['alpha'].shape}")


def make_loss(name: str, **hparams) -> Loss:
  """Build a registry loss: ``Loss(name, init, apply)`` (contract in ``docs/DESIGN.md``).

  Names (:data:`LOSSES`) and their own hparams (defaults):

  * ``ce``; ``weighted_ce`` (``weights='inverse'`` by default); ``label_smoothing`` (epsilon=0.1);
    ``focal`` (softmax, gamma=1.0, alpha=None per-class vector, form='paper' | 'ldam_drw': where
    class weights go, see :func:`focal_loss`); ``bce`` (sigmoid, summed);
    ``sigmoid_focal`` (gamma=2.0, alpha=None scalar or vector);
  * ``cb_softmax`` / ``cb_sigmoid`` / ``cb_focal`` (beta=0.9999; cb_focal gamma=0.5): effective-
    number weights, need raw counts; ``cb_softmax_bce`` (beta=0.9999): the same weights on the BCE of
    the softmax probabilities (vandit15's port, weight balancing's stage 2, ``softmax_bce_loss``);
  * ``ldam`` (max_m=0.5, s=30.0); ``logit_adjusted`` (tau=1.0); ``balanced_softmax``;
    ``generalized_la`` (tau=1.0, or delta=(C, C) matrix; alpha=None (C,) vector);
  * ``eql`` (lam=0.00177); ``seql`` (lam=0.005, gamma=0.9, stochastic=True, seed=0);
    ``eqlv2`` (gamma=12.0, mu=0.8, alpha=4.0); ``seesaw`` (p=0.8, q=2.0, eps=0.01, online=True);
  * multi-expert (:data:`EXPERT_LOSSES`, logits ``(B, E, C)``): ``ride`` (max_m=0.5, s=30.0,
    diversity_factor=-0.45, diversity_temperature=1.0, reweight_factor=0.05; with ``weights`` and
    ``drw_start`` its per-class diversity temperatures switch on with the weights, see
    :func:`lt_jax.losses.experts.ride_loss`); ``sade`` (tau=2.0, exactly 3 experts).

  Class weighting, accepted by every entry except ``cb_*`` (whose weights are intrinsic; they still
  accept ``weight_norm`` and ``drw_start``):

  * ``weights``: a :data:`priors.WEIGHT_SCHEMES` name or an explicit (C,) vector; the per-example
    loss is multiplied by ``w_y`` (soft targets: ``sum_c y_c w_c``). Scheme kwargs go top level
    (``weights='effective_number', beta=0.9999``; ``weights='cost_sensitive', gamma=0.5``) unless
    the loss owns that name (``focal``'s gamma), then in ``weight_kwargs={'gamma': 0.5}``.
  * ``weight_norm``: ``'none'`` (default; ``reduce_mean`` gives ``mean_i w_{y_i} l_i``, Cui et al.)
    or ``'batch'``: the vector is rescaled by ``n / sum_i w_{y_i}`` over the batch's non-padding
    rows, so ``reduce_mean`` gives PyTorch ``cross_entropy(weight=w)`` semantics
    (``sum w l / sum w``, LDAM-DRW and BagofTricks code). Padding rows must then carry label -1
    (or a zero soft row) so they are excluded from the sums.
  * ``drw_start``: deferred re-weighting (Cao et al., NeurIPS 2019): unweighted before this many
    ``apply`` calls (train steps), weighted afterwards. LDAM-DRW's recipe is
    ``make_loss('ldam', weights='effective_number', beta=0.9999, weight_norm='batch',
    drw_start=160 * steps_per_epoch)``.

  State: ``()`` for stateless losses, otherwise a dict of float32/int32 arrays: ``step`` (int32,
  number of apply calls so far; present with ``drw_start``, ``seql`` stochastic and ``eqlv2``),
  ``cum_counts`` (seesaw, online), ``pos_grad`` / ``neg_grad`` (eqlv2). SEQL's Bernoulli key is
  ``fold_in(key(seed), step)``, so ``apply`` is pure and needs no key argument.

  Raises ``ValueError`` for an unknown name (listing :data:`LOSSES`) or unknown/invalid hparams.
  """
  if name not in _SPECS:
    raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
  spec = _SPECS[name]
  own = dict(spec.defaults)
  weight_hp: dict = {}
  scheme_kw: dict = {}
  accepts_weights = spec.weighting in ("optional", "required")
  valid_names = list(spec.defaults) + (list(_WEIGHT_HPARAMS) if accepts_weights else
                                       ["weight_norm", "drw_start"])
  if accepts_weights:
    valid_names += [k for k in _SCHEME_KWARGS if k not in spec.defaults]
  for k, v in hparams.items():
    if k in spec.defaults:
      own[k] = v
    elif k in valid_names and k in _SCHEME_KWARGS:
      scheme_kw[k] = v
    elif k in valid_names:
      weight_hp[k] = v
    else:
      raise ValueError(f"make_loss({name!r}) got unknown hparam {k!r}; valid hparams: "
                       f"{', '.join(valid_names) or 'none'}")
  # Traced hparams (a population's per-member values, lt_jax.train.population) were range-checked
  # as numbers before tracing: the checks below see the registry default in their place.
  traced = {k: v for k, v in own.items() if isinstance(v, jax.core.Tracer)}
  own.update({k: spec.defaults[k] for k in traced})
  _validate_own(name, own, set(hparams))
  own.update(traced)

  # ---- class weighting configuration
  weights = weight_hp.get("weights", "inverse" if spec.weighting == "required" else None)
  scheme_kw.update(weight_hp.get("weight_kwargs") or {})
  if spec.weighting == "cb":
    weights, scheme_kw = "effective_number", {"beta": own["beta"]}
  if spec.weighting == "required" and weights is None:
    raise ValueError(f"make_loss({name!r}) needs weights= (a scheme name, one of "
                     f"{', '.join(priors.WEIGHT_SCHEMES)}, or a (C,) vector)")
  if weights is None and scheme_kw:
    raise ValueError(f"make_loss({name!r}): {sorted(scheme_kw)} given without weights=")
  if isinstance(weights, str):
    if weights not in priors.WEIGHT_SCHEMES:
      raise ValueError(f"make_loss({name!r}): unknown weights scheme {weights!r}; valid schemes: "
                       f"{', '.join(priors.WEIGHT_SCHEMES)}")
    try:  # validate scheme kwargs now, not at the first step
      priors.class_weights(np.ones(2, np.float32), weights, **scheme_kw)
    except TypeError as err:
      raise ValueError(f"make_loss({name!r}): {err}") from None
  elif weights is not None:
    if scheme_kw:
      raise ValueError(f"make_loss({name!r}): {sorted(scheme_kw)} only apply to a weights scheme "
                       f"name, not to an explicit weight vector")
    weights = _f32(weights)
    if weights.ndim != 1:
      raise ValueError(f"make_loss({name!r}): explicit weights must be a (C,) vector, "
                       f"got shape {weights.shape}")
  weight_norm = weight_hp.get("weight_norm", "none")
  if weight_norm not in _WEIGHT_NORMS:
    raise ValueError(f"make_loss({name!r}): unknown weight_norm {weight_norm!r}; valid: "
                     f"{', '.join(_WEIGHT_NORMS)}")
  if weights is None and "weight_norm" in weight_hp:
    raise ValueError(f"make_loss({name!r}): weight_norm needs weights=")
  drw_start = weight_hp.get("drw_start")
  if drw_start is not None:
    if weights is None:
      raise ValueError(f"make_loss({name!r}): drw_start needs weights=")
    if not (isinstance(drw_start, (int, np.integer)) and drw_start >= 0):
      raise ValueError(f"make_loss({name!r}): drw_start must be an int >= 0 (steps), got {drw_start!r}")

  core = spec.build(dict(own, drw_start=drw_start) if spec.experts else own)
  has_step = spec.needs_step(own) or drw_start is not None
  state_fn = spec.state
  stateful = has_step or (state_fn is not None and state_fn(1, own) is not None)

  def init(num_classes: int) -> PyTree:
    st = {}
    if state_fn is not None:
      st.update(state_fn(int(num_classes), own) or {})
    if has_step:
      st["step"] = jnp.zeros((), jnp.int32)
    return st if st else ()

  def apply(logits: Array, labels: Array, prior_or_counts: Array,
            state: PyTree) -> tuple[Array, PyTree]:
    z = check_expert_logits(logits) if spec.experts else _check_logits(logits)
    C = z.shape[-1]
    t = as_targets(labels, C)
    if stateful and not isinstance(state, dict):
      raise ValueError(f"loss {name!r} is stateful: pass the state from init(num_classes), "
                       f"got {type(state).__name__}")
    ex_w = None
    if weights is not None:
      w = resolve_class_weights(prior_or_counts, weights, **scheme_kw)
      if w.shape != (C,):
        raise ValueError(f"loss {name!r}: class weights have shape {w.shape}, logits have {C} classes")
      ex_w = t @ w
      if weight_norm == "batch":
        tot = jnp.sum(ex_w)
        ex_w = ex_w * (jnp.sum(t) / jnp.where(tot > 0, tot, 1.0))
      if drw_start is not None:
        ex_w = jnp.where(state["step"] >= drw_start, ex_w, 1.0)
    loss, updates = core(z, labels, t, prior_or_counts, state, ex_w)
    if not isinstance(state, dict):
      return loss, state
    new_state = dict(state)
    new_state.update(updates)
    if has_step:
      new_state["step"] = state["step"] + 1
    return loss, new_state

  return Loss(name, init, apply)

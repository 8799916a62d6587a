"""Decoupled classifier stages, BBN cumulative learning, BAGS group softmax, post-hoc sweeps.

Pure functions (``jax.numpy``; jit-, vmap- and grad-safe unless marked host-side):

* Stage wiring for decoupled training (Kang et al., ICLR 2020):
  :func:`param_labels` (for ``optax.partition``), :func:`reinit_head`.
  The heads themselves live in :mod:`lt_jax.heads` (``LinearHead`` for cRT, ``LWSHead`` +
  ``lws_from_linear`` for LWS, ``tau_norm_logits`` for tau-normalisation, ``ncm_centroids`` +
  ``ncm_logits`` for NCM); they are reused here, not duplicated.
* BBN (Zhou et al., CVPR 2020): :func:`bbn_alpha`, :func:`bbn_div_epoch` (the feature mixing
  ``[2 alpha f_cb ; 2 (1 - alpha) f_rb]`` is in the model, ``lt_jax.models``; the loss
  ``alpha CE(z, y_cb) + (1 - alpha) CE(z, y_rb)`` is the train step's mixed-label rule).
* BAGS group softmax as a classification head (Li et al., CVPR 2020):
  :func:`bags_groups` (host-side), :func:`group_softmax_num_outputs`,
  :func:`group_softmax_loss`, :func:`group_softmax_logits`, :func:`group_softmax_predict`.
* Vectorised post-hoc grid search: :func:`posthoc_sweep`, :func:`tau_norm_sweep` score a whole
  grid in one jitted ``vmap`` over logits (or features) collected once;
  :func:`select_on_validation` (host-side) picks the grid point on a *validation* split.

Stage wiring (what a trainer does; REFERENCE.md §3):

* freezing is optax's own partition: ``optax.partition({'trainable': tx, 'frozen':
  optax.set_to_zero()}, param_labels(params, mode))`` (frozen leaves get exactly zero updates
  and keep no optimiser state: ``set_to_zero`` has none and ``partition`` masks them out of
  ``tx``'s state).
* joint stage: plain ``tx`` (mode ``'all'``).
* cRT: ``params = reinit_head(params, key, model, input_shape, train=False)``, then the
  partition with mode ``'head'`` and a class-balanced sampler (``lt_jax.samplers``).
* LWS: build the model with an ``LWSHead`` (``head='lws'``), load the trained linear head via
  ``heads.lws_from_linear(params['head'])``, then the partition with mode ``'lws_scales'``.
* tau-norm / post-hoc LA: collect validation and test logits (or features) once, run
  :func:`tau_norm_sweep` / :func:`posthoc_sweep` on both, choose the index with
  :func:`select_on_validation` on the validation scores, report the test scores at that index.
* Frozen backbone = frozen *parameters* and frozen BatchNorm statistics: call the model with
  ``train=False`` during cRT / LWS (or discard the returned ``batch_stats``); the optimiser
  partition only covers parameters. Computing features under ``jax.lax.stop_gradient`` (or
  once, offline) also saves the backbone backward pass; the partition makes the result
  correct either way.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import optax

from lt_jax import heads, losses, metrics

Array = jax.Array
PyTree = Any

__all__ = [
    "TRAINABLE_MODES", "param_labels", "reinit_head",
    "bbn_alpha", "bbn_div_epoch",
    "bags_groups", "group_softmax_num_outputs", "group_softmax_loss", "group_softmax_logits",
    "group_softmax_predict",
    "posthoc_sweep", "tau_norm_sweep", "select_on_validation", "SELECTION_KEYS",
]

TRAINABLE_MODES = ("all", "head", "lws_scales", "backbone")

_NORM_EPS = 1e-12  # the norm floor of heads.tau_normalize (F.normalize eps)


# =======================================================================================
# Parameter partition for decoupled stages.


def _path_keys(path) -> tuple:
  return tuple(getattr(p, "key", getattr(p, "name", getattr(p, "idx", None))) for p in path)


def _model_keys(path) -> tuple:
  """Path keys with a leading ``'params'`` collection name removed."""
  keys = _path_keys(path)
  return keys[1:] if keys and keys[0] == "params" else keys


def param_labels(params: PyTree, trainable: str) -> PyTree:
  """Label every parameter leaf ``'trainable'`` or ``'frozen'`` for a training stage.

  Decoupled training (Kang et al., "Decoupling Representation and Classifier for
  Long-Tailed Recognition", ICLR 2020): the representation is learnt jointly, then the
  classifier is re-balanced on a frozen backbone (cRT: the whole linear head; LWS: only the
  per-class ``scales`` of :class:`lt_jax.heads.LWSHead`, ``kernel`` and ``bias`` frozen, as
  ``TauNormClassifier.py``). Modes (:data:`TRAINABLE_MODES`):

  * ``'all'``: every leaf trainable (joint / first stage);
  * ``'head'``: only leaves under ``params['head']`` (cRT, BAGS fine-tuning);
  * ``'lws_scales'``: only leaves named ``scales`` under ``params['head']`` (LWS);
  * ``'backbone'``: every leaf *not* under ``params['head']``.

  ``params`` is the ``'params'`` collection, plain (``{'head': ..., ...}``) or wrapped
  (``{'params': {...}}``); the head is the top-level submodule named ``'head'`` (what
  :func:`lt_jax.models.layers.make_head` builds); ``'lws_scales'`` ignores ``scales`` leaves
  outside the head. Pass only parameters, not
  ``batch_stats``.

  Raises:
    ValueError: unknown mode (valid modes listed), no ``'head'`` subtree for a mode that
      needs one, or no ``scales`` leaf under the head for ``'lws_scales'``.
  """
  if trainable not in TRAINABLE_MODES:
    raise ValueError(f"unknown trainable mode {trainable!r}; valid modes: {', '.join(TRAINABLE_MODES)}")
  paths = [_model_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  in_head = [bool(k) and k[0] == "head" for k in paths]
  if trainable != "all" and not any(in_head):
    top = sorted({str(k[0]) for k in paths if k})
    raise ValueError(f"param_labels({trainable!r}) needs a top-level 'head' submodule; "
                     f"top-level keys are {top}")
  if trainable == "lws_scales" and not any(h and k[-1] == "scales" for h, k in zip(in_head, paths)):
    raise ValueError("param_labels('lws_scales') found no 'scales' leaf under params['head']; "
                     "build the model with an LWSHead (head='lws') and load it with heads.lws_from_linear")

  def label(path, _):
    keys = _model_keys(path)
    head = bool(keys) and keys[0] == "head"
    if trainable == "all":
      ok = True
    elif trainable == "head":
      ok = head
    elif trainable == "lws_scales":
      ok = head and keys[-1] == "scales"
    else:  # backbone
      ok = not head
    return "trainable" if ok else "frozen"

  return jax.tree_util.tree_map_with_path(label, params)


def reinit_head(params: PyTree, rng: Array, model: Any, input_shape: Sequence[int],
                *init_args, input_dtype: Any = jnp.float32, **init_kwargs) -> PyTree:
  """cRT: replace ``params['head']`` by a fresh initialisation, keep everything else.

  classifier Re-Training (Kang et al., ICLR 2020): the classifier is re-initialised and
  retrained on the frozen representation with class-balanced sampling. The fresh head is
  ``model.init(rng, zeros(input_shape), *init_args, **init_kwargs)['params']['head']``,
  so it follows the model's own initialisers (e.g. ``CifarResNet``: Kaiming-normal kernel,
  zero bias). Pass the model's call arguments, e.g.
  ``reinit_head(params, key, model, (1, 32, 32, 3), train=False)``. ``params`` is plain or
  wrapped (``{'params': ...}``) and comes back in the same nesting; it is not modified.

  Raises:
    ValueError: ``params`` has no ``'head'``, or the fresh head's structure or shapes differ
      from the current head (a different model or number of classes).
  """
  wrapped = isinstance(params, Mapping) and "params" in params and "head" not in params
  inner = params["params"] if wrapped else params
  if not isinstance(inner, Mapping) or "head" not in inner:
    keys = sorted(inner) if isinstance(inner, Mapping) else type(inner).__name__
    raise ValueError(f"reinit_head: params have no 'head' submodule (keys: {keys})")
  variables = model.init(rng, jnp.zeros(tuple(input_shape), input_dtype), *init_args, **init_kwargs)
  fresh = variables["params"]["head"]
  old_s = jax.tree_util.tree_structure(inner["head"])
  new_s = jax.tree_util.tree_structure(fresh)
  old_shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(inner["head"])]
  new_shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(fresh)]
  if old_s != new_s or old_shapes != new_shapes:
    raise ValueError(f"reinit_head: the model's fresh head {new_s} {new_shapes} does not match "
                     f"params['head'] {old_s} {old_shapes}")
  out = dict(inner)
  out["head"] = fresh
  if wrapped:
    return {**params, "params": out}
  return out


# =======================================================================================
# BBN.


def bbn_div_epoch(max_epoch: int) -> int:
  """The reference's cumulative-learning divisor ``T_div`` for a ``max_epoch``-epoch schedule.

  BBN ``lib/core/combiner.py`` (``initilize_all_parameters``): ``T_div = 100 * (max_epoch // 100
  + 1)`` **only** for ``max_epoch in (90, 180)`` (giving 100 / 200, so ``alpha`` stays above 0 in
  the last epoch), else ``T_div = max_epoch``. lt_jax follows the code, not the simplified
  "always ``100 * (max_epoch // 100 + 1)``" reading (which would give 300 for the 200-epoch
  CIFAR recipe, where the reference divides by 200).
  """
  if not isinstance(max_epoch, numbers.Integral) or max_epoch < 1:
    raise ValueError(f"bbn_div_epoch: max_epoch must be an int >= 1, got {max_epoch!r}")
  return 100 * (int(max_epoch) // 100 + 1) if max_epoch in (90, 180) else int(max_epoch)


def bbn_alpha(epoch: int | Array, max_epoch: int, div_epoch: int | None = None) -> Array:
  """BBN cumulative-learning weight ``alpha = 1 - ((T - 1) / T_div)^2``, float32 scalar.

  Zhou et al., "BBN: Bilateral-Branch Network with Cumulative Learning for Long-Tailed
  Visual Recognition", CVPR 2020 (``lib/core/combiner.py``, REFERENCE.md §3): ``T`` is the
  **1-based** epoch (``T = 1`` gives ``alpha = 1``: only the conventional branch),
  ``T_div = bbn_div_epoch(max_epoch)`` unless ``div_epoch`` is given: the reference's rule,
  100 / 200 for 90 / 180-epoch runs and ``max_epoch`` otherwise (so ``div_epoch=None`` matches
  the reference for every schedule). ``alpha`` weights the
  conventional (uniform-sampler) branch, ``1 - alpha`` the re-balancing (reversed-sampler,
  ``lt_jax.samplers.reversed_probs``) branch. ``epoch`` may be traced; concrete values are
  checked.

  Raises:
    ValueError: ``max_epoch < 1``, ``div_epoch <= 0``, a concrete epoch outside
      ``[1, max_epoch]``, or ``div_epoch < max_epoch - 1`` (``alpha`` would turn negative).
  """
  if not isinstance(max_epoch, numbers.Integral) or max_epoch < 1:
    raise ValueError(f"bbn_alpha: max_epoch must be an int >= 1, got {max_epoch!r}")
  t_div = bbn_div_epoch(max_epoch) if div_epoch is None else div_epoch
  if not t_div > 0:
    raise ValueError(f"bbn_alpha: div_epoch must be > 0, got {div_epoch!r}")
  if t_div < max_epoch - 1:
    raise ValueError(f"bbn_alpha: div_epoch={t_div} < max_epoch - 1 = {max_epoch - 1} makes alpha "
                     f"negative in the last epochs; use div_epoch >= max_epoch - 1 (or None)")
  if isinstance(epoch, numbers.Number) and not 1 <= epoch <= max_epoch:
    raise ValueError(f"bbn_alpha: epoch is 1-based and must lie in [1, {max_epoch}], got {epoch}")
  t = jnp.asarray(epoch, jnp.float32)
  return (1.0 - jnp.square((t - 1.0) / jnp.float32(t_div))).astype(jnp.float32)


def bags_groups(counts: Array, bin_split: Sequence[float] = (10, 100, 1000)) -> np.ndarray:
  """Group id of every class, binned by training-instance count; host-side NumPy ``(C,)`` int32.

  Li et al., "Overcoming Classifier Imbalance for Long-tail Object Detection with Balanced
  Group Softmax", CVPR 2020; eqlv2 ``group_softmax.py`` (REFERENCE.md §3): class ``c`` goes
  to bin ``#{s in bin_split : s <= n_c}`` (``bisect_right``), i.e. ``[0, 10)``,
  ``[10, 100)``, ``[100, 1000)``, ``>= 1000`` for the default split. **Empty bins are
  dropped** and the remaining ones renumbered ``0..G-1`` in increasing count order (the
  reference keeps an empty bin as a group with only its "others" logit, which never has a
  foreground target and only wastes an output). For classification there is no background
  group. The number of groups fixes the head width (:func:`group_softmax_num_outputs`), so
  counts must be concrete.

  Raises:
    ValueError: traced or non 1-D counts, negative counts, or a ``bin_split`` that is not
      strictly increasing.
  """
  try:
    n = np.asarray(counts, np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError("bags_groups needs concrete counts (the number of groups is static)") from e
  if n.ndim != 1 or n.size == 0:
    raise ValueError(f"bags_groups: counts must be a non-empty (C,) vector, got shape {n.shape}")
  if np.any(n < 0):
    raise ValueError(f"bags_groups: counts must be non-negative, got {n}")
  split = np.asarray(bin_split, np.float64).reshape(-1)
  if np.any(np.diff(split) <= 0):
    raise ValueError(f"bags_groups: bin_split must be strictly increasing, got {tuple(bin_split)}")
  bins = np.searchsorted(split, n, side="right")
  _, groups = np.unique(bins, return_inverse=True)
  return groups.astype(np.int32).reshape(-1)


def group_softmax_num_outputs(groups: Array) -> int:
  """Head width ``C + G`` for the group-softmax layout (``G = max(groups) + 1``); host-side."""
  g = np.asarray(groups)
  return int(g.shape[0] + g.max() + 1)


def _group_layout(logits_ext: Array, groups: Array) -> tuple[Array, Array, int, int]:
  z = jnp.asarray(logits_ext, jnp.float32)
  g = jnp.asarray(groups)
  if z.ndim != 2 or g.ndim != 1:
    raise ValueError(f"group softmax expects logits_ext (B, C + G) and groups (C,), got "
                     f"{z.shape} and {g.shape}")
  C = g.shape[0]
  G = z.shape[-1] - C
  if G < 1:
    raise ValueError(f"logits_ext has {z.shape[-1]} outputs but {C} classes: the layout is C class "
                     f"logits then one 'others' logit per group (C + G outputs, G >= 1)")
  try:
    gc = np.asarray(g)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    gc = None
  if gc is not None:
    if not np.issubdtype(gc.dtype, np.integer):
      raise ValueError(f"groups must be integer group ids, got dtype {gc.dtype}")
    if gc.min() < 0 or set(np.unique(gc).tolist()) != set(range(G)):
      raise ValueError(f"groups must use every id 0..{G - 1} (G = outputs - classes = "
                       f"{z.shape[-1]} - {C}); got ids {sorted(set(gc.tolist()))}")
  return z, g.astype(jnp.int32), C, G


def _group_lse(z: Array, g: Array, C: int, G: int) -> Array:
  """``lse[b, k] = log(sum_{c in group k} e^{z_bc} + e^{o_bk})``, ``(B, G)``, via segment ops."""
  seg = jnp.concatenate([g, jnp.arange(G, dtype=jnp.int32)])  # (C + G,)
  m = jax.lax.stop_gradient(jax.ops.segment_max(z.T, seg, num_segments=G))  # (G, B)
  s = jax.ops.segment_sum(jnp.exp(z.T - m[seg]), seg, num_segments=G)
  return (m + jnp.log(s)).T


def group_softmax_logits(logits_ext: Array, groups: Array) -> Array:
  """Class scores ``log p_g(c) = z_c - log(sum_{k in g} e^{z_k} + e^{o_g})``, ``(B, C)``.

  ``p_g(c)`` is the probability of class ``c`` in its own group's softmax (which includes the
  group's "others" logit ``o_g``), the reference's test-time activation (eqlv2
  ``group_softmax.py`` ``get_activation``, Li et al., CVPR 2020) without a background group.
  ``argmax`` of these is the BAGS prediction; ``softmax`` of them is
  :func:`group_softmax_predict`. Use these as logits for metrics and post-hoc sweeps.
  """
  z, g, C, G = _group_layout(logits_ext, groups)
  return z[:, :C] - _group_lse(z, g, C, G)[:, g]


def group_softmax_predict(logits_ext: Array, groups: Array) -> Array:
  """Class probabilities ``(B, C)`` of a group-softmax head (no background group).

  Li et al., CVPR 2020. With ``q_g(c)`` the softmax over the *classes* of group ``g`` only
  and ``p_g(others)`` the group's "others" probability, the reference's activation is
  ``softmax_g(c) (1 - p_g(others)) = q_g(c) (1 - p_g(others)) = p_g(c)`` (the class entry of the
  full group softmax, others included), multiplied by ``p(foreground)`` from the background
  group; for classification there is no background group (``p(foreground) = 1``). The
  per-group scores do not sum to 1 across groups, so **this function renormalises over all
  classes**: ``p(c) = p_g(c) / sum_k p_{g(k)}(k)`` = ``softmax(group_softmax_logits)``. The
  ``argmax`` is the reference's; the renormalisation makes the rows proper distributions
  (for NLL / ECE). A group whose "others" wins gives its classes small weight, as intended.
  """
  return jax.nn.softmax(group_softmax_logits(logits_ext, groups), axis=-1)


def group_softmax_loss(logits_ext: Array, labels: Array, groups: Array, *,
                       others_ratio: float | None = None, key: Array | None = None) -> Array:
  """BAGS group-softmax loss per example, ``(B,)`` float32 (Li et al., CVPR 2020).

  Logit layout of ``logits_ext`` ``(B, C + G)``: columns ``0..C-1`` are the class logits
  ``z_c`` in class-id order, column ``C + g`` is the "others" logit ``o_g`` of group ``g``
  (``groups[c]`` from :func:`bags_groups`; width :func:`group_softmax_num_outputs`). (The
  eqlv2 reference interleaves ``[others_0, group-0 classes, others_1, ...]``; the content is
  the same.) Each group ``g`` has its own softmax over ``{z_c : groups[c] = g} + {o_g}``; for
  an example of class ``y`` the target in group ``groups[y]`` is ``y`` and in every other
  group it is "others"::

      CE_g(i) = log(sum_{c in g} e^{z_c} + e^{o_g}) - (z_y if g = groups[y] else o_g)
      loss_i  = sum_g w_ig CE_g(i) * n_valid / max(sum_i w_ig, 1)

  **Others subsampling** (``others_ratio=beta``, reference ``beta = 8``; default ``None``:
  off, ``w_ig = 1``, which is the natural choice for classification where every group is
  a true partition of the label space): in each group the examples whose target is
  "others" are subsampled uniformly without replacement to ``floor(beta * n_fg_g)``, with
  ``n_fg_g`` the examples of the batch whose class is in ``g`` (all kept if fewer); a group
  with no foreground example in the batch contributes nothing, as in the reference. It
  needs an explicit ``key`` and is vectorised (random ranks, no loop) and jit-safe.

  Normalisation: the reference averages each group's CE over its selected examples and
  sums over groups; the factor ``n_valid / max(sum_i w_ig, 1)`` makes
  ``losses.reduce_mean(loss, mask=valid)`` (or ``jnp.mean`` without padding) equal to that
  exactly. Without subsampling the factor is 1, ``loss_i = sum_g CE_g(i)``. Int labels
  only; a label outside ``[0, C)`` is padding (loss 0, not counted).

  Raises:
    ValueError: soft labels, a layout mismatch, ``others_ratio <= 0``, or subsampling
      without a key.
  """
  z, g, C, G = _group_layout(logits_ext, groups)
  y = jnp.asarray(labels)
  if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"group_softmax_loss needs int labels (batch,), got shape {y.shape} dtype {y.dtype}")
  if others_ratio is not None:
    if not others_ratio > 0:
      raise ValueError(f"others_ratio must be > 0 (reference 8) or None, got {others_ratio}")
    if key is None:
      raise ValueError("group_softmax_loss: others subsampling (others_ratio) needs an explicit "
                       "key=jax.random.key(...)")
  valid = (y >= 0) & (y < C)
  yc = jnp.clip(y, 0, C - 1)
  g_true = g[yc]  # (B,)
  lse = _group_lse(z, g, C, G)  # (B, G)
  is_fg = g_true[:, None] == jnp.arange(G)[None, :]  # (B, G)
  z_y = jnp.take_along_axis(z, yc[:, None], axis=-1)  # (B, 1)
  target = jnp.where(is_fg, z_y, z[:, C:])
  ce = lse - target  # (B, G)
  if others_ratio is None:
    return jnp.sum(ce, axis=-1) * valid.astype(jnp.float32)
  fg = is_fg & valid[:, None]
  bg = (~is_fg) & valid[:, None]
  n_fg = jnp.sum(fg, axis=0)  # (G,)
  n_keep = jnp.floor(n_fg.astype(jnp.float32) * jnp.float32(others_ratio)).astype(jnp.int32)
  u = jnp.where(bg, jax.random.uniform(key, bg.shape), jnp.inf)
  rank = jnp.argsort(jnp.argsort(u, axis=0), axis=0)  # random order of the bg examples first
  w = fg | (bg & (rank < n_keep[None, :]))
  wf = w.astype(jnp.float32)
  n_sel = jnp.sum(wf, axis=0)
  n_valid = jnp.sum(valid.astype(jnp.float32))
  factor = n_valid / jnp.maximum(n_sel, 1.0)
  return jnp.sum(jnp.where(w, ce, 0.0) * factor[None, :], axis=-1)


# =======================================================================================
# Vectorised post-hoc search.


def _grid_map(f: Callable, xs: Any, chunk_size: int | None) -> Any:
  if chunk_size is None:
    return jax.vmap(f)(xs)
  return jax.lax.map(f, xs, batch_size=chunk_size)


def _score(z: Array, labels: Array, mask: Array | None, train_counts: Array | None,
           many: int, few: int) -> dict[str, Array]:
  preds = jnp.argmax(z, axis=-1)
  k = metrics.per_class_counts(labels, preds, z.shape[-1], mask)
  return metrics.summarize(k, train_counts, many=many, few=few)


@functools.partial(jax.jit, static_argnames=("many", "few", "chunk_size", "grid_prior"))
def _posthoc_sweep_jit(logits, labels, prior, taus, target_priors, train_counts, mask, *,
                       many, few, chunk_size, grid_prior):
  def at(tau, tp):
    return _score(heads.posthoc_adjust(logits, prior, tau, tp), labels, mask, train_counts, many, few)

  if not grid_prior:
    out = _grid_map(lambda t: at(t, target_priors), taus, chunk_size)
    out["tau"] = taus
    return out
  T, P = taus.shape[0], target_priors.shape[0]
  tt = jnp.repeat(taus, P)
  pp = jnp.tile(target_priors, (T, 1))
  out = _grid_map(lambda a: at(a[0], a[1]), (tt, pp), chunk_size)
  out["tau"] = tt
  return {k: v.reshape(T, P) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("many", "few", "chunk_size"))
def _tau_norm_sweep_jit(features, kernel, bias, labels, taus, train_counts, mask, *,
                        many, few, chunk_size):
  base = features @ kernel  # (N, C), computed once
  norms = jnp.maximum(heads.weight_norms(kernel), _NORM_EPS)

  def at(tau):
    z = base / jnp.power(norms, tau)
    if bias is not None:
      z = z + bias
    return _score(z, labels, mask, train_counts, many, few)

  out = _grid_map(at, taus, chunk_size)
  out["tau"] = taus
  return out


def _check_eval_inputs(n: int, labels, taus, train_counts, mask, C: int, chunk_size) -> tuple:
  y = jnp.asarray(labels)
  if y.ndim != 1 or y.shape[0] != n or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"labels must be int (N,) with N = {n}, got shape {y.shape} dtype {y.dtype}")
  t = jnp.asarray(taus, jnp.float32)
  if t.ndim != 1 or t.shape[0] < 1:
    raise ValueError(f"taus must be a non-empty 1-D grid, got shape {t.shape}")
  tc = None
  if train_counts is not None:
    tc = jnp.asarray(train_counts)
    if tc.shape != (C,):
      raise ValueError(f"train_counts must have shape ({C},), got {tc.shape}")
  m = None if mask is None else jnp.asarray(mask)
  if m is not None and m.shape != (n,):
    raise ValueError(f"mask must have shape ({n},), got {m.shape}")
  if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
    raise ValueError(f"chunk_size must be None (one vmap) or a positive int, got {chunk_size!r}")
  return y, t, tc, m


def posthoc_sweep(logits: Array, labels: Array, prior: Array, taus: Array,
                  target_priors: Array | None = None, *, train_counts: Array | None = None,
                  many: int = 100, few: int = 20, mask: Array | None = None,
                  chunk_size: int | None = None) -> dict[str, Array]:
  """Score post-hoc logit adjustment on a whole ``tau`` (x target prior) grid in one jitted call.

  Menon et al., "Long-tail learning via logit adjustment", ICLR 2021: every grid point is
  ``argmax(heads.posthoc_adjust(z, prior, tau, target_prior))`` (``z - tau (log pi - log
  pi^t)``; ``tau = 0`` is the unadjusted model). Metrics come from
  :func:`lt_jax.metrics.per_class_counts` + :func:`lt_jax.metrics.summarize` for each grid
  point, evaluated with one ``jax.vmap`` over the grid (``chunk_size``: ``jax.lax.map`` in
  vmapped chunks, bounding memory to ``chunk_size`` copies of the ``(N, C)`` logits).

  Args:
    logits: ``(N, C)`` collected once (validation or test split).
    labels: int ``(N,)``.
    prior: training counts or prior ``(C,)``.
    taus: ``(T,)`` grid, e.g. ``jnp.linspace(0, 2, 21)``.
    target_priors: ``None`` (balanced target), one ``(C,)`` target prior, or a ``(P, C)``
      grid of target counts / priors (then every ``(tau, target)`` pair is scored).
    train_counts: ``(C,)`` training counts; adds ``many_shot`` / ``medium_shot`` /
      ``few_shot`` (:func:`lt_jax.metrics.shot_accuracy`, thresholds ``many`` / ``few``).
    mask: ``(N,)`` validity of each row (padding).
    chunk_size: ``None`` or grid points per vmapped chunk.

  Returns:
    ``{'accuracy', 'balanced_accuracy', 'balanced_error_rate', 'macro_f1'[, 'many_shot',
    'medium_shot', 'few_shot'], 'tau'}``, each float32 of shape ``(T,)`` or ``(T, P)`` for a
    target-prior grid. Pick a point with :func:`select_on_validation` on the validation
    split's scores, then read the test split's scores at that index.
  """
  z = jnp.asarray(logits, jnp.float32)
  if z.ndim != 2:
    raise ValueError(f"logits must be (N, C), got shape {z.shape}")
  N, C = z.shape
  y, t, tc, m = _check_eval_inputs(N, labels, taus, train_counts, mask, C, chunk_size)
  pr = jnp.asarray(prior)
  if pr.shape != (C,):
    raise ValueError(f"prior must have shape ({C},), got {pr.shape}")
  tp = None if target_priors is None else jnp.asarray(target_priors)
  grid_prior = tp is not None and tp.ndim == 2
  if tp is not None and (tp.ndim not in (1, 2) or tp.shape[-1] != C):
    raise ValueError(f"target_priors must be (C,) or (P, C) with C = {C}, got shape {tp.shape}")
  return _posthoc_sweep_jit(z, y, pr, t, tp, tc, m, many=many, few=few, chunk_size=chunk_size,
                            grid_prior=grid_prior)


def tau_norm_sweep(features: Array, kernel: Array, labels: Array, taus: Array, *,
                   bias: Array | None = None, train_counts: Array | None = None,
                   many: int = 100, few: int = 20, mask: Array | None = None,
                   chunk_size: int | None = None) -> dict[str, Array]:
  """Score tau-normalisation on a whole ``tau`` grid in one jitted call.

  Kang et al., ICLR 2020 (``classifier-balancing/tau_norm.py``): the classifier
  ``w_c / ||w_c||^tau`` scores ``z = f @ tau_normalize(W, tau)`` = ``(f @ W) / ||w_c||^tau``,
  so ``f @ W`` is computed once and each grid point only rescales columns (``O(N C)`` per
  point instead of ``O(N D C)``); norms are floored at ``1e-12`` as
  :func:`lt_jax.heads.tau_normalize`, and ``tau = 0`` is exactly ``f @ W``. The bias is
  dropped as in ``tau_norm.py`` unless ``bias`` is given (BagofTricks-LT keeps it, adding it
  unscaled). Reference grid ``jnp.linspace(0, 2, 21)``, chosen on validation features.
  Arguments and returns as :func:`posthoc_sweep` (``features`` ``(N, D)``, ``kernel``
  ``(D, C)``), shapes ``(T,)``.
  """
  f = jnp.asarray(features, jnp.float32)
  k = jnp.asarray(kernel, jnp.float32)
  if f.ndim != 2 or k.ndim != 2 or f.shape[-1] != k.shape[0]:
    raise ValueError(f"features (N, D) and kernel (D, C) expected, got {f.shape} and {k.shape}")
  C = k.shape[-1]
  y, t, tc, m = _check_eval_inputs(f.shape[0], labels, taus, train_counts, mask, C, chunk_size)
  b = None if bias is None else jnp.asarray(bias, jnp.float32)
  if b is not None and b.shape != (C,):
    raise ValueError(f"bias must have shape ({C},), got {b.shape}")
  return _tau_norm_sweep_jit(f, k, b, y, t, tc, m, many=many, few=few, chunk_size=chunk_size)


# Direction of each selectable metric: +1 higher is better, -1 lower is better.
SELECTION_KEYS: dict[str, int] = {
    "balanced_error_rate": -1, "balanced_accuracy": 1, "accuracy": 1, "macro_f1": 1,
    "many_shot": 1, "medium_shot": 1, "few_shot": 1,
}


def select_on_validation(val_scores: Mapping[str, Array], key: str = "balanced_error_rate"
                         ) -> int | tuple[int, int]:
  """Index of the best grid point of a sweep run on a **validation** split; host-side.

  Selection protocol (Kang et al., ICLR 2020 pick tau on val; Menon et al., ICLR 2021 tune on
  held-out data): run :func:`posthoc_sweep` / :func:`tau_norm_sweep` on validation logits,
  call this on those scores, and report the *test* sweep (or a test evaluation) at the
  returned index. Never pass test scores here (that is tuning on test).

  ``key`` must be one of :data:`SELECTION_KEYS` and present in ``val_scores``;
  ``balanced_error_rate`` is minimised, the others maximised. NaN counts as worst. Ties go
  to the smallest ``tau`` (read from ``val_scores['tau']`` when present, else the first
  index), then to the smallest target-prior index.

  Returns:
    an ``int`` for a ``(T,)`` sweep, ``(tau_index, prior_index)`` for a ``(T, P)`` sweep.

  Raises:
    ValueError: unknown or missing key, or every value NaN.
  """
  if key not in SELECTION_KEYS:
    raise ValueError(f"unknown selection key {key!r}; valid keys: {', '.join(SELECTION_KEYS)}")
  if key not in val_scores:
    raise ValueError(f"selection key {key!r} not in the scores (keys: {sorted(val_scores)}); "
                     "shot keys need train_counts in the sweep")
  s = np.asarray(val_scores[key], np.float64)
  if s.ndim not in (1, 2):
    raise ValueError(f"scores must be (T,) or (T, P), got shape {s.shape}")
  if np.all(np.isnan(s)):
    raise ValueError(f"every {key!r} score is NaN (e.g. an empty shot group); choose another key")
  cost = np.where(np.isnan(s), np.inf, -SELECTION_KEYS[key] * s)
  best = np.min(cost)
  cands = np.argwhere(cost == best)  # (n, ndim), row-major order
  taus = np.asarray(val_scores["tau"], np.float64) if "tau" in val_scores else None
  if taus is not None and taus.shape == s.shape:
    order = sorted(range(len(cands)), key=lambda r: (taus[tuple(cands[r])], tuple(cands[r])))
    pick = cands[order[0]]
  else:
    pick = cands[0]
  return int(pick[0]) if s.ndim == 1 else (int(pick[0]), int(pick[1]))

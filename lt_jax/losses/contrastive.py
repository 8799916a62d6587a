"""Contrastive losses for long-tailed learning: NT-Xent (SimCLR), SupCon, BCL and PaCo.

Pure functions of L2-normalised projections, labels and the class counts (or prior), in
float32, jit-, vmap- and grad-safe. Each returns the *per-anchor* loss (the caller takes the
mean, as every reference does); PaCo's queue is explicit state (state in, state out), like
the running statistics of the stateful classification losses. The global batch is one
array, so under ``jit`` over a ``Mesh`` every similarity, class count and queue entry is
over the global batch: the all-gathers the PyTorch references do by hand are implicit.

Layout: ``z`` is ``(V, B, d)``, view-major (the references' ``torch.cat(torch.unbind(
features, dim=1))``), so anchor ``v * B + i`` is view ``v`` of example ``i``; per-anchor
losses come back as ``(V, B)``.

* :func:`supcon_loss` — Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020
  (HobbitLong/SupContrast ``losses.py::SupConLoss``, ``contrast_mode='all'``). Without
  labels it is SimCLR's NT-Xent (:func:`nt_xent_loss`; Chen et al., ICML 2020).
* :func:`balanced_contrastive_loss` — Zhu et al., "Balanced Contrastive Learning for
  Long-Tailed Visual Recognition" (BCL), CVPR 2022 (FlamieZhu/Balanced-Contrastive-Learning
  ``loss/contrastive.py::BalSCL``): class-averaging + class-complement.
* :func:`paco_loss` with :class:`Queue` — Cui et al., "Parametric Contrastive Learning"
  (PaCo), ICCV 2021 (dvlab-research/Parametric-Contrastive-Learning ``PaCo/LT/losses.py::
  PaCoLoss``, ``PaCo/LT/moco/builder.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lt_jax import priors

Array = jax.Array


def _check_views(z: Array) -> tuple[int, int]:
  if z.ndim != 3:
    raise ValueError(f"projections must be (V, B, d) (views first), got shape {z.shape}")
  return z.shape[0], z.shape[1]


def _masked_log_softmax(logits: Array, weights: Array) -> Array:
  """``logits - log(sum_j weights_j exp(logits_j))`` per row over ``weights > 0`` (the maximum is
  taken over those entries only, so a large masked-out self-similarity cannot underflow the sum)."""
  return logits - jax.nn.logsumexp(logits, axis=1, b=weights, keepdims=True, where=weights > 0)


def supcon_loss(z: Array, labels: Array | None = None, temperature: float = 0.07,
                base_temperature: float = 0.07) -> Array:
  """Supervised contrastive loss (SupCon); NT-Xent when ``labels`` is ``None``.

  With the ``N = V B`` anchors ``z_a`` (every view of every example) and
  ``s_ab = z_a . z_b / T``::

      L_a = -(T / T_base) * 1/|P(a)| sum_{p in P(a)} [ s_ap - log sum_{b != a} exp(s_ab) ]

  where ``P(a)`` are the other anchors with the same label (``labels=None``: the other
  views of the same example, SimCLR). An anchor with no positive gets 0 (the reference's
  ``mask_pos_pairs < 1e-6 -> 1``). ``T_base`` is the reference's ``base_temperature``
  (0.07), a loss scale: with ``T = 0.5`` (SimCLR) the loss is multiplied by 7.1.

  Args:
    z: ``(V, B, d)`` L2-normalised projections.
    labels: int ``(B,)`` or ``None``.
  Returns: ``(V, B)`` per-anchor losses (the reference's ``loss.view(V, B).mean()`` is
  their mean).
  """
  V, B = _check_views(z)
  zf = z.reshape(V * B, -1).astype(jnp.float32)
  ids = jnp.arange(B) if labels is None else jnp.asarray(labels)
  ids = jnp.tile(ids, V)
  s = (zf @ zf.T) / temperature
  not_self = 1.0 - jnp.eye(V * B, dtype=jnp.float32)
  pos = (ids[:, None] == ids[None, :]).astype(jnp.float32) * not_self
  log_prob = _masked_log_softmax(s, not_self)
  n_pos = jnp.sum(pos, axis=1)
  mean_pos = jnp.sum(pos * log_prob, axis=1) / jnp.where(n_pos < 1e-6, 1.0, n_pos)
  return (-(temperature / base_temperature) * mean_pos).reshape(V, B)


def nt_xent_loss(z: Array, temperature: float = 0.5, base_temperature: float = 0.07) -> Array:
  """SimCLR's NT-Xent (Chen et al., ICML 2020) as SupContrast computes it: :func:`supcon_loss`
  without labels (the positive of an anchor is the other view of its example)."""
  return supcon_loss(z, None, temperature, base_temperature)


def balanced_contrastive_loss(z: Array, labels: Array, centres: Array, temperature: float = 0.07) -> Array:
  """BCL's balanced supervised contrastive loss (``BalSCL``): class-averaging + class-complement.

  The contrast set is the ``N = V B`` views plus the ``C`` class centres ``c_k``
  (class-complement: every class is present in every batch); only views are anchors. With
  ``t_j`` the label of column ``j`` (centre ``k`` has label ``k``), ``n_k`` the number of
  columns of class ``k`` (views and centres), ``s_aj = z_a . f_j / T`` and ``P(a)`` the
  columns ``j != a`` with ``t_j = y_a``::

      L_a = -1/|P(a)| sum_{p in P(a)} [ s_ap - log sum_{j != a} exp(s_aj) / (n_{t_j} - [t_j = y_a]) ]

  Class-averaging: each exp term is divided by the size of its class in the batch, so
  every class weighs the same in the denominator (the anchor's own class counts itself
  out, the reference's ``per_ins_weight = batch_cls_count[targets] - mask``). No
  temperature rescaling of the loss (the reference has none). ``|P(a)| >= 1`` always
  (the class centre).

  Args:
    z: ``(V, B, d)`` L2-normalised projections of the contrastive views (the reference uses
      V = 2; any V >= 1 follows the same formula).
    labels: int ``(B,)`` in ``[0, C)``.
    centres: ``(C, d)`` L2-normalised class centres (BCL: an MLP over the classifier weights).
  Returns: ``(V, B)`` per-anchor losses.
  """
  V, B = _check_views(z)
  C = centres.shape[0]
  labels = jnp.asarray(labels)
  zf = z.reshape(V * B, -1).astype(jnp.float32)
  feats = jnp.concatenate([zf, centres.astype(jnp.float32)], axis=0)
  targets = jnp.concatenate([jnp.tile(labels, V), jnp.arange(C, dtype=labels.dtype)])
  counts = jnp.zeros((C,), jnp.float32).at[targets].add(1.0)
  s = (zf @ feats.T) / temperature                                   # (N, N + C)
  not_self = 1.0 - jnp.eye(V * B, V * B + C, dtype=jnp.float32)
  pos = (targets[: V * B, None] == targets[None, :]).astype(jnp.float32) * not_self
  weight = counts[targets][None, :] - pos                             # class size, anchor's class minus itself
  log_prob = _masked_log_softmax(s, not_self / weight)
  mean_pos = jnp.sum(pos * log_prob, axis=1) / jnp.sum(pos, axis=1)
  return (-mean_pos).reshape(V, B)


class Queue(NamedTuple):
  """PaCo/MoCo's queue of past keys: ``keys (K, d)``, ``labels (K,)`` int32, ``ptr ()`` int32."""
  keys: Array
  labels: Array
  ptr: Array


def queue_init(key: Array, size: int, dim: int, num_classes: int) -> Queue:
  """The reference's initial queue: ``randn(K, d)`` normalised along dim 0 (``F.normalize(queue,
  dim=0)`` on a ``(K, d)`` buffer normalises each *column*), random labels ``U{0..C-1}``, pointer 0.

  The random entries act as (weak) negatives and, for matching random labels, positives
  until ``K / B`` steps have overwritten them, as in the reference.
  """
  k_keys, k_labels = jax.random.split(key)
  keys = jax.random.normal(k_keys, (size, dim), jnp.float32)
  keys = keys / jnp.maximum(jnp.linalg.norm(keys, axis=0, keepdims=True), 1e-12)
  labels = jax.random.randint(k_labels, (size,), 0, num_classes, jnp.int32)
  return Queue(keys, labels, jnp.zeros((), jnp.int32))


def queue_push(queue: Queue, keys: Array, labels: Array) -> Queue:
  """Replace ``K[ptr : ptr + B]`` by the batch's keys and labels, ``ptr <- (ptr + B) mod K``.

  ``keys`` is the *global* batch (the reference's ``concat_all_gather``); like the
  reference, ``K`` must be a multiple of ``B`` (then a write never wraps).
  """
  K, B = queue.keys.shape[0], keys.shape[0]
  if K % B:
    raise ValueError(f"the queue size K={K} must be a multiple of the global batch size B={B} "
                     "(the reference asserts K % batch_size == 0)")
  new_keys = jax.lax.dynamic_update_slice(queue.keys, keys.astype(queue.keys.dtype), (queue.ptr, 0))
  new_labels = jax.lax.dynamic_update_slice(queue.labels, labels.astype(queue.labels.dtype), (queue.ptr,))
  return Queue(new_keys, new_labels, ((queue.ptr + B) % K).astype(jnp.int32))


def paco_loss(q: Array, k: Array, labels: Array, sup_logits: Array, prior_or_counts: Array, queue: Queue,
              alpha: float = 0.01, beta: float = 1.0, gamma: float = 1.0, temperature: float = 0.05,
              base_temperature: float | None = None, supt: float = 1.0) -> tuple[Array, Queue]:
  """Parametric contrastive loss (PaCo) and the queue after enqueuing this batch's keys.

  The anchors are the queries ``q_i``; the contrast set is the ``C`` parametric class
  centres (the classifier's Balanced-Softmax-adjusted logits) followed by the samples
  ``[q; k; queue]`` (``M = 2B + K``, labels ``[y; y; queue labels]``)::

      l_i = [ (z_i + log pi) / supt ,  q_i . f_j / T ]            (C + M entries)
      w_i = [ 1 (C times) ,  gamma * [j != i] ]                    (denominator weights)
      p_i = [ beta * onehot(y_i) ,  alpha * [t_j = y_i, j != i] ]  (positive weights)
      L_i = -(T / T_base) * sum_j p_ij (l_ij - log(sum_k w_ik exp(l_ik))) / sum_j p_ij

  As the reference, ``l`` is shifted by its row maximum and ``1e-12`` is added inside the
  log (so this is not exactly shift-invariant; it matches ``PaCoLoss`` to float round-off).
  ``T_base`` defaults to ``T`` (the reference's ``base_temperature=None``). The keys ``k``
  come from the momentum encoder: pass them through ``stop_gradient``.

  Convention: ``log pi`` is :func:`lt_jax.priors.log_prior` (the zero-count rule) where the
  reference has ``log(pi + 1e-9)``: equal to float32 round-off for observed classes.

  Args:
    q, k: ``(B, d)`` L2-normalised query and key projections.
    labels: int ``(B,)``; ``sup_logits``: ``(B, C)`` classifier logits of the query view.
    prior_or_counts: ``(C,)`` training counts or prior.
    queue: the state before this batch (:func:`queue_init`).
  Returns: ``((B,) per-anchor losses, queue_push(queue, k, labels))``.
  """
  labels = jnp.asarray(labels)
  B, C = q.shape[0], sup_logits.shape[1]
  base = temperature if base_temperature is None else base_temperature
  feats = jnp.concatenate([q, k, queue.keys], axis=0).astype(jnp.float32)
  targets = jnp.concatenate([labels, labels, queue.labels.astype(labels.dtype)])
  contrast = (q.astype(jnp.float32) @ feats.T) / temperature
  sup = (sup_logits.astype(jnp.float32) + priors.log_prior(prior_or_counts)) / supt
  logits = jnp.concatenate([sup, contrast], axis=1)
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
  not_self = 1.0 - jnp.eye(B, feats.shape[0], dtype=jnp.float32)
  same = (labels[:, None] == targets[None, :]).astype(jnp.float32) * not_self
  pos = jnp.concatenate([beta * jax.nn.one_hot(labels, C, dtype=jnp.float32), alpha * same], axis=1)
  den = jnp.concatenate([jnp.ones((B, C), jnp.float32), gamma * not_self], axis=1)
  log_prob = logits - jnp.log(jnp.sum(jnp.exp(logits) * den, axis=1, keepdims=True) + 1e-12)
  mean_pos = jnp.sum(pos * log_prob, axis=1) / jnp.sum(pos, axis=1)
  return -(temperature / base) * mean_pos, queue_push(queue, jax.lax.stop_gradient(k), labels)

"""Nearest class mean on 'cl2n' features: centred by the training mean, L2-normalised, squared L2
distance (Kang et al., ICLR 2020, classifier-balancing's ``KNNClassifier``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lt_jax import heads
from lt_jax.train.evaluators.classification import result_of_logits
from lt_jax.train.evaluators.common import EvalResult, Evaluator


class NCMEvaluator(Evaluator):
  """No settings: centroids from the whole (un-augmented) training split."""

  def evaluate(self, variables) -> EvalResult:
    outputs = self.ctx.outputs.get(self.ctx, variables)
    (_, f_train), (_, f_test) = outputs("train"), outputs("test")
    train_labels = self.ctx.splits.arrays("train")[1]
    centroids, center = heads.ncm_centroids(jnp.asarray(f_train), train_labels, self.ctx.num_classes)
    logits = heads.ncm_logits(jnp.asarray(f_test), centroids, center)
    res = result_of_logits(self.ctx, np.asarray(logits), self.ctx.splits.arrays("test")[1])
    return EvalResult(res.summary, res.sums, {"feature": "cl2n", "distance": "squared l2",
                                              "centroids": np.asarray(centroids).tolist(),
                                              "center": np.asarray(center).tolist()})

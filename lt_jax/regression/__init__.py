"""Deep imbalanced regression: binning, LDS, FDS, regression losses and shot metrics.

Yang, Zha, Chen, Wang & Katabi, "Delving into Deep Imbalanced Regression", ICML 2021 (DIR), and
Ren, Zhang, Liu & Yi, "Balanced MSE for Imbalanced Visual Regression", CVPR 2022. Behaviour
follows the reference code described in ``../shared/REFERENCE.md`` section 3 ("DIR: LDS",
"DIR: FDS"); every deviation is stated in the function that makes it.

Pieces (all pure ``jax.numpy`` functions unless marked host-side; jit/vmap/grad-safe):

* **Bins**: :func:`make_bins` (host-side edges) and :func:`bin_index` map integer *or float*
  targets to ``B`` bins (the reference only handles integer labels, issue #15); targets outside
  the edges are clipped into the first / last bin (the reference puts ``y >= max_target - 1``
  into the last bin).
* **LDS** (label distribution smoothing): :func:`label_histogram`, :func:`lds_kernel`,
  :func:`smooth_density`, :func:`lds_bin_weights` (a ``(B,)`` weight table) and
  :func:`lds_weights` (per-example weights, mean 1 over the training set).
* **FDS** (feature distribution smoothing): explicit state :class:`FDSState`, per-bin *sums*
  :func:`fds_batch_stats` (accumulate with ``+`` over batches, ``psum`` / a jitted sum over a
  sharded batch across devices), the once-per-epoch :func:`fds_update`, the bin smoother
  :func:`fds_smooth` and the training-time recalibration :func:`fds_calibrate`.
* **Losses**, per example ``(B,)`` float32: :func:`mse`, :func:`l1`, :func:`huber`,
  :func:`focal_r`, :func:`balanced_mse` (BMC) and its GAI / BNI forms :func:`balanced_mse_gai` /
  :func:`balanced_mse_bni` (label density from :func:`fit_gmm` / :func:`bni_buckets`, host-side, once);
  :func:`weighted` is the reference's LDS reduction.
* **Metrics** from per-bin sums: :func:`regression_sums` and :func:`regression_summary`
  (MAE / MSE / geometric mean, overall and many / medium / few-shot by *training* counts).

Conventions: ``pred`` and ``target`` are ``(B,)`` or ``(B, 1)`` (a ``(B, 1)`` vs ``(B,)`` pair is
reconciled instead of broadcasting to ``(B, B)``); dense ``(B, ...)`` targets reduce to one value
per example by a mean over the non-batch axes. A padding row is excluded with ``mask`` (or, for
bin ids, an id outside ``[0, B)``): it contributes nothing to any histogram, sum or statistic.

Trainer wiring (see the functions for the details):

1. LDS: once, before training, ``w_bin = lds_bin_weights(label_histogram(y_train, bins), ...)``;
   in the step, ``w = w_bin[bin_index(y, bins)]`` and ``loss = weighted(per_example, w, mask)``.
2. FDS: keep an :class:`FDSState` (``fds_init``) beside the train state and checkpoint it. In the
   training forward pass, for ``epoch >= start_smooth`` (reference: 1), replace the features by
   ``fds_calibrate(z, bin_ids, state)`` before the regressor; never at evaluation. After each
   epoch ``>= start_update`` (reference: 0), run the training set once more without gradients,
   sum ``fds_batch_stats`` of the *uncalibrated* features over all batches and call
   ``fds_update`` once.
"""

from __future__ import annotations

from lt_jax.regression.bins import make_bins, bin_index, label_histogram
from lt_jax.regression.lds import (
    KERNELS, KERNEL_NORMS, REWEIGHTS, lds_kernel, smooth_density, lds_bin_weights, lds_weights)
from lt_jax.regression.fds import (
    FDSState, FDSSums, fds_init, fds_batch_stats, fds_smooth, fds_update, fds_calibrate)
from lt_jax.regression.losses import (
    FOCAL_KINDS, FOCAL_ACTIVATIONS, mse, l1, huber, focal_r, balanced_mse, weighted, GMM, fit_gmm, bni_buckets,
    balanced_mse_gai, balanced_mse_bni)
from lt_jax.regression.metrics import REGRESSION_KEYS, RegressionSums, regression_sums, regression_summary

__all__ = [
    "KERNELS", "REWEIGHTS", "REGRESSION_KEYS", "make_bins", "bin_index", "label_histogram",
    "lds_kernel", "smooth_density", "lds_bin_weights", "lds_weights", "FDSState", "FDSSums", "fds_init",
    "fds_batch_stats", "fds_smooth", "fds_update", "fds_calibrate", "mse", "l1", "huber", "focal_r",
    "balanced_mse", "weighted", "GMM", "fit_gmm", "bni_buckets", "balanced_mse_gai", "balanced_mse_bni",
    "RegressionSums", "regression_sums", "regression_summary"
]

"""Data: tfds sources, offline Fashion-MNIST preparation, long-tailed subsets, augmentation.

* :mod:`lt_jax.data.prepare`  ``python -m lt_jax.data.prepare NAME`` or ``prepare.prepare(name)``
  (offline Fashion-MNIST, bounded-network CIFAR, manual ImageNet-LT); atomic, idempotent.
* :mod:`lt_jax.data.sources`  ``load_arrays(name, split)`` -> (uint8 NHWC, int32);
  dataset specs and normalisation constants.
* :mod:`lt_jax.data.streaming` host input pipeline for datasets streamed from disk
  (ImageNet-LT, iNat18): sources, exact host samplers, transforms.
* :mod:`lt_jax.data.longtail` ``lt_indices`` (reference CIFAR-LT selection),
  ``make_lt_dataset`` -> :class:`LTDataset`.
* :mod:`lt_jax.data.augment`  ``random_crop_flip``, ``normalize`` (pure JAX, on device).

tensorflow / tensorflow_datasets are imported only when data is actually read or built.
"""

from __future__ import annotations

import importlib

# Lazy re-exports (PEP 562), so `python -m lt_jax.data.prepare` does not import the
# module twice and importing lt_jax.data stays cheap.
_EXPORTS = {
    "normalize": "augment", "random_crop_flip": "augment",
    "LT_DATASETS": "longtail", "LTDataset": "longtail", "balanced_indices": "longtail",
    "lt_indices": "longtail", "make_lt_dataset": "longtail",
    "DataUnavailableError": "prepare", "default_data_dir": "prepare",
    "DATASETS": "sources", "SPECS": "sources", "DatasetSpec": "sources", "get_spec": "sources",
    "load_arrays": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    module = importlib.import_module(f"lt_jax.data.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module 'lt_jax.data' has no attribute {name!r}")

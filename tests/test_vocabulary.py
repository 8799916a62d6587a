"""One vocabulary per kind: every name (and default) accepted in one place is accepted, with the
same default, everywhere else — config variants, command-line fields, validation, the registries,
the on-device step and the host pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar_lt, fashion_mnist_dir, fashion_mnist_lt
from lt_jax import losses, models, regression, samplers
from lt_jax.data import host_samplers, sources
from lt_jax.models import layers
from lt_jax.train import config as cfg, evaluators, regression_trainer, steps


@pytest.mark.parametrize("name", losses.LOSSES)
def test_every_registry_loss_is_a_variant_with_the_registry_defaults(name):
  c = fashion_mnist_lt.get_config(f"loss={name}")           # the variant ...
  d = fashion_mnist_lt.get_config()
  d.loss.name, d.loss.hparams = name, losses.default_hparams(name)  # ... == --config.loss.name=<name>
  if name in losses.EXPERT_LOSSES:  # multi-expert losses also need the multi-expert model the variant sets
    d.model = c.model
  assert c.loss.name == d.loss.name == name
  assert c.loss.hparams.to_dict() == losses.default_hparams(name)
  cfg.validate(c)
  cfg.validate(d)
  # The config's hparams build the same loss as the registry's own defaults.
  z = jax.random.normal(jax.random.key(1), (6, 3, 10) if name in losses.EXPERT_LOSSES else (6, 10))
  y = jnp.array([0, 1, 2, 9, 9, 5])
  counts = jnp.asarray([500., 300, 200, 120, 80, 50, 30, 20, 10, 5])
  a, b = losses.make_loss(name), losses.make_loss(name, **c.loss.hparams.to_dict())
  np.testing.assert_array_equal(a.apply(z, y, counts, a.init(10))[0], b.apply(z, y, counts, b.init(10))[0])


def test_aliases_and_recipes_resolve_to_registry_losses():
  for alias, name in cfg.LOSS_ALIASES.items():
    assert name in losses.LOSSES and fashion_mnist_lt.get_config(f"loss={alias}").loss.name == name
  for recipe in cfg.LOSS_RECIPES:
    c = fashion_mnist_lt.get_config(f"loss={recipe}")
    assert c.loss.name in losses.LOSSES
    cfg.validate(c)
  assert fashion_mnist_lt.get_config("loss=cb_focal").loss.hparams.gamma == 0.5 == losses.default_hparams(
      "cb_focal")["gamma"]  # was 0.5 in the config and 2.0 in the registry


def test_one_sampler_vocabulary_on_device_and_on_the_host():
  assert cfg.SAMPLERS == samplers.SAMPLERS
  for alias, name in cfg.SAMPLER_ALIASES.items():
    assert fashion_mnist_lt.get_config(f"sampler={alias}").sampler.name == name
  labels = np.repeat(np.arange(4), [40, 20, 10, 5])
  data = steps.TrainData(images=None, labels=jnp.asarray(labels), index=samplers.build_index(labels, 4))
  counts = jnp.asarray(np.bincount(labels), jnp.float32)
  for name in samplers.SAMPLERS:
    c = fashion_mnist_lt.get_config(f"sampler={name}")
    cfg.validate(c)
    sc = steps.StepConfig(batch_size=8, steps_per_epoch=9, num_epochs=2, sampler=name, k_per_class=2, crop_pad=0,
                          flip=False, mean=(0.,), std=(1.,))
    idx = steps.batch_indices(jax.random.key(0), jnp.int32(3), data, counts, sc)
    hs = host_samplers.HostSampler(labels, 4, 8, sampler=name, seed=0, num_epochs=2, steps_per_epoch=9, k_per_class=2)
    assert idx.shape == hs.indices(3).shape == (8,)
  with pytest.raises(ValueError, match="valid choices: instance, class_balanced"):
    c = fashion_mnist_lt.get_config()
    c.sampler.name = "nope"
    cfg.validate(c)


def test_models_heads_datasets_evaluators_and_dir_names_agree():
  assert cfg.MODELS == models.MODELS and cfg.HEADS == layers.HEADS
  assert set(cfg.DATASETS) == set(sources.IN_MEMORY_DATASETS)
  assert set(cfg.BBN_MODELS) <= set(models.MODELS)
  assert set(cfg.EVAL_STAGES) <= set(evaluators.EVALUATORS) and set(cfg.EVAL_STAGES) == set(evaluators.NEEDS_MEMORY)
  c = fashion_mnist_lt.get_config()
  for name in cfg.EVAL_STAGES:  # each stage's config settings are that evaluator's keyword arguments
    import inspect
    params = inspect.signature(evaluators.EVALUATORS[name].__init__).parameters
    assert set(c.stage[name].keys()) <= set(params), name
  for kind in ("classification",):
    assert c.evals.test.type == kind
  d = fashion_mnist_dir.get_config()
  for name in cfg.DIR_LOSSES:  # every DIR loss name builds a loss function
    d.loss.name = name
    cfg.validate_regression(d)
    y = np.linspace(0.0, 89.0, 50)  # GAI / BNI integrate over the training labels' density
    edges = np.arange(91.0)
    prior = regression_trainer.label_prior(d, y, np.histogram(y, edges)[0], edges)
    fn = regression_trainer.make_loss(d.loss, prior)
    assert fn(jnp.zeros((4,)), jnp.arange(4.0), {}).shape == (4,)
  for method in cfg.DIR_METHODS:
    fashion_mnist_dir.get_config(f"method={method}")
  assert set(regression.KERNELS) >= {d.lds.kernel, d.fds.kernel}


def test_bad_evaluator_entries_are_rejected():
  import ml_collections
  c = fashion_mnist_lt.get_config()
  c.evals.x = ml_collections.ConfigDict(dict(type="nope"))
  with pytest.raises(cfg.ConfigError, match="unknown evals.x.type 'nope'; valid choices: classification, tau_norm"):
    cfg.validate(c)
  c = fashion_mnist_lt.get_config()
  c.evals.x = ml_collections.ConfigDict(dict(type="classification", split="val"))
  with pytest.raises(cfg.ConfigError, match="evals.x reads the validation split: set dataset.val_per_class"):
    cfg.validate(c)
  c = cifar_lt.get_config()
  c.evals.test.split = "holdout"
  with pytest.raises(cfg.ConfigError, match="valid choices: train, val, test"):
    cfg.validate(c)

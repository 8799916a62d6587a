"""The train state pytree and the device mesh it lives on."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one explicit pytree.

  ``rng`` holds raw key data (``jax.random.key_data``) so that checkpoints store plain
  uint32 arrays; the step's key is ``fold_in(wrap_key_data(rng), step)``.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  loss_state: Any
  rng: jax.Array


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ``('data',)`` mesh over the first ``num_devices`` global devices (0: all)."""
  from lt_jax.train.config import ConfigError  # a user setting: one clear line in launch.py
  devices = jax.devices()
  if not isinstance(num_devices, int) or num_devices < 0:
    raise ConfigError(f"num_devices must be 0 (all) or a positive number of devices, got {num_devices!r}")
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f"num_devices={num_devices}, but only {len(devices)} devices are available")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places a host array (identical on every process) as a global array with ``sharding``.

  Works single- and multi-process: each process provides the shards its devices hold.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def create_state(model, tx, loss, num_classes: int, input_shape: tuple[int, ...], seed: int,
                 mesh: Mesh, variables: Any = None) -> TrainState:
  """Builds the initial state shape-first (``eval_shape``), then ``jit(init)`` replicated.

  ``variables`` (``{'params', 'batch_stats'}``, e.g. a trained model for a decoupled
  stage) replaces the model's fresh initialisation; the optimiser state is always fresh.
  """
  def init(variables) -> TrainState:
    return init_state(model, tx, loss, num_classes, input_shape, seed, variables)
  abstract = jax.eval_shape(init, variables)
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(variables)


def init_state(model, tx, loss, num_classes: int, input_shape: tuple[int, ...], seed, variables: Any = None
               ) -> TrainState:
  """The initial state of ``seed`` (a Python int, or traced: a population vmaps this over its seeds)."""
  key = jax.random.key(seed)
  init_key, rng = jax.random.split(key)
  if variables is None:
    variables = model.init(init_key, jnp.zeros((2, *input_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    loss_state=loss.init(num_classes), rng=jax.random.key_data(rng))

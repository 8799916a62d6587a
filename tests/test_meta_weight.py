"""Meta-Weight-Net (Shu et al., NeurIPS 2019): the meta-gradient against finite differences of a
NumPy float64 re-derivation, the real step against a plain step, and exact resume of a run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from lt_jax import losses, meta_weight as mw
from lt_jax.models import get_model
from lt_jax.train import config as config_lib, optim, steps, trainer
from lt_jax.train.state import create_state, make_mesh, put_global, replicated
from test_train import MOCK_EXAMPLES, tiny_config

# ------------------------------------------------------------------ a tiny linear softmax model in NumPy


def np_vnet(phi, l):
  """VNet(ℓ) and dVNet/dℓ in float64 (kernel (1, H), bias (H,), kernel (H, 1), bias (1,))."""
  w1, b1 = phi["Dense_0"]["kernel"][0], phi["Dense_0"]["bias"]
  w2, b2 = phi["Dense_1"]["kernel"][:, 0], phi["Dense_1"]["bias"][0]
  pre = l[:, None] * w1[None] + b1[None]
  a = np.maximum(pre, 0) @ w2 + b2
  v = 1 / (1 + np.exp(-a))
  dv = v * (1 - v) * ((pre > 0) * w1[None] * w2[None]).sum(1)
  return v, dv


def np_softmax_ce(w, b, X, y):
  z = X @ w + b
  z = z - z.max(1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  return -np.log(p[np.arange(len(y)), y]), p


def np_meta_objective(phi, w, b, X, y, Xm, ym, lr):
  """CE_meta(θ − lr ∇_θ Σ ℓ_i V(ℓ_i)/Σ V), the gradient derived by hand (weights depend on ℓ)."""
  l, p = np_softmax_ce(w, b, X, y)
  v, dv = np_vnet(phi, l)
  S, T = v.sum(), (l * v).sum()
  c = v / S + l * dv / S - T * dv / S ** 2          # ∂(Σ ℓ v / Σ v)/∂ℓ_i
  r = p.copy()
  r[np.arange(len(y)), y] -= 1                       # ∂ℓ_i/∂z_i
  gw, gb = X.T @ (c[:, None] * r), (c[:, None] * r).sum(0)
  return np_softmax_ce(w - lr * gw, b - lr * gb, Xm, ym)[0].mean()


@pytest.fixture(scope="module")
def tiny_problem():
  rng = np.random.default_rng(0)
  X, y = rng.normal(size=(12, 5)), rng.integers(0, 3, 12)
  Xm, ym = rng.normal(size=(6, 5)), np.arange(6) % 3
  w, b = 0.7 * rng.normal(size=(5, 3)), 0.1 * rng.normal(size=3)
  phi = jax.device_get(mw.init_vnet(jax.random.key(1), 8))
  return X, y, Xm, ym, w, b, phi


def _jax_fns(X, y, Xm, ym):
  def ce(p, A, t):
    z = jnp.asarray(A, jnp.float32) @ p["w"] + p["b"]
    return losses.softmax_cross_entropy(z, jnp.asarray(t))
  return (lambda p: ce(p, X, y)), (lambda p: jnp.mean(ce(p, Xm, ym)))


def test_meta_gradient_against_finite_differences(tiny_problem):
  X, y, Xm, ym, w, b, phi = tiny_problem
  lr = 0.5
  per_example, meta_loss = _jax_fns(X, y, Xm, ym)
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  tx = optax.sgd(0.0)
  out = jax.jit(lambda p, f: mw.meta_weight_grads(lambda q: (per_example(q), ()), meta_loss, p, f, tx.init(f),
                                                  tx, lr))(params, phi)
  value, definition = jax.jit(lambda p, f: mw.meta_gradient(per_example, meta_loss, p, f, lr))(params, phi)
  phi64 = jax.tree.map(lambda a: np.asarray(a, np.float64), phi)
  want = np_meta_objective(phi64["params"], w, b, X, y, Xm, ym, lr)
  assert float(out.meta_loss) == pytest.approx(want, rel=1e-5) and float(value) == pytest.approx(want, rel=1e-5)
  leaves, treedef = jax.tree.flatten(phi64)
  fd, h = [], 1e-6
  for i, leaf in enumerate(leaves):   # central differences over every VNet parameter
    g = np.zeros_like(leaf)
    for j in np.ndindex(leaf.shape):
      def at(d):
        moved = [x.copy() for x in leaves]
        moved[i][j] += d
        return np_meta_objective(jax.tree.unflatten(treedef, moved)["params"], w, b, X, y, Xm, ym, lr)
      g[j] = (at(h) - at(-h)) / (2 * h)
    fd.append(g)
  fd = jax.tree.unflatten(treedef, fd)
  scale = max(np.max(np.abs(a)) for a in jax.tree.leaves(fd))
  assert scale > 1e-4  # a meta-gradient worth checking
  for got in (out.vnet_grads, definition):
    for a, g in zip(jax.tree.leaves(got), jax.tree.leaves(fd)):
      np.testing.assert_allclose(np.asarray(a, np.float64), g, rtol=2e-3, atol=2e-5 * scale)
  # The real step's gradient: Σ_i w_i ∇ℓ_i with the normalised weights of the updated VNet (here φ' = φ).
  v, _ = np_vnet(phi64["params"], np_softmax_ce(w, b, X, y)[0])
  np.testing.assert_allclose(np.asarray(out.weights), v / v.sum(), rtol=1e-5)
  _, p = np_softmax_ce(w, b, X, y)
  r = p.copy()
  r[np.arange(len(y)), y] -= 1
  np.testing.assert_allclose(np.asarray(out.grads["w"]), X.T @ ((v / v.sum())[:, None] * r), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the train step


def _step_setup(seed=0):
  rng = np.random.default_rng(seed)
  n, c = 48, 3
  images = rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(c), [30, 12, 6]).astype(np.int32)
  mesh = make_mesh(1)
  rep = replicated(mesh)
  from lt_jax import samplers
  data = steps.TrainData(put_global(images, rep), put_global(labels, rep),
                         jax.device_put(samplers.build_index(labels, c), rep))
  meta = steps.MetaData(put_global(images[::4], rep), put_global(labels[::4], rep))
  sc = steps.StepConfig(batch_size=8, steps_per_epoch=6, num_epochs=2, sampler="instance", k_per_class=1,
                        crop_pad=1, flip=True, mean=(0.5,), std=(0.25,), num_classes=c)
  model = get_model("cnn", num_classes=c, widths=(4, 8), feature_dim=8)
  o = tiny_config().optim
  o.lr, o.weight_decay, o.nesterov, o.warmup_epochs, o.decay_epochs = 0.1, 5e-4, True, 0.0, ()
  schedule = optim.make_schedule(o, 6, 2)
  tx = optim.make_optimizer(o, schedule)
  loss = losses.make_loss("ce")
  counts = jnp.asarray(np.bincount(labels).astype(np.float32))
  return model, tx, loss, schedule, counts, sc, mesh, data, meta, c


def _copy(tree):  # the steps donate their state
  return jax.tree.map(lambda a: a.copy(), tree)


def _mw_state(st, mesh, vnet, vnet_tx):
  vnet = jax.device_put(vnet, replicated(mesh))
  opt = jax.device_put(vnet_tx.init(vnet), replicated(mesh))
  return steps.MetaWeightState(step=st.step, params=st.params, batch_stats=st.batch_stats, opt_state=st.opt_state,
                               loss_state=st.loss_state, rng=st.rng, vnet_params=vnet, vnet_opt_state=opt)


def test_real_step_equals_plain_step_when_the_weights_are_equal():
  model, tx, loss, schedule, counts, sc, mesh, data, meta, c = _step_setup()
  vnet_tx = optim.make_optimizer(config_lib.base_config().meta_weight.optim, optax.constant_schedule(1e-5))
  plain = steps.make_train_step(model, tx, loss, schedule, counts, sc, mesh)
  mwstep = steps.make_meta_weight_step(model, tx, vnet_tx, loss, schedule, counts, sc, mesh, 8)
  vnet = jax.device_get(mw.init_vnet(jax.random.key(3), 100))  # host copy: the steps donate theirs
  # W1 = 0, b1 < 0: every hidden unit is off, V(ℓ) = sigmoid(b2) for every example (and stays so).
  flat = {"params": {"Dense_0": {"kernel": jnp.zeros((1, 100)), "bias": -jnp.ones((100,))},
                     "Dense_1": vnet["params"]["Dense_1"]}}
  init = create_state(model, tx, loss, c, (8, 8, 1), 0, mesh)
  ref, mws = _copy(init), _mw_state(_copy(init), mesh, flat, vnet_tx)
  for _ in range(3):
    ref, m_ref = plain(ref, data)
    mws, m_mw = mwstep(mws, data, meta)
    assert float(m_mw["weight_cv"]) < 1e-6  # equal up to float32 rounding of V / ΣV
    assert float(m_mw["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-6)
  for part in ("params", "batch_stats", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(ref, part)), jax.tree.leaves(getattr(mws, part))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7, err_msg=part)
  # A VNet that discriminates gives unequal weights and a different step (the check above can fail).
  other, m_other = mwstep(_mw_state(_copy(init), mesh, vnet, vnet_tx), data, meta)
  ref2, _ = plain(init, data)
  assert float(m_other["weight_cv"]) > 1e-3
  assert not np.allclose(np.asarray(other.params["head"]["kernel"]), np.asarray(ref2.params["head"]["kernel"]),
                         rtol=1e-5, atol=1e-7)
  assert not jax.tree.all(jax.tree.map(np.array_equal, other.vnet_params, vnet))  # the VNet learnt


# ------------------------------------------------------------------ end to end: a resumed run is exact


def test_mwnet_run_resumes_exactly_and_config_errors(tmp_path):
  def config(max_steps):
    c = tiny_config(max_steps=max_steps)
    c.meta_weight.enabled = True
    c.dataset.val_per_class = 4
    return c
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    full = trainer.train_and_evaluate(config(6), str(tmp_path / "full"))
    trainer.train_and_evaluate(config(3), str(tmp_path / "resumed"))
    resumed = trainer.train_and_evaluate(config(6), str(tmp_path / "resumed"))
  assert resumed["step"] == full["step"] == 6
  a, b = full["state"], resumed["state"]
  assert isinstance(a, steps.MetaWeightState)
  for part in ("params", "batch_stats", "opt_state", "vnet_params", "vnet_opt_state"):
    for x, y in zip(jax.tree.leaves(jax.device_get(getattr(a, part))), jax.tree.leaves(jax.device_get(getattr(b, part)))):
      np.testing.assert_array_equal(x, y, err_msg=part)
  init = mw.init_vnet(jax.random.fold_in(jax.random.key(0), 2000), 100)
  assert not jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(a.vnet_params), jax.device_get(init)))
  for mutate, message in [
      (lambda c: setattr(c.dataset, "val_per_class", 0), "meta set, the validation split"),
      (lambda c: setattr(c.mix, "name", "mixup"), "cannot be combined with mix"),
      (lambda c: setattr(c.meta_weight, "hidden", 0), "meta_weight.hidden must be"),
      (lambda c: setattr(c.meta_weight.optim, "lr", -1.0), "meta_weight.optim.lr must be")]:
    c = config(6)
    mutate(c)
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(c)

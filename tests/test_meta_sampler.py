"""BALMS Meta Sampler: the grouped Gumbel-softmax equals the reference's N-way one, the meta-gradient
through one functional optimiser step against finite differences, and the real step is a plain step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lt_jax import decoupled, losses
from lt_jax import meta_sampler as M
from lt_jax.models import layers
from lt_jax.train import feature_stages as fs
from lt_jax.train import steps
from lt_jax.train.state import TrainState, make_mesh

COUNTS = np.array([9, 5, 0, 3, 6])
C = len(COUNTS)
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(C), COUNTS)).astype(np.int32)
N = len(LABELS)


def test_init_logits_hand_worked():
  np.testing.assert_array_equal(M.init_logits(COUNTS), np.zeros(C))            # init_pow 0: sigmoid 1/2
  q = 1 / (np.array([100.0, 10.0, 1.0]) / 111)                                   # init_pow 1: 1/pi
  q = q / (q.min() + q.max())
  np.testing.assert_allclose(jax.nn.sigmoid(M.init_logits([100, 10, 1], 1.0)), q, rtol=1e-5)
  np.testing.assert_allclose(M.sampling_probs(jnp.zeros(3), [100, 10, 1]), np.array([100, 10, 1]) / 111, rtol=1e-6)


def test_grouped_gumbel_softmax_equals_the_reference_n_way_softmax():
  """Hard draws and the soft probability (and its gradient) of the drawn example equal the
  reference's softmax over all N examples (NumPy float64 on the same Gumbel noise)."""
  phi = jnp.asarray([0.3, -1.2, 0.0, 2.0, 0.7], jnp.float32)
  key, B = jax.random.key(3), 7
  d = jax.jit(M.gumbel_draws, static_argnames="num")(key, phi, LABELS, B)
  g = np.asarray(jax.random.gumbel(key, (B, N), jnp.float32), np.float64)       # the draws' noise
  a = np.log(1 / (1 + np.exp(-np.asarray(phi, np.float64))))
  logits = a[LABELS][None, :] + g
  soft = np.exp(logits - logits.max(1, keepdims=True))
  soft /= soft.sum(1, keepdims=True)
  idx = logits.argmax(1)
  np.testing.assert_array_equal(d.indices, idx)
  y_drawn = LABELS[idx]
  p = M.soft_probability(phi, d, jnp.asarray(y_drawn))
  np.testing.assert_allclose(p, soft[np.arange(B), idx], rtol=1e-5)
  # d/dphi_c sum_b c_b p_b, with dp_{b,i_b}/da_j = p (delta_{j i_b} - soft_{b j}) and da/dphi = 1 - sigmoid
  coef = np.linspace(-1, 2, B)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(jnp.asarray(coef, jnp.float32) * M.soft_probability(f, d, y_drawn))))(phi)
  ps = soft[np.arange(B), idx]
  da = coef[:, None] * ps[:, None] * (np.eye(N)[idx] - soft)                      # (B, N)
  expect = np.array([da[:, LABELS == c].sum() for c in range(C)]) * (1 - 1 / (1 + np.exp(-np.asarray(phi))))
  np.testing.assert_allclose(grad, expect, rtol=1e-4, atol=1e-7)
  w = M.straight_through_weights(phi, d, y_drawn)
  np.testing.assert_array_equal(w, np.ones(B, np.float32))                      # exactly 1 in value
  # equal logits: the draw is the argmax of the noise alone (uniform over examples)
  np.testing.assert_array_equal(M.gumbel_draws(key, jnp.full((C,), 0.4), LABELS, B).indices, g.argmax(1))


def test_meta_gradient_matches_finite_differences():
  """float64: d meta_loss(theta'(phi)) / d phi through SGD + momentum + weight decay (a partition with a
  frozen leaf, the stage's optimiser), against central differences of the same function with the
  straight-through weights replaced by their value function 1 + p(phi) - p(phi_0)."""
  with jax.enable_x64(True):
    r = np.random.default_rng(1)
    D, B, MB = 3, 6, 5
    feats = jnp.asarray(r.normal(size=(N, D)))
    params = {"fc": jnp.asarray(r.normal(size=(2, 2))),
              "head": {"kernel": jnp.asarray(r.normal(size=(D, C))), "bias": jnp.asarray(r.normal(size=C))}}
    labels_tree = decoupled.param_labels(params, "head")
    tx = optax.partition({"trainable": optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.3, momentum=0.9)),
                          "frozen": optax.set_to_zero()}, labels_tree)
    opt_state = tx.init(params)
    warm = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape)), params)  # a non-zero momentum buffer
    _, opt_state = tx.update(warm, opt_state, params)
    phi0 = jnp.asarray(r.normal(size=C))
    d = M.gumbel_draws(jax.random.key(5), phi0, LABELS, B)
    d = M.GumbelDraws(d.indices, d.noise.astype(jnp.float64), d.class_lse.astype(jnp.float64))
    x, y = feats[d.indices], jnp.asarray(LABELS)[d.indices]
    meta_idx = np.array([0, 9, 14, 17, 22])[:MB]
    mx, my = feats[meta_idx], jnp.asarray(LABELS)[meta_idx]
    head = lambda p, f: f @ p["head"]["kernel"] + p["head"]["bias"]
    counts = jnp.asarray(np.maximum(COUNTS, 1), jnp.float64)

    def train_loss(p, w):  # Balanced Softmax in float64 (lt_jax's losses compute in float32)
      z = head(p, x) + jnp.log(counts)
      return jnp.mean(w * (jax.nn.logsumexp(z, 1) - z[jnp.arange(B), y]))

    def meta_loss(p):
      z = head(p, mx)
      return jnp.mean(jax.nn.logsumexp(z, 1) - z[jnp.arange(MB), my])

    value, grad = jax.jit(lambda f: M.meta_gradient(f, params, opt_state, tx, train_loss, meta_loss,
                                                    lambda ff: M.straight_through_weights(ff, d, y)))(phi0)
    p0 = M.soft_probability(phi0, d, y)

    @jax.jit
    @jax.vmap
    def F(f):  # the value function whose derivative at phi0 is the straight-through meta-gradient
      g = jax.grad(train_loss)(params, 1.0 + M.soft_probability(f, d, y) - p0)
      u, _ = tx.update(g, opt_state, params)
      return meta_loss(optax.apply_updates(params, u))

    h = 1e-6
    shifts = jnp.concatenate([jnp.zeros((1, C)), h * jnp.eye(C), -h * jnp.eye(C)])
    vals = np.asarray(F(phi0[None, :] + shifts))
    np.testing.assert_allclose(value, vals[0], rtol=1e-12)
    fd = (vals[1:C + 1] - vals[C + 1:]) / (2 * h)
    assert np.abs(fd).max() > 1e-4                                    # a real signal
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-9)
    assert grad[2] == 0.0                                              # the empty class


def test_real_step_is_a_plain_step_on_the_drawn_batch():
  """The meta step's classifier update equals a plain Balanced-Softmax step on the same drawn batch,
  bit for bit, for any sampler logits; the sampler logits move (Adam) and nothing else does."""
  head = layers.make_head("linear", C, name=None)        # what feature_stages.standalone_head builds
  r = np.random.default_rng(2)
  variables = {"params": {"conv1": {"kernel": jnp.asarray(r.normal(size=(3, 3)), jnp.float32)},
                          "head": head.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]}, "batch_stats": {}}
  data = fs.feature_data(r.normal(size=(N, 6)).astype(np.float32), LABELS, C, make_mesh(1))
  labels_tree = decoupled.param_labels(variables["params"], "head")
  tx = optax.partition({"trainable": optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)),
                        "frozen": optax.set_to_zero()}, labels_tree)
  sc = steps.StepConfig(batch_size=4, steps_per_epoch=5, num_epochs=1, sampler="instance", k_per_class=2, crop_pad=0,
                        flip=False, mean=(0.0,), std=(1.0,), num_classes=C, bn_train=False)
  counts = jnp.asarray(COUNTS, jnp.float32)
  base = losses.make_loss("balanced_softmax")
  meta_tx = optax.adam(0.01)
  loss = fs.meta_sampler_loss(base, COUNTS, meta_tx)
  step = fs.make_meta_sampler_step(head, tx, base, meta_tx, optax.constant_schedule(0.1), counts, sc, make_mesh(1),
                                   meta_batch_size=4)
  rng = jax.random.key_data(jax.random.key(9))
  plain = jax.jit(lambda p, o, x, y: fs.classifier_update(head, tx, lambda z, yy: base.apply(z, yy, counts, ())[0],
                                                          p, o, x, y))
  for phi in (jnp.zeros(C), jnp.asarray([1.0, -0.5, 0.0, 2.0, -1.0])):
    state = TrainState(step=jnp.int32(3), params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=tx.init(variables["params"]), loss_state=M.MetaSamplerState(phi, meta_tx.init(phi)),
                       rng=rng)
    expect_draws = M.gumbel_draws(jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), 4), 3),
                                  phi, data.labels, 4)
    x, y = data.images[expect_draws.indices], data.labels[expect_draws.indices]
    _, _, _, params, opt_state = plain(state.params, state.opt_state, x, y)
    new, m = step(jax.tree.map(jnp.array, state), data)
    jax.tree.map(np.testing.assert_array_equal, new.params, params)
    jax.tree.map(np.testing.assert_array_equal, new.opt_state, opt_state)
    np.testing.assert_array_equal(new.params["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])  # frozen
    assert int(new.step) == 4 and np.isfinite(float(m["meta_loss"])) and float(m["meta_grad_norm"]) > 0
    moved = np.asarray(new.loss_state.logits) - np.asarray(phi)
    assert np.abs(moved).max() == pytest.approx(0.01, rel=1e-3)          # Adam's first step: lr * sign
    assert loss.init(C).logits.shape == (C,)

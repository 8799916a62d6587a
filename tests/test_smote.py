"""SMOTE in feature space against imbalanced-learn (a test-only dependency) on the same features."""

import jax
import numpy as np
import pytest

from lt_jax import smote as S

imblearn = pytest.importorskip("imblearn")
from imblearn.over_sampling import SMOTE  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

COUNTS = np.array([40, 23, 11, 7, 0, 30])
C = len(COUNTS)


def _data(seed=0, dim=6):
  r = np.random.default_rng(seed)
  y = r.permutation(np.repeat(np.arange(C), COUNTS))
  x = (r.normal(size=(len(y), dim)) + 3 * y[:, None] * (np.arange(dim) == 0)).astype(np.float32)
  return x, y


def test_neighbour_sets_equal_imbalanced_learns():
  x, y = _data(1)
  for c in (0, 2, 3):
    xc = x[y == c]
    ref = NearestNeighbors(n_neighbors=6).fit(xc).kneighbors(xc, return_distance=False)[:, 1:]
    np.testing.assert_array_equal(S.smote_neighbours(xc, 5), ref)   # the same order: nearest first
  # blocks smaller than the class give the same neighbours
  np.testing.assert_array_equal(S.smote_neighbours(x[y == 0], 5, chunk=8), S.smote_neighbours(x[y == 0], 5))
  # a class of k points or fewer uses its n - 1 other points
  assert S.smote_neighbours(x[y == 3][:4], 5).shape == (4, 3)


@pytest.mark.parametrize("strategy", [s for s in S.SAMPLING_STRATEGIES if s != "none"])
def test_synthetic_points_equal_imbalanced_learns_for_the_same_random_choice(strategy):
  """imbalanced-learn draws (r, u) from RandomState(seed) afresh for every class; feed the same
  draws to smote_generate with lt_jax's neighbours and compare every synthetic point."""
  x, y = _data(2)
  present = COUNTS > 0
  seed = 7
  sm = SMOTE(sampling_strategy=strategy, k_neighbors=5, random_state=seed)
  x_res, y_res = sm.fit_resample(x, y)
  extra = S.smote_counts(COUNTS, strategy)
  ref_extra = np.bincount(y_res, minlength=C) - COUNTS
  np.testing.assert_array_equal(extra, ref_extra)                     # the sampling strategy
  assert (np.bincount(y_res, minlength=C)[extra > 0] == COUNTS.max()).all()
  np.testing.assert_array_equal(x_res[:len(y)], x)
  new, start = [], len(y)
  for c in np.flatnonzero(extra):                                    # imbalanced-learn's class order
    xc = x[y == c]
    nn = np.asarray(S.smote_neighbours(xc, 5))
    rs = np.random.RandomState(seed)                                 # check_random_state(int): fresh per class
    r = rs.randint(low=0, high=nn.size, size=extra[c])
    u = rs.uniform(size=extra[c])
    pts = np.asarray(S.smote_generate(xc, nn, r // 5, r % 5, u))
    np.testing.assert_allclose(pts, x_res[start:start + extra[c]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y_res[start:start + extra[c]], c)
    start += extra[c]
    new.append(pts)
  assert start == len(y_res) and present.sum() == 5


def test_smote_with_a_key_fills_classes_with_points_on_neighbour_segments():
  x, y = _data(3)
  out = S.smote(jax.random.key(0), x, y, C, k_neighbors=5)
  np.testing.assert_array_equal(np.bincount(np.asarray(out.labels), minlength=C), [40, 40, 40, 40, 0, 40])
  np.testing.assert_array_equal(out.num_synthetic, [0, 17, 29, 33, 0, 10])
  np.testing.assert_array_equal(np.asarray(out.features[:len(y)]), x)
  feats, labels = np.asarray(out.features[len(y):], np.float64), np.asarray(out.labels[len(y):])
  for c in (1, 2, 3, 5):
    xc = x[y == c].astype(np.float64)
    nn = np.asarray(S.smote_neighbours(xc, 5))
    for p in feats[labels == c]:
      # p = x_i + u (x_j - x_i) for some i, some j among i's 5 neighbours, u in [0, 1)
      d = xc[nn] - xc[:, None, :]                                    # (n, 5, D)
      u = np.clip(np.sum((p - xc)[:, None, :] * d, -1) / np.sum(d * d, -1), 0, 1)
      resid = np.linalg.norm(xc[:, None, :] + u[..., None] * d - p, axis=-1)
      assert resid.min() < 1e-4
  # deterministic in the key, different across keys
  again = S.smote(jax.random.key(0), x, y, C)
  np.testing.assert_array_equal(np.asarray(again.features), np.asarray(out.features))
  assert not np.array_equal(np.asarray(S.smote(jax.random.key(1), x, y, C).features), np.asarray(out.features))
  none = S.smote(jax.random.key(0), x, y, C, sampling_strategy="none")   # the ablation: nothing added
  np.testing.assert_array_equal(np.asarray(none.features), x)
  np.testing.assert_array_equal(none.num_synthetic, 0)
  with pytest.raises(ValueError, match="auto, not majority"):
    S.smote_counts(COUNTS, "majority")


def test_smote_draws_of_a_class_are_smote_draw_with_the_class_key():
  x, y = _data(4)
  out = S.smote(jax.random.key(3), x, y, C)
  xc = x[y == 2]
  nn = S.smote_neighbours(xc, 5)
  rows, cols, steps = S.smote_draw(jax.random.fold_in(jax.random.key(3), 2), 11, 5, 29)
  assert int(rows.max()) < 11 and int(cols.max()) < 5 and 0 <= float(steps.min()) and float(steps.max()) < 1
  start = len(y) + 17                                               # after class 1's 17 points
  np.testing.assert_allclose(np.asarray(out.features[start:start + 29]),
                             np.asarray(S.smote_generate(xc, nn, rows, cols, steps)), rtol=1e-6, atol=1e-6)

"""End to end: weight balancing's stage 2 (wb) and the cached-feature stages (smote_crt, meta_sampler)
after a joint run on mock data; their config variants and errors."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lt_jax import heads, smote
from lt_jax import weight_balancing as wb
from lt_jax.train import config as config_lib, feature_stages, trainer
from test_train import MOCK_EXAMPLES, tiny_config
from configs import fashion_mnist_lt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("feature_stages")
  c = tiny_config(stages="wb,smote_crt,meta_sampler")
  c.num_epochs, c.max_steps, c.log_every_steps = 1, 4, 1   # 4 steps of every stage: the wiring, not learning
  for name in ("wb", "smote_crt", "meta_sampler"):
    c.stage[name].num_epochs = 1
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return c, str(workdir), trainer.train_and_evaluate(c, str(workdir))


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def test_every_stage_trains_only_the_head(run):
  _, _, out = run
  joint = _leaves(out["variables"]["joint"])
  for name in ("wb", "smote_crt", "meta_sampler"):
    stage = _leaves(out["variables"][name])
    assert set(stage) == set(joint)
    for k in joint:
      if k.startswith("['params']['head']"):
        assert not np.array_equal(joint[k], stage[k]), (name, k)
      else:
        np.testing.assert_array_equal(joint[k], stage[k], err_msg=f"{name} {k}")  # frozen, BN statistics too
    assert np.isfinite(out["stages"][name]["balanced_error_rate"])


def test_wb_keeps_every_class_norm_within_the_stage1_radius(run):
  c, _, out = run
  k1 = out["variables"]["joint"]["params"]["head"]["kernel"]
  radius = float(wb.max_norm_radius(k1, c.stage.wb.max_norm_thresh))
  norms1, norms2 = np.asarray(heads.weight_norms(k1)), np.asarray(heads.weight_norms(
      out["variables"]["wb"]["params"]["head"]["kernel"]))
  assert norms1.max() > radius * 1.01              # stage 1 had rows above the radius
  assert norms2.max() <= radius * (1 + 1e-5)       # after the last step none is (projected every step)


def test_smote_and_meta_sampler_stage_records(run):
  c, workdir, out = run
  counts = np.asarray(json.load(open(os.path.join(workdir, "train_counts.json")))["counts"])
  assert out["stages"]["smote_crt"]["balanced_error_rate"] < 1
  rows = [json.loads(line) for line in open(os.path.join(workdir, "stages", "meta_sampler", "metrics.jsonl"))]
  train = [r for r in rows if r["split"] == "train"]
  assert train and all(np.isfinite(r["meta_loss"]) and r["meta_grad_norm"] > 0 for r in train)
  # the sampler starts instance-balanced (init_pow 0) and learns: its class probabilities move
  p0 = counts / counts.sum()
  assert abs(train[-1]["sampler_min_prob"] - p0.min()) > 1e-4
  assert np.asarray(smote.smote_counts(counts)).sum() == counts.max() * len(counts) - counts.sum()


def test_variants_and_errors():
  c = fashion_mnist_lt.get_config("smoke,wb")
  assert c.optim.weight_decay == 5e-3 and c.stages == "wb" and c.stage.wb.optim.weight_decay == 0.1
  assert c.stage.wb.loss == "cb_softmax_bce" and c.stage.wb.max_norm_thresh == 0.1
  config_lib.validate(c)
  assert fashion_mnist_lt.get_config("wb,stages=wb+posthoc").stages == "wb,posthoc"
  assert fashion_mnist_lt.get_config("sampler=under").sampler.name == "random_under"
  assert set(config_lib.FEATURE_STAGES) <= set(config_lib.TRAIN_STAGES)
  assert feature_stages.FEATURE_STAGES is config_lib.FEATURE_STAGES
  bad = [("stages=smote_crt", "stage.smote_crt.sampling_strategy", "all_but_one", "valid choices: auto"),
         ("stages=meta_sampler", "stage.meta_sampler.loss", "seesaw", "stateless"),
         ("stages=meta_sampler", "stage.meta_sampler.meta_lr", -1.0, "meta_lr"),
         ("wb", "stage.wb.max_norm_thresh", 2.0, r"\[0, 1\]"),
         ("wb", "model.head", "cosine", "linear classifier"),
         ("sampler=over", "sampler.target_count", -3, "target_count")]
  for variant, key, value, match in bad:
    c = fashion_mnist_lt.get_config(f"smoke,{variant}")
    node, *path = key.split(".")
    target = c[node]
    for p in path[:-1]:
      target = target[p]
    target[path[-1]] = value
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(c)

r"""Rotated Fashion-MNIST DIR: regress the rotation angle (0-90 deg) from long-tailed training angles.

The offline deep-imbalanced-regression benchmark of :mod:`lt_jax.data.dir_data` (7,813
training images, exponential profile over 90 one-degree bins, IR 100, balanced val / test) with
the small CNN, Adam 1e-3, cosine schedule, batch 128, 3 epochs (183 steps), MSE. About 1.5 minutes of CPU
time on 2 cores.

  python launch.py --config=configs/fashion_mnist_dir.py --workdir=/tmp/fmnist_dir
  python launch.py --config=configs/fashion_mnist_dir.py:method=lds_fds,seed=1 --workdir=/tmp/fmnist_dir_ldsfds

Variant keys: method (vanilla | sqinv | lds | fds | lds_fds | balanced_mse | balanced_mse_gai |
balanced_mse_bni), loss (mse | l1 | huber | focal_r | balanced_mse | balanced_mse_gai |
balanced_mse_bni), seed, smoke. Every field is overridable, e.g. --config.fds.sigma=1.
Balanced MSE (Ren et al., CVPR 2022): ``balanced_mse`` is the batch Monte-Carlo form (BMC),
``balanced_mse_gai`` integrates over a GMM fitted to the training targets (``loss.gmm_components``,
default 8), ``balanced_mse_bni`` over the training histogram of the target bins (``loss.bni_smooth``
smooths it with the LDS window); all three learn the noise scale (``loss.noise_sigma``, ``sigma_lr``).

  python launch.py --config=configs/fashion_mnist_dir.py:method=balanced_mse_gai --workdir=/tmp/fmnist_dir_gai
"""

from lt_jax.train import config as cfg


def get_config(arg: str | None = None):
  variant = cfg.parse_variant(arg)
  allowed = ("method", "loss", "seed", "smoke")
  unknown = set(variant) - set(allowed)
  if unknown:
    raise cfg.ConfigError(f"unknown config variant key(s) {sorted(unknown)}; valid keys: {', '.join(allowed)}")
  c = cfg.regression_config()
  if "loss" in variant:
    if variant["loss"] not in cfg.DIR_LOSSES:
      raise cfg.ConfigError(f"unknown regression loss {variant['loss']!r}; valid losses: {', '.join(cfg.DIR_LOSSES)}")
    c.loss.name = variant["loss"]
  cfg.set_dir_method(c, str(variant.get("method", "vanilla")))
  if "seed" in variant:
    c.seed = int(variant["seed"])
  if variant.get("smoke"):
    c.dataset.n_max = 60
    c.dataset.imbalance_ratio = 10.0
    c.dataset.val_per_bin = 1
    c.dataset.test_per_bin = 2
    c.batch_size = 32
    c.eval_batch_size = 100
    c.num_epochs = 2
    c.max_steps = 6
    c.plots = False
  return c

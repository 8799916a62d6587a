r"""Fashion-MNIST-LT (IR 100, exp profile) with a small CNN: the README's main job.

Runs offline on a 2-core CPU in under 15 minutes (Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` package through tfds's own builder; see README "Data").

  python launch.py --config=configs/fashion_mnist_lt.py --workdir=/tmp/fmnist_lt
  python launch.py --config=configs/fashion_mnist_lt.py:loss=la,seed=1 --workdir=/tmp/fmnist_la1

Variant keys: ir, loss (a registry name, alias or recipe such as ldam_drw), sampler, head,
seed, mix=mixup|cutmix|remix, bbn, mwnet (Meta-Weight-Net; meta set = the validation split,
10 per class unless dataset.val_per_class is set), stages=crt+tau_norm+...+posterior_recal,
epochs=<int> (scales the schedule), smoke.

  python launch.py --config=configs/fashion_mnist_lt.py:loss=ldam_drw --workdir=/tmp/fm_ldam
  python launch.py --config=configs/fashion_mnist_lt.py:mwnet --config.dataset.val_per_class=20 --workdir=/tmp/fm_mwnet
  python launch.py --config=configs/fashion_mnist_lt.py:stages=crt+tau_norm+ncm+posthoc \
      --config.dataset.val_per_class=20 --workdir=/tmp/fm_decoupled  # joint CE, then stages
"""

from lt_jax.train import config as cfg


def get_config(arg: str | None = None):
  variant = cfg.parse_variant(arg)
  c = cfg.base_config()
  c.dataset.name = "fashion_mnist"
  c.dataset.imbalance_ratio = 100.0
  c.model.name = "cnn"
  c.augment.crop_pad = 2
  c.augment.flip = True
  c.batch_size = 128
  c.num_epochs = 16
  c.optim.lr = 0.05
  c.optim.weight_decay = 5e-4
  c.optim.warmup_epochs = 1.0
  c.optim.decay_epochs = (12, 15)
  c.optim.decay_factor = 0.1
  c.eval_every_epochs = 4
  c.stage.crt.num_epochs = 2
  c.stage.lws.num_epochs = 2
  if variant.get("smoke"):
    c.num_epochs = 1
    c.max_steps = 5
    c.batch_size = 32
    c.eval_batch_size = 200
    c.optim.warmup_epochs = 0.0
    c.optim.decay_epochs = (1, 1)
    c.eval_every_epochs = 1
    c.plots = False
    c.stage.crt.num_epochs = c.stage.lws.num_epochs = 1
  cfg.apply_common_variants(c, variant, cfg.COMMON_VARIANTS + ("smoke",))
  return c

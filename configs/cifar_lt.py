r"""CIFAR-10/100-LT with ResNet-32: the standard LDAM-DRW recipe (REFERENCE.md section 1c).

SGD 0.1, momentum 0.9, wd 2e-4, batch 128, 200 epochs, 5-epoch linear warmup,
lr x0.01 at epoch 160 and x0.0001 at 180; pad-4 crop + flip; exp profile, subset seed 0.

  python launch.py --config=configs/cifar_lt.py --workdir=/tmp/c10_ir100_ce
  python launch.py --config=configs/cifar_lt.py:dataset=cifar100,ir=50,loss=la --workdir=...
  python launch.py --config=configs/cifar_lt.py:smoke --workdir=/tmp/smoke   # seconds, for CI

Variant keys: dataset=cifar10|cifar100, ir=<float>, loss=<registry name or alias>,
sampler=instance|class_balanced|sqrt|progressive|class_aware|reversed, head=linear|cosine|lws,
seed=<int>, mix=mixup|cutmix|remix, bbn, stages=crt+lws+tau_norm+ncm+posthoc, epochs=<int>,
test_agnostic, smoke; a population (lt_jax.train.population): seeds=0+1+2, losses=ce+la+bs,
samplers=instance+cb. ``loss=ride_drw`` / ``loss=sade``: RIDE / SADE on ``resnet32_experts``
(3 experts of 24/48 channels, as their CIFAR configs).
"""

from lt_jax.train import config as cfg


def get_config(arg: str | None = None):
  variant = cfg.parse_variant(arg)
  c = cfg.base_config()
  dataset = variant.get("dataset", "cifar10")
  if dataset not in ("cifar10", "cifar100"):
    raise cfg.ConfigError(f"configs/cifar_lt.py: unknown dataset {dataset!r}; valid: cifar10, cifar100")
  c.dataset.name = dataset
  c.model.name = "resnet32"
  if variant.get("smoke"):
    c.model.name = "resnet20"
    c.batch_size = 32
    c.eval_batch_size = 100
    c.num_epochs = 1
    c.max_steps = 3
    c.optim.warmup_epochs = 0.0
    c.optim.decay_epochs = (1, 1)
    c.eval_every_epochs = 1
    c.plots = False
    c.stage.crt.num_epochs = c.stage.lws.num_epochs = 1
  cfg.apply_common_variants(c, variant, cfg.COMMON_VARIANTS + ("dataset", "smoke"))
  return c

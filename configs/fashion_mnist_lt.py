r"""Fashion-MNIST-LT (IR 100, exp profile) with a small CNN: the README's main job.

Runs offline on a 2-core CPU in under 15 minutes (Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` package through tfds's own builder; see README "Data").

  python launch.py --config=configs/fashion_mnist_lt.py --workdir=/tmp/fmnist_lt
  python launch.py --config=configs/fashion_mnist_lt.py:loss=la,seed=1 --workdir=/tmp/fmnist_la1

Variant keys: ir, loss (a registry name, alias or recipe such as ldam_drw), sampler (also
random_under / random_over, aliases under / over), head, seed, mix=mixup|cutmix|remix, bbn,
stages=crt+tau_norm+...+wb+smote_crt+meta_sampler+posterior_recal, wb (weight balancing: stage 1
with wd 5e-3, then the wb stage), mwnet (Meta-Weight-Net; meta set = the validation split, 10 per
class unless dataset.val_per_class is set), epochs=<int> (scales the schedule), test_agnostic
(adds the test-agnostic evaluator), contrastive=simclr|supcon|bcl|paco (a contrastive joint stage,
README methods table), smoke; a population (``lt_jax.train.population``): seeds=0+1+2,
losses=ce+la+bs, samplers=instance+cb. ``loss=ride_drw`` (RIDE) and ``loss=sade`` (SADE) switch
the model to ``cnn_experts``.

  python launch.py --config=configs/fashion_mnist_lt.py:seeds=0+1+2,losses=ce+la+bs --workdir=/tmp/fm_pop

  python launch.py --config=configs/fashion_mnist_lt.py:loss=ldam_drw --workdir=/tmp/fm_ldam
  python launch.py --config=configs/fashion_mnist_lt.py:mwnet --config.dataset.val_per_class=20 --workdir=/tmp/fm_mwnet
  python launch.py --config=configs/fashion_mnist_lt.py:stages=crt+tau_norm+ncm+posthoc \
      --config.dataset.val_per_class=20 --workdir=/tmp/fm_decoupled  # joint CE, then stages
  python launch.py --config=configs/fashion_mnist_lt.py:contrastive=simclr,stages=crt+finetune \
      --workdir=/tmp/fm_simclr      # SimCLR pre-training (no labels), then cRT and full fine-tuning
  python launch.py --config=configs/fashion_mnist_lt.py:contrastive=bcl --workdir=/tmp/fm_bcl
  python launch.py --config=configs/fashion_mnist_lt.py:wb --workdir=/tmp/fm_wb     # weight balancing
  python launch.py --config=configs/fashion_mnist_lt.py:stages=smote_crt+meta_sampler --workdir=/tmp/fm_feat
  python launch.py --config=configs/fashion_mnist_lt.py:sampler=under --workdir=/tmp/fm_rus
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
  c.stage.finetune.num_epochs = 4
  c.stage.wb.num_epochs = c.stage.smote_crt.num_epochs = c.stage.meta_sampler.num_epochs = 2
  if variant.get("smoke"):
    c.num_epochs = 1
    c.max_steps = 5
    c.batch_size = 32
    c.eval_batch_size = 200
    c.optim.warmup_epochs = 0.0
    c.optim.decay_epochs = (1, 1)
    c.eval_every_epochs = 1
    c.plots = False
    c.stage.crt.num_epochs = c.stage.lws.num_epochs = c.stage.finetune.num_epochs = 1
    c.stage.wb.num_epochs = c.stage.smote_crt.num_epochs = c.stage.meta_sampler.num_epochs = 1
  cfg.apply_common_variants(c, variant, cfg.COMMON_VARIANTS + ("smoke",))
  return c

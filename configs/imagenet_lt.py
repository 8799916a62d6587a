r"""ImageNet-LT with ResNeXt-50 / ResNet-50: the decoupling paper's recipe (REFERENCE.md section 2).

ImageNet-LT (Liu et al., OLTR, CVPR 2019): 1000 classes, 115,846 training images (1280 to 5
per class), a balanced 20,000-image validation split and the balanced 50,000-image test
split. Recipe of Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition", ICLR 2020 (facebookresearch/classifier-balancing configs):

* joint stage: ResNeXt-50 32x4d, 90 epochs, batch 512, SGD lr 0.2, momentum 0.9, cosine
  decay, weight decay 5e-4, instance-balanced sampling, RandomResizedCrop(224) + flip,
  resize 256 / centre-crop 224 at test;
* cRT: classifier re-initialised, backbone frozen, class-aware sampler (K = 4), 10 epochs,
  lr 0.2, cosine; LWS: 5 epochs, same sampler (``stages=crt`` / ``stages=lws``).
* The lr scales linearly with the batch (classifier-balancing#8: lr 0.1 for batch 256).

The data is streamed from the host (:mod:`lt_jax.data.streaming`): ``source=tfds`` reads an
``array_record`` build of tfds ``imagenet_lt`` (``python -m lt_jax.data.prepare imagenet_lt``
plus ``file_format=array_record``); ``source=folder`` reads an ImageNet folder with OLTR's
split lists (``ImageNet_LT_train.txt``, ``ImageNet_LT_test.txt``: ``train/n01440764/x.JPEG 0``).

  python launch.py --config=configs/imagenet_lt.py --workdir=/ckpt/inlt_x50
  python launch.py --config=configs/imagenet_lt.py:model=resnet50,source=folder,stages=crt \
      --config.dataset.root=/data/imagenet --workdir=/ckpt/inlt_r50
  python launch.py --config=configs/imagenet_lt.py:smoke --workdir=/tmp/inlt_smoke   # here, seconds

Variant keys: model=resnext50|resnet50, source=tfds|folder, loss, sampler, head, seed, stages,
smoke (a generated 12-class JPEG fixture, ResNet-20 at 32x32, 3 steps).
"""

from lt_jax.train import config as cfg


def recipe(c, *, name: str, tfds_name: str, num_classes: int, train_split: str, test_split: str,
           folder_splits: tuple[str, str], model: str, variant: dict):
  """The decoupling recipe on a streamed dataset (shared with ``configs/inat18.py``)."""
  cfg.add_streaming_fields(c, name=name, tfds_name=tfds_name, num_classes=num_classes,
                                 train_split=train_split, test_split=test_split)
  c.model.name = str(variant.get("model", model))
  if c.model.name not in ("resnet50", "resnext50"):
    raise cfg.ConfigError(f"model must be resnet50 or resnext50 for {name}, got {c.model.name!r}")
  source = str(variant.get("source", "tfds"))
  if source not in ("tfds", "folder"):
    raise cfg.ConfigError(f"source must be tfds or folder, got {source!r}")
  c.dataset.source = source
  if source == "folder":
    c.dataset.train_split, c.dataset.test_split = folder_splits
  c.dataset.imbalance_ratio = 1.0   # the dataset is long-tailed as distributed
  c.augment.crop_pad = 0
  c.augment.flip = True
  c.batch_size = 512
  c.eval_batch_size = 500
  c.num_epochs = 90
  c.optim.update(dict(name="sgd", lr=0.2, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="cosine",
                      warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1))
  c.sampler.name = "instance"
  c.sampler.k_per_class = 4
  c.eval_every_epochs = 10
  c.log_every_steps = 50
  if "stage" in c:  # decoupled stages (cRT / LWS), classifier-balancing settings
    for stage, epochs in (("crt", 10), ("lws", 5)):
      c.stage[stage].num_epochs = epochs
      c.stage[stage].sampler = "class_aware"
      c.stage[stage].optim.update(dict(lr=0.2, schedule="cosine", weight_decay=5e-4, warmup_epochs=0.0))
  common = tuple(k for k in getattr(cfg, "COMMON_VARIANTS", ("loss", "sampler", "head", "seed")) if k != "ir")
  cfg.apply_common_variants(c, {k: v for k, v in variant.items() if k not in ("model", "source")},
                            common + ("smoke",))
  if variant.get("smoke"):
    smoke(c)
  return c


def smoke(c):
  """A few steps on a generated 12-class long-tailed JPEG folder: runs here in seconds."""
  c.dataset.source = "fixture"
  c.dataset.num_classes = c.dataset.fixture.num_classes
  c.dataset.image_size = 32
  c.model.name = "resnet20"        # ResNet-50 at 224 is ~1 image/s on this CPU (bench/input_pipeline.py)
  c.input.min_scale = 0.35
  c.input.eval_transform = "resize"
  c.input.num_threads = 2
  c.batch_size = 32
  c.optim.lr = 0.2 * 32 / 512      # the linear scaling rule of the recipe
  if "stage" in c:
    for stage in ("crt", "lws"):
      c.stage[stage].num_epochs = 1
      c.stage[stage].optim.lr = c.optim.lr
  c.eval_batch_size = 24           # the fixture's test split: 12 classes x 6 = 72 images
  c.num_epochs = 1
  c.max_steps = 3
  c.eval_every_epochs = 1
  c.plots = False


def get_config(arg: str | None = None):
  variant = cfg.parse_variant(arg)
  return recipe(cfg.base_config(), name="imagenet_lt", tfds_name="imagenet_lt", num_classes=1000,
                train_split="train", test_split="test",
                folder_splits=("ImageNet_LT_train.txt", "ImageNet_LT_test.txt"), model="resnext50",
                variant=variant)

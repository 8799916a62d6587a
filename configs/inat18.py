r"""iNaturalist 2018 with ResNet-50: the decoupling paper's recipe (REFERENCE.md section 2).

iNaturalist 2018 (Van Horn et al., CVPR 2018): 8,142 species, 437,513 training images (1000
to 2 per class), 24,426 validation images (3 per class), used as the test set by every
long-tail paper (there is no public test labels file). Recipe of Kang et al., ICLR 2020
(classifier-balancing iNaturalist configs): ResNet-50, 90 epochs (200 for the long
schedule: ``--config.num_epochs=200``), batch 512, SGD lr 0.2, momentum 0.9, cosine, weight
decay 5e-4, instance-balanced; cRT 10 epochs / LWS 5 epochs with the class-aware sampler.
As the reference does for iNat, tau-normalisation would be tuned on the test split; here
``tau_norm`` / ``posthoc`` stages select tau on a split carved from training data only.

Data: ``source=tfds`` reads an ``array_record`` build of tfds ``i_naturalist2018`` (manual
download); ``source=folder`` reads the iNat folder with the split lists of
classifier-balancing (``iNaturalist18_train.txt``, ``iNaturalist18_val.txt``:
``train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4a.jpg 7477``).

  python launch.py --config=configs/inat18.py:source=folder --config.dataset.root=/data/inat2018 \
      --workdir=/ckpt/inat_r50
  python launch.py --config=configs/inat18.py:smoke --workdir=/tmp/inat_smoke   # here, seconds

Variant keys: model=resnet50|resnext50, source=tfds|folder, loss, sampler, head, seed, stages, smoke.
"""

from configs import imagenet_lt  # the package install (pip install -e .) makes configs importable
from lt_jax.train import config as cfg


def get_config(arg: str | None = None):
  variant = cfg.parse_variant(arg)
  return imagenet_lt.recipe(cfg.base_config(), name="inat18", tfds_name="i_naturalist2018", num_classes=8142,
                            train_split="train", test_split="validation",
                            folder_splits=("iNaturalist18_train.txt", "iNaturalist18_val.txt"), model="resnet50",
                            variant=variant)

"""Image-classification data sets as float tensors in [0, 1], and batched augmentation.

Every loader returns ``x`` float32 [N, C, H, W] in [0, 1] on the CPU and ``y`` int64 [N].
Normalisation is not done here: it is the first layer of every model (see docs/design.md),
so attacks and epsilons live in pixel units.

Formats read from a data folder (detected automatically, in this order):

* ``.npz``: ``train.npz`` / ``test.npz`` or shards ``train-00.npz``, ``train-01.npz``, ...
  holding ``x`` uint8 [N, H, W, C] and ``y`` integer [N] (the /work/shared/data format).
* MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte`` ..., gzipped or not).
* CIFAR-10 / CIFAR-100 "python version" pickles, as a folder or as the official
  ``.tar.gz`` archive read in memory (never extracted). The pickles are opened with a
  restricted unpickler that can build numpy arrays and nothing else.

``download=True`` fetches the official archives with urllib, verifies their md5 before
anything reads them, and moves them into place atomically.

Modules, lowest first:

* ``registry``: ``DatasetInfo``, ``DATASETS``, ``SPLITS``.
* ``messages``: an exception as one line, for the user errors.
* ``download``: the official files, their mirrors and md5s; ``download_dataset``.
* ``locate``: which files of a folder hold a part, in which format; the missing-file error.
* ``readers``: decoding .npz, IDX, CIFAR pickles and archives into validated arrays.
* ``load``: the data folder, the decode cache, digits, the train/val split; ``load_dataset``.
* ``augmentation``: ``augment``, ``default_augmentation``, ``configured_augmentation``, ``alternating_flips``.
"""

from __future__ import annotations

from .augmentation import alternating_flips, augment, configured_augmentation, default_augmentation
from .download import download_dataset
from .load import load_dataset
from .registry import DATASETS, SPLITS, DatasetInfo

__all__ = [
    "DatasetInfo",
    "DATASETS",
    "SPLITS",
    "load_dataset",
    "download_dataset",
    "alternating_flips",
    "augment",
    "configured_augmentation",
    "default_augmentation",
]

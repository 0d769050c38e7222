"""The data sets repulsor knows: their shapes, statistics and class names, and the split names."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

__all__ = ["DatasetInfo", "DATASETS", "SPLITS", "dataset_info"]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one data set.

    Attributes:
        name: the key in ``DATASETS``.
        num_classes: number of classes k; labels are 0..k-1.
        shape: (C, H, W) of one image.
        mean, std: per-channel statistics of the training images in [0, 1] units, one
            entry per channel (used by the model's ``Normalize`` layer).
        classes: class names in label order, ``len(classes) == num_classes``.
    """

    name: str
    num_classes: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# The official ``fine_label_names`` of CIFAR-100's meta file (alphabetical, as shipped),
# written out so that the names are known without the data on disk.
_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower",
    "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit",
    "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
    "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train",
    "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
assert len(_CIFAR100_CLASSES) == 100

_DIGIT_NAMES = tuple(str(i) for i in range(10))

DATASETS: dict[str, DatasetInfo] = {
    # sklearn's 8x8 digits divided by 16: mean and std over all pixels of all 1797 images.
    "digits": DatasetInfo("digits", 10, (1, 8, 8), (0.3053,), (0.3760,), _DIGIT_NAMES),
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), _DIGIT_NAMES),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 10, (1, 28, 28), (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    # Per-channel std over all training pixels (not the 0.2023/0.1994/0.2010 that circulates,
    # which is an average of per-image stds).
    "cifar10": DatasetInfo(
        "cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        _CIFAR10_CLASSES,
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        _CIFAR100_CLASSES,
    ),
}

SPLITS = ("train", "val", "test", "train_full")


def dataset_info(name: str) -> DatasetInfo:
    """``DATASETS[name]``, or a UserError that lists the known names."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}") from None

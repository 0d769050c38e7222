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
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .store.files import default_file_mode
from .errors import UserError

__all__ = [
    "DatasetInfo",
    "DATASETS",
    "SPLITS",
    "load_dataset",
    "download_dataset",
    "augment",
    "default_augmentation",
]


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

# The digits train/test split is part of the data set's definition, so its seed is fixed
# and independent of ``split_seed`` (which only chooses the validation images).
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}") from None


def _one_line(exc: BaseException) -> str:
    """An exception as a single line (the CLI prints user errors on one line)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- downloads


class _Remote(NamedTuple):
    filename: str
    md5: str
    urls: tuple[str, ...]  # mirrors, tried in order until one answers


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_CIFAR_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)

_DOWNLOADS: dict[str, list[_Remote]] = {
    "mnist": [
        _Remote("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", _MNIST_MIRRORS),
        _Remote("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", _MNIST_MIRRORS),
        _Remote("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", _MNIST_MIRRORS),
        _Remote("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", _MNIST_MIRRORS),
    ],
    "fashion_mnist": [
        _Remote("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", _FASHION_MIRRORS),
        _Remote("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", _FASHION_MIRRORS),
        _Remote("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", _FASHION_MIRRORS),
        _Remote("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", _FASHION_MIRRORS),
    ],
    "cifar10": [_Remote("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", _CIFAR_MIRRORS)],
    "cifar100": [_Remote("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", _CIFAR_MIRRORS)],
}


def _fetch(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Stream ``url`` into the file ``dest`` (overwriting it). Network errors propagate."""
    request = urllib.request.Request(url, headers={"User-Agent": "repulsor"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)


def _md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _download_file(remote: _Remote, folder: Path) -> Path:
    """Download one file into ``folder``, verified, via a temporary file and an atomic rename.

    An existing file with the right md5 is kept. The md5 is checked on the temporary file,
    so a corrupt or tampered download never appears under the final name.
    """
    final = folder / remote.filename
    if final.is_file() and _md5(final) == remote.md5:
        return final
    failures = []
    for base in remote.urls:
        url = base + remote.filename
        fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=folder)
        os.fchmod(fd, default_file_mode())
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(url, tmp)
        except Exception as exc:  # any network/HTTP/URL failure: try the next mirror
            _remove_quietly(tmp)
            failures.append(f"{url}: {_one_line(exc)}")
            continue
        except BaseException:
            _remove_quietly(tmp)
            raise
        got = _md5(tmp)
        if got != remote.md5:
            _remove_quietly(tmp)
            raise UserError(
                f"download of {url} is corrupt (md5 {got}, expected {remote.md5}); nothing was "
                f"saved in {folder}; try again, or download {remote.filename} by hand into {folder}"
            )
        os.replace(tmp, final)
        return final
    raise UserError(
        f"could not download {remote.filename} into {folder} ({'; '.join(failures)}); check the "
        f"network, or download it by hand into {folder}, or use the .npz format"
    )


def _cache_root() -> Path:
    return Path.home() / ".cache" / "repulsor"


def download_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Download and verify the official files of data set ``name``.

    Args:
        name: a key of ``DATASETS`` other than ``digits`` (which ships with scikit-learn).
        data_dir: target folder; default ``$REPULSOR_DATA/<name>``, else
            ``~/.cache/repulsor/<name>``. Created if needed.

    Returns:
        The folder holding the verified files (``load_dataset`` reads them as they are).
    """
    info = _info(name)
    if name not in _DOWNLOADS:
        raise UserError(f"{name} needs no download (it ships with scikit-learn)")
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
    elif os.environ.get("REPULSOR_DATA"):
        folder = Path(os.environ["REPULSOR_DATA"]).expanduser() / info.name
    else:
        folder = _cache_root() / info.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create data folder {folder} ({_one_line(exc)}); pass a writable --data-dir") from None
    for remote in _DOWNLOADS[name]:
        _download_file(remote, folder)
    return folder


# --------------------------------------------------------------------------- locating files


class _Source(NamedTuple):
    fmt: str  # "npz" | "idx" | "cifar_dir" | "cifar_tar"
    files: tuple[str, ...]  # absolute paths, in reading order


_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_DIR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
_CIFAR_BATCHES = {
    ("cifar10", "train"): tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("cifar10", "test"): ("test_batch",),
    ("cifar100", "train"): ("train",),
    ("cifar100", "test"): ("test",),
}


def _npz_files(folder: Path, part: str) -> list[Path] | None:
    """``<part>.npz`` or its shards ``<part>-00.npz``, ``<part>-01.npz``... in order, or None."""
    single = folder / f"{part}.npz"
    pattern = re.compile(rf"^{part}-(\d+)\.npz$")
    shards = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            shards[int(match.group(1))] = path
    if single.is_file() and shards:
        raise UserError(
            f"{folder} holds both {single.name} and shards {part}-NN.npz; keep only one of the two"
        )
    if single.is_file():
        return [single]
    if not shards:
        return None
    # A gap in the numbering would silently drop data, so every shard from 0 must be there.
    expected = list(range(len(shards)))
    if sorted(shards) != expected:
        missing = sorted(set(range(max(shards) + 1)) - set(shards))
        raise UserError(
            f"shard {part}-{missing[0]:02d}.npz is missing in {folder}: shards must be numbered "
            f"{part}-00.npz, {part}-01.npz, ... without gaps"
        )
    return [shards[i] for i in expected]


def _idx_files(folder: Path, part: str) -> tuple[Path, Path] | None:
    prefix = _IDX_PREFIX[part]
    found = []
    for kind, dims in (("images", 3), ("labels", 1)):
        names = [f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte"]
        candidates = [n + ext for n in names for ext in ("", ".gz")]
        for sub in (folder, folder / "raw"):
            hit = next((sub / n for n in candidates if (sub / n).is_file()), None)
            if hit is not None:
                found.append(hit)
                break
        else:
            return None
    return found[0], found[1]


def _cifar_source(info: DatasetInfo, folder: Path, part: str) -> _Source | None:
    batches = _CIFAR_BATCHES[(info.name, part)]
    for sub in (folder / _CIFAR_DIR[info.name], folder):
        present = [b for b in batches if (sub / b).is_file()]
        if len(present) == len(batches):
            return _Source("cifar_dir", tuple(str(sub / b) for b in batches))
        if present:
            missing = [b for b in batches if b not in present]
            raise UserError(
                f"{sub} is an incomplete CIFAR folder: missing {', '.join(missing)}; restore them "
                f"or put the official {_CIFAR_ARCHIVE[info.name]} in {folder}"
            )
    archive = folder / _CIFAR_ARCHIVE[info.name]
    if archive.is_file():
        return _Source("cifar_tar", (str(archive),))
    return None


def _locate(info: DatasetInfo, folder: Path, part: str) -> _Source | None:
    """Find the files holding ``part`` ("train" or "test") of ``info`` in ``folder``."""
    try:
        npz = _npz_files(folder, part)
    except OSError as exc:
        raise UserError(f"cannot list data folder {folder} ({_one_line(exc)})") from None
    if npz:
        return _Source("npz", tuple(str(p) for p in npz))
    if info.name in ("mnist", "fashion_mnist"):
        idx = _idx_files(folder, part)
        if idx:
            return _Source("idx", tuple(str(p) for p in idx))
    if info.name in _CIFAR_DIR:
        return _cifar_source(info, folder, part)
    return None


def _missing_error(info: DatasetInfo, folder: Path, part: str) -> UserError:
    what = f"{part}.npz (or shards {part}-00.npz, {part}-01.npz, ...)"
    if info.name in ("mnist", "fashion_mnist"):
        p = _IDX_PREFIX[part]
        what += f", or the IDX files {p}-images-idx3-ubyte[.gz] and {p}-labels-idx1-ubyte[.gz]"
    elif info.name in _CIFAR_DIR:
        what += (
            f", or the folder {_CIFAR_DIR[info.name]}/ ({', '.join(_CIFAR_BATCHES[(info.name, part)])})"
            f" or the archive {_CIFAR_ARCHIVE[info.name]}"
        )
    how = "use --download (download=True) to fetch the official files, or write" if info.name in _DOWNLOADS else "write"
    return UserError(
        f"no {info.name} {part} data in {folder}: expected {what}; {how} the .npz format "
        f"(x uint8 N x H x W x C, y int64 N)"
    )


def _resolve_folder(info: DatasetInfo, data_dir, download: bool) -> Path:
    """The data folder: ``data_dir``, else ``$REPULSOR_DATA/<name>``, else the download cache."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if folder.is_dir():
            return folder
        if folder.exists():
            raise UserError(f"data path {folder} is not a folder; pass the folder that holds the {info.name} files")
        if download:
            return folder  # created by the download
        raise UserError(
            f"data folder {folder} does not exist; pass the folder holding the {info.name} files "
            f"as --data-dir, or add --download to fetch them into it"
        )
    candidates = []
    env = os.environ.get("REPULSOR_DATA")
    if env:
        root = Path(env).expanduser()
        candidates.append(root / info.name)
        # The shared offline copy of CIFAR-10 is the JPEG-derived one; never fall back to it
        # when the user asked for the official files.
        if info.name == "cifar10" and not download:
            candidates.append(root / "cifar10_jpeg")
    candidates.append(_cache_root() / info.name)
    for folder in candidates:
        if folder.is_dir():
            return folder
    if download:
        return candidates[0]
    tried = ", ".join(str(c) for c in candidates)
    if env:
        raise UserError(
            f"no {info.name} folder found (tried {tried}); put the files in {candidates[0]}, "
            f"pass --data-dir, or use --download"
        )
    raise UserError(
        f"no data folder for {info.name} (tried {tried}): pass --data-dir or set REPULSOR_DATA, "
        f"or use --download"
    )


# --------------------------------------------------------------------------- decoding


class _Raw(NamedTuple):
    x: np.ndarray  # uint8 [N, H, W, C]
    y: np.ndarray  # int64 [N]
    scale: float  # x / scale is in [0, 1]


def _check_arrays(x, y, info: DatasetInfo, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate decoded arrays; return (x uint8 [N,H,W,C], y int64 [N])."""
    c, h, w = info.shape
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        dtype = getattr(x, "dtype", type(x).__name__)
        raise UserError(f"{where}: images must be uint8 0..255, got {dtype}; convert them with x.astype(np.uint8)")
    if x.ndim != 4 or x.shape[1:] != (h, w, c):
        raise UserError(
            f"{where}: images have shape {tuple(x.shape)} but {info.name} needs N x {h} x {w} x {c} (HWC)"
        )
    if not isinstance(y, np.ndarray) or y.ndim != 1 or y.shape[0] != x.shape[0]:
        shape = tuple(getattr(y, "shape", ()))
        raise UserError(f"{where}: labels must be a 1-D array of {x.shape[0]} entries, got shape {shape}")
    if y.dtype.kind not in "iu":
        raise UserError(f"{where}: labels must be integers, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= info.num_classes):
        raise UserError(
            f"{where}: labels range over {int(y.min())}..{int(y.max())} but {info.name} has classes "
            f"0..{info.num_classes - 1}"
        )
    return x, y.astype(np.int64, copy=False)


def _corrupt(path, exc: BaseException) -> UserError:
    return UserError(
        f"cannot read {path} ({_one_line(exc)}): the file is corrupt or truncated; delete it and "
        f"download or write it again"
    )


def _read_npz(path: str, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise UserError(f"{path} is a single .npy array, not an .npz archive with arrays x and y")
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise UserError(
                    f"{path} lacks array(s) {', '.join(missing)} (it holds {', '.join(archive.files) or 'nothing'}); "
                    f"save it with np.savez_compressed(path, x=..., y=...)"
                )
            x, y = archive["x"], archive["y"]
    except UserError:
        raise
    except Exception as exc:  # BadZipFile, EOFError, zlib.error, ValueError (pickled objects)...
        raise _corrupt(path, exc) from None
    return _check_arrays(x, y, info, path)


def _read_bytes(path: str) -> bytes:
    """The file's bytes, decompressed when it is gzip (detected by magic, not by name)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions (big-endian header)."""
    try:
        data = _read_bytes(path)
    except Exception as exc:
        raise _corrupt(path, exc) from None
    # Header: two zero bytes, type code (0x08 = unsigned byte), number of dimensions,
    # then one big-endian uint32 per dimension.
    header = 4 + 4 * ndim
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        magic = data[:4].hex() or "nothing"
        raise UserError(
            f"{path} is not an IDX file of {ndim}-D unsigned bytes (magic {magic}, expected "
            f"00000{800 + ndim}); it is corrupt or the wrong file"
        )
    if len(data) < header:
        raise UserError(f"{path} is truncated (header cut off); delete it and download it again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != size:
        raise UserError(
            f"{path} holds {len(data) - header} data bytes but its header {dims} announces {size}: "
            f"the file is truncated or corrupt; delete it and download it again"
        )
    # Copy so the cached array owns writable memory (torch.from_numpy wants writable arrays).
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=header).reshape(dims).copy()


def _read_idx_pair(images: str, labels: str, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    x = _read_idx(images, 3)[..., None]  # [N, H, W] -> [N, H, W, 1]
    y = _read_idx(labels, 1)
    if y.shape[0] != x.shape[0]:
        raise UserError(f"{images} holds {x.shape[0]} images but {labels} holds {y.shape[0]} labels; use a matching pair")
    return _check_arrays(x, y, info, images)


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, and for nothing else."""
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], object]:
    """Everything a pickled dict of numpy arrays may name, mapped to the real object."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): _latin1_encode,
    }
    # Protocol-5 pickles of arrays rebuild them with numpy's _frombuffer (a plain frombuffer).
    if hasattr(numeric, "_frombuffer"):
        allowed[("numpy.core.numeric", "_frombuffer")] = numeric._frombuffer
        allowed[("numpy._core.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays, dicts, lists and strings, and nothing else.

    A pickle can call any importable function while loading; refusing every global but
    the few that rebuild an ndarray makes a malicious "CIFAR batch" harmless.
    """

    def __init__(self, file, where: str):
        super().__init__(file, encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise UserError(
                f"refusing to unpickle {module}.{name} from {self._where}: a CIFAR batch holds only "
                f"numpy arrays; this is not an official CIFAR file, delete it"
            )
        return allowed


def _unpickle(data: bytes, where: str):
    try:
        return _RestrictedUnpickler(io.BytesIO(data), where).load()
    except UserError:
        raise
    except Exception as exc:
        raise _corrupt(where, exc) from None


def _field(batch: dict, key: str):
    # Official batches were pickled by Python 2 (bytes keys); re-pickled ones may use str keys.
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _decode_cifar_batch(data: bytes, where: str, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(data, where)
    label_key = "fine_labels" if info.name == "cifar100" else "labels"
    if not isinstance(batch, dict):
        raise UserError(f"{where} is not a CIFAR batch (a pickled {type(batch).__name__}, not a dict)")
    pixels, labels = _field(batch, "data"), _field(batch, label_key)
    if pixels is None or labels is None:
        raise UserError(f"{where} is not a {info.name} batch: it lacks 'data' or '{label_key}'")
    c, h, w = info.shape
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] != c * h * w:
        shape = tuple(getattr(pixels, "shape", ()))
        raise UserError(f"{where}: 'data' must be an array of N x {c * h * w} bytes, got shape {shape}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UserError(f"{where}: '{label_key}' must be a list of integers ({_one_line(exc)})") from None
    if pixels.dtype != np.uint8:
        raise UserError(f"{where}: 'data' must be uint8, got {pixels.dtype}")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue, each row-major): CHW -> HWC.
    x = np.ascontiguousarray(pixels.reshape(-1, c, h, w).transpose(0, 2, 3, 1))
    return _check_arrays(x, y, info, where)


def _check_member(member: tarfile.TarInfo, archive: str) -> None:
    """Refuse archive members that could write outside a target folder if extracted."""
    path = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member.name) or ".." in path.parts:
        raise UserError(f"refusing archive {archive}: member {member.name!r} points outside the folder")
    if not (member.isfile() or member.isdir()):
        raise UserError(
            f"refusing archive {archive}: member {member.name!r} is a link or special file; "
            f"use the official archive"
        )


def _read_tar_members(archive: str, wanted: list[str]) -> dict[str, bytes]:
    """Read the regular files ``wanted`` from a tar archive in memory, in one pass."""
    got: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _check_member(member, archive)
                if member.name in wanted and member.isfile():
                    got[member.name] = tar.extractfile(member).read()
    except UserError:
        raise
    except Exception as exc:  # ReadError, EOFError, zlib.error, gzip.BadGzipFile...
        raise _corrupt(archive, exc) from None
    missing = [w for w in wanted if w not in got]
    if missing:
        raise UserError(f"archive {archive} lacks {', '.join(missing)}; use the official archive")
    return got


def _decode(info: DatasetInfo, source: _Source, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode and validate the files of ``source``; return (x uint8 [N,H,W,C], y int64 [N])."""
    if source.fmt == "npz":
        parts = [_read_npz(p, info) for p in source.files]
    elif source.fmt == "idx":
        parts = [_read_idx_pair(source.files[0], source.files[1], info)]
    elif source.fmt == "cifar_dir":
        parts = []
        for path in source.files:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise UserError(f"cannot read {path} ({_one_line(exc)})") from None
            parts.append(_decode_cifar_batch(data, path, info))
    elif source.fmt == "cifar_tar":
        archive = source.files[0]
        names = [f"{_CIFAR_DIR[info.name]}/{b}" for b in _CIFAR_BATCHES[(info.name, part)]]
        members = _read_tar_members(archive, names)
        parts = [_decode_cifar_batch(members[n], f"{archive}:{n}", info) for n in names]
    else:  # pragma: no cover - _locate only produces the formats above
        raise AssertionError(source.fmt)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@functools.lru_cache(maxsize=6)
def _decode_cached(name: str, part: str, source: _Source, stamps: tuple) -> _Raw:
    """Decoded ``part`` of a data set, cached per resolved files.

    ``stamps`` (size and mtime of every file) is part of the key so that a file replaced
    on disk is decoded again instead of served stale.
    """
    x, y = _decode(DATASETS[name], source, part)
    return _Raw(x, y, 255.0)


def _stamps(source: _Source) -> tuple:
    out = []
    for path in source.files:
        st = os.stat(path)
        out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[_Raw, np.ndarray, np.ndarray]:
    """All 1797 sklearn digits (values 0..16) and the fixed stratified train/test indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[..., None]  # [1797, 8, 8, 1], integers 0..16
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=_DIGITS_TEST_FRACTION, stratify=y, random_state=_DIGITS_SPLIT_SEED
    )
    return _Raw(x, y, 16.0), np.sort(train_idx), np.sort(test_idx)


def _load_part(info: DatasetInfo, part: str, data_dir, download: bool) -> _Raw:
    """The decoded training ("train") or test ("test") set, from cache when possible."""
    folder = _resolve_folder(info, data_dir, download)
    source = _locate(info, folder, part) if folder.is_dir() else None
    if source is None and download:
        download_dataset(info.name, folder)
        source = _locate(info, folder, part)
    if source is None:
        raise _missing_error(info, folder, part)
    if info.name == "cifar10" and "jpeg" in folder.name.lower():
        warnings.warn(
            f"{folder} holds JPEG-compressed CIFAR-10 (error about 8/255 per pixel): fine for "
            f"development, not comparable with published CIFAR-10 robustness numbers",
            stacklevel=3,
        )
    try:
        stamps = _stamps(source)
    except OSError as exc:
        raise UserError(f"cannot read the {info.name} files in {folder} ({_one_line(exc)})") from None
    return _decode_cached(info.name, part, source, stamps)


# --------------------------------------------------------------------------- splits


def _val_count(val_size, n: int) -> int:
    """Number of validation images carved from a training set of ``n`` images."""
    if val_size is None:
        return 1000 if n >= 10000 else int(round(0.1 * n))
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise UserError(f"val_size must be an integer count or a fraction in (0, 1), got {val_size!r}")
    if isinstance(val_size, (int, np.integer)):
        count = int(val_size)
        if not 0 <= count < n:
            raise UserError(f"val_size={count} must be between 0 and {n - 1} (the training set holds {n} images)")
        return count
    fraction = float(val_size)
    if not 0.0 < fraction < 1.0:
        raise UserError(f"val_size={val_size} as a fraction must be in (0, 1); give an integer for a count")
    return int(round(fraction * n))


def _split_indices(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: a seeded random ``count`` of ``range(n)`` for val, sorted.

    numpy's own Generator keeps the split independent of torch's global RNG, and sorting
    keeps both subsets in the data set's published order.
    """
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[count:]), np.sort(perm[:count])


def _split_digits(y: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) positions for digits: with ~1400 images, class balance matters."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if count == 0:
        return idx, idx[:0]
    try:
        train, val = train_test_split(idx, test_size=count, stratify=y, random_state=seed)
    except ValueError as exc:
        raise UserError(f"val_size={count} cannot be split evenly over digits' 10 classes ({_one_line(exc)}); use at least 10") from None
    return np.sort(train), np.sort(val)


def _to_tensors(raw: _Raw, idx: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = raw.x if idx is None else raw.x[idx]
    y = raw.y if idx is None else raw.y[idx]
    # Permute the uint8 array (cheap), then convert: the float copy never aliases the cache.
    xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    xt = xt.to(torch.float32).div_(raw.scale)
    return xt, torch.from_numpy(np.array(y, dtype=np.int64))


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    val_size: int | float | None = None,
    split_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a data set as tensors.

    Args:
        name: a key of ``DATASETS`` (``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``,
            ``cifar100``).
        split: ``"train"`` (training set minus validation), ``"val"`` (seeded random subset
            of the training set), ``"test"``, or ``"train_full"`` (``train`` + ``val``).
        data_dir: folder with the files; default ``$REPULSOR_DATA/<name>`` (for cifar10 also
            ``$REPULSOR_DATA/cifar10_jpeg``), then ``~/.cache/repulsor/<name>``. Ignored
            for ``digits``, which ships with scikit-learn.
        download: fetch and verify the official files when the folder has none.
        val_size: validation images: an int count, a float fraction in (0, 1), or None for
            1000 when the training set holds at least 10,000 images, else 10%.
        split_seed: seed of the train/val split (numpy Generator; torch's RNG is untouched).
            For digits the split is stratified by class.

    Returns:
        ``(x, y)``: ``x`` float32 [N, C, H, W] in [0, 1], contiguous, on the CPU;
        ``y`` int64 [N]. Both are fresh tensors the caller may modify.

    Raises:
        UserError: unknown name or split, bad val_size, missing folder or files, or a
            corrupt or malformed file (the message names it).
    """
    info = _info(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
        raise UserError(f"split_seed must be a non-negative integer, got {split_seed!r}")

    if info.name == "digits":
        raw, train_idx, test_idx = _digits_raw()
        if split == "test":
            return _to_tensors(raw, test_idx)
        if split == "train_full":
            return _to_tensors(raw, train_idx)
        count = _val_count(val_size, len(train_idx))
        tr, va = _split_digits(raw.y[train_idx], count, int(split_seed))
        return _to_tensors(raw, train_idx[tr if split == "train" else va])

    if split == "test":
        return _to_tensors(_load_part(info, "test", data_dir, download), None)
    raw = _load_part(info, "train", data_dir, download)
    if split == "train_full":
        return _to_tensors(raw, None)
    count = _val_count(val_size, len(raw.y))
    train_idx, val_idx = _split_indices(len(raw.y), count, int(split_seed))
    return _to_tensors(raw, train_idx if split == "train" else val_idx)


# --------------------------------------------------------------------------- augmentation


def default_augmentation(name: str) -> dict:
    """The standard training augmentation of a data set, as keyword arguments of ``augment``.

    Returns:
        ``{"crop_padding": 4, "flip": True}`` for CIFAR-10/100 (random crop and mirror);
        ``{"crop_padding": 0, "flip": False}`` (none) for digits, MNIST and Fashion-MNIST,
        where a mirrored digit is a different symbol.
    """
    info = _info(name)
    if info.name in ("cifar10", "cifar100"):
        return {"crop_padding": 4, "flip": True}
    return {"crop_padding": 0, "flip": False}


def augment(
    x: torch.Tensor,
    *,
    generator: torch.Generator | None,
    crop_padding: int = 4,
    flip: bool = True,
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole batch at once.

    Each image is zero-padded by ``crop_padding`` pixels on every side, an H x W window at a
    random offset in [0, 2 * crop_padding] (per axis, per image) is cut out, and the window
    is mirrored left-right with probability 1/2. All of it is one gather, on ``x``'s device.

    Args:
        x: images [N, C, H, W], any float dtype, any device.
        generator: torch.Generator for the random offsets and flips (drawn on the
            generator's device, normally the CPU, then moved to ``x.device``), so the result
            is reproducible whatever device ``x`` is on.
        crop_padding: padding in pixels; 0 disables cropping.
        flip: whether to mirror a random half of the images.

    Returns:
        Augmented images [N, C, H, W], same dtype and device as ``x`` (``x`` itself when both
        augmentations are off).
    """
    if x.dim() != 4:
        raise ValueError(f"augment expects images [N, C, H, W], got shape {tuple(x.shape)}")
    pad = int(crop_padding)
    if pad < 0:
        raise UserError(f"crop_padding must be >= 0, got {crop_padding}")
    if pad == 0 and not flip:
        return x
    n, _, h, w = x.shape
    device = x.device
    rng_device = generator.device if generator is not None else torch.device("cpu")
    # Always draw offsets then flips, in this order, so a seed gives the same batch whatever
    # the device of x.
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rng_device).to(device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rng_device).to(device)
    rows = dy[:, None] + torch.arange(h, device=device)  # [N, H], in padded coordinates
    cols = dx[:, None] + torch.arange(w, device=device)  # [N, W]
    if flip:
        mirrored = (torch.rand(n, generator=generator, device=rng_device) < 0.5).to(device)
        # Reading the crop's columns right-to-left is cropping then mirroring.
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice: the result is [N, H, W, C].
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()

"""Which files of a data folder hold a data set's training or test part, in which format."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from .download import DOWNLOADS
from .messages import one_line
from .registry import DatasetInfo

__all__ = ["Source", "CIFAR_DIR", "CIFAR_BATCHES", "locate", "missing_error"]


class Source(NamedTuple):
    """The files holding one part of a data set, and their format."""

    fmt: str  # "npz" | "idx" | "cifar_dir" | "cifar_tar"
    files: tuple[str, ...]  # absolute paths, in reading order


# File names of the official formats (CIFAR_DIR and CIFAR_BATCHES name archive members too).
_IDX_PREFIX = {"train": "train", "test": "t10k"}
CIFAR_DIR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
CIFAR_BATCHES = {
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


def _cifar_source(info: DatasetInfo, folder: Path, part: str) -> Source | None:
    batches = CIFAR_BATCHES[(info.name, part)]
    for sub in (folder / CIFAR_DIR[info.name], folder):
        present = [b for b in batches if (sub / b).is_file()]
        if len(present) == len(batches):
            return Source("cifar_dir", tuple(str(sub / b) for b in batches))
        if present:
            missing = [b for b in batches if b not in present]
            raise UserError(
                f"{sub} is an incomplete CIFAR folder: missing {', '.join(missing)}; restore them "
                f"or put the official {_CIFAR_ARCHIVE[info.name]} in {folder}"
            )
    archive = folder / _CIFAR_ARCHIVE[info.name]
    if archive.is_file():
        return Source("cifar_tar", (str(archive),))
    return None


def locate(info: DatasetInfo, folder: Path, part: str) -> Source | None:
    """Find the files holding ``part`` ("train" or "test") of ``info`` in ``folder``."""
    try:
        npz = _npz_files(folder, part)
    except OSError as exc:
        raise UserError(f"cannot list data folder {folder} ({one_line(exc)})") from None
    if npz:
        return Source("npz", tuple(str(p) for p in npz))
    if info.name in ("mnist", "fashion_mnist"):
        idx = _idx_files(folder, part)
        if idx:
            return Source("idx", tuple(str(p) for p in idx))
    if info.name in CIFAR_DIR:
        return _cifar_source(info, folder, part)
    return None


def missing_error(info: DatasetInfo, folder: Path, part: str) -> UserError:
    """The error for a folder without ``part`` of ``info``: it lists the files it looks for."""
    what = f"{part}.npz (or shards {part}-00.npz, {part}-01.npz, ...)"
    if info.name in ("mnist", "fashion_mnist"):
        p = _IDX_PREFIX[part]
        what += f", or the IDX files {p}-images-idx3-ubyte[.gz] and {p}-labels-idx1-ubyte[.gz]"
    elif info.name in CIFAR_DIR:
        what += (
            f", or the folder {CIFAR_DIR[info.name]}/ ({', '.join(CIFAR_BATCHES[(info.name, part)])})"
            f" or the archive {_CIFAR_ARCHIVE[info.name]}"
        )
    how = "use --download (download=True) to fetch the official files, or write" if info.name in DOWNLOADS else "write"
    return UserError(
        f"no {info.name} {part} data in {folder}: expected {what}; {how} the .npz format "
        f"(x uint8 N x H x W x C, y int64 N)"
    )

"""``load_dataset``: the data folder, the decode cache, digits, and the train/val split."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import UserError
from .download import cache_root, download_dataset
from .locate import Source, locate, missing_error
from .messages import one_line
from .readers import decode
from .registry import DATASETS, SPLITS, DatasetInfo, dataset_info

__all__ = ["load_dataset", "decode_cached", "val_count"]

# The digits train/test split is part of the data set's definition, so its seed is fixed
# and independent of ``split_seed`` (which only chooses the validation images).
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


# --------------------------------------------------------------------------- folders


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
    candidates.append(cache_root() / info.name)
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


# --------------------------------------------------------------------------- decoded parts


class _Raw(NamedTuple):
    x: np.ndarray  # uint8 [N, H, W, C]
    y: np.ndarray  # int64 [N]
    scale: float  # x / scale is in [0, 1]


@functools.lru_cache(maxsize=6)
def decode_cached(name: str, part: str, source: Source, stamps: tuple) -> _Raw:
    """Decoded ``part`` of a data set, cached per resolved files.

    ``stamps`` (size and mtime of every file) is part of the key so that a file replaced
    on disk is decoded again instead of served stale.
    """
    x, y = decode(DATASETS[name], source, part)
    return _Raw(x, y, 255.0)


def _stamps(source: Source) -> tuple:
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
    source = locate(info, folder, part) if folder.is_dir() else None
    if source is None and download:
        download_dataset(info.name, folder)
        source = locate(info, folder, part)
    if source is None:
        raise missing_error(info, folder, part)
    if info.name == "cifar10" and "jpeg" in folder.name.lower():
        warnings.warn(
            f"{folder} holds JPEG-compressed CIFAR-10 (error about 8/255 per pixel): fine for "
            f"development, not comparable with published CIFAR-10 robustness numbers",
            stacklevel=3,
        )
    try:
        stamps = _stamps(source)
    except OSError as exc:
        raise UserError(f"cannot read the {info.name} files in {folder} ({one_line(exc)})") from None
    return decode_cached(info.name, part, source, stamps)


# --------------------------------------------------------------------------- splits


def val_count(val_size, n: int) -> int:
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
        raise UserError(f"val_size={count} cannot be split evenly over digits' 10 classes ({one_line(exc)}); use at least 10") from None
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
    info = dataset_info(name)
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
        count = val_count(val_size, len(train_idx))
        tr, va = _split_digits(raw.y[train_idx], count, int(split_seed))
        return _to_tensors(raw, train_idx[tr if split == "train" else va])

    if split == "test":
        return _to_tensors(_load_part(info, "test", data_dir, download), None)
    raw = _load_part(info, "train", data_dir, download)
    if split == "train_full":
        return _to_tensors(raw, None)
    count = val_count(val_size, len(raw.y))
    train_idx, val_idx = _split_indices(len(raw.y), count, int(split_seed))
    return _to_tensors(raw, train_idx if split == "train" else val_idx)

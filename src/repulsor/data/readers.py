"""Decoding the located files into validated arrays: .npz, IDX, CIFAR pickles (restricted
unpickler) and the CIFAR .tar.gz read in memory."""

from __future__ import annotations

import functools
import gzip
import io
import pickle
import re
import struct
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import UserError
from .locate import CIFAR_BATCHES, CIFAR_DIR, Source
from .messages import one_line
from .registry import DatasetInfo

__all__ = ["decode"]


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
        f"cannot read {path} ({one_line(exc)}): the file is corrupt or truncated; delete it and "
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
        raise UserError(f"{where}: '{label_key}' must be a list of integers ({one_line(exc)})") from None
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


def decode(info: DatasetInfo, source: Source, part: str) -> tuple[np.ndarray, np.ndarray]:
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
                raise UserError(f"cannot read {path} ({one_line(exc)})") from None
            parts.append(_decode_cifar_batch(data, path, info))
    elif source.fmt == "cifar_tar":
        archive = source.files[0]
        names = [f"{CIFAR_DIR[info.name]}/{b}" for b in CIFAR_BATCHES[(info.name, part)]]
        members = _read_tar_members(archive, names)
        parts = [_decode_cifar_batch(members[n], f"{archive}:{n}", info) for n in names]
    else:  # pragma: no cover - locate only produces the formats above
        raise AssertionError(source.fmt)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

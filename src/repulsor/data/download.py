"""Downloading the official files of a data set: mirrors, md5 checks, atomic moves into place."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

from ..errors import UserError
from ..store.files import default_file_mode
from .messages import one_line
from .registry import dataset_info

__all__ = ["Remote", "DOWNLOADS", "fetch", "md5", "cache_root", "download_dataset"]


class Remote(NamedTuple):
    """One official file: its name, its md5, and where to fetch it."""

    filename: str
    md5: str
    urls: tuple[str, ...]  # mirrors, tried in order until one answers


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_CIFAR_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)

# The official files of every downloadable data set (digits ships with scikit-learn).
DOWNLOADS: dict[str, list[Remote]] = {
    "mnist": [
        Remote("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", _MNIST_MIRRORS),
        Remote("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", _MNIST_MIRRORS),
        Remote("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", _MNIST_MIRRORS),
        Remote("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", _MNIST_MIRRORS),
    ],
    "fashion_mnist": [
        Remote("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", _FASHION_MIRRORS),
        Remote("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", _FASHION_MIRRORS),
        Remote("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", _FASHION_MIRRORS),
        Remote("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", _FASHION_MIRRORS),
    ],
    "cifar10": [Remote("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", _CIFAR_MIRRORS)],
    "cifar100": [Remote("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", _CIFAR_MIRRORS)],
}


def fetch(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Stream ``url`` into the file ``dest`` (overwriting it). Network errors propagate."""
    request = urllib.request.Request(url, headers={"User-Agent": "repulsor"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)


def md5(path: Path) -> str:
    """The md5 of a file, as hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _download_file(remote: Remote, folder: Path) -> Path:
    """Download one file into ``folder``, verified, via a temporary file and an atomic rename.

    An existing file with the right md5 is kept. The md5 is checked on the temporary file,
    so a corrupt or tampered download never appears under the final name.
    """
    final = folder / remote.filename
    if final.is_file() and md5(final) == remote.md5:
        return final
    failures = []
    for base in remote.urls:
        url = base + remote.filename
        fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=folder)
        os.fchmod(fd, default_file_mode())
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            fetch(url, tmp)
        except Exception as exc:  # any network/HTTP/URL failure: try the next mirror
            _remove_quietly(tmp)
            failures.append(f"{url}: {one_line(exc)}")
            continue
        except BaseException:
            _remove_quietly(tmp)
            raise
        got = md5(tmp)
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


def cache_root() -> Path:
    """The download cache, ``~/.cache/repulsor``: the last place a data folder is looked for."""
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
    info = dataset_info(name)
    if name not in DOWNLOADS:
        raise UserError(f"{name} needs no download (it ships with scikit-learn)")
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
    elif os.environ.get("REPULSOR_DATA"):
        folder = Path(os.environ["REPULSOR_DATA"]).expanduser() / info.name
    else:
        folder = cache_root() / info.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create data folder {folder} ({one_line(exc)}); pass a writable --data-dir") from None
    for remote in DOWNLOADS[name]:
        _download_file(remote, folder)
    return folder

"""Carry the JPEG-decoded CIFAR-10 training set to a lent GPU machine, bit for bit, in ~1/5 of its size.

The device tool moves at most 64 MiB of working tree; ``../shared/data/cifar10_jpeg`` holds 164 MB of
``savez_compressed`` arrays, because JPEG-decoded pixels are noisy and compress badly. But they were
JPEG-encoded once (quality 75, 4:2:0), so re-encoding them the same way gives back almost the same
pixels: we store each image's re-encoded JPEG scan (the header, identical for every 32x32 image at
that quality, once) plus the residual against the pixels we have, which is mostly zeros. Unpacking
decodes, adds the residual and checks a SHA-256 of the result against the one recorded at packing,
so the training set there is the one here exactly.

    python bench/gpu/pack_jpeg.py pack ../shared/data/cifar10_jpeg carry/cifar10_jpeg.npz [train|test]
    python bench/gpu/pack_jpeg.py unpack carry/cifar10_jpeg.npz /tmp/data/cifar10_jpeg   # writes train.npz

Needs numpy and Pillow (matplotlib's dependency) only. The decoder must be the same libjpeg build
(Pillow's) on both sides for the residual to apply; the checksum refuses any mismatch.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

QUALITY, SUBSAMPLING = 75, 2  # 2 is 4:2:0 in Pillow's numbering


def _encode(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=QUALITY, subsampling=SUBSAMPLING)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _digest(x: np.ndarray, y: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes()).hexdigest()


def _read(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    shards = sorted(folder.glob(f"{part}-*.npz")) or [folder / f"{part}.npz"]
    parts = [np.load(p, allow_pickle=False) for p in shards]
    return np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])


def pack(folder: Path, out: Path, part: str) -> None:
    x, y = _read(folder, part)
    encoded = [_encode(image) for image in x]
    header = os.path.commonprefix(encoded)
    scans = [e[len(header):] for e in encoded]
    decoded = np.stack([_decode(header + s) for s in scans])
    residual = (x.astype(np.int16) - decoded).astype(np.int16)
    if np.abs(residual).max() > 127:
        raise SystemExit("a residual exceeds int8; cannot pack losslessly")
    offsets = np.cumsum([0] + [len(s) for s in scans]).astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, header=np.frombuffer(header, np.uint8), scans=np.frombuffer(b"".join(scans), np.uint8),
                        offsets=offsets, residual=residual.astype(np.int8), y=y,
                        sha256=np.array(_digest(x, y)), part=np.array(part))
    exact = float((residual == 0).mean())
    print(f"packed {len(x)} images: {out.stat().st_size / 2**20:.1f} MiB; {exact:.1%} of the re-encoded pixel values exact")


def unpack(packed: Path, folder: Path, allow_mismatch: bool = False) -> None:
    z = np.load(packed, allow_pickle=False)
    header, scans, offsets = z["header"].tobytes(), z["scans"].tobytes(), z["offsets"]
    decoded = np.stack([_decode(header + scans[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    x = (decoded.astype(np.int16) + z["residual"]).astype(np.uint8)
    y = z["y"]
    if _digest(x, y) != str(z["sha256"]):
        if not allow_mismatch:
            raise SystemExit("unpacked pixels differ from the packed ones (another libjpeg build?); not writing them"
                             " (--allow-mismatch writes them anyway)")
        print("WARNING: unpacked pixels differ from the packed ones (another libjpeg build); written anyway")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{z['part']}.npz"
    np.savez(target, x=x, y=y)
    print(f"unpacked {len(x)} images into {target}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--allow-mismatch"]
    if len(args) not in (3, 4) or args[0] not in ("pack", "unpack"):
        raise SystemExit(__doc__)
    if args[0] == "pack":
        pack(Path(args[1]), Path(args[2]), args[3] if len(args) == 4 else "train")
    else:
        unpack(Path(args[1]), Path(args[2]), allow_mismatch="--allow-mismatch" in sys.argv)

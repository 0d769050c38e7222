"""Tests of repulsor.data: every format from tiny files the tests write, the splits, the
safety checks (restricted unpickling, tar members, md5), and batched augmentation."""

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from repulsor.data import download, load
from repulsor.data import (DATASETS, SPLITS, alternating_flips, augment, configured_augmentation,
                           default_augmentation, load_dataset)
from repulsor.errors import UserError


# ----------------------------------------------------------------------------- helpers


def _images(n, h, w, c, seed=0):
    """uint8 [n, h, w, c] with image i identifiable: its first byte is i."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n, dtype=np.uint8)
    return x


def _labels(n, k=10, seed=0):
    return np.random.default_rng(seed + 1).integers(0, k, size=n).astype(np.int64)


def _exact(x_u8_nhwc):
    """The float tensor load_dataset must return for these bytes."""
    return torch.from_numpy(x_u8_nhwc).permute(0, 3, 1, 2).float() / 255


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _cifar_batch(n, seed, label_key="labels", k=10):
    x = _images(n, 32, 32, 3, seed)  # HWC; CIFAR stores CHW rows
    rows = x.transpose(0, 3, 1, 2).reshape(n, 3072)
    batch = {b"data": rows, label_key.encode(): _labels(n, k, seed).tolist(), b"batch_label": b"test"}
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [99] * n  # must be ignored
    return x, np.array(batch[label_key.encode()]), batch


def _tar_add(tar, name, payload, **kw):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for key, value in kw.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(payload))


def _split_ids(x):
    """Image ids written by _images (first byte), as a sorted list."""
    return sorted(torch.round(x[:, 0, 0, 0] * 255).long().tolist())


# ----------------------------------------------------------------------------- registry


def test_dataset_infos_are_consistent():
    assert set(DATASETS) == {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.classes) == info.num_classes == len(set(info.classes))
        assert len(info.mean) == len(info.std) == info.shape[0]
        assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    assert DATASETS["cifar100"].classes[:3] == ("apple", "aquarium_fish", "baby")
    with pytest.raises(Exception):
        DATASETS["mnist"].num_classes = 3  # frozen


def test_unknown_name_or_split_lists_valid_ones():
    with pytest.raises(UserError, match="cifar10.*cifar100|mnist"):
        load_dataset("imagenet", "train")
    with pytest.raises(UserError, match="validation") as err:
        load_dataset("digits", "validation")
    assert all(split in str(err.value) for split in SPLITS)
    with pytest.raises(UserError, match="mnist"):
        default_augmentation("svhn")


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_determinism():
    x_full, y_full = load_dataset("digits", "train_full")
    x_test, y_test = load_dataset("digits", "test")
    assert x_full.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_full.dtype == torch.float32 and y_full.dtype == torch.int64 and x_full.is_contiguous()
    assert 0 <= x_full.min() and x_full.max() == 1.0
    assert torch.equal(x_full * 16, torch.round(x_full * 16))  # values are k/16
    assert set(y_test.tolist()) == set(range(10))
    torch.manual_seed(123)  # the split must not depend on torch's global RNG
    x_val, y_val = load_dataset("digits", "val", split_seed=3)
    torch.manual_seed(999)
    x_val2, y_val2 = load_dataset("digits", "val", split_seed=3)
    assert torch.equal(x_val, x_val2) and torch.equal(y_val, y_val2)
    x_val3, _ = load_dataset("digits", "val", split_seed=4)
    assert not torch.equal(x_val, x_val3)


def test_digits_train_and_val_partition_train_full_stratified():
    x_full, y_full = load_dataset("digits", "train_full")
    x_tr, y_tr = load_dataset("digits", "train")
    x_va, y_va = load_dataset("digits", "val")
    assert len(y_va) == round(0.1 * 1437) and len(y_tr) + len(y_va) == len(y_full)

    def rows(x, y):
        return sorted(map(tuple, torch.cat([x.flatten(1) * 16, y[:, None].float()], 1).long().tolist()))

    # Same multiset of (image, label) rows: disjoint and covering.
    assert rows(torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va])) == rows(x_full, y_full)
    assert y_va.bincount(minlength=10).min() >= 13  # stratified: ~14 per class
    assert len(load_dataset("digits", "val", val_size=0.25)[1]) == round(0.25 * 1437)


@pytest.mark.parametrize("bad", [1.5, 0.0, -1, 1437, "10", True])
def test_bad_val_size_is_a_user_error(bad):
    with pytest.raises(UserError, match="val_size"):
        load_dataset("digits", "val", val_size=bad)


def test_default_val_size():
    assert load.val_count(None, 60000) == 1000
    assert load.val_count(None, 10000) == 1000
    assert load.val_count(None, 5000) == 500
    assert load.val_count(0.2, 50) == 10 and load.val_count(7, 50) == 7


# ----------------------------------------------------------------------------- npz


def test_npz_single_file_values_exact_and_splits(tmp_path):
    x, y = _images(30, 28, 28, 1), _labels(30)
    xt, yt = _images(12, 28, 28, 1, seed=5), _labels(12, seed=5)
    np.savez_compressed(tmp_path / "train.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "test.npz", x=xt, y=yt)
    got_x, got_y = load_dataset("mnist", "train_full", data_dir=tmp_path)
    assert got_x.shape == (30, 1, 28, 28) and torch.equal(got_x, _exact(x)) and torch.equal(got_y, torch.from_numpy(y))
    got_xt, got_yt = load_dataset("mnist", "test", data_dir=tmp_path)
    assert torch.equal(got_xt, _exact(xt)) and torch.equal(got_yt, torch.from_numpy(yt))
    # train/val: disjoint, covering, sizes as asked, in original order, same seed = same split.
    x_tr, _ = load_dataset("mnist", "train", data_dir=tmp_path, val_size=7, split_seed=1)
    x_va, _ = load_dataset("mnist", "val", data_dir=tmp_path, val_size=7, split_seed=1)
    ids_tr, ids_va = _split_ids(x_tr), _split_ids(x_va)
    assert len(ids_va) == 7 and not set(ids_tr) & set(ids_va) and sorted(ids_tr + ids_va) == list(range(30))
    assert torch.round(x_tr[:, 0, 0, 0] * 255).tolist() == sorted(torch.round(x_tr[:, 0, 0, 0] * 255).tolist())
    assert _split_ids(load_dataset("mnist", "val", data_dir=tmp_path, val_size=7, split_seed=1)[0]) == ids_va
    assert _split_ids(load_dataset("mnist", "val", data_dir=tmp_path, val_size=7, split_seed=2)[0]) != ids_va
    assert len(load_dataset("mnist", "val", data_dir=tmp_path)[1]) == 3  # default 10% of 30


def test_npz_shards_concatenated_in_order_and_decoded_once(tmp_path):
    x, y = _images(30, 32, 32, 3), _labels(30)
    for i, (a, b) in enumerate([(0, 10), (10, 25), (25, 30)]):
        np.savez_compressed(tmp_path / f"train-{i:02d}.npz", x=x[a:b], y=y[a:b])
    before = load.decode_cached.cache_info()
    got_x, got_y = load_dataset("cifar10", "train_full", data_dir=tmp_path)
    load_dataset("cifar10", "train", data_dir=tmp_path)
    load_dataset("cifar10", "val", data_dir=tmp_path)
    after = load.decode_cached.cache_info()
    assert torch.equal(got_x, _exact(x)) and torch.equal(got_y, torch.from_numpy(y))
    assert after.misses - before.misses == 1 and after.hits - before.hits == 2
    got_x[:] = 0  # the caller owns its tensors: the cache must be unaffected
    assert torch.equal(load_dataset("cifar10", "train_full", data_dir=tmp_path)[0], _exact(x))


def test_npz_shard_gap_and_ambiguity_are_user_errors(tmp_path):
    x, y = _images(4, 28, 28, 1), _labels(4)
    np.savez_compressed(tmp_path / "train-00.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "train-02.npz", x=x, y=y)
    with pytest.raises(UserError, match="train-01.npz is missing"):
        load_dataset("mnist", "train", data_dir=tmp_path)
    (tmp_path / "train-02.npz").unlink()
    np.savez_compressed(tmp_path / "train.npz", x=x, y=y)
    with pytest.raises(UserError, match="both"):
        load_dataset("mnist", "train", data_dir=tmp_path)


def test_npz_corrupt_and_truncated_files_name_the_file(tmp_path):
    good = tmp_path / "good.npz"
    np.savez_compressed(good, x=_images(20, 28, 28, 1), y=_labels(20))
    for case, payload in [("junk", b"this is not a zip file" * 10), ("cut", good.read_bytes()[: good.stat().st_size // 2])]:
        folder = tmp_path / case
        folder.mkdir()
        (folder / "train.npz").write_bytes(payload)
        with pytest.raises(UserError, match="corrupt or truncated") as err:
            load_dataset("mnist", "train", data_dir=folder)
        assert str(folder / "train.npz") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(x=_images(5, 28, 28, 3), y=_labels(5)), "N x 28 x 28 x 1"),
        (dict(x=_images(5, 28, 28, 1)[..., 0], y=_labels(5)), "N x 28 x 28 x 1"),
        (dict(x=_images(5, 28, 28, 1).astype(np.float32), y=_labels(5)), "uint8"),
        (dict(x=_images(5, 28, 28, 1), y=np.array([0, 1, 2, 10, 3])), "0..9"),
        (dict(x=_images(5, 28, 28, 1), y=np.array([0, 1, -1, 2, 3])), "0..9"),
        (dict(x=_images(5, 28, 28, 1), y=_labels(4)), "1-D array of 5"),
        (dict(x=_images(5, 28, 28, 1), y=_labels(5).astype(np.float32)), "integers"),
        (dict(images=_images(5, 28, 28, 1), y=_labels(5)), "lacks array"),
    ],
)
def test_npz_malformed_arrays_are_user_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "test.npz", **arrays)
    with pytest.raises(UserError, match=message) as err:
        load_dataset("mnist", "test", data_dir=tmp_path)
    assert str(tmp_path / "test.npz") in str(err.value)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz, dotted", [(True, False), (False, False), (False, True), (True, True)])
def test_idx_files_gzipped_raw_and_dotted_names(tmp_path, gz, dotted):
    x, y = _images(9, 28, 28, 1), _labels(9)
    xt, yt = _images(4, 28, 28, 1, seed=3), _labels(4, seed=3)
    ext = ".gz" if gz else ""
    sep = "." if dotted else "-"
    _write_idx(tmp_path / f"train-images{sep}idx3-ubyte{ext}", x[..., 0], gz)
    _write_idx(tmp_path / f"train-labels{sep}idx1-ubyte{ext}", y, gz)
    _write_idx(tmp_path / f"t10k-images{sep}idx3-ubyte{ext}", xt[..., 0], gz)
    _write_idx(tmp_path / f"t10k-labels{sep}idx1-ubyte{ext}", yt, gz)
    got_x, got_y = load_dataset("fashion_mnist", "train_full", data_dir=tmp_path)
    assert torch.equal(got_x, _exact(x)) and torch.equal(got_y, torch.from_numpy(y))
    got_xt, got_yt = load_dataset("fashion_mnist", "test", data_dir=tmp_path)
    assert torch.equal(got_xt, _exact(xt)) and torch.equal(got_yt, torch.from_numpy(yt))


def test_idx_truncated_corrupt_and_mismatched_are_user_errors(tmp_path):
    x, y = _images(6, 28, 28, 1)[..., 0], _labels(6)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(labels, y, gz=True)

    _write_idx(images, x, gz=False)
    images.write_bytes(images.read_bytes()[:-100])  # truncated payload
    with pytest.raises(UserError, match="truncated") as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    assert str(images) in str(err.value)

    images.write_bytes(b"\x00\x00\x0d\x03" + images.read_bytes()[4:])  # float type code
    with pytest.raises(UserError, match="not an IDX file") as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    assert str(images) in str(err.value)

    _write_idx(images, x, gz=False)
    labels.write_bytes(labels.read_bytes()[:-6])  # truncated gzip stream
    with pytest.raises(UserError, match="corrupt or truncated") as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    assert str(labels) in str(err.value)

    _write_idx(labels, y[:5], gz=True)
    with pytest.raises(UserError, match="6 images .* 5 labels"):
        load_dataset("mnist", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("layout", ["subfolder", "itself"])
def test_cifar10_pickle_folder(tmp_path, protocol, layout):
    folder = tmp_path / "cifar-10-batches-py" if layout == "subfolder" else tmp_path
    folder.mkdir(exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y, batch = _cifar_batch(4, seed=i)
        xs.append(x), ys.append(y)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=protocol))
    xt, yt, batch = _cifar_batch(3, seed=9)
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    got_x, got_y = load_dataset("cifar10", "train_full", data_dir=tmp_path)
    assert got_x.shape == (20, 3, 32, 32)
    assert torch.equal(got_x, _exact(np.concatenate(xs))) and got_y.tolist() == np.concatenate(ys).tolist()
    got_xt, got_yt = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert torch.equal(got_xt, _exact(xt)) and got_yt.tolist() == yt.tolist()


def test_cifar_incomplete_folder_is_a_user_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps(_cifar_batch(2, 1)[2]))
    with pytest.raises(UserError, match="data_batch_2") as err:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert str(folder) in str(err.value)


def test_cifar100_tar_gz_uses_fine_labels(tmp_path):
    x, y, batch = _cifar_batch(20, seed=1, label_key="fine_labels", k=100)
    xt, yt, batch_t = _cifar_batch(5, seed=2, label_key="fine_labels", k=100)
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        _tar_add(tar, "cifar-100-python/meta", pickle.dumps({b"fine_label_names": [b"apple"]}, protocol=2))
        _tar_add(tar, "cifar-100-python/train", pickle.dumps(batch, protocol=2))
        _tar_add(tar, "cifar-100-python/test", pickle.dumps(batch_t, protocol=2))
    got_x, got_y = load_dataset("cifar100", "train_full", data_dir=tmp_path)
    assert torch.equal(got_x, _exact(x)) and got_y.tolist() == y.tolist() and got_y.max() < 100
    got_xt, got_yt = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert torch.equal(got_xt, _exact(xt)) and got_yt.tolist() == yt.tolist()
    assert not (tmp_path / "cifar-100-python").exists()  # read in memory, never extracted


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}))
    with pytest.raises(UserError, match="refusing to unpickle") as err:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert "system" in str(err.value) and str(folder / "test_batch") in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, attrs, message",
    [
        ("../evil", {}, "outside"),
        ("/tmp/evil", {}, "outside"),
        ("cifar-10-batches-py/../../evil", {}, "outside"),
        ("cifar-10-batches-py/link", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "link"),
        ("cifar-10-batches-py/hard", {"type": tarfile.LNKTYPE, "linkname": "cifar-10-batches-py/test_batch"}, "link"),
    ],
)
def test_tar_with_unsafe_member_is_refused(tmp_path, name, attrs, message):
    folder = tmp_path / "data"
    folder.mkdir()
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _tar_add(tar, "cifar-10-batches-py/test_batch", pickle.dumps(_cifar_batch(2, 1)[2], protocol=2))
        _tar_add(tar, name, b"" if attrs else b"gotcha", **attrs)
    with pytest.raises(UserError, match=message) as err:
        load_dataset("cifar10", "test", data_dir=folder)
    assert str(archive) in str(err.value)
    assert not (tmp_path / "evil").exists()


def test_truncated_tar_is_a_user_error(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _tar_add(tar, "cifar-10-batches-py/test_batch", pickle.dumps(_cifar_batch(20, 1)[2], protocol=2))
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(UserError, match="corrupt or truncated") as err:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert str(archive) in str(err.value)


# ----------------------------------------------------------------------------- folders


def test_missing_folder_and_missing_files_name_the_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="does not exist") as err:
        load_dataset("mnist", "train", data_dir=missing)
    assert str(missing) in str(err.value) and "--download" in str(err.value)
    with pytest.raises(UserError, match="train-images-idx3-ubyte") as err:
        load_dataset("mnist", "train", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "train.npz" in message and "--download" in message and "\n" not in message
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_folder_resolution_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no download cache to fall back on
    monkeypatch.delenv("REPULSOR_DATA", raising=False)
    with pytest.raises(UserError, match="REPULSOR_DATA.*--download"):
        load_dataset("mnist", "test")
    root = tmp_path / "root"
    (root / "cifar10_jpeg").mkdir(parents=True)
    x, y = _images(3, 32, 32, 3), _labels(3)
    np.savez_compressed(root / "cifar10_jpeg" / "test.npz", x=x, y=y)
    monkeypatch.setenv("REPULSOR_DATA", str(root))
    with pytest.warns(UserWarning, match="JPEG"):
        got_x, _ = load_dataset("cifar10", "test")
    assert torch.equal(got_x, _exact(x))
    with pytest.raises(UserError, match=str(root / "mnist")):
        load_dataset("mnist", "test")


# ----------------------------------------------------------------------------- download


def _fake_fetch(source, calls):
    def fetch(url, dest, **kwargs):
        calls.append(url)
        Path(dest).write_bytes(Path(source).read_bytes())

    return fetch


def test_download_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"not the real archive")
    calls = []
    monkeypatch.setattr(download, "fetch", _fake_fetch(fake, calls))
    target = tmp_path / "cifar"
    with pytest.raises(UserError, match="md5") as err:
        load_dataset("cifar10", "test", data_dir=target, download=True)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert str(target) in str(err.value)
    assert list(target.iterdir()) == []  # neither the temporary nor the final file


def test_download_verified_then_loaded(tmp_path, monkeypatch):
    xt, yt, batch = _cifar_batch(3, seed=4)
    fake = tmp_path / "fake.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        _tar_add(tar, "cifar-10-batches-py/test_batch", pickle.dumps(batch, protocol=2))
    good = download.md5(fake)
    monkeypatch.setitem(download.DOWNLOADS, "cifar10", [download.Remote("cifar-10-python.tar.gz", good, ("http://a/", "http://b/"))])
    calls = []
    fetch = _fake_fetch(fake, calls)

    def flaky(url, dest, **kwargs):  # first mirror down: the second one must be used
        if url.startswith("http://a/"):
            raise OSError("connection refused")
        fetch(url, dest)

    monkeypatch.setattr(download, "fetch", flaky)
    target = tmp_path / "cifar"
    got_x, got_y = load_dataset("cifar10", "test", data_dir=target, download=True)
    assert torch.equal(got_x, _exact(xt)) and got_y.tolist() == yt.tolist()
    assert calls == ["http://b/cifar-10-python.tar.gz"]
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-python.tar.gz"]
    load_dataset("cifar10", "test", data_dir=target, download=True)  # present: no new fetch
    assert len(calls) == 1


def test_download_network_failure_is_a_user_error(tmp_path, monkeypatch):
    def down(url, dest, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(download, "fetch", down)
    with pytest.raises(UserError, match="could not download train-images-idx3-ubyte.gz.*no route"):
        load_dataset("mnist", "train", data_dir=tmp_path / "m", download=True)
    assert list((tmp_path / "m").iterdir()) == []


# ----------------------------------------------------------------------------- augment


def test_augment_shape_reproducible_and_identity():
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = augment(x, generator=torch.Generator().manual_seed(1))
    b = augment(x, generator=torch.Generator().manual_seed(1))
    c = augment(x, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment(x, generator=torch.Generator(), crop_padding=0, flip=False), x)
    assert default_augmentation("cifar10") == {"crop_padding": 4, "flip": True}
    assert default_augmentation("mnist") == {"crop_padding": 0, "flip": False}
    with pytest.raises(UserError, match="crop_padding"):
        augment(x, generator=torch.Generator(), crop_padding=-1)


def test_augment_flip_only_flips_some_images():
    x = torch.rand(64, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    out = augment(x, generator=torch.Generator().manual_seed(0), crop_padding=0, flip=True)
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s != f for s, f in zip(same, flipped))  # each image is exactly one of the two
    assert 10 < sum(flipped) < 54


def test_augment_crops_are_windows_of_the_padded_image():
    p = 2
    x = torch.rand(12, 3, 6, 6, generator=torch.Generator().manual_seed(0)) + 0.1  # nonzero, so padding shows
    out = augment(x, generator=torch.Generator().manual_seed(5), crop_padding=p, flip=True)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = set()
    for o, xp in zip(out, padded):
        matches = [
            (dy, dx, f)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for f in (False, True)
            if torch.equal(o, (lambda w: w.flip(-1) if f else w)(xp[:, dy : dy + 6, dx : dx + 6]))
        ]
        assert len(matches) == 1
        offsets.add(matches[0][:2])
    assert len(offsets) > 3  # offsets actually vary across the batch


def test_augment_reflect_padding_crops_windows_of_the_reflected_image():
    p = 2
    x = torch.rand(12, 3, 6, 6, generator=torch.Generator().manual_seed(0)) + 0.1
    out = augment(x, generator=torch.Generator().manual_seed(5), crop_padding=p, flip=False, padding="reflect")
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
    assert padded[0, 0, 0, 0] == x[0, 0, 2, 2]  # reflect mirrors about the edge pixel
    assert (out > 0.05).all()  # no black border anywhere
    offsets = set()
    for o, xp in zip(out, padded):
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if torch.equal(o, xp[:, dy : dy + 6, dx : dx + 6])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 3
    same_draws = augment(x, generator=torch.Generator().manual_seed(5), crop_padding=p, flip=False)
    zero_border = (same_draws == 0).flatten(1).any(1)  # the same offsets with zero padding
    assert torch.equal(zero_border, ~(out == same_draws).flatten(1).all(1))
    with pytest.raises(UserError, match="padding must be one of zeros, reflect"):
        augment(x, generator=torch.Generator(), padding="edge")
    with pytest.raises(UserError, match="reflect padding needs images larger than 6"):
        augment(x, generator=torch.Generator(), crop_padding=6, padding="reflect")


def test_augment_mirrors_exactly_the_images_it_is_told():
    x = torch.rand(8, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    mirrored = torch.tensor([True, False, False, True, True, False, True, False])
    out = augment(x, generator=torch.Generator().manual_seed(0), crop_padding=0, mirrored=mirrored)
    for o, i, m in zip(out, x, mirrored):
        assert torch.equal(o, i.flip(-1) if m else i)
    # Given flips draw no flips: the crops are those of a random-flip batch with the same seed.
    a = augment(x, generator=torch.Generator().manual_seed(3), crop_padding=2, mirrored=torch.zeros(8, dtype=torch.bool))
    b = augment(x, generator=torch.Generator().manual_seed(3), crop_padding=2, flip=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mirrored must be a bool tensor"):
        augment(x, generator=torch.Generator(), flip=False, mirrored=mirrored)
    with pytest.raises(ValueError, match="mirrored must be a bool tensor"):
        augment(x, generator=torch.Generator(), mirrored=mirrored[:4])


def test_alternating_flips_show_every_image_both_ways_in_two_epochs():
    first = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(alternating_flips(first, 0), first) and torch.equal(alternating_flips(first, 4), first)
    assert torch.equal(alternating_flips(first, 1), ~first) and torch.equal(alternating_flips(first, 7), ~first)
    assert 400 < int(first.sum()) < 600


def test_configured_augmentation_reads_the_data_settings():
    assert configured_augmentation("cifar10", "auto", 4) == {"crop_padding": 4, "flip": True, "padding": "zeros"}
    assert configured_augmentation("cifar10", "crop_flip", 2, "reflect") == {"crop_padding": 2, "flip": True,
                                                                             "padding": "reflect"}
    assert configured_augmentation("mnist", "auto", 4) == {"crop_padding": 0, "flip": False}
    assert configured_augmentation("mnist", "crop_flip", 3) == {"crop_padding": 3, "flip": True, "padding": "zeros"}
    assert configured_augmentation("cifar10", "none", 4) == {"crop_padding": 0, "flip": False}
    assert configured_augmentation("cifar10", "crop_flip", 0)["flip"]


# ----------------------------------------------------------------------------- shared data


def test_shared_mnist(shared_data):
    folder = shared_data / "mnist"
    x_tr, y_tr = load_dataset("mnist", "train", data_dir=folder)
    x_va, y_va = load_dataset("mnist", "val", data_dir=folder)
    x_te, y_te = load_dataset("mnist", "test", data_dir=folder)
    _, y_full = load_dataset("mnist", "train_full", data_dir=folder)
    assert x_tr.shape == (59000, 1, 28, 28) and x_va.shape == (1000, 1, 28, 28) and x_te.shape == (10000, 1, 28, 28)
    assert len(y_tr) == 59000 and len(y_va) == 1000 and len(y_te) == 10000
    assert y_full[:5].tolist() == [5, 0, 4, 1, 9]
    assert float(x_te.min()) == 0.0 and float(x_te.max()) == 1.0
    assert torch.bincount(y_tr, minlength=10).sum() + torch.bincount(y_va, minlength=10).sum() == 60000

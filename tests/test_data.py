"""Dataset parsers on tiny files written in the exact original formats; validation; splits; batching."""
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from bpfree import data as D
from bpfree.errors import BpfreeError

REAL_DEBIAN = D.DEBIAN_FASHION_MNIST


# --- writers for the original formats ----------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    # magic: two zero bytes, 0x08 (unsigned byte data), number of dims; then big-endian uint32 sizes
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def make_idx_dir(folder: Path, n_train=30, n_test=10, gz=True, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
              "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8)}
    for stem, a in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), a, gz)
    return arrays


def cifar_dict(n, label_key, rng, n_classes=10):
    # As in the originals: a dict with bytes keys, uint8 data of shape (N, 3072), a list of int labels.
    return {b"batch_label": b"training batch", label_key: [int(v) for v in rng.integers(0, n_classes, n)],
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"a.png"] * n}


def make_cifar10(folder: Path, as_tar: bool):
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": cifar_dict(4, b"labels", rng) for i in range(1, 6)}
    batches["test_batch"] = cifar_dict(3, b"labels", rng)
    batches["test_batch"][b"labels"] = batches["data_batch_1"][b"labels"][:3]   # classes the training set has
    return _write_cifar(folder, "cifar-10-batches-py", "cifar-10-python.tar.gz", batches, as_tar)


def make_cifar100(folder: Path, as_tar: bool):
    rng = np.random.default_rng(2)
    batches = {"train": cifar_dict(6, b"fine_labels", rng, 100),
               "test": cifar_dict(2, b"fine_labels", rng, 100),
               "meta": {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                        b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}}
    batches["test"][b"fine_labels"] = batches["train"][b"fine_labels"][:2]    # classes the training set has
    return _write_cifar(folder, "cifar-100-python", "cifar-100-python.tar.gz", batches, as_tar)


def _write_cifar(folder, subdir, archive, batches, as_tar):
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {name: pickle.dumps(b, protocol=2) for name, b in batches.items()}
    if as_tar:
        with tarfile.open(folder / archive, "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"{subdir}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (folder / subdir).mkdir()
        for name, blob in blobs.items():
            (folder / subdir / name).write_bytes(blob)
    return batches


def normalised(raw_train: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """What the loader should return for images: per-channel stats of the raw train split."""
    t, r = raw_train.astype(np.float64) / 255, raw.astype(np.float64) / 255
    mean, std = t.mean(axis=(0, 2, 3), keepdims=True), t.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    return (r - mean) / std


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test sees the real cache, $HOME, $BPFREE_DATA, the Debian files or the network."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(D, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.delenv("BPFREE_DATA", raising=False)

    def no_network(url, dest):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(D, "_fetch", no_network)


# --- idx -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = make_idx_dir(tmp_path / "mnist", gz=gz)          # the <dir>/<name>/ layout
    d = D.load_data("mnist", data_dir=str(tmp_path))
    assert d.in_shape == (1, 28, 28) and d.num_classes == 10 and d.x_train.dtype == torch.uint8
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_val.shape == (0, 1, 28, 28)
    assert torch.equal(d.y_train, torch.tensor(arrays["train-labels-idx1-ubyte"], dtype=torch.int64))
    assert d.y_train.dtype == torch.int64
    x_tr, x_te = arrays["train-images-idx3-ubyte"][:, None], arrays["t10k-images-idx3-ubyte"][:, None]
    assert np.array_equal(d.x_train.numpy(), x_tr) and np.array_equal(d.x_test.numpy(), x_te)   # the bytes
    np.testing.assert_allclose(d.normalize(d.x_test).numpy(), normalised(x_tr, x_te), atol=1e-4)
    np.testing.assert_allclose(d.normalize(d.x_train).numpy(), normalised(x_tr, x_tr), atol=1e-4)


def test_read_idx_values_and_dims(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "f", a, gz=False)
    assert np.array_equal(D.read_idx(tmp_path / "f"), a)


def test_idx_bad_magic(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x09\x03" + p.read_bytes()[4:])      # 0x09: signed bytes, not ours
    with pytest.raises(BpfreeError, match="bad magic number 0x00000903"):
        D.load_data("mnist", data_dir=str(tmp_path))


def test_idx_labels_file_swapped_for_images(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes((tmp_path / "t10k-images-idx3-ubyte").read_bytes())
    with pytest.raises(BpfreeError, match="train-labels-idx1-ubyte has 3 dimensions"):
        D.load_data("mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    make_idx_dir(tmp_path, gz=gz)
    p = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(BpfreeError, match="truncated"):
        D.load_data("mnist", data_dir=str(tmp_path))


def test_idx_label_out_of_range(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10]), gz=False)
    with pytest.raises(BpfreeError, match="label 10 is out of range; labels must be 0..9"):
        D.load_data("mnist", data_dir=str(tmp_path))


def test_idx_missing_file_is_named(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(BpfreeError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]") as e:
        D.load_data("mnist", data_dir=str(tmp_path), download=False)
    assert "\n" not in str(e.value) and "--data-dir" in str(e.value)


def test_data_dir_must_exist(tmp_path):
    with pytest.raises(BpfreeError, match="is not a directory"):
        D.load_data("mnist", data_dir=str(tmp_path / "nope"))


def test_bpfree_data_env_is_searched(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "env", n_train=12)
    monkeypatch.setenv("BPFREE_DATA", str(tmp_path / "env"))
    assert len(D.load_data("mnist").y_train) == 12


# --- CIFAR ---------------------------------------------------------------------------------
@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar10_round_trip(tmp_path, as_tar):
    batches = make_cifar10(tmp_path / "cifar10", as_tar)
    d = D.load_data("cifar10", data_dir=str(tmp_path))
    assert d.in_shape == (3, 32, 32) and len(d.y_train) == 20 and len(d.y_test) == 3 and d.num_classes == 10
    assert d.y_train.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert d.classes[0] == "airplane"
    x_tr = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    x_te = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    assert d.x_test.dtype == torch.uint8 and d.mean.shape == d.std.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(d.normalize(d.x_test).numpy(), normalised(x_tr, x_te), atol=1e-4)


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar100_round_trip(tmp_path, as_tar):
    batches = make_cifar100(tmp_path, as_tar)
    d = D.load_data("cifar100", data_dir=str(tmp_path))
    assert d.y_train.tolist() == batches["train"][b"fine_labels"]
    assert d.y_test.tolist() == batches["test"][b"fine_labels"]
    assert d.num_classes == 100 and d.classes[99] == "c99" and d.in_shape == (3, 32, 32)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("as_tar", [False, True])
def test_malicious_cifar_pickle_is_refused_not_executed(tmp_path, as_tar):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    batches = {f"data_batch_{i}": cifar_dict(2, b"labels", np.random.default_rng(i)) for i in range(1, 6)}
    batches["test_batch"] = {b"data": evil, b"labels": [0]}
    _write_cifar(tmp_path, "cifar-10-batches-py", "cifar-10-python.tar.gz", batches, as_tar)
    refused = r"test_batch is not a valid CIFAR pickle: refusing to load (posix|os)\.system"
    with pytest.raises(BpfreeError, match=refused):
        D.load_data("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()


def test_corrupt_cifar_pickle(tmp_path):
    make_cifar10(tmp_path, as_tar=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}q\x00garbage")
    with pytest.raises(BpfreeError, match="data_batch_3 is not a valid CIFAR pickle"):
        D.load_data("cifar10", data_dir=str(tmp_path))


def test_cifar_batch_with_wrong_shape(tmp_path):
    make_cifar10(tmp_path, as_tar=False)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(BpfreeError, match="test_batch is corrupt.*expected N x 3072"):
        D.load_data("cifar10", data_dir=str(tmp_path))


def test_corrupt_and_incomplete_cifar_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(BpfreeError, match="not a readable tar.gz"):
        D.load_data("cifar10", data_dir=str(tmp_path))
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(BpfreeError, match="has no member cifar-10-batches-py/data_batch_2"):
        D.load_data("cifar10", data_dir=str(tmp_path))


# --- download + checksum ---------------------------------------------------------------------
def _serve_from(folder: Path, fetched: list):
    def fake_fetch(url, dest):
        fetched.append(url)
        dest.write_bytes((folder / url.rsplit("/", 1)[1]).read_bytes())
    return fake_fetch


def test_download_verifies_sha256_and_caches(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "origin")
    good = {f: hashlib.sha256((tmp_path / "origin" / f).read_bytes()).hexdigest() for f in D.MNIST.files}
    monkeypatch.setattr(D, "MNIST", D._Files(good, ("https://example.org/mnist/",), D._lacks_idx, 4))
    fetched = []
    monkeypatch.setattr(D, "_fetch", _serve_from(tmp_path / "origin", fetched))
    d = D.load_data("mnist")
    assert len(d.y_train) == 30 and sorted(fetched) == sorted("https://example.org/mnist/" + f for f in good)
    # verified files in the cache, no temp files left behind
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(good)
    D.load_data("mnist")
    assert len(fetched) == 4                       # second load uses the cache


def test_download_with_wrong_checksum_is_deleted(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "origin")                 # real idx files, but not the published ones
    monkeypatch.setattr(D, "_fetch", _serve_from(tmp_path / "origin", []))
    with pytest.raises(BpfreeError) as e:
        D.load_data("mnist")
    actual = hashlib.sha256((tmp_path / "origin" / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert str(e.value).startswith("checksum mismatch for train-images-idx3-ubyte.gz")
    assert D.MNIST.files["train-images-idx3-ubyte.gz"] in str(e.value) and actual in str(e.value)
    assert list((tmp_path / "cache" / "mnist").iterdir()) == []


def test_download_falls_back_to_next_mirror(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "origin")
    good = {f: hashlib.sha256((tmp_path / "origin" / f).read_bytes()).hexdigest() for f in D.MNIST.files}
    monkeypatch.setattr(D, "MNIST", D._Files(good, ("https://down/", "https://up/"), D._lacks_idx, 4))
    serve = _serve_from(tmp_path / "origin", [])

    def flaky(url, dest):
        if url.startswith("https://down/"):
            raise urllib.error.URLError("connection refused")
        serve(url, dest)
    monkeypatch.setattr(D, "_fetch", flaky)
    assert len(D.load_data("mnist").y_train) == 30


def test_offline_error_says_how_to_get_fashion_mnist(tmp_path):
    with pytest.raises(BpfreeError) as e:
        D.load_data("fashion-mnist")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg and "BPFREE_DATA" in msg
    assert "network disabled in tests" in msg and str(tmp_path / "cache" / "fashion-mnist") in msg
    assert "\n" not in msg
    with pytest.raises(BpfreeError, match="downloading is off"):
        D.load_data("fashion-mnist", download=False)
    with pytest.raises(BpfreeError) as e:
        D.load_data("cifar10")
    assert "apt-get" not in str(e.value) and "--data-dir" in str(e.value)


def test_fashion_mnist_found_in_debian_dir(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "deb", n_train=20)
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "deb")
    d = D.load_data("fashion-mnist")
    assert len(d.y_train) == 20 and d.classes[9] == "Ankle boot"
    make_idx_dir(tmp_path / "mine" / "fashion-mnist", n_train=11)    # --data-dir comes first
    assert len(D.load_data("fashion-mnist", data_dir=str(tmp_path / "mine")).y_train) == 11


# --- npz and validation ----------------------------------------------------------------------
def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (20, 6, 6)).astype(np.uint8), y_train=np.arange(20) % 4,
                  x_test=rng.integers(0, 256, (8, 6, 6)).astype(np.uint8), y_test=np.arange(8) % 4)
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return f"npz:{path}"


def test_npz_images_and_vectors(tmp_path):
    d = D.load_data(write_npz(tmp_path / "a.npz"))
    assert d.in_shape == (1, 6, 6) and d.num_classes == 4 and d.name == f"npz:{tmp_path / 'a.npz'}"
    v = D.load_data(write_npz(tmp_path / "b.npz", x_train=np.random.rand(20, 5).astype(np.float32),
                              y_train=np.arange(20) % 7, x_test=np.random.rand(8, 5).astype(np.float32),
                              y_test=np.array([6] + [0] * 7)))
    assert v.in_shape == (5,) and v.num_classes == 7 and v.x_test.shape == (8, 5)   # max label over both + 1
    c = D.load_data(write_npz(tmp_path / "c.npz", x_train=np.random.rand(20, 3, 4, 4),
                              x_test=np.random.rand(8, 3, 4, 4)))
    assert c.in_shape == (3, 4, 4) and c.x_train.dtype == torch.float32 and c.y_train.dtype == torch.int64
    assert (len(c.y_train), len(c.y_val), len(c.y_test)) == (20, 0, 8) and c.num_classes == 4


@pytest.mark.parametrize("overrides, message", [
    (dict(y_test=None, x_train=None), "lacks array\\(s\\) x_train, y_test"),
    (dict(x_train=np.full((20, 5), np.nan), x_test=np.zeros((8, 5))), "x_train contains NaN or infinite"),
    (dict(x_test=np.full((8, 6, 6), np.inf)), "x_test contains NaN or infinite"),
    (dict(y_train=np.arange(20) % 4 - 1), "label -1 is out of range"),
    (dict(y_test=np.arange(8) % 4 + 1), "test label 4 never occurs in the training split"),
    (dict(y_train=np.linspace(0, 3, 20)), "labels must be integers"),
    (dict(y_train=(np.arange(20) % 4).astype(np.float32)), "labels must be integers"),
    (dict(y_train=np.arange(19) % 4), "x_train has 20 rows but y_train has 19 labels"),
    (dict(x_test=np.zeros((8, 7, 7), np.uint8)), r"train examples have shape \(1, 6, 6\) but test examples"),
    (dict(x_test=np.zeros((0, 6, 6), np.uint8), y_test=np.zeros(0, np.int64)), "the test split is empty"),
    (dict(x_train=np.zeros((0, 6, 6), np.uint8), y_train=np.zeros(0, np.int64)), "the train split is empty"),
    (dict(x_train=np.zeros((20, 2, 2, 2, 2))), "x_train has shape \\(20, 2, 2, 2, 2\\); expected N x D"),
    (dict(x_train=np.zeros(20)), "expected N x D"),
    (dict(y_train=np.zeros((20, 1), np.int64)), "y_train has shape \\(20, 1\\)"),
])
def test_npz_validation_errors(tmp_path, overrides, message):
    spec = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(BpfreeError, match=message) as e:
        D.load_data(spec)
    assert "\n" not in str(e.value)


def test_npz_missing_file_and_pickle_refused(tmp_path):
    with pytest.raises(BpfreeError, match="npz file not found"):
        D.load_data(f"npz:{tmp_path / 'nope.npz'}")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=[0], x_test=[0],
             y_test=[0])
    with pytest.raises(BpfreeError, match="cannot read .* as an npz of plain arrays"):
        D.load_data(f"npz:{tmp_path / 'obj.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BpfreeError, match="cannot read"):
        D.load_data(f"npz:{tmp_path / 'junk.npz'}")


def test_unknown_dataset_lists_choices():
    with pytest.raises(BpfreeError) as e:
        D.load_data("imagenet")
    msg = str(e.value)
    assert msg.startswith("unknown dataset 'imagenet'")
    assert all(n in msg for n in ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "tiny-imagenet",
                                  "npz:PATH", "imagefolder:PATH"))


def test_list_and_register_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_DATASETS", D._DATASETS.copy())
    seen = {}

    @D.register_dataset("toy", "two points")
    def toy(root_dirs, download):
        seen.update(root_dirs=root_dirs, download=download)
        x = np.array([[0.0, 1.0], [2.0, 3.0]])
        return x, np.array([0, 1]), x, np.array([1, 0])          # a plain 4-tuple is enough
    assert D.list_datasets()["toy"] == "two points" and "npz:PATH" in D.list_datasets()
    d = D.load_data("toy", data_dir=str(tmp_path), download=False)
    assert seen == {"root_dirs": [tmp_path], "download": False} and d.in_shape == (2,) and d.num_classes == 2


# --- splits and normalisation --------------------------------------------------------------
def test_normalisation_uses_train_statistics_only(tmp_path):
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 5.0, 0.2])[None, :, None, None]
    x_tr = rng.normal(3.0, 1.0, (50, 3, 4, 4)) * scale
    x_te = x_tr[:10] + 10.0                          # test shifted: its own stats would hide it
    d = D.load_data(write_npz(tmp_path / "n.npz", x_train=x_tr, x_test=x_te, y_train=np.arange(50) % 2,
                              y_test=np.arange(10) % 2))
    assert torch.allclose(d.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(d.x_train.std((0, 2, 3)), torch.ones(3), atol=1e-4)
    std = torch.tensor(x_tr.std(axis=(0, 2, 3), ddof=1), dtype=torch.float32)
    shift = (d.x_test - d.x_train[:10]).mean((0, 2, 3))
    assert torch.allclose(shift, 10.0 / std, rtol=1e-4)


def test_normalisation_of_vectors_is_global_and_val_uses_train_stats(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (100, 3)) * [1, 10, 100] + 7
    d = D.load_data(write_npz(tmp_path / "v.npz", x_train=x, x_test=x[:5], y_train=np.arange(100) % 2,
                              y_test=np.arange(5) % 2), val_split=0.3)
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std()) - 1) < 1e-4
    assert d.x_train.std(0)[2] > 10 * d.x_train.std(0)[0]          # one global scale, not per feature
    assert abs(float(d.x_val.mean())) > 1e-4                          # not normalised with its own stats


def test_val_split_is_seeded_and_disjoint():
    a = D.load_data("digits", val_split=0.2, seed=1)
    b = D.load_data("digits", val_split=0.2, seed=1)
    c = D.load_data("digits", val_split=0.2, seed=2)
    assert len(a.y_val) == round(0.2 * 1347) and len(a.y_train) + len(a.y_val) == 1347
    assert a.x_val.shape == (269, 1, 8, 8)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_val, c.x_val)
    assert torch.equal(a.y_test, c.y_test)          # the test split never moves


def test_val_split_rows_are_held_out_training_rows(tmp_path):
    x = np.arange(40, dtype=np.float64)[:, None]          # each row identifies itself
    d = D.load_data(write_npz(tmp_path / "ids.npz", x_train=x, y_train=np.arange(40) % 2, x_test=x[:4],
                              y_test=np.arange(4) % 2), val_split=0.25, seed=3)
    # undo the (affine) normalisation with the test rows, which are ids 0 and 1
    b, a = d.x_test[0, 0].item(), (d.x_test[1, 0] - d.x_test[0, 0]).item()
    tr = [round((v - b) / a) for v in d.x_train[:, 0].tolist()]
    va = [round((v - b) / a) for v in d.x_val[:, 0].tolist()]
    assert len(va) == 10 and sorted(tr + va) == list(range(40))        # disjoint, together all of train
    assert d.y_val.tolist() == [i % 2 for i in va]                      # labels follow their rows


def test_train_subset_and_bad_options():
    a = D.load_data("digits", train_subset=100, seed=0)
    assert len(a.y_train) == 100 and len(a.y_test) == 450
    b, c = D.load_data("digits", train_subset=100, seed=0), D.load_data("digits", train_subset=100, seed=1)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.y_train, c.y_train)
    assert len(D.load_data("digits", train_subset=100, val_split=0.1).y_val) == 10
    for bad in (0, -5):
        with pytest.raises(BpfreeError, match="--train-subset must be a positive"):
            D.load_data("digits", train_subset=bad)
    with pytest.raises(BpfreeError, match="--train-subset 5000 is larger than the 1347"):
        D.load_data("digits", train_subset=5000)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(BpfreeError, match="--val-split must be in \\[0, 1\\)"):
            D.load_data("digits", val_split=bad)
    with pytest.raises(BpfreeError, match="leaves no training examples"):
        D.load_data("digits", train_subset=1, val_split=0.9)


def test_digits_is_deterministic():
    a, b = D.load_data("digits"), D.load_data("digits", seed=5)
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10 and (len(a.y_train), len(a.y_test)) == (1347, 450)
    assert a.x_train.shape == (1347, 1, 8, 8) and a.x_val.shape == (0, 1, 8, 8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    assert torch.equal(a.y_test, b.y_test)
    from sklearn.datasets import load_digits
    per_class = np.bincount(load_digits().target)                  # stratified: a quarter of each digit
    assert np.abs(torch.bincount(a.y_test).numpy() - per_class / 4).max() <= 1


@pytest.mark.skipif(not REAL_DEBIAN.exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", REAL_DEBIAN)
    d = D.load_data("fashion-mnist")
    assert (len(d.y_train), len(d.y_test), d.num_classes, d.in_shape) == (60000, 10000, 10, (1, 28, 28))
    assert torch.bincount(d.y_train).tolist() == [6000] * 10
    assert d.x_train.dtype == torch.uint8 and d.x_train.numel() == 60000 * 28 * 28     # 47 MB, not 188 MB


# --- inputs stored as bytes, normalised per batch -------------------------------------------------
def _old_eager_load(x_tr, y_tr, x_te, train_subset=None, val_split=0.0, seed=0):
    """load_data's splits and normalisation as they were before inputs were kept as uint8 (verbatim)."""
    def _to_float(x):
        out = torch.from_numpy(x.astype(np.float32, order="C"))
        return out.div_(255.0) if x.dtype == np.uint8 else out
    rng = np.random.default_rng(seed)
    keep = np.arange(len(y_tr))
    if train_subset is not None:
        keep = np.sort(rng.permutation(len(keep))[:train_subset])
    n_val = int(round(val_split * len(keep)))
    order = rng.permutation(len(keep))
    val_idx, train_idx = np.sort(keep[order[:n_val]]), np.sort(keep[order[n_val:]])
    x_train, x_val, x_test = _to_float(x_tr[train_idx]), _to_float(x_tr[val_idx]), _to_float(x_te)
    dims = (0, 2, 3) if x_train.dim() == 4 else (0, 1)
    mean = x_train.double().mean(dim=dims, keepdim=True).float()
    std = x_train.double().std(dim=dims, keepdim=True).float().clamp_min(1e-6)
    return tuple(x.sub_(mean).div_(std) for x in (x_train, x_val, x_test))


@pytest.mark.parametrize("shape, subset, val", [((3, 7, 5), None, 0.0), ((1, 9, 9), 150, 0.2), ((6,), 120, 0.25)])
def test_uint8_inputs_normalise_bit_identically_to_the_old_eager_path(tmp_path, shape, subset, val):
    rng = np.random.default_rng(7)
    # skewed, per-channel different levels, so the statistics are not round numbers
    x_tr = (rng.beta(2, 5, (200, *shape)) * 255 * rng.uniform(0.3, 1, shape)).astype(np.uint8)
    x_te = rng.integers(0, 256, (33, *shape)).astype(np.uint8)
    spec = write_npz(tmp_path / "u8.npz", x_train=x_tr, x_test=x_te, y_train=np.arange(200) % 3,
                     y_test=np.arange(33) % 3)
    d = D.load_data(spec, train_subset=subset, val_split=val, seed=4)
    old = _old_eager_load(x_tr, np.arange(200) % 3, x_te, subset, val, seed=4)
    assert d.x_train.dtype == d.x_val.dtype == d.x_test.dtype == torch.uint8
    assert d.mean.dtype == d.std.dtype == torch.float32
    assert d.mean.shape == d.std.shape == ((1, shape[0], 1, 1) if len(shape) == 3 else (1, 1))
    for x, want in zip((d.x_train, d.x_val, d.x_test), old):
        got = d.normalize(x)
        assert got.dtype == torch.float32 and torch.equal(got, want)           # bit for bit
    rows = torch.tensor([5, 0, 17, 5, 2])                                        # any batch of rows
    assert torch.equal(d.normalize(d.x_train[rows]), old[0][rows])
    assert torch.equal(d.normalized().x_test, old[2]) and d.normalized().x_train.dtype == torch.float32


def test_normalize_keeps_channels_last_and_labels_only_keeps_statistics(tmp_path):
    rng = np.random.default_rng(1)
    d = D.load_data(write_npz(tmp_path / "c.npz", x_train=rng.integers(0, 256, (30, 3, 6, 6)).astype(np.uint8),
                              x_test=rng.integers(0, 256, (8, 3, 6, 6)).astype(np.uint8), y_train=np.arange(30) % 2,
                              y_test=np.arange(8) % 2))
    nhwc = d.x_train.contiguous(memory_format=torch.channels_last)
    out = d.normalize(nhwc)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, d.normalize(d.x_train))
    meta = d.labels_only()
    assert meta.x_train.shape == (0, 3, 6, 6) and torch.equal(meta.mean, d.mean) and torch.equal(meta.std, d.std)
    assert meta.normalize(meta.x_train).shape == (0, 3, 6, 6)
    with pytest.raises(BpfreeError, match="uint8 inputs are normalised per batch and need mean and std"):
        dataclasses.replace(d, mean=None)


def test_float_inputs_are_normalised_at_load_and_pass_through(tmp_path):
    d = D.load_data("digits")
    assert d.x_train.dtype == torch.float32 and d.normalize(d.x_train) is d.x_train
    assert d.mean.shape == (1, 1, 1, 1) and abs(float(d.x_train.mean())) < 1e-5      # statistics kept, applied
    v = D.load_data(write_npz(tmp_path / "v.npz", x_train=np.random.rand(20, 5).astype(np.float32),
                              x_test=np.random.rand(8, 5).astype(np.float32)))
    assert v.normalize(v.x_test) is v.x_test and v.mean.shape == (1, 1)
    mixed = D.load_data(write_npz(tmp_path / "m.npz", x_test=np.random.rand(8, 6, 6)))   # uint8 train, float test
    assert mixed.x_train.dtype == torch.float32                       # as before: bytes only when every split is


def test_bytes_take_a_quarter_of_float32(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (64, 3, 8, 8)).astype(np.uint8)
    d = D.load_data(write_npz(tmp_path / "m.npz", x_train=x, x_test=x[:8], y_train=np.arange(64) % 2,
                              y_test=np.arange(8) % 2))
    assert d.x_train.element_size() * d.x_train.numel() == x.nbytes
    assert d.normalize(d.x_train).element_size() * d.x_train.numel() == 4 * x.nbytes


def test_image_size_is_checked_and_refused_where_images_have_a_fixed_size(tmp_path):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(BpfreeError, match="--image-size must be a positive number of pixels"):
            D.load_data("digits", image_size=bad)
    with pytest.raises(BpfreeError, match="--image-size resizes images on decode .*digits has a fixed size"):
        D.load_data("digits", image_size=32)
    with pytest.raises(BpfreeError, match="holds arrays"):
        D.load_data(write_npz(tmp_path / "a.npz"), image_size=32)


def test_md5_checksums_verify_downloads_too(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "origin")
    good = {f: "md5:" + hashlib.md5((tmp_path / "origin" / f).read_bytes()).hexdigest() for f in D.MNIST.files}
    monkeypatch.setattr(D, "MNIST", D._Files(good, ("https://example.org/",), D._lacks_idx, 4))
    monkeypatch.setattr(D, "_fetch", _serve_from(tmp_path / "origin", []))
    assert len(D.load_data("mnist").y_train) == 30
    bad = dict(good, **{"t10k-labels-idx1-ubyte.gz": "md5:" + "0" * 32})
    monkeypatch.setattr(D, "MNIST", D._Files(bad, ("https://example.org/",), D._lacks_idx, 4))
    (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(BpfreeError, match=f"expected md5 {'0' * 32}, got [0-9a-f]{{32}}; the download was deleted"):
        D.load_data("mnist")


@pytest.mark.skipif(not REAL_DEBIAN.exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_normalises_bit_identically(monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", REAL_DEBIAN)
    d = D.load_data("fashion-mnist", val_split=0.1, seed=3)
    x_tr, y_tr, x_te, _ = D._parse_idx(REAL_DEBIAN)
    old = _old_eager_load(x_tr, y_tr, x_te, val_split=0.1, seed=3)
    assert d.x_train.dtype == torch.uint8 and d.x_train.numel() * d.x_train.element_size() == 54000 * 784
    assert all(torch.equal(d.normalize(x), want) for x, want in zip((d.x_train, d.x_val, d.x_test), old))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_normalize_on_cuda_equals_the_cpu_bit_for_bit(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, (40, 3, 8, 8)).astype(np.uint8)
    d = D.load_data(write_npz(tmp_path / "g.npz", x_train=x, x_test=x[:8], y_train=np.arange(40) % 2,
                              y_test=np.arange(8) % 2))
    on_gpu = dataclasses.replace(d, mean=d.mean.cuda(), std=d.std.cuda())
    assert torch.equal(on_gpu.normalize(d.x_train.cuda()).cpu(), d.normalize(d.x_train))

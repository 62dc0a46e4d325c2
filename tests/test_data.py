"""Dataset parsers on small files generated in the exact original formats, and validation."""
import gzip
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


# --- writers for the original formats ----------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def make_idx_dir(folder: Path, n_train=30, n_test=10, gz=True, rng=np.random.default_rng(0)):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for stem, a in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), a, gz)
    return arrays


def cifar_dict(n, label_key, rng):
    # As in the originals: a dict with bytes keys, uint8 data of shape (N, 3072), a list of labels.
    return {b"batch_label": b"x", label_key: [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8)}


def make_cifar10(folder: Path, as_tar: bool):
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": cifar_dict(4, b"labels", rng) for i in range(1, 6)}
    batches["test_batch"] = cifar_dict(3, b"labels", rng)
    for b in batches.values():
        b[b"labels"][:2] = [0, 1]
    return _write_cifar(folder, "cifar-10-batches-py", "cifar-10-python.tar.gz", batches, as_tar)


def make_cifar100(folder: Path, as_tar: bool):
    rng = np.random.default_rng(2)
    batches = {"train": cifar_dict(6, b"fine_labels", rng), "test": cifar_dict(2, b"fine_labels", rng)}
    batches["train"][b"fine_labels"][:] = list(range(6))
    batches["test"][b"fine_labels"][:] = [0, 5]
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


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test sees the real cache, $BPFREE_DATA or the network."""
    monkeypatch.setattr(D, "CACHE", tmp_path / "cache")
    monkeypatch.delenv("BPFREE_DATA", raising=False)

    def no_network(url, dest):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(D, "_fetch", no_network)


# --- idx -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    arrays = make_idx_dir(tmp_path / "mnist", gz=gz)
    d = D.load_data("mnist", data_dir=str(tmp_path))
    assert d.in_shape == (1, 28, 28) and d.num_classes == 10
    assert torch.equal(d.y_train, torch.tensor(arrays["train-labels-idx1-ubyte"]))
    # undo normalisation: the pixels come back exactly
    raw = arrays["t10k-images-idx3-ubyte"] / 255.0
    x = d.x_test[:, 0].numpy()
    slope = np.polyfit(raw.ravel(), x.ravel(), 1)[0]
    assert np.allclose(raw * slope + (x.ravel()[0] - raw.ravel()[0] * slope), x, atol=1e-4)


def test_idx_bad_magic(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x09\x03" + p.read_bytes()[4:])
    with pytest.raises(BpfreeError, match="bad magic"):
        D.read_idx(p)


def test_idx_truncated(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(BpfreeError, match="truncated"):
        D.read_idx(p)
    with pytest.raises(BpfreeError, match="truncated"):
        D.load_data("mnist", data_dir=str(tmp_path))


def test_idx_missing_file_is_reported(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(BpfreeError, match="mnist not found"):
        D.load_data("mnist", data_dir=str(tmp_path))


# --- CIFAR ---------------------------------------------------------------------------------
@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar10_round_trip(tmp_path, as_tar):
    batches = make_cifar10(tmp_path / "cifar10", as_tar)
    d = D.load_data("cifar10", data_dir=str(tmp_path))
    assert d.in_shape == (3, 32, 32) and len(d.y_train) == 20 and len(d.y_test) == 3
    assert d.y_train.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar100_round_trip(tmp_path, as_tar):
    make_cifar100(tmp_path, as_tar)
    d = D.load_data("cifar100", data_dir=str(tmp_path))
    assert d.y_train.tolist() == list(range(6)) and d.y_test.tolist() == [0, 5] and d.num_classes == 6


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bpfree-pwned",))


def test_malicious_cifar_pickle_is_refused_not_executed(tmp_path):
    make_cifar10(tmp_path, as_tar=False)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Evil()}))
    if os.path.exists("/tmp/bpfree-pwned"):
        os.unlink("/tmp/bpfree-pwned")
    with pytest.raises(BpfreeError, match="refusing to load posix.system|refusing to load os.system"):
        D.load_data("cifar10", data_dir=str(tmp_path))
    assert not os.path.exists("/tmp/bpfree-pwned")


def test_corrupt_cifar_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(BpfreeError, match="not a readable tar.gz"):
        D.load_data("cifar10", data_dir=str(tmp_path))


# --- download + checksum ---------------------------------------------------------------------
def test_download_verifies_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    make_idx_dir(tmp_path / "origin")
    good = {f: D.sha256(tmp_path / "origin" / f) for f in D._DATASETS["mnist"].files}
    monkeypatch.setitem(D._DATASETS, "mnist", D._Source("t", good, "https://example/", D._parse_idx))
    fetched = []

    def fake_fetch(url, dest):
        fetched.append(url)
        dest.write_bytes((tmp_path / "origin" / url.rsplit("/", 1)[1]).read_bytes())
    monkeypatch.setattr(D, "_fetch", fake_fetch)
    d = D.load_data("mnist")
    assert len(d.y_train) == 30 and len(fetched) == 4
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(good)


def test_download_with_wrong_checksum_is_discarded(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    monkeypatch.setattr(D, "_fetch", lambda url, dest: dest.write_bytes(b"tampered"))
    with pytest.raises(BpfreeError, match="checksum mismatch"):
        D.load_data("mnist")
    assert list((tmp_path / "cache" / "mnist").iterdir()) == []


def test_offline_error_says_how_to_get_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    monkeypatch.setitem(D._DATASETS, "fashion-mnist",
                        D._Source("t", D._DATASETS["fashion-mnist"].files, "http://x/", D._parse_idx, (tmp_path / "none",)))
    with pytest.raises(BpfreeError) as e:
        D.load_data("fashion-mnist")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg and "\n" not in msg


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
    assert d.in_shape == (1, 6, 6) and d.num_classes == 4
    v = D.load_data(write_npz(tmp_path / "b.npz", x_train=np.random.rand(20, 5).astype(np.float32),
                              x_test=np.random.rand(8, 5).astype(np.float32)))
    assert v.in_shape == (5,)
    c = D.load_data(write_npz(tmp_path / "c.npz", x_train=np.random.rand(20, 3, 4, 4), x_test=np.random.rand(8, 3, 4, 4)))
    assert c.in_shape == (3, 4, 4) and c.x_train.dtype == torch.float32


@pytest.mark.parametrize("overrides, message", [
    (dict(y_test=None), "lacks array"),
    (dict(x_train=np.full((20, 5), np.nan)), "NaN"),
    (dict(y_train=np.arange(20) % 4 - 1), "negative label"),
    (dict(y_train=np.linspace(0, 3, 20)), "labels must be integers"),
    (dict(y_train=np.arange(19) % 4), "19 labels|19,|shape \\(19,\\)"),
    (dict(x_test=np.zeros((8, 7, 7), np.uint8)), "train examples have shape"),
    (dict(x_test=np.zeros((0, 6, 6), np.uint8), y_test=np.zeros(0, np.int64)), "split is empty"),
    (dict(x_train=np.zeros((20, 2, 2, 2, 2))), "expected N x D"),
])
def test_npz_validation_errors(tmp_path, overrides, message):
    spec = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(BpfreeError, match=message):
        D.load_data(spec)


def test_npz_missing_file_and_pickle_refused(tmp_path):
    with pytest.raises(BpfreeError, match="not found"):
        D.load_data(f"npz:{tmp_path / 'nope.npz'}")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=[0], x_test=[0], y_test=[0])
    with pytest.raises(BpfreeError, match="cannot read"):
        D.load_data(f"npz:{tmp_path / 'obj.npz'}")


def test_unknown_dataset_lists_choices():
    with pytest.raises(BpfreeError, match="digits.*fashion-mnist.*npz:PATH"):
        D.load_data("imagenet")


# --- splits and normalisation --------------------------------------------------------------
def test_normalisation_uses_train_statistics_only():
    d = D.load_data("digits")
    assert abs(d.x_train.mean()) < 1e-5 and abs(d.x_train.std() - 1) < 1e-3
    assert abs(d.x_test.mean()) > 1e-5          # test set is normalised with train stats, not its own


def test_val_split_is_seeded_and_disjoint():
    a = D.load_data("digits", val_split=0.2, seed=1)
    b = D.load_data("digits", val_split=0.2, seed=1)
    c = D.load_data("digits", val_split=0.2, seed=2)
    assert len(a.y_val) == round(0.2 * 1347) and len(a.y_train) + len(a.y_val) == 1347
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.x_val, c.x_val)
    assert torch.equal(a.y_test, c.y_test)          # the test split never moves


def test_train_subset_and_bad_options():
    assert len(D.load_data("digits", train_subset=100).y_train) == 100
    with pytest.raises(BpfreeError, match="--train-subset"):
        D.load_data("digits", train_subset=0)
    with pytest.raises(BpfreeError, match="--val-split"):
        D.load_data("digits", val_split=1.0)
    with pytest.raises(BpfreeError, match="leaves no training"):
        D.load_data("digits", train_subset=1, val_split=0.9)


def test_digits_is_deterministic():
    a, b = D.load_data("digits"), D.load_data("digits", seed=5)
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10 and len(a.y_test) == 450
    assert torch.equal(a.x_train, b.x_train)


def test_batches_cover_every_example_once_reproducibly():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    seen = [yb for _, yb in D.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert sorted(torch.cat(seen).tolist()) == list(range(10)) and [len(s) for s in seen] == [3, 3, 3, 1]
    again = [yb for _, yb in D.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert all(torch.equal(p, q) for p, q in zip(seen, again))
    assert len(list(D.batches(x, y, 3, shuffle=False, drop_last=True))) == 3


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package():
    d = D.load_data("fashion-mnist")
    assert (len(d.y_train), len(d.y_test), d.num_classes, d.in_shape) == (60000, 10000, 10, (1, 28, 28))

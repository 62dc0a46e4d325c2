"""Datasets as whole in-memory tensors: registry, file parsers, download + checksum, validation.

`load_data(spec)` returns a `Data`: float32 inputs normalised with statistics of the training
split only, int64 labels, and the train / validation / test splits. Named datasets are found in
`--data-dir`, `$BPFREE_DATA`, the Debian package path (Fashion-MNIST), `~/.cache/bpfree`, or are
downloaded from the canonical source and verified by SHA-256. `npz:PATH` loads your own arrays.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .errors import BpfreeError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path("~/.cache/bpfree")


@dataclass
class Data:
    name: str
    x_train: torch.Tensor      # float32, (N, C, H, W) or (N, D), normalised
    y_train: torch.Tensor      # int64 in 0..num_classes-1
    x_val: torch.Tensor        # held out from train; may have 0 rows
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_shape: tuple[int, ...]
    classes: Optional[list[str]] = None

    def summary(self) -> str:
        return (f"{self.name}: input {self.in_shape}, {self.num_classes} classes, "
                f"{len(self.y_train)} train / {len(self.y_val)} val / {len(self.y_test)} test")


# Raw arrays as parsed from files: x uint8 or float, y integers.
Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# --- registry ------------------------------------------------------------------------------
@dataclass
class _Source:
    description: str
    files: dict[str, str]          # file name -> SHA-256 of the canonical download
    url: str                       # base URL the files are downloaded from
    parse: Callable[[Path], Raw]   # directory holding the files -> raw arrays
    system_dirs: tuple[Path, ...] = ()
    classes: Optional[list[str]] = None


_DATASETS: dict[str, _Source] = {}
_EMBEDDED: dict[str, tuple[str, Callable[[], Raw]]] = {}


def register_dataset(name: str, description: str):
    """Register an embedded dataset: a function returning (x_train, y_train, x_test, y_test)."""
    def wrap(fn):
        _EMBEDDED[name] = (description, fn)
        return fn
    return wrap


def list_datasets() -> dict[str, str]:
    names = {n: d for n, (d, _) in _EMBEDDED.items()}
    names.update({n: s.description for n, s in _DATASETS.items()})
    names["npz:PATH"] = "your arrays: x_train, y_train, x_test, y_test in an .npz file"
    return names


@register_dataset("digits", "scikit-learn's bundled 8x8 handwritten digits (1797 images, fixed 75/25 split)")
def _digits() -> Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]          # (N, 1, 8, 8) in [0, 1]
    # Fixed split, independent of --seed, so test sets are comparable across runs.
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return x_tr, y_tr, x_te, y_te


# --- idx (MNIST, Fashion-MNIST) ----------------------------------------------------------------
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _open_maybe_gz(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise BpfreeError(f"cannot read {path}: {e}") from None


def read_idx(path: Path) -> np.ndarray:
    """An idx file: magic 0x0000 08 NDIM (uint8 data), NDIM big-endian uint32 sizes, then the data."""
    buf = _open_maybe_gz(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08 or not 1 <= buf[3] <= 4:
        raise BpfreeError(f"{path} is not an idx file of unsigned bytes (bad magic number {buf[:4].hex()})")
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise BpfreeError(f"{path} is truncated: its header is incomplete")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(buf) != expected:
        raise BpfreeError(f"{path} is corrupt or truncated: header says {dims} ({expected} bytes), file has {len(buf)}")
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise BpfreeError(f"missing file {stem}[.gz] in {folder}")


def _parse_idx(folder: Path) -> Raw:
    arrays = [read_idx(_find(folder, stem)) for stem in IDX_FILES]
    x_tr, y_tr, x_te, y_te = arrays
    return x_tr[:, None], y_tr, x_te[:, None], y_te        # images (N, 1, 28, 28)


# --- CIFAR python pickles --------------------------------------------------------------------
class _SafeUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; allow only what they contain (numpy arrays), never code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise BpfreeError(f"{where} is not a valid CIFAR batch: {e}") from None
    if not isinstance(obj, dict):
        raise BpfreeError(f"{where} is not a valid CIFAR batch: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_batch(obj: dict, label_key: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in obj or label_key not in obj:
        raise BpfreeError(f"{where} is not a valid CIFAR batch: missing {label_key.decode()} or data")
    x = np.asarray(obj[b"data"], dtype=np.uint8)
    y = np.asarray(obj[label_key])
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise BpfreeError(f"{where} is corrupt: data shape {x.shape}, {len(y)} labels")
    return x.reshape(-1, 3, 32, 32), y


def _cifar_reader(folder: Path, archive: str, subdir: str) -> Callable[[str], bytes]:
    """Read members from the extracted folder or straight from the downloaded .tar.gz."""
    if (folder / subdir).is_dir():
        return lambda name: (folder / subdir / name).read_bytes()
    tar_path = folder / archive
    if not tar_path.exists():
        raise BpfreeError(f"missing {subdir}/ or {archive} in {folder}")
    try:
        tar = tarfile.open(tar_path, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BpfreeError(f"{tar_path} is not a readable tar.gz: {e}") from None

    def read(name):
        try:
            member = tar.extractfile(f"{subdir}/{name}")
            return member.read()
        except (KeyError, AttributeError):
            raise BpfreeError(f"{tar_path} has no member {subdir}/{name}") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BpfreeError(f"{tar_path} is corrupt: {e}") from None
    return read


def _read_member(read, name, where):
    try:
        return read(name)
    except FileNotFoundError:
        raise BpfreeError(f"missing file {name} in {where}") from None


def _parse_cifar10(folder: Path) -> Raw:
    read = _cifar_reader(folder, "cifar-10-python.tar.gz", "cifar-10-batches-py")
    parts = [_cifar_batch(_unpickle(_read_member(read, f"data_batch_{i}", folder), f"data_batch_{i}"),
                          b"labels", f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = _cifar_batch(_unpickle(_read_member(read, "test_batch", folder), "test_batch"), b"labels", "test_batch")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_te, y_te


def _parse_cifar100(folder: Path) -> Raw:
    read = _cifar_reader(folder, "cifar-100-python.tar.gz", "cifar-100-python")
    x_tr, y_tr = _cifar_batch(_unpickle(_read_member(read, "train", folder), "train"), b"fine_labels", "train")
    x_te, y_te = _cifar_batch(_unpickle(_read_member(read, "test", folder), "test"), b"fine_labels", "test")
    return x_tr, y_tr, x_te, y_te


# SHA-256 sources: Fashion-MNIST computed from Debian's dataset-fashion-mnist files (upstream's
# originals); MNIST as published in torchvision's prototype datasets and many mirrors' manifests;
# CIFAR as in Keras' datasets (cifar10.py / cifar100.py `file_hash`).
_DATASETS.update({
    "fashion-mnist": _Source(
        "Zalando's 28x28 clothing images (60000 train / 10000 test), idx files",
        {"train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
         "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
         "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
         "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"},
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _parse_idx, (DEBIAN_FASHION_MNIST,),
        ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
    "mnist": _Source(
        "LeCun's 28x28 handwritten digits (60000 train / 10000 test), idx files",
        {"train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
         "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
         "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
         "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
        "https://ossci-datasets.s3.amazonaws.com/mnist/", _parse_idx),
    "cifar10": _Source(
        "32x32 colour images in 10 classes (50000 train / 10000 test), python pickle batches",
        {"cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
        "https://www.cs.toronto.edu/~kriz/", _parse_cifar10),
    "cifar100": _Source(
        "32x32 colour images in 100 classes (50000 train / 10000 test), python pickle files",
        {"cifar-100-python.tar.gz": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"},
        "https://www.cs.toronto.edu/~kriz/", _parse_cifar100),
})


# --- finding and downloading files --------------------------------------------------------------
def _candidate_dirs(name: str, source: _Source, data_dir: Optional[str]) -> list[Path]:
    roots = [Path(p).expanduser() for p in (data_dir, os.environ.get("BPFREE_DATA")) if p]
    dirs = [d for root in roots for d in (root, root / name)]
    return dirs + list(source.system_dirs) + [CACHE.expanduser() / name]


def _has_files(folder: Path, name: str) -> bool:
    if name in ("cifar10", "cifar100"):
        sub, archive = {"cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
                        "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz")}[name]
        return (folder / sub).is_dir() or (folder / archive).is_file()
    return all((folder / s).exists() or (folder / (s + ".gz")).exists() for s in IDX_FILES)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path) -> None:
    """Download `url` to `dest` (tests replace this; the library never downloads in tests)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def download(name: str, source: _Source, folder: Path) -> None:
    """Fetch every file to a temporary name, check its SHA-256, then rename it into place."""
    folder.mkdir(parents=True, exist_ok=True)
    for file, expected in source.files.items():
        target = folder / file
        if target.exists() and sha256(target) == expected:
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{file}.", suffix=".part")
        os.close(fd)
        try:
            _fetch(source.url + file, Path(tmp))
            actual = sha256(Path(tmp))
            if actual != expected:
                raise BpfreeError(f"checksum mismatch for {file} from {source.url}: expected sha256 {expected}, "
                                  f"got {actual}; the download was discarded")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _how_to_get(name: str, dirs: list[Path]) -> str:
    hint = "; or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
    return (f"looked in {', '.join(str(d) for d in dirs)}; put the files in --data-dir DIR or $BPFREE_DATA"
            f"{hint}")


def _load_named(name: str, data_dir: Optional[str], download_ok: bool) -> Raw:
    source = _DATASETS[name]
    dirs = _candidate_dirs(name, source, data_dir)
    for folder in dirs:
        if folder.is_dir() and _has_files(folder, name):
            return source.parse(folder)
    if not download_ok:
        raise BpfreeError(f"dataset {name} not found; {_how_to_get(name, dirs)}")
    try:
        download(name, source, dirs[-1])
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise BpfreeError(f"dataset {name} not found and download from {source.url} failed ({reason}); "
                          f"{_how_to_get(name, dirs)}") from None
    return source.parse(dirs[-1])


# --- npz ---------------------------------------------------------------------------------------
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(path: str) -> Raw:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise BpfreeError(f"{path} lacks array(s) {', '.join(missing)}; an npz dataset needs "
                                  f"{', '.join(NPZ_KEYS)}")
            arrays = tuple(f[k] for k in NPZ_KEYS)
    except FileNotFoundError:
        raise BpfreeError(f"npz file not found: {path}") from None
    except (ValueError, OSError, EOFError) as e:
        raise BpfreeError(f"cannot read {path} as npz (without pickles): {str(e).splitlines()[0]}") from None
    x_tr, y_tr, x_te, y_te = arrays
    if x_tr.ndim == 3:                 # N x H x W images -> N x 1 x H x W
        x_tr, x_te = x_tr[:, None], x_te[:, None] if x_te.ndim == 3 else x_te
    return x_tr, y_tr, x_te, y_te


# --- validation, splits, normalisation -------------------------------------------------------------
def _validate(name: str, raw: Raw) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    x_tr, y_tr, x_te, y_te = raw
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.ndim not in (2, 4):
            raise BpfreeError(f"{name}: x_{split} has shape {x.shape}; expected N x D, N x H x W or N x C x H x W")
        if len(x) == 0:
            raise BpfreeError(f"{name}: the {split} split is empty")
        if y.ndim != 1 or len(y) != len(x):
            raise BpfreeError(f"{name}: y_{split} has shape {y.shape} but x_{split} has {len(x)} rows; "
                              "expected one integer label per row")
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
            raise BpfreeError(f"{name}: y_{split} has dtype {y.dtype}; labels must be integers 0..C-1")
        if y.min() < 0:
            raise BpfreeError(f"{name}: y_{split} has negative label {y.min()}; labels must be 0..C-1")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise BpfreeError(f"{name}: x_{split} has dtype {x.dtype}; expected uint8 or float")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise BpfreeError(f"{name}: x_{split} contains NaN or infinite values")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise BpfreeError(f"{name}: train examples have shape {x_tr.shape[1:]} but test examples {x_te.shape[1:]}")
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return x_tr, y_tr, x_te, y_te, num_classes


def _to_float(x: np.ndarray) -> torch.Tensor:
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def load_data(spec: str, *, data_dir: Optional[str] = None, train_subset: Optional[int] = None,
              val_split: float = 0.0, seed: int = 0, download: bool = True) -> Data:
    """Load a dataset by name (see `list_datasets`) or `npz:PATH` as normalised tensors."""
    if spec.startswith("npz:"):
        raw, classes = _load_npz(spec[4:]), None
    elif spec in _EMBEDDED:
        raw, classes = _EMBEDDED[spec][1](), None
    elif spec in _DATASETS:
        raw, classes = _load_named(spec, data_dir, download), _DATASETS[spec].classes
    else:
        raise BpfreeError(f"unknown dataset {spec!r}; choose one of: {', '.join(list_datasets())}")
    x_tr, y_tr, x_te, y_te, num_classes = _validate(spec, raw)
    if not 0 <= val_split < 1:
        raise BpfreeError(f"--val-split must be in [0, 1), got {val_split}")
    rng = np.random.default_rng(seed)
    if train_subset is not None:
        if not 0 < train_subset <= len(y_tr):
            raise BpfreeError(f"--train-subset must be in 1..{len(y_tr)} for {spec}, got {train_subset}")
        keep = np.sort(rng.permutation(len(y_tr))[:train_subset])
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    n_val = int(round(val_split * len(y_tr)))
    if n_val >= len(y_tr):
        raise BpfreeError(f"--val-split {val_split} leaves no training examples out of {len(y_tr)}")
    order = rng.permutation(len(y_tr))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    x_all, x_test = _to_float(x_tr), _to_float(x_te)
    x_train, x_val = x_all[torch.from_numpy(train_idx)], x_all[torch.from_numpy(val_idx)]
    # Normalise with statistics of the training split only: per channel for images, global for vectors.
    dims = (0, 2, 3) if x_train.dim() == 4 else (0, 1)
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    norm = lambda x: ((x - mean) / std).contiguous()  # noqa: E731
    labels = lambda y: torch.from_numpy(np.asarray(y, dtype=np.int64))  # noqa: E731
    return Data(spec, norm(x_train), labels(y_tr[train_idx]), norm(x_val), labels(y_tr[val_idx]),
                norm(x_test), labels(y_te), num_classes, tuple(x_train.shape[1:]), classes)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
            generator: Optional[torch.Generator] = None, drop_last: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches by index slicing of whole tensors (one randperm per epoch, no per-item Python)."""
    n = len(y)
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else torch.arange(n, device=x.device)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]

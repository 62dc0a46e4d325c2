"""Datasets as whole in-memory tensors: registry, file parsers, download + checksum, validation.

`load_data(spec)` returns a `Data`: inputs, int64 labels, and the train / validation / test splits,
normalised with statistics of the training split only. Images stored as bytes (MNIST, CIFAR, image
folders, uint8 npz) stay uint8, a quarter of float32's memory, and are normalised per batch by
`Data.normalize`; float inputs (digits, float npz) are normalised once at load. Named datasets are
looked for in `--data-dir`, `$BPFREE_DATA`, the Debian package path (Fashion-MNIST),
`~/.cache/bpfree/<name>`, and otherwise downloaded from the canonical source and verified by its
checksum. `npz:PATH` loads your own arrays, `imagefolder:PATH` your own image files (decoded once
into a uint8 cache, `bpfree.images`). Everything else is vectorised numpy / torch: no per-example
Python anywhere.
"""
from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import inspect
import io
import os
import pickle
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from .dataset import Data, Loaders, batch_of, batches_of, check_classes, check_image_layout, to_float  # noqa: F401
from .errors import BpfreeError, first_line
from .images import TINY_ROOT, TINY_ZIP, image_folder, streamed_folder, tiny_imagenet
from .io import atomic_write
from .registry import Registry

# Module-level so tests (and unusual installs) can point them elsewhere; read at call time.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path("~/.cache/bpfree")


class Raw(NamedTuple):
    """What a dataset loader returns: arrays as stored (x uint8 or float, y integers)."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None = None     # fixed class count; None means max label + 1
    classes: list[str] | None = None


# --- registry ------------------------------------------------------------------------------
# name -> loader, a function fn(root_dirs, download) -> Raw; listed in registration order (small first).
_DATASETS: Registry[Callable[[list[Path], bool], Raw]] = Registry("dataset", sort=False)
NPZ_HELP = "your arrays x_train, y_train, x_test, y_test in an .npz file (images N x [C x] H x W, or N x D)"
IMAGEFOLDER_HELP = "your images PATH/train/CLASS/* and PATH/test|val/CLASS/* (png, jpg...), decoded once, cached"


def register_dataset(name: str, description: str):
    """Decorator registering `fn(root_dirs, download) -> Raw` as dataset `name`.

    `root_dirs` are the user's directories to search first, in order (`--data-dir`, `$BPFREE_DATA`);
    `download` says whether fetching from the network is allowed. A loader that can resize its
    images on decode also takes an `image_size` keyword (`--image-size`); others refuse it.
    """
    def wrap(fn):
        return _DATASETS.register(name, fn, description)
    return wrap


def list_datasets(pattern: str | None = None) -> dict[str, str]:
    """Dataset name -> one-line description, including the `npz:PATH` form; with a shell-style
    `pattern` ("*mnist"), only the names matching it."""
    return _DATASETS.describe(pattern)


# --- parsers: idx (MNIST, Fashion-MNIST) ----------------------------------------------------------
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:   # EOFError: a truncated .gz
        raise BpfreeError(f"cannot read {path} (corrupt or truncated?): {e}") from None


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped): magic 0x000008NN (uint8 data, NN dims), big-endian sizes, data."""
    buf = _read_maybe_gz(Path(path))
    if len(buf) < 4 or buf[:3] != b"\x00\x00\x08" or not 1 <= buf[3] <= 4:
        raise BpfreeError(f"{path} is not an idx file of unsigned bytes (bad magic number 0x{buf[:4].hex()}, "
                          "expected 0x00000801 for labels or 0x00000803 for images)")
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise BpfreeError(f"{path} is truncated: its header is incomplete")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(buf) != expected:
        raise BpfreeError(f"{path} is corrupt or truncated: its header says shape {dims} ({expected} bytes) "
                          f"but it has {len(buf)} bytes")
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise BpfreeError(f"missing file {stem}[.gz] in {folder}")


def _parse_idx(folder: Path) -> tuple[np.ndarray, ...]:
    x_tr, y_tr, x_te, y_te = (read_idx(_idx_path(folder, stem)) for stem in IDX_FILES)
    for stem, a, ndim in zip(IDX_FILES, (x_tr, y_tr, x_te, y_te), (3, 1, 3, 1)):
        if a.ndim != ndim:
            raise BpfreeError(f"{folder / stem} has {a.ndim} dimensions {a.shape}; expected {ndim} "
                              f"(magic 0x0000080{ndim})")
    return x_tr[:, None], y_tr, x_te[:, None], y_te       # images (N, 1, H, W)


# --- parsers: CIFAR python pickles -------------------------------------------------------------
_np_core = getattr(np, "_core", None) or np.core   # numpy 2 renamed numpy.core to numpy._core
# Everything a pickled numpy array needs, under both module names; nothing else can be loaded.
_PICKLE_ALLOWED = {
    (f"{module}.{sub}", name): getattr(getattr(_np_core, sub), name)
    for module in ("numpy.core", "numpy._core")
    for sub, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
} | {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,    # how Python 3 writes bytes in protocol 2
}


class _SafeUnpickler(pickle.Unpickler):
    """The CIFAR files are pickles: resolve only the names numpy arrays need, so no code can run."""

    def find_class(self, module, name):
        # Return the object directly rather than importing `module`: nothing outside the list loads.
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can fail in many ways; all mean "not a CIFAR file"
        reason = first_line(e)
        raise BpfreeError(f"{where} is not a valid CIFAR pickle: {reason}") from None
    if not isinstance(obj, dict):
        raise BpfreeError(f"{where} is not a valid CIFAR pickle: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_split(obj: dict, label_key: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    missing = [k.decode() for k in (b"data", label_key) if k not in obj]
    if missing:
        raise BpfreeError(f"{where} is not a valid CIFAR file: it has no {' or '.join(missing)} entry")
    try:
        x, y = np.asarray(obj[b"data"]), np.asarray(obj[label_key])
    except Exception as e:
        raise BpfreeError(f"{where} is corrupt: {e}") from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.ndim != 1 or len(x) != len(y):
        raise BpfreeError(f"{where} is corrupt: data has shape {x.shape} dtype {x.dtype} and labels shape "
                          f"{y.shape}; expected N x 3072 uint8 and N labels")
    return x.reshape(-1, 3, 32, 32), y


def _read_cifar(folder: Path, archive: str, subdir: str, names: list[str], optional=()) -> dict[str, bytes]:
    """Named files from `folder/subdir/`, or straight from the downloaded `folder/archive` (no extraction)."""
    if (folder / subdir).is_dir():
        out = {}
        for name in names + list(optional):
            path = folder / subdir / name
            if path.is_file():
                out[name] = path.read_bytes()
            elif name not in optional:
                raise BpfreeError(f"missing file {name} in {folder / subdir}")
        return out
    path = folder / archive
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            lacking = [n for n in names if f"{subdir}/{n}" not in members]
            if lacking:
                raise BpfreeError(f"{path} has no member {subdir}/{lacking[0]}; the archive is incomplete")
            return {n: tar.extractfile(members[f"{subdir}/{n}"]).read()
                    for n in names + list(optional) if f"{subdir}/{n}" in members}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise BpfreeError(f"{path} is not a readable tar.gz (corrupt or truncated?): {e}") from None


def _parse_cifar10(folder: Path) -> tuple[np.ndarray, ...]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    files = _read_cifar(folder, "cifar-10-python.tar.gz", "cifar-10-batches-py", names)
    parts = [_cifar_split(_unpickle(files[n], n), b"labels", n) for n in names]
    x_tr, y_tr = np.concatenate([p[0] for p in parts[:5]]), np.concatenate([p[1] for p in parts[:5]])
    return x_tr, y_tr, *parts[5]


def _parse_cifar100(folder: Path) -> tuple[tuple[np.ndarray, ...], list[str] | None]:
    files = _read_cifar(folder, "cifar-100-python.tar.gz", "cifar-100-python", ["train", "test"],
                        optional=["meta"])
    (x_tr, y_tr), (x_te, y_te) = (_cifar_split(_unpickle(files[n], n), b"fine_labels", n)
                                  for n in ("train", "test"))
    names = _unpickle(files["meta"], "meta").get(b"fine_label_names") if "meta" in files else None
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names else None
    return (x_tr, y_tr, x_te, y_te), classes


# --- finding and downloading files -------------------------------------------------------------
def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(path: Path, expected: str) -> tuple[str, str]:
    """(algorithm, hex digest of `path`) for an expected checksum written as sha256 hex or "md5:HEX"."""
    if expected.startswith("md5:"):
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "md5", h.hexdigest()
    return "sha256", sha256(path)


def _verified(path: Path, expected: str) -> bool:
    return _digest(path, expected)[1] == expected.split(":")[-1]


def _fetch(url: str, dest: Path) -> None:
    """Download `url` to `dest` (tests replace this function, so they never touch the network)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def _fetch_verified(base: str, file: str, expected: str, dest: str) -> None:
    print(f"bpfree: downloading {base}{file}", file=sys.stderr, flush=True)
    _fetch(base + file, Path(dest))
    algorithm, actual = _digest(Path(dest), expected)
    if actual != expected.split(":")[-1]:
        raise BpfreeError(f"checksum mismatch for {file} downloaded from {base}: expected {algorithm} "
                          f"{expected.split(':')[-1]}, got {actual}; the download was deleted")


def download(files: dict[str, str], mirrors: tuple[str, ...], folder: Path) -> None:
    """Fetch each file to a temporary name, verify its checksum (SHA-256, or "md5:HEX" where no SHA-256
    is published), then rename it into place atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for file, expected in files.items():
        target = folder / file
        if target.is_file() and _verified(target, expected):
            continue
        error: Exception | None = None
        for base in mirrors:
            try:
                # a failed or wrong download leaves nothing behind
                atomic_write(target, functools.partial(_fetch_verified, base, file, expected))
                error = None
                break
            except (urllib.error.URLError, OSError, TimeoutError) as e:   # try the next mirror
                error = e
        if error is not None:
            raise error


@dataclass(frozen=True)
class _Files:
    """Where a named dataset's files come from and how to recognise a folder holding them."""
    files: dict[str, str]                  # downloaded file name -> SHA-256 hex (or "md5:HEX")
    mirrors: tuple[str, ...]               # base URLs, tried in order
    missing: Callable[[Path], list[str]]   # folder -> what it lacks (empty: usable)
    parts: int                             # how many items `missing` checks for


def _locate(name: str, spec: _Files, root_dirs: list[Path], download_ok: bool, system_dirs=()) -> Path:
    """The first folder holding the files: each root and root/<name>, system dirs, then the cache."""
    cache = CACHE.expanduser() / name
    dirs = [d for root in list(root_dirs) + list(system_dirs) for d in (root, root / name)] + [cache]
    partial = []
    for folder in dirs:
        if folder.is_dir():
            lacks = spec.missing(folder)
            if not lacks:
                return folder
            if len(lacks) < spec.parts:     # some of the files are there: say which are not
                partial.append(f"{folder} lacks {', '.join(lacks)}")
    where = (f"looked in {', '.join(str(d) for d in dirs)}"
             + (f" ({'; '.join(partial)})" if partial else ""))
    how = "put the files in --data-dir DIR or $BPFREE_DATA"
    if name == "fashion-mnist":
        how += ", or run `apt-get install dataset-fashion-mnist`"
    if not download_ok:
        raise BpfreeError(f"dataset {name} not found and downloading is off; {where}; {how}")
    try:
        download(spec.files, spec.mirrors, cache)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise BpfreeError(f"dataset {name} not found and its download from {spec.mirrors[0]} failed "
                          f"({reason}); {where}; {how}") from None
    return cache


def _lacks_idx(folder: Path) -> list[str]:
    return [s + "[.gz]" for s in IDX_FILES
            if not ((folder / s).is_file() or (folder / (s + ".gz")).is_file())]


def _lacks_one_of(subdir: str, archive: str) -> Callable[[Path], list[str]]:
    def lacks(folder: Path) -> list[str]:
        found = (folder / subdir).is_dir() or (folder / archive).is_file()
        return [] if found else [f"{subdir}/ or {archive}"]
    return lacks


# SHA-256 of the canonical downloads, each copied from the source named beside it.
FASHION_MNIST = _Files(
    # computed from the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/*.gz),
    # which ships upstream's original files
    {"train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
     "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
     "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
     "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"},
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), _lacks_idx, len(IDX_FILES))
MNIST = _Files(
    # tensorflow/datasets: tensorflow_datasets/url_checksums/mnist.txt (for the cvdf-datasets URLs)
    {"train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
     "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
     "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
     "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
    ("https://storage.googleapis.com/cvdf-datasets/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    _lacks_idx, len(IDX_FILES))
CIFAR10 = _Files(
    # pytorch/vision: torchvision/prototype/datasets/_builtin/cifar.py (Cifar10 resource sha256)
    {"cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
    ("https://www.cs.toronto.edu/~kriz/",), _lacks_one_of("cifar-10-batches-py", "cifar-10-python.tar.gz"), 1)
CIFAR100 = _Files(
    # pytorch/vision: torchvision/prototype/datasets/_builtin/cifar.py (Cifar100); Keras cifar100.py file_hash
    {"cifar-100-python.tar.gz": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"},
    ("https://www.cs.toronto.edu/~kriz/",), _lacks_one_of("cifar-100-python", "cifar-100-python.tar.gz"), 1)


def _lacks_tiny(folder: Path) -> list[str]:
    found = ((folder / TINY_ROOT).is_dir() or (folder / TINY_ZIP).is_file()
             or (folder / "wnids.txt").is_file())
    return [] if found else [f"{TINY_ROOT}/ or {TINY_ZIP}"]


TINY_IMAGENET = _Files(
    # No SHA-256 of this zip is published anywhere we could check (searched: torchvision-style
    # loaders, TFDS, papers' code). Its MD5 and size are, and agree across many independent loaders
    # (e.g. ContinualAI avalanche's TinyImagenet, torchvision-based repos): 248,100,043 bytes, md5
    # 90528d7ca1a48142e341f4ef8d21d0de. Verified by that MD5 until someone with the file replaces
    # it with `sha256(tiny-imagenet-200.zip)` from a download that matches it.
    {TINY_ZIP: "md5:90528d7ca1a48142e341f4ef8d21d0de"},
    ("https://cs231n.stanford.edu/", "http://cs231n.stanford.edu/"), _lacks_tiny, 1)


# --- the built-in datasets -----------------------------------------------------------------------
DIGIT_NAMES = [str(i) for i in range(10)]


@register_dataset("digits", "scikit-learn's bundled 8x8 handwritten digits (1797 images, fixed 75/25 split)")
def _digits(root_dirs: list[Path], download: bool) -> Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]          # (N, 1, 8, 8) in [0, 1]
    # Fixed stratified split, independent of --seed, so test sets are comparable across runs.
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return Raw(x_tr, y_tr, x_te, y_te, 10, DIGIT_NAMES)


@register_dataset("fashion-mnist", "Zalando's 28x28 clothing images (60000 train / 10000 test), idx files")
def _fashion_mnist(root_dirs: list[Path], download: bool) -> Raw:
    folder = _locate("fashion-mnist", FASHION_MNIST, root_dirs, download, system_dirs=[DEBIAN_FASHION_MNIST])
    return Raw(*_parse_idx(folder), 10, ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                         "Shirt", "Sneaker", "Bag", "Ankle boot"])


@register_dataset("mnist", "LeCun's 28x28 handwritten digits (60000 train / 10000 test), idx files")
def _mnist(root_dirs: list[Path], download: bool) -> Raw:
    return Raw(*_parse_idx(_locate("mnist", MNIST, root_dirs, download)), 10, DIGIT_NAMES)


@register_dataset("cifar10", "32x32 colour images in 10 classes (50000 train / 10000 test), python pickles")
def _cifar10(root_dirs: list[Path], download: bool) -> Raw:
    return Raw(*_parse_cifar10(_locate("cifar10", CIFAR10, root_dirs, download)), 10,
               ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])


@register_dataset("cifar100", "32x32 colour images in 100 classes (50000 train / 10000 test), python pickles")
def _cifar100(root_dirs: list[Path], download: bool) -> Raw:
    arrays, classes = _parse_cifar100(_locate("cifar100", CIFAR100, root_dirs, download))
    return Raw(*arrays, 100, classes)


@register_dataset("tiny-imagenet", "64x64 colour images in 200 classes (100000 train / 10000 val, the test split), "
                                   "the official zip of JPEGs")
def _tiny_imagenet(root_dirs: list[Path], download: bool, image_size: int | None = None) -> Raw:
    folder = _locate("tiny-imagenet", TINY_IMAGENET, root_dirs, download)
    return Raw(*tiny_imagenet(folder, image_size, CACHE.expanduser()))


# --- npz -----------------------------------------------------------------------------------
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(path: str) -> Raw:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise BpfreeError(f"{path} lacks array(s) {', '.join(missing)}; an npz dataset needs "
                                  f"{', '.join(NPZ_KEYS)}")
            x_tr, y_tr, x_te, y_te = (f[k] for k in NPZ_KEYS)
    except FileNotFoundError:
        raise BpfreeError(f"npz file not found: {path}") from None
    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:  # ValueError: pickled arrays
        raise BpfreeError(f"cannot read {path} as an npz of plain arrays: {first_line(e)}") from None
    # N x H x W greyscale images get their channel axis
    x_tr, x_te = (x[:, None] if x.ndim == 3 else x for x in (x_tr, x_te))
    return Raw(x_tr, y_tr, x_te, y_te)


# Listed (and named by the unknown-dataset error) with the rest; `load_data` reads them by their prefix.
_DATASETS.register("npz:PATH", _load_npz, NPZ_HELP)
_DATASETS.register("imagefolder:PATH", image_folder, IMAGEFOLDER_HELP)


# --- validation ------------------------------------------------------------------------------
def _validate(name: str, raw: Raw) -> int:
    """Check shapes, dtypes, labels and values; return the number of classes."""
    x_tr, y_tr, x_te, y_te = raw[:4]
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.ndim not in (2, 4):
            raise BpfreeError(f"{name}: x_{split} has shape {x.shape}; "
                              "expected N x D, N x H x W or N x C x H x W")
        if y.ndim != 1:
            raise BpfreeError(f"{name}: y_{split} has shape {y.shape}; expected one integer label per row")
        if len(y) != len(x):
            raise BpfreeError(f"{name}: x_{split} has {len(x)} rows but y_{split} has {len(y)} labels")
        if len(x) == 0:
            raise BpfreeError(f"{name}: the {split} split is empty")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise BpfreeError(f"{name}: x_{split} has dtype {x.dtype}; expected uint8 or float")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise BpfreeError(f"{name}: x_{split} contains NaN or infinite values")
        if not np.issubdtype(y.dtype, np.integer):
            raise BpfreeError(f"{name}: y_{split} has dtype {y.dtype}; labels must be integers 0..C-1")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise BpfreeError(f"{name}: train examples have shape {x_tr.shape[1:]} "
                          f"but test examples {x_te.shape[1:]}")
    lo, hi = int(min(y_tr.min(), y_te.min())), int(max(y_tr.max(), y_te.max()))
    num_classes = raw.num_classes or hi + 1
    if lo < 0 or hi >= num_classes:
        raise BpfreeError(f"{name}: label {lo if lo < 0 else hi} is out of range; "
                          f"labels must be 0..{num_classes - 1}")
    if x_tr.ndim == 4:
        check_image_layout(tuple(x_tr.shape[1:]), name)
    check_classes(name, np.unique(y_tr).tolist(), np.unique(y_te).tolist())
    return num_classes


# --- loading, splits, normalisation -------------------------------------------------------------
STREAM_STATS_SAMPLE = 10_000   # streamed data: normalisation statistics from this many training images


def _split_rows(n: int, spec: str, train_subset: int | None, val_split: float, seed: int):
    """(train rows, val rows) of n training examples: a seeded subset, then a seeded held-out fraction."""
    rng = np.random.default_rng(seed)
    keep = np.arange(n)
    if train_subset is not None:
        if train_subset > len(keep):
            raise BpfreeError(f"--train-subset {train_subset} is larger than the {len(keep)} training "
                              f"examples of {spec}; use 1..{len(keep)}")
        keep = np.sort(rng.permutation(len(keep))[:train_subset])
    n_val = int(round(val_split * len(keep)))
    if n_val >= len(keep):
        raise BpfreeError(f"--val-split {val_split} leaves no training examples out of {len(keep)}; "
                          "use a smaller --val-split or a larger --train-subset")
    order = rng.permutation(len(keep))
    return np.sort(keep[order[n_val:]]), np.sort(keep[order[:n_val]])


def _statistics(x_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (images) or global (vectors) mean and std, computed in float64: a float32 sum's
    rounding depends on the thread count, and the same seed must give the same inputs whatever
    --threads is (or how many processes share the cores)."""
    dims = (0, 2, 3) if x_train.dim() == 4 else (0, 1)
    mean = x_train.double().mean(dim=dims, keepdim=True).float()
    std = x_train.double().std(dim=dims, keepdim=True).float().clamp_min(1e-6)   # constant inputs: no 0 divide
    return mean, std


def _streamed(spec: str, image_size: int | None, train_subset: int | None, val_split: float, seed: int) -> Data:
    """An image folder whose images are decoded batch by batch (`--stream`), never all at once."""
    if not spec.startswith("imagefolder:"):
        raise BpfreeError(f"--stream decodes image files batch by batch: it needs --data imagefolder:PATH "
                          f"({spec} is loaded into memory)")
    x_tr, y_tr, x_te, y_te, num_classes, classes = streamed_folder(spec[len("imagefolder:"):], image_size)
    train_idx, val_idx = _split_rows(len(y_tr), spec, train_subset, val_split, seed)
    x_train, x_val = x_tr.subset(train_idx), x_tr.subset(val_idx)
    sample = np.sort(np.random.default_rng(seed).permutation(len(train_idx))[:STREAM_STATS_SAMPLE])
    mean, std = _statistics(to_float(x_train[sample].numpy()))

    def labels(y):
        return torch.from_numpy(np.asarray(y, dtype=np.int64))
    return Data(spec, x_train, labels(y_tr[train_idx]), x_val, labels(y_tr[val_idx]), x_te, labels(y_te),
                num_classes, tuple(x_train.shape[1:]), classes, mean, std)


def load_data(spec: str, *, data_dir: str | None = None, train_subset: int | None = None,
              val_split: float = 0.0, seed: int = 0, download: bool = True, image_size: int | None = None,
              stream: bool = False, context: int = 128, batch_size: int = 128,
              text_split=(0.9, 0.05, 0.05)) -> Data:
    """Load a dataset by name (see `list_datasets`), `npz:PATH` or `imagefolder:PATH` as tensors.

    Order: raw arrays -> seeded `train_subset` of train -> seeded `val_split` fraction of the rest held
    out -> statistics of the remaining train split (per channel for images, one global value for
    vectors; in float64). Inputs stored as bytes (uint8 in every split) stay uint8 and are normalised
    per batch by `Data.normalize`; others are normalised here, to float32. The test split never
    depends on `seed`. `image_size` resizes images to N x N on decode (image folders, tiny-imagenet).
    `stream` (image folders): nothing is decoded here; batches are decoded when read (see
    `batches_of`), and the statistics come from a seeded sample of STREAM_STATS_SAMPLE images.
    """
    # Option errors first, before reading a large dataset.
    if not isinstance(spec, str):
        path = f"'npz:{spec}'" if isinstance(spec, os.PathLike) else "'npz:PATH'"
        raise BpfreeError(f"load_data takes a dataset name (one of: {', '.join(list_datasets())}) or a string such "
                          f"as {path}, 'imagefolder:PATH' or 'text:PATH', got {type(spec).__name__}")
    if not 0.0 <= val_split < 1.0:
        raise BpfreeError(f"--val-split must be in [0, 1) (a fraction of the training set), got {val_split}")
    if train_subset is not None and train_subset <= 0:
        raise BpfreeError(f"--train-subset must be a positive number of examples, got {train_subset}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise BpfreeError(f"--image-size must be a positive number of pixels, got {image_size}")
    if spec.startswith("text:"):
        for flag, given in (("--train-subset", train_subset), ("--val-split", val_split or None),
                            ("--image-size", image_size), ("--stream", stream or None)):
            if given is not None:
                raise BpfreeError(f"{flag} does not apply to text data ({spec}); it splits by position: "
                                  "--text-split TRAIN,VAL,TEST")
        return load_text(spec, context=context, batch_size=batch_size, seed=seed, split=text_split)
    if stream:
        return _streamed(spec, image_size, train_subset, val_split, seed)
    resizable = "imagefolder:PATH or tiny-imagenet"
    if spec.startswith("imagefolder:"):
        raw = Raw(*image_folder(spec[len("imagefolder:"):], image_size, CACHE.expanduser()))
    elif spec.startswith("npz:"):
        if image_size is not None:
            raise BpfreeError(f"--image-size resizes images on decode ({resizable}); {spec} holds arrays")
        raw = _load_npz(spec[4:])
    else:
        loader = _DATASETS.get(spec)     # an unknown name: one error naming the choices
        resizes = "image_size" in inspect.signature(loader).parameters
        if image_size is not None and not resizes:
            raise BpfreeError(f"--image-size resizes images on decode ({resizable}); {spec} has a fixed size")
        if data_dir is not None and not Path(data_dir).expanduser().is_dir():
            raise BpfreeError(f"--data-dir {data_dir} is not a directory")
        roots = [Path(p).expanduser() for p in (data_dir, os.environ.get("BPFREE_DATA")) if p]
        sized = {"image_size": image_size} if resizes else {}
        raw = Raw(*loader(roots, download, **sized))     # a loader may return a plain 4-tuple
    num_classes = _validate(spec, raw)
    x_tr, y_tr, x_te, y_te = raw[:4]

    train_idx, val_idx = _split_rows(len(y_tr), spec, train_subset, val_split, seed)

    # Index the raw (often uint8) arrays before converting: a quarter of the memory of float32.
    rows = x_tr[train_idx]
    x_train = to_float(rows)
    mean, std = _statistics(x_train)
    if x_tr.dtype == np.uint8 and x_te.dtype == np.uint8:
        # Kept as bytes (fresh arrays: never the loader's, which may be read-only); `Data.normalize`
        # turns a batch into exactly the float32 this function used to return.
        del x_train
        x_train, x_val, x_test = torch.from_numpy(rows), torch.from_numpy(x_tr[val_idx]), torch.from_numpy(x_te.copy())
    else:
        x_val, x_test = to_float(x_tr[val_idx]), to_float(x_te)
        x_train, x_val, x_test = (x.sub_(mean).div_(std) for x in (x_train, x_val, x_test))

    def labels(y):
        return torch.from_numpy(np.asarray(y, dtype=np.int64))
    return Data(spec, x_train, labels(y_tr[train_idx]), x_val, labels(y_tr[val_idx]), x_test, labels(y_te),
                num_classes, tuple(int(s) for s in x_train.shape[1:]), raw.classes, mean, std)


# --- text: a file's bytes as a token stream ------------------------------------------------------------
class TextWindows:
    """`steps` batches of `batch_size` windows of `context` + 1 bytes at random positions of a token
    stream: inputs the first `context` bytes, labels the next byte at every position. The positions
    come from its own seeded generator, saved in checkpoints (a resumed run draws what an uninterrupted
    one would)."""
    resumable = True
    bytes_per_token = 1

    def __init__(self, tokens: torch.Tensor, context: int, batch_size: int, steps: int, seed: int):
        self.tokens, self.context, self.batch_size, self.steps = tokens, context, batch_size, steps
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(context + 1)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            starts = torch.randint(0, len(self.tokens) - self.context, (self.batch_size,), generator=self.generator)
            windows = self.tokens[starts[:, None] + self.offsets].long()
            yield windows[:, :-1], windows[:, 1:]


class TextSequence:
    """A held-out token stream in order: every whole window of `context` + 1 bytes, consecutive windows
    overlapping by one byte (each byte but the first is predicted once), `batch_size` windows a batch."""
    resumable = True
    bytes_per_token = 1

    def __init__(self, tokens: torch.Tensor, context: int, batch_size: int = 64):
        count = (len(tokens) - 1) // context
        self.windows = tokens[: count * context + 1].unfold(0, context + 1, context)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.windows) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.windows), self.batch_size):
            windows = self.windows[i:i + self.batch_size].long()
            yield windows[:, :-1], windows[:, 1:]


def load_text(spec: str, *, context: int, batch_size: int, seed: int, split=(0.9, 0.05, 0.05)) -> Data:
    """`text:PATH`: the file's bytes (a vocabulary of 256), cut by position into train / val / test
    (contiguous, `split` fractions); training batches are random windows (`TextWindows`, an epoch as
    many tokens as the training split), val and test every window in order (`TextSequence`)."""
    path = Path(spec[len("text:"):]).expanduser()
    if not path.is_file():
        raise BpfreeError(f"{spec}: no such file (text:PATH reads a file's bytes as tokens)")
    if len(split) != 3 or min(split) < 0 or split[0] <= 0 or split[2] <= 0 or abs(sum(split) - 1) > 1e-6:
        raise BpfreeError(f"--text-split must be three fractions TRAIN,VAL,TEST summing to 1 (train and test "
                          f"above 0), got {list(split)}")
    tokens = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    ends = [round(len(tokens) * split[0]), round(len(tokens) * (split[0] + split[1]))]
    parts = tokens[:ends[0]], tokens[ends[0]:ends[1]], tokens[ends[1]:]
    for name, part, fraction in zip(("train", "val", "test"), parts, split):
        if fraction and len(part) < context + 1:
            raise BpfreeError(f"{spec}: its {name} split has {len(part)} bytes, fewer than one window of "
                              f"--context {context} + 1; use a larger file or a smaller --context")
    steps = max(1, len(parts[0]) // (batch_size * context))
    train = TextWindows(parts[0], context, batch_size, steps, seed)
    val = TextSequence(parts[1], context) if split[1] else None
    return Data.from_loaders(train, TextSequence(parts[2], context), num_classes=256, val_loader=val, name=spec)

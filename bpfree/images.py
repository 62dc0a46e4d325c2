"""Image files decoded once into uint8 arrays and cached: image folders and the Tiny-ImageNet layout.

`image_folder(PATH)` reads PATH/train/CLASS/* and PATH/test/CLASS/* (or PATH/val/CLASS/* when there is
no test/: the test split); `tiny_imagenet(FOLDER)` reads the official zip, or its extracted tree, with
its own layout (train/WNID/images/*.JPEG; val/images/*.JPEG labelled by val/val_annotations.txt).
Both decode every file with Pillow into one (N, C, H, W) uint8 array and keep it in the cache folder
(`~/.cache/bpfree/images/`), keyed by the source's resolved path, its file list (names, sizes and
modification times; names, sizes and CRCs inside a zip) and the image size, so a changed folder is
decoded again and an unchanged one loads as fast as the disk reads it.

Decoding: 8-bit images; colour (RGB; palette, RGBA, CMYK... converted to RGB, alpha dropped),
except that a dataset whose images are *all* greyscale stays one channel (MNIST-like folders cost a
third of the memory); in a mixed dataset greyscale images are repeated over the three channels, as
Pillow's RGB conversion does. `image_size=N` resizes each image to N x N (bilinear, antialiased by
Pillow when shrinking; the aspect ratio is not kept); without it every image must have one size.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from .errors import BpfreeError, first_line
from .io import atomic_write

_CACHE_VERSION = 2     # bump when decoding changes, so old cache files are not read
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class ImageFile(NamedTuple):
    """One image to decode: where it is (for messages), its size in bytes, a stamp that changes with
    its content (mtime in ns, or a zip member's CRC), and how to open it."""
    name: str
    size: int
    stamp: int
    open: Callable[[], io.BufferedIOBase]


def image_extensions() -> set[str]:
    """File extensions (lower case, with the dot) of the formats Pillow can read."""
    from PIL import Image
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


# --- decoding -------------------------------------------------------------------------------------
def decode(files: Sequence[ImageFile], image_size: int | None = None, channels: int | None = None) -> np.ndarray:
    """Every file as one uint8 array (N, C, H, W): C = 1 if all are greyscale, else 3 (see the module
    notes), or `channels` when given; each resized to image_size x image_size when given, else all
    must share one size."""
    from PIL import Image
    x, first, grey = None, None, True
    for i, f in enumerate(files):
        if f.size == 0:
            raise BpfreeError(f"image file {f.name} is empty (0 bytes)")
        try:
            with f.open() as stream, Image.open(stream) as im:
                a = np.asarray(_resized(_eight_bit(im), image_size))
        except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError) as e:
            # UnidentifiedImageError is an OSError; Pillow raises SyntaxError for some corrupt files
            raise BpfreeError(f"cannot read image file {f.name}: {first_line(e)}") from None
        if x is None:
            first = f.name
            x = np.empty((len(files), 3, *a.shape[:2]), np.uint8)
        elif a.shape[:2] != x.shape[2:]:
            raise BpfreeError(f"image {f.name} is {a.shape[1]}x{a.shape[0]} but {first} is "
                              f"{x.shape[3]}x{x.shape[2]}; resize them on decode with --image-size N")
        if a.ndim == 2:
            x[i] = a             # repeated over the channels
        else:
            x[i] = a.transpose(2, 0, 1)
            grey = False
    if x is None:
        raise BpfreeError("no images to decode")
    return np.ascontiguousarray(x[:, :1]) if (grey if channels is None else channels == 1) else x


def _eight_bit(im):
    """An image as 8-bit greyscale ("L") or RGB. 16-bit greyscale ("I;16*", and "I", which Pillow
    gives some 16-bit files) is scaled, v -> round(v / 257), not clipped at 255 as Pillow's
    conversion would (a 16-bit image's pixels are nearly all above 255)."""
    from PIL import Image
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.clip(np.asarray(im, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.rint(a / 257).astype(np.uint8), mode="L")
    if im.mode in _GREY_MODES:
        return im if im.mode == "L" else im.convert("L")
    if im.mode == "P":        # a palette may carry transparency: through RGBA, as Pillow advises
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def _resized(im, image_size: int | None):
    from PIL import Image
    if image_size is None or im.size == (image_size, image_size):
        return im
    return im.resize((image_size, image_size), Image.Resampling.BILINEAR)


# --- the cache ------------------------------------------------------------------------------------
def cached(cache_dir: Path, source: Path, entries: list, image_size: int | None,
           build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays `build()` makes from `source`, read from the cache when `entries` (the source's file
    list with sizes and stamps) and `image_size` are unchanged, else built and stored (atomically,
    replacing the entry this source and size had before). A cache that cannot be written is only
    reported: the data is still returned."""
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, str(source), image_size, entries]).encode()).hexdigest()
    folder = cache_dir / "images" / f"{source.name}-{hashlib.sha256(str(source).encode()).hexdigest()[:12]}"
    stem = f"size-{image_size or 'as-is'}-"
    path = folder / f"{stem}{key[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass                       # unreadable: decode again and overwrite it
    print(f"bpfree: decoding the images of {source} (once; cached in {folder})", file=sys.stderr, flush=True)
    arrays = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)

        def write(tmp):
            with open(tmp, "wb") as out:
                np.savez(out, **arrays)
        atomic_write(path, write)
        for old in folder.glob(f"{stem}*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        print(f"bpfree: warning: cannot cache the decoded images in {folder}: {e}", file=sys.stderr, flush=True)
    return arrays


def _split(files_train: list[ImageFile], y_train: list[int], files_test: list[ImageFile], y_test: list[int],
           classes: list[str], image_size: int | None) -> dict[str, np.ndarray]:
    x = decode(files_train + files_test, image_size)      # one call: one channel count for both splits
    n = len(files_train)
    return {"x_train": x[:n], "y_train": np.asarray(y_train, np.int64),
            "x_test": x[n:], "y_test": np.asarray(y_test, np.int64), "classes": np.asarray(classes, dtype=str)}


def _unpack(arrays: dict[str, np.ndarray]):
    return (arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
            len(arrays["classes"]), [str(c) for c in arrays["classes"]])


# --- streamed: decoded batch by batch -------------------------------------------------------------
class StreamedImages:
    """Image files decoded on demand: `x[idx]` (indices, a slice or an index tensor) is a uint8
    (len, C, H, W) tensor decoded there and then, the same bytes `decode` gives. For data larger than
    memory: a DataLoader's workers call it with whole batches of indices (`data.batches_of`).

    The channel count and the size are fixed up front from the image headers (no decoding): one
    channel if every image is greyscale, else three; every image must share one size unless
    `image_size` resizes them."""

    def __init__(self, files: Sequence[ImageFile], image_size: int | None, channels: int | None = None,
                 size: tuple[int, int] | None = None):
        self.files, self.image_size = list(files), image_size
        if channels is None or size is None:
            channels, size = _probe(self.files, image_size)
        self.channels, self.size = channels, size

    def subset(self, indices) -> "StreamedImages":
        return StreamedImages([self.files[i] for i in indices], self.image_size, self.channels, self.size)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), self.channels, *self.size)

    def dim(self) -> int:
        return 4

    @property
    def dtype(self):
        import torch
        return torch.uint8

    def __getitem__(self, idx):
        import torch
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self.files)))
        elif hasattr(idx, "tolist"):
            idx = idx.tolist()
        chosen = [self.files[i] for i in idx]
        if not chosen:
            return torch.empty((0, *self.shape[1:]), dtype=torch.uint8)
        x = decode(chosen, self.image_size, channels=self.channels)
        if x.shape[2:] != self.size:
            raise BpfreeError(f"image {chosen[0].name} is {x.shape[3]}x{x.shape[2]}, others are "
                              f"{self.size[1]}x{self.size[0]}; resize them on decode with --image-size N")
        return torch.from_numpy(x)


def _probe(files: Sequence[ImageFile], image_size: int | None) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of a set of images from their headers alone."""
    from PIL import Image
    grey, size = True, None
    for f in files:
        if f.size == 0:
            raise BpfreeError(f"image file {f.name} is empty (0 bytes)")
        try:
            with f.open() as stream, Image.open(stream) as im:
                mode, (w, h) = im.mode, im.size
        except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError) as e:
            raise BpfreeError(f"cannot read image file {f.name}: {first_line(e)}") from None
        grey = grey and mode in _GREY_MODES
        if image_size is None:
            if size is None:
                size, first = (h, w), f.name
            elif (h, w) != size:
                raise BpfreeError(f"image {f.name} is {w}x{h} but {first} is {size[1]}x{size[0]}; resize "
                                  "them on decode with --image-size N")
    if not files:
        raise BpfreeError("no images to decode")
    return (1 if grey else 3), (size if image_size is None else (image_size, image_size))


def streamed_folder(path: str, image_size: int | None):
    """An image folder as (x_train, y_train, x_test, y_test, num_classes, classes) with the inputs
    `StreamedImages`: nothing is decoded (one pass over the headers fixes channels and size)."""
    root, f_tr, y_tr, f_te, y_te, classes = _folder_index(path)
    channels, size = _probe(f_tr + f_te, image_size)
    return (StreamedImages(f_tr, image_size, channels, size), np.asarray(y_tr, np.int64),
            StreamedImages(f_te, image_size, channels, size), np.asarray(y_te, np.int64), len(classes), classes)


# --- image folders --------------------------------------------------------------------------------
def image_folder(path: str, image_size: int | None, cache_dir: Path):
    """PATH/train/CLASS/* and PATH/test/CLASS/* (or PATH/val/CLASS/*) as (x_train, y_train, x_test,
    y_test, num_classes, classes); classes sorted by folder name, images found recursively."""
    root, f_tr, y_tr, f_te, y_te, classes = _folder_index(path)
    entries = [[os.path.relpath(f.name, root), f.size, f.stamp] for f in f_tr + f_te]
    return _unpack(cached(cache_dir, root, entries, image_size,
                          lambda: _split(f_tr, y_tr, f_te, y_te, classes, image_size)))


def _folder_index(path: str):
    """(root, train files, train labels, test files, test labels, classes) of an image folder."""
    given = Path(path).expanduser()
    if not given.is_dir():
        raise BpfreeError(f"image folder {path} is not a directory")
    root = given.resolve()
    layout = "an image folder holds train/CLASS/* and val/CLASS/* or test/CLASS/*"
    train = root / "train"
    if not train.is_dir():
        raise BpfreeError(f"{root} has no train/ folder; {layout}")
    test = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test is None:
        raise BpfreeError(f"{root} has no val/ or test/ folder for the test split; {layout}")
    classes, test_classes = _class_dirs(train), _class_dirs(test)
    if not classes:
        raise BpfreeError(f"{train} has no class folders; {layout}")
    if len(classes) == 1:
        inner = _class_dirs(train / classes[0])
        hint = (f"the class folders look one level too deep ({train / classes[0]}/{{{', '.join(inner[:3])}"
                f"{', ...' if len(inner) > 3 else ''}}}): move them up to {train}/CLASS, and likewise in {test.name}/"
                if len(inner) > 1 else "a classifier needs two or more")
        raise BpfreeError(f"{train} holds a single class folder, {classes[0]}; {hint}")
    missing = [c for c in classes if c not in test_classes]
    if missing:
        raise BpfreeError(f"class folder {train / missing[0]} has no counterpart {test / missing[0]}"
                          + (f" ({len(missing) - 1} more classes lack one)" if len(missing) > 1 else ""))
    extra = [c for c in test_classes if c not in classes]
    if extra:
        raise BpfreeError(f"class folder {test / extra[0]} has no counterpart {train / extra[0]}")
    exts = image_extensions()
    (f_tr, y_tr), (f_te, y_te) = (_folder_files(split, classes, exts) for split in (train, test))
    return root, f_tr, y_tr, f_te, y_te, classes


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_files(split: Path, classes: list[str], exts: set[str]) -> tuple[list[ImageFile], list[int]]:
    files, labels = [], []
    for k, c in enumerate(classes):
        found = _images_under(split / c, exts)
        if not found:
            raise BpfreeError(f"{split / c} has no images (files ending in {', '.join(_shown(exts))}, ...)")
        files += found
        labels += [k] * len(found)
    return files, labels


def _images_under(folder: Path, exts: set[str]) -> list[ImageFile]:
    """The image files under `folder`, recursively; symbolic links are followed (to files and to
    folders), a dangling link or a link back into a folder above it is named in one line."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=_walk_error):
        real = os.path.realpath(dirpath)
        if real in seen:              # walked top-down: a link to a folder above it is seen already
            raise BpfreeError(f"{dirpath} leads back to {real}, read already (a symbolic link loop); remove the link")
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                continue
            p = os.path.join(dirpath, name)
            try:
                st = os.stat(p)
            except OSError as e:      # a dangling link (ENOENT) or a loop of links (ELOOP)
                why = "a symbolic link to nothing" if os.path.islink(p) and not os.path.exists(p) else first_line(e)
                raise BpfreeError(f"image file {p} cannot be read ({why}); remove it or fix the link") from None
            out.append(ImageFile(p, st.st_size, st.st_mtime_ns, lambda p=p: open(p, "rb")))
    return sorted(out, key=lambda f: f.name)


def _walk_error(e: OSError) -> None:
    raise BpfreeError(f"cannot read folder {e.filename}: {e.strerror or first_line(e)}")


def _shown(exts: set[str]) -> list[str]:
    common = [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif"]
    return [e for e in common if e in exts]


# --- Tiny-ImageNet --------------------------------------------------------------------------------
TINY_ROOT = "tiny-imagenet-200"
TINY_ZIP = "tiny-imagenet-200.zip"


def tiny_imagenet(folder: Path, image_size: int | None, cache_dir: Path):
    """Tiny-ImageNet from `folder` (holding tiny-imagenet-200/ or tiny-imagenet-200.zip, or being the
    extracted tiny-imagenet-200/ itself) as (x_train, y_train, x_test, y_test, num_classes, classes).

    Classes are the wnids of wnids.txt, sorted (named by words.txt where it has them); train images
    are train/WNID/images/*; the val split (val/images/*, labelled by val/val_annotations.txt) is
    the test split, since test/ has no labels."""
    if (folder / TINY_ROOT).is_dir():
        tree = _DirTree(folder / TINY_ROOT)
    elif (folder / "wnids.txt").is_file():
        tree = _DirTree(folder)
    else:
        tree = _ZipTree(folder / TINY_ZIP)
    with tree:
        wnids = sorted({w.strip() for w in tree.text("wnids.txt").splitlines() if w.strip()})
        if not wnids:
            raise BpfreeError(f"{tree.where('wnids.txt')} lists no classes")
        words = dict(line.split("\t", 1) for line in (tree.text("words.txt", optional=True) or "").splitlines()
                     if "\t" in line)
        classes = [words.get(w, w).strip() or w for w in wnids]
        index = {w: k for k, w in enumerate(wnids)}
        exts = image_extensions()

        unknown = [d for d in tree.subdirs("train") if d not in index]
        if unknown:
            raise BpfreeError(f"{tree.where('train/' + unknown[0])} is a class folder not listed in "
                              f"{tree.where('wnids.txt')}")
        f_tr, y_tr = [], []
        for w in wnids:
            found = tree.files(f"train/{w}/images", exts)
            if not found:
                raise BpfreeError(f"{tree.where(f'train/{w}/images')} has no images")
            f_tr += found
            y_tr += [index[w]] * len(found)

        annotations = "val/val_annotations.txt"
        labelled = {}
        for i, line in enumerate(tree.text(annotations).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1].strip() not in index:
                raise BpfreeError(f"{tree.where(annotations)} line {i}: expected 'FILE<tab>WNID...' with a "
                                  f"wnid from wnids.txt, got {line.strip()[:80]!r}")
            labelled[parts[0].strip()] = index[parts[1].strip()]
        val = {os.path.basename(f.name): f for f in tree.files("val/images", exts)}
        lacking = sorted(set(labelled) - set(val))
        if lacking:
            raise BpfreeError(f"{tree.where('val/images/' + lacking[0])} is listed in "
                              f"{tree.where(annotations)} but missing")
        unlabelled = sorted(set(val) - set(labelled))
        if unlabelled:
            raise BpfreeError(f"{val[unlabelled[0]].name} has no line in {tree.where(annotations)}")
        names = sorted(val)
        f_te, y_te = [val[n] for n in names], [labelled[n] for n in names]
        entries = [[tree.relative(f.name), f.size, f.stamp] for f in f_tr + f_te] + tree.stamps(
            ["wnids.txt", "words.txt", annotations])
        return _unpack(cached(cache_dir, tree.source, entries, image_size,
                              lambda: _split(f_tr, y_tr, f_te, y_te, classes, image_size)))


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


class _DirTree:
    """The extracted tiny-imagenet-200/ folder."""

    def __init__(self, base: Path):
        self.base = base.resolve()
        self.source = self.base

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def where(self, rel: str) -> str:
        return str(self.base / rel)

    def relative(self, name: str) -> str:
        return os.path.relpath(name, self.base)

    def text(self, rel: str, optional: bool = False) -> str | None:
        path = self.base / rel
        if not path.is_file():
            if optional:
                return None
            raise BpfreeError(f"{self.base} has no {rel}; is it the tiny-imagenet-200 folder?")
        return path.read_text(errors="replace")

    def subdirs(self, rel: str) -> list[str]:
        folder = self.base / rel
        if not folder.is_dir():
            raise BpfreeError(f"{self.base} has no {rel}/ folder")
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def files(self, rel: str, exts: set[str]) -> list[ImageFile]:
        folder = self.base / rel
        return _images_under(folder, exts) if folder.is_dir() else []

    def stamps(self, rels: list[str]) -> list:
        return [[r, *((st.st_size, st.st_mtime_ns) if (st := _stat(self.base / r)) else (None, None))]
                for r in rels]


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None


class _ZipTree:
    """The official tiny-imagenet-200.zip, read in place (members decoded straight from the archive)."""

    def __init__(self, path: Path):
        self.source = path.resolve()
        try:
            self.zip = zipfile.ZipFile(self.source)
            infos = self.zip.infolist()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise BpfreeError(f"{path} is not a readable zip (corrupt or truncated?): {first_line(e)}") from None
        prefix = TINY_ROOT + "/"
        self.members = {i.filename[len(prefix):]: i for i in infos
                        if i.filename.startswith(prefix) and not i.is_dir()}
        if not self.members:
            raise BpfreeError(f"{path} has no {prefix} folder; is it the Tiny-ImageNet zip?")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()
        return False

    def where(self, rel: str) -> str:
        return f"{self.source}:{TINY_ROOT}/{rel}"

    def relative(self, name: str) -> str:
        return name.split(f":{TINY_ROOT}/", 1)[1]

    def text(self, rel: str, optional: bool = False) -> str | None:
        if rel not in self.members:
            if optional:
                return None
            raise BpfreeError(f"{self.source} has no member {TINY_ROOT}/{rel}; the archive is incomplete")
        return self._read(self.members[rel]).decode(errors="replace")

    def _read(self, info: zipfile.ZipInfo) -> bytes:
        try:
            return self.zip.read(info)
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise BpfreeError(f"cannot read {self.source}:{info.filename} (corrupt zip?): {first_line(e)}") from None

    def subdirs(self, rel: str) -> list[str]:
        prefix = rel + "/"
        return sorted({r[len(prefix):].split("/", 1)[0] for r in self.members
                       if r.startswith(prefix) and "/" in r[len(prefix):]})

    def files(self, rel: str, exts: set[str]) -> list[ImageFile]:
        prefix = rel + "/"
        return [ImageFile(self.where(r), i.file_size, i.CRC, lambda i=i: io.BytesIO(self._read(i)))
                for r, i in sorted(self.members.items())
                if r.startswith(prefix) and _ext(r) in exts and not os.path.basename(r).startswith(".")]

    def stamps(self, rels: list[str]) -> list:
        return [[r, *((self.members[r].file_size, self.members[r].CRC) if r in self.members else (None, None))]
                for r in rels]

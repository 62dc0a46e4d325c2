"""Image folders and Tiny-ImageNet: tiny trees (and zips) written in the real layouts, decoded with
Pillow into the uint8 cache; the cache's key; one-line errors naming the file or folder."""
import hashlib
import io
import os
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bpfree import data as D
from bpfree import images
from bpfree.errors import BpfreeError


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test sees the real cache, $HOME, $BPFREE_DATA or the network."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(D, "CACHE", tmp_path / "cache")
    monkeypatch.delenv("BPFREE_DATA", raising=False)

    def no_network(url, dest):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(D, "_fetch", no_network)


def pixels(seed, h, w, channels=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def make_folder(root: Path, classes=("cat", "dog", "ant"), n_train=3, n_test=2, size=(6, 5), test_dir="val",
                ext=".png"):
    """root/train/CLASS/i.png and root/<test_dir>/CLASS/i.png with random RGB pixels; returns what a
    loader must give: (x_train, y_train, x_test, y_test) in sorted-class, sorted-file order, NCHW."""
    out = {}
    for split, n in (("train", n_train), (test_dir, n_test)):
        xs, ys = [], []
        for k, c in enumerate(sorted(classes)):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = pixels(hash((split, c, i)) % 2**32, size[1], size[0])
                Image.fromarray(a).save(root / split / c / f"{i}{ext}")
                xs.append(a.transpose(2, 0, 1))
                ys.append(k)
        out[split] = (np.stack(xs), np.array(ys))
    return (*out["train"], *out[test_dir])


def load(root, **kw):
    return D.load_data(f"imagefolder:{root}", **kw)


# --- image folders ------------------------------------------------------------------------------------
def test_png_folder_round_trip(tmp_path):
    x_tr, y_tr, x_te, y_te = make_folder(tmp_path / "ds")
    d = load(tmp_path / "ds")
    assert d.classes == ["ant", "cat", "dog"] and d.num_classes == 3 and d.in_shape == (3, 5, 6)
    assert d.x_train.dtype == torch.uint8 and np.array_equal(d.x_train.numpy(), x_tr)     # PNG is lossless
    assert np.array_equal(d.x_test.numpy(), x_te) and d.y_train.tolist() == y_tr.tolist()
    assert d.y_test.tolist() == y_te.tolist() and d.name == f"imagefolder:{tmp_path / 'ds'}"
    assert d.normalize(d.x_test).dtype == torch.float32                  # then the usual in-memory path
    s = load(tmp_path / "ds", train_subset=6, val_split=0.5, seed=2)     # (seed 1 leaves class 2 out: refused)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (3, 3, 6)


def test_test_folder_is_the_test_split_before_val(tmp_path):
    make_folder(tmp_path / "ds", n_test=2, test_dir="val")
    _, _, x_te, _ = make_folder(tmp_path / "ds", n_train=3, n_test=1, test_dir="test")
    d = load(tmp_path / "ds")
    assert np.array_equal(d.x_test.numpy(), x_te)
    make_folder(tmp_path / "only", test_dir="test")
    assert len(load(tmp_path / "only").y_test) == 6


def test_modes_are_made_rgb_and_an_all_grey_folder_stays_one_channel(tmp_path):
    root = tmp_path / "mixed"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
    grey = pixels(1, 4, 4, channels=1)
    rgba = np.dstack([pixels(2, 4, 4), np.full((4, 4), 7, np.uint8)])
    Image.fromarray(grey, "L").save(root / "train" / "a" / "grey.png")
    Image.fromarray(rgba, "RGBA").save(root / "train" / "a" / "rgba.PNG")
    Image.fromarray(pixels(3, 4, 4)).convert("P").save(root / "train" / "b" / "pal.gif")
    Image.fromarray(pixels(4, 4, 4)).save(root / "train" / "b" / "q.JPEG", quality=95)
    Image.fromarray(pixels(5, 4, 4)).save(root / "test" / "a" / "t.bmp")
    Image.fromarray(pixels(6, 4, 4, channels=1), "L").save(root / "test" / "b" / "t.jpeg")
    d = load(root)
    assert d.in_shape == (3, 4, 4) and len(d.y_train) == 4
    assert np.array_equal(d.x_train[0].numpy(), np.repeat(grey[None], 3, 0))            # grey.png repeated
    assert np.array_equal(d.x_train[1].numpy(), rgba[..., :3].transpose(2, 0, 1))       # alpha dropped
    with Image.open(root / "train" / "b" / "pal.gif") as im:
        assert np.array_equal(d.x_train[2].numpy(), np.asarray(im.convert("RGB")).transpose(2, 0, 1))
    with Image.open(root / "train" / "b" / "q.JPEG") as im:
        assert np.array_equal(d.x_train[3].numpy(), np.asarray(im).transpose(2, 0, 1))

    for split in ("train", "test"):                                     # now every image greyscale
        for f in (root / split).rglob("*.*"):
            with Image.open(f) as im:
                im.convert("L").save(f.with_suffix(".png"))
            if f.suffix != ".png":
                f.unlink()
    g = load(root)
    assert g.in_shape == (1, 4, 4) and g.mean.shape == (1, 1, 1, 1)


def test_images_found_recursively_and_other_files_ignored(tmp_path):
    x_tr, _, _, _ = make_folder(tmp_path / "ds", classes=("a", "b"), n_train=1, n_test=1)
    (tmp_path / "ds" / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "ds" / "train" / "a" / "._0.png").write_bytes(b"macOS resource fork")
    (tmp_path / "ds" / "train" / ".hidden").mkdir()
    (tmp_path / "ds" / "train" / "b" / "deeper").mkdir()
    Image.fromarray(pixels(9, 5, 6)).save(tmp_path / "ds" / "train" / "b" / "deeper" / "z.png")
    d = load(tmp_path / "ds")
    assert d.classes == ["a", "b"] and d.y_train.tolist() == [0, 1, 1]
    assert np.array_equal(d.x_train[2].numpy(), pixels(9, 5, 6).transpose(2, 0, 1))


def test_image_size_resizes_on_decode_and_mixed_sizes_need_it(tmp_path):
    make_folder(tmp_path / "ds", classes=("a", "b"), size=(6, 5))
    odd = tmp_path / "ds" / "train" / "b" / "odd.png"
    Image.fromarray(pixels(0, 9, 7)).save(odd)
    with pytest.raises(BpfreeError) as e:
        load(tmp_path / "ds")
    msg = str(e.value)
    assert str(odd) in msg and "is 7x9 but" in msg and "--image-size N" in msg and "\n" not in msg
    d = load(tmp_path / "ds", image_size=4)
    assert d.in_shape == (3, 4, 4)
    with Image.open(odd) as im:
        want = np.asarray(im.resize((4, 4), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(d.x_train[-1].numpy(), want)


# --- the cache -----------------------------------------------------------------------------------------
def _cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "images").rglob("*.npz"))


def test_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    make_folder(tmp_path / "ds")
    first = load(tmp_path / "ds")
    assert len(_cache_files(tmp_path)) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(images, "decode", no_decoding)
    again = load(tmp_path / "ds")
    assert torch.equal(again.x_train, first.x_train) and again.classes == first.classes
    assert torch.equal(again.x_test, first.x_test) and torch.equal(again.y_test, first.y_test)
    monkeypatch.undo()
    monkeypatch.setattr(D, "CACHE", tmp_path / "cache")
    load(tmp_path / "ds", image_size=3)                      # another size: its own entry, beside the first
    assert len(_cache_files(tmp_path)) == 2


@pytest.mark.parametrize("change", ["rewrite", "add", "remove", "rename", "nothing"])
def test_a_changed_folder_is_decoded_again(tmp_path, capsys, change):
    make_folder(tmp_path / "ds")
    before = load(tmp_path / "ds")
    assert "bpfree: decoding the images of" in capsys.readouterr().err
    f = tmp_path / "ds" / "train" / "cat" / "0.png"
    if change == "rewrite":                                  # same size, new pixels, later mtime
        Image.fromarray(255 - pixels(hash(("train", "cat", 0)) % 2**32, 5, 6)).save(f)
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    elif change == "add":
        Image.fromarray(pixels(1, 5, 6)).save(f.with_name("9.png"))
    elif change == "remove":
        f.unlink()
    elif change == "rename":
        f.rename(f.with_name("00.png"))
    after = load(tmp_path / "ds")
    decoded = "bpfree: decoding the images of" in capsys.readouterr().err
    assert decoded == (change != "nothing")
    if change in ("rename", "nothing"):
        assert torch.equal(after.x_train, before.x_train)
    else:
        assert after.x_train.shape != before.x_train.shape or not torch.equal(after.x_train, before.x_train)
    assert len(_cache_files(tmp_path)) == 1                  # a stale entry is replaced, not kept


def test_unreadable_cache_entry_is_decoded_again(tmp_path):
    make_folder(tmp_path / "ds")
    first = load(tmp_path / "ds")
    (entry,) = _cache_files(tmp_path)
    entry.write_bytes(b"garbage")
    assert torch.equal(load(tmp_path / "ds").x_train, first.x_train)
    with np.load(entry) as f:
        assert f["x_train"].shape == (9, 3, 5, 6)


# --- errors: one line naming the file or folder -----------------------------------------------------
def _error(root, **kw) -> str:
    with pytest.raises(BpfreeError) as e:
        load(root, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_layout_errors_name_the_folder(tmp_path):
    assert "image folder" in _error(tmp_path / "nowhere") and "not a directory" in _error(tmp_path / "nowhere")
    (tmp_path / "a" / "val" / "x").mkdir(parents=True)
    assert _error(tmp_path / "a").startswith(f"{tmp_path / 'a'} has no train/ folder")
    (tmp_path / "b" / "train" / "x").mkdir(parents=True)
    assert _error(tmp_path / "b").startswith(f"{tmp_path / 'b'} has no val/ or test/ folder")
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "val").mkdir()
    assert _error(tmp_path / "c").startswith(f"{tmp_path / 'c' / 'train'} has no class folders")


def test_class_folders_must_match_between_splits(tmp_path):
    make_folder(tmp_path / "ds", classes=("a", "b", "c"))
    for f in (tmp_path / "ds" / "val" / "b").iterdir():
        f.unlink()
    (tmp_path / "ds" / "val" / "b").rmdir()
    msg = _error(tmp_path / "ds")
    assert msg == f"class folder {tmp_path / 'ds' / 'train' / 'b'} has no counterpart {tmp_path / 'ds' / 'val' / 'b'}"
    make_folder(tmp_path / "ds2", classes=("a", "b"))
    (tmp_path / "ds2" / "val" / "extra").mkdir()
    assert _error(tmp_path / "ds2") == (f"class folder {tmp_path / 'ds2' / 'val' / 'extra'} has no counterpart "
                                        f"{tmp_path / 'ds2' / 'train' / 'extra'}")


def test_a_class_folder_without_images(tmp_path):
    make_folder(tmp_path / "ds", classes=("a", "b"))
    empty = tmp_path / "ds" / "val" / "b"
    for f in empty.iterdir():
        f.rename(f.with_suffix(".txt"))
    msg = _error(tmp_path / "ds")
    assert msg.startswith(f"{empty} has no images (files ending in .png, .jpg, .jpeg")


@pytest.mark.parametrize("content, why", [
    (b"", "is empty (0 bytes)"),
    (b"this is not a png at all", "cannot identify image file"),
    ("truncated", "truncated"),
])
def test_bad_image_files_are_named(tmp_path, content, why):
    make_folder(tmp_path / "ds", classes=("a", "b"))
    bad = tmp_path / "ds" / "train" / "b" / "1.png"
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(pixels(0, 64, 64)).save(buf, format="JPEG")
        bad = bad.with_suffix(".jpg")
        bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    else:
        bad.write_bytes(content)
    msg = _error(tmp_path / "ds")
    assert str(bad) in msg and why in msg and ("image file" in msg)


# --- Tiny-ImageNet -------------------------------------------------------------------------------------
WNIDS = ["n02124075", "n01443537", "n09999999"]          # wnids.txt is not sorted in the original


def make_tiny(folder: Path, n_train=3, n_val=2) -> dict:
    """The official layout under folder/tiny-imagenet-200/: wnids.txt, words.txt, train/WNID/images/*.JPEG
    with WNID_boxes.txt, val/images/*.JPEG with val/val_annotations.txt, unlabelled test/images/."""
    base = folder / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "test" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn00000001\tentity\n"
                                    "n02124075\tEgyptian cat\n")           # n09999999: no words, its wnid
    labels = {}
    for w in WNIDS:
        (base / "train" / w / "images").mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n"
                                                                   for i in range(n_train)))
        for i in range(n_train):
            img = Image.fromarray(pixels(hash((w, i)) % 2**32, 64, 64))
            (img.convert("L") if i == 0 and w == WNIDS[0] else img).save(base / "train" / w / "images" / f"{w}_{i}.JPEG")
    lines = []
    for i in range(n_val * len(WNIDS)):
        w = WNIDS[(i * 2) % len(WNIDS)]
        Image.fromarray(pixels(1000 + i, 64, 64)).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t1\t2\t50\t60")
        labels[f"val_{i}.JPEG"] = sorted(WNIDS).index(w)
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    Image.fromarray(pixels(5, 64, 64)).save(base / "test" / "images" / "test_0.JPEG")
    return labels


def zip_tiny(folder: Path, dest: Path) -> Path:
    """Zip folder/tiny-imagenet-200/ as the original archive is: members under tiny-imagenet-200/, with
    directory entries."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w") as z:
        for p in sorted((folder / "tiny-imagenet-200").rglob("*")):
            z.write(p, str(p.relative_to(folder)) + ("/" if p.is_dir() else ""))
    return dest


def _decoded(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def test_tiny_imagenet_from_the_extracted_tree(tmp_path):
    val_labels = make_tiny(tmp_path / "src")
    d = D.load_data("tiny-imagenet", data_dir=str(tmp_path / "src"), download=False)
    assert d.in_shape == (3, 64, 64) and d.num_classes == 3 and d.x_train.dtype == torch.uint8
    assert d.classes == ["goldfish, Carassius auratus", "Egyptian cat", "n09999999"]   # sorted wnids, named
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    base = tmp_path / "src" / "tiny-imagenet-200"
    assert np.array_equal(d.x_train[3].numpy(), _decoded(base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_0.JPEG"))
    names = sorted(val_labels)                          # val is the test split; test/ (unlabelled) is not used
    assert d.y_test.tolist() == [val_labels[n] for n in names] and len(d.y_test) == 6
    assert np.array_equal(d.x_test[1].numpy(), _decoded(base / "val" / "images" / names[1]))
    # --data-dir may also be the extracted folder itself
    e = D.load_data("tiny-imagenet", data_dir=str(base), download=False)
    assert torch.equal(e.x_train, d.x_train) and torch.equal(e.y_test, d.y_test)


def test_tiny_imagenet_read_from_the_zip_in_place_equals_the_tree(tmp_path):
    make_tiny(tmp_path / "src")
    tree = D.load_data("tiny-imagenet", data_dir=str(tmp_path / "src"), download=False, image_size=32)
    zip_tiny(tmp_path / "src", tmp_path / "mine" / "tiny-imagenet" / "tiny-imagenet-200.zip")
    z = D.load_data("tiny-imagenet", data_dir=str(tmp_path / "mine"), download=False, image_size=32)
    assert z.in_shape == (3, 32, 32) and z.classes == tree.classes
    assert torch.equal(z.x_train, tree.x_train) and torch.equal(z.x_test, tree.x_test)
    assert torch.equal(z.y_train, tree.y_train) and torch.equal(z.y_test, tree.y_test)


def test_tiny_imagenet_download_is_verified(tmp_path, monkeypatch):
    make_tiny(tmp_path / "src")
    archive = zip_tiny(tmp_path / "src", tmp_path / "origin" / "tiny-imagenet-200.zip")
    fetched = []

    def serve(url, dest):
        fetched.append(url)
        dest.write_bytes(archive.read_bytes())
    monkeypatch.setattr(D, "_fetch", serve)
    with pytest.raises(BpfreeError) as e:          # our zip is not the published one: its md5 differs
        D.load_data("tiny-imagenet")
    assert str(e.value).startswith("checksum mismatch for tiny-imagenet-200.zip downloaded from "
                                   "https://cs231n.stanford.edu/: expected md5 90528d7ca1a48142e341f4ef8d21d0de")
    assert list((tmp_path / "cache" / "tiny-imagenet").iterdir()) == []          # nothing kept
    wrong = D._Files({"tiny-imagenet-200.zip": "0" * 64}, D.TINY_IMAGENET.mirrors, D._lacks_tiny, 1)
    monkeypatch.setattr(D, "TINY_IMAGENET", wrong)
    with pytest.raises(BpfreeError, match=f"expected sha256 {'0' * 64}, got "
                                          f"{hashlib.sha256(archive.read_bytes()).hexdigest()}"):
        D.load_data("tiny-imagenet")
    good = D._Files({"tiny-imagenet-200.zip": hashlib.sha256(archive.read_bytes()).hexdigest()},
                    D.TINY_IMAGENET.mirrors, D._lacks_tiny, 1)
    monkeypatch.setattr(D, "TINY_IMAGENET", good)
    d = D.load_data("tiny-imagenet")
    assert len(d.y_train) == 9 and (tmp_path / "cache" / "tiny-imagenet" / "tiny-imagenet-200.zip").is_file()
    n = len(fetched)
    D.load_data("tiny-imagenet")
    assert len(fetched) == n                        # found (and decoded) once


def test_tiny_imagenet_not_found_offline(tmp_path):
    with pytest.raises(BpfreeError, match="dataset tiny-imagenet not found and downloading is off"):
        D.load_data("tiny-imagenet", download=False)


def _tiny_error(tmp_path) -> str:
    with pytest.raises(BpfreeError) as e:
        D.load_data("tiny-imagenet", data_dir=str(tmp_path / "src"), download=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_tiny_imagenet_layout_errors_name_the_file(tmp_path):
    make_tiny(tmp_path / "src")
    base = tmp_path / "src" / "tiny-imagenet-200"
    ann = base / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    assert _tiny_error(tmp_path).startswith(f"{ann} line 7: expected 'FILE<tab>WNID...' with a wnid from wnids.txt")
    ann.write_text(good + "val_99.JPEG\tn01443537\t0\t0\t1\t1\n")
    assert _tiny_error(tmp_path) == f"{base / 'val' / 'images' / 'val_99.JPEG'} is listed in {ann} but missing"
    ann.write_text(good)
    Image.fromarray(pixels(0, 64, 64)).save(base / "val" / "images" / "val_77.JPEG")
    assert _tiny_error(tmp_path) == f"{base / 'val' / 'images' / 'val_77.JPEG'} has no line in {ann}"
    (base / "val" / "images" / "val_77.JPEG").unlink()
    (base / "train" / "n00000042" / "images").mkdir(parents=True)
    assert _tiny_error(tmp_path).startswith(f"{base / 'train' / 'n00000042'} is a class folder not listed in")
    (base / "train" / "n00000042" / "images").rmdir()
    (base / "train" / "n00000042").rmdir()
    (base / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_1.JPEG").write_bytes(b"")
    assert _tiny_error(tmp_path) == f"image file {base / 'train' / WNIDS[2] / 'images' / (WNIDS[2] + '_1.JPEG')} is empty (0 bytes)"


def test_tiny_imagenet_corrupt_zip(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny-imagenet-200.zip").write_bytes(b"PK\x03\x04 not really a zip")
    assert "is not a readable zip (corrupt or truncated?)" in _tiny_error(tmp_path)


# --- streamed image folders (--stream) ----------------------------------------------------------------
def _stream_config(root, **kw):
    from bpfree.config import RunConfig
    values = dict(method="dgl", model="mlp", data=f"imagefolder:{root}", epochs=2, batch_size=16, blocks=2,
                  model_options={"widths": (32, 32)}, threads=1)
    return RunConfig(**{**values, **kw})


def test_a_streamed_folder_decodes_batches_on_demand_to_the_same_bytes(tmp_path):
    import torch
    make_folder(tmp_path / "f", n_train=10, n_test=4, size=(12, 10))
    lazy = load(tmp_path / "f", stream=True)
    assert not isinstance(lazy.x_train, torch.Tensor) and not _cache_files(tmp_path)   # nothing decoded
    eager = load(tmp_path / "f")
    assert lazy.x_train.shape == eager.x_train.shape and torch.equal(lazy.y_train, eager.y_train)
    assert torch.equal(lazy.x_train[torch.tensor([3, 0, 7])], eager.x_train[[3, 0, 7]])
    assert torch.equal(lazy.x_test[:], eager.x_test) and torch.equal(lazy.mean, eager.mean)
    batches = list(D.batches_of(lazy.x_train, [torch.tensor([1, 2]), torch.tensor([5])], workers=2))
    assert [b.shape[0] for b in batches] == [2, 1] and torch.equal(batches[1], eager.x_train[[5]])


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_training_equals_in_memory_training_and_resumes(tmp_path, workers):
    from bpfree.run import train
    make_folder(tmp_path / "f", n_train=20, n_test=5, size=(12, 12))
    strip = lambda s: {k: v for k, v in s.items() if "time" not in k and "per_s" not in k and k != "config"}  # noqa: E731
    in_memory = train(_stream_config(tmp_path / "f"), quiet=True)
    cfg = _stream_config(tmp_path / "f", stream=True, workers=workers, augment="crop=2,flip")
    train(cfg, tmp_path / "run", quiet=True, stop_after=1)
    resumed = train(cfg, tmp_path / "run", quiet=True, resume=True)
    assert strip(resumed) == strip(train(cfg, quiet=True))
    streamed = train(_stream_config(tmp_path / "f", stream=True, workers=workers), quiet=True)
    assert strip(streamed) == strip(in_memory)


def test_stream_needs_an_image_folder(tmp_path):
    with pytest.raises(BpfreeError, match="--stream decodes image files batch by batch"):
        D.load_data("digits", stream=True)

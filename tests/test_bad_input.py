"""Bad input through the Python API, from odd image folders and on the command line: one line (a
BpfreeError; exit 2 without a traceback on the CLI), or handled correctly, never a silently wrong run.
Each case is what a new user tried; the message must name the problem and the way out."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpfree import (
    BlockNet,
    BpfreeError,
    Data,
    RunConfig,
    Trainer,
    create_model,
    create_rule,
    get_rule,
    load_data,
    train,
)
from bpfree import data as D
from bpfree.cli import main
from bpfree.dataset import check_image_layout


def images(n=60, classes=3, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, *shape, generator=g) + y.view(-1, *[1] * len(shape)).float()
    return x, y


def mine(name="mine", seed=0, **changes) -> Data:
    x, y = images(seed=seed)
    values = dict(name=name, x_train=x[:45], y_train=y[:45], x_val=x[:0], y_val=y[:0], x_test=x[45:],
                  y_test=y[45:], num_classes=3, in_shape=(1, 8, 8))
    return Data(**{**values, **changes})


def cnn_rule(name="bwbpf", classes=3, shape=(1, 8, 8)):
    return create_rule(name, create_model("cnn", classes, shape, blocks=2, widths=(8, 8)))


# --- Data checks itself ------------------------------------------------------------------------
@pytest.mark.parametrize("change, said", [
    (lambda x, y: dict(x_train=x[:45].permute(0, 2, 3, 1).expand(45, 8, 8, 3).contiguous(), in_shape=(8, 8, 3),
                       x_test=x[45:].permute(0, 2, 3, 1).expand(15, 8, 8, 3).contiguous()),
     r"images of shape \(8, 8, 3\) would be read as 8 channels of 8x3; .* transpose them"),
    (lambda x, y: dict(y_train=y[:45] + 1, y_test=y[45:] + 1), r"label 3 is out of range; labels must be 0..2 .*subtract 1"),
    (lambda x, y: dict(y_train=y[:45].float()), "y_train must be a tensor of integer labels 0..C-1, got torch.float32"),
    (lambda x, y: dict(y_train=torch.zeros(45, dtype=torch.int64), y_test=torch.zeros(15, dtype=torch.int64)),
     "the training split holds a single class"),
    (lambda x, y: dict(y_train=y[:45] % 2), "test label 2 never occurs in the training split"),
    (lambda x, y: dict(x_test=x[45:, :, :4]), r"x_test holds examples of shape \(1, 4, 8\), but in_shape is \(1, 8, 8\)"),
    (lambda x, y: dict(y_train=y[:40]), "x_train has 45 rows but y_train has 40 labels"),
    (lambda x, y: dict(x_train=(x[:45] * 40).clamp(0, 255).to(torch.uint8), x_test=x[45:].to(torch.uint8)),
     "uint8 inputs are normalised per batch and need mean and std"),
    (lambda x, y: dict(x_train=x[:45].long(), x_test=x[45:].long()), "x_train has dtype torch.int64"),
    (lambda x, y: dict(num_classes=1), "num_classes must be an integer >= 2"),
    (lambda x, y: dict(in_shape=64), "in_shape must be a tuple of positive integers"),
])
def test_data_refuses_what_would_train_wrong(change, said):
    x, y = images()
    with pytest.raises(BpfreeError, match=said):
        mine(**change(x, y))


def test_integer_labels_of_any_width_are_read_as_int64():
    x, y = images()
    data = mine(y_train=y[:45].int(), y_test=y[45:].to(torch.uint8))
    assert data.y_train.dtype == data.y_test.dtype == torch.int64 and torch.equal(data.y_train, y[:45])


def test_npz_files_get_the_same_checks(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = tmp_path / "nhwc.npz"
    np.savez(nhwc, x_train=rng.integers(0, 255, (30, 8, 8, 3), dtype=np.uint8), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 255, (9, 8, 8, 3), dtype=np.uint8), y_test=np.arange(9) % 3)
    with pytest.raises(BpfreeError, match="would be read as 8 channels of 8x3; .*x.transpose"):
        load_data(f"npz:{nhwc}")
    one = tmp_path / "one.npz"
    np.savez(one, x_train=rng.random((30, 16)), y_train=np.zeros(30, int), x_test=rng.random((9, 16)),
             y_test=np.zeros(9, int))
    with pytest.raises(BpfreeError, match="the training split holds a single class"):
        load_data(f"npz:{one}")
    check_image_layout((3, 32, 32), "ok")       # real C x H x W images pass
    check_image_layout((1, 28, 28), "ok")


# --- the entrances check their arguments -----------------------------------------------------------
def test_trainer_names_what_it_expected(tmp_path):
    data, rule = mine(), cnn_rule()
    cfg = RunConfig(method="bwbpf", model="cnn")
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=8)
    for args, said in (((rule, loader, cfg), r"Trainer needs a bpfree Data \(Data.from_loaders"),
                       ((rule, data, {"method": "bwbpf"}), r"Trainer needs a RunConfig \(RunConfig\(\*\*settings\)"),
                       ((rule.net, data, cfg), "cut your module with BlockNet.from_module"),
                       ((cnn_rule("dgl"), data, cfg), "the config says method 'bwbpf' but the rule given is 'dgl'")):
        with pytest.raises(BpfreeError, match=said):
            Trainer(*args)


def test_a_network_that_does_not_fit_the_data_is_refused_before_training(tmp_path):
    data = mine()
    for rule, said in ((cnn_rule(shape=(1, 28, 28)), r"reads inputs of shape \(1, 28, 28\) but the data 'mine' has \(1, 8, 8\)"),
                       (cnn_rule(classes=2), "scores 2 classes but the data 'mine' has 3; build the network with num_classes=3")):
        for parallel in (None, 2):
            with pytest.raises(BpfreeError, match=said):
                train(None, tmp_path / "run", rule=rule, data=data, parallel=parallel)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("call, said", [
    (lambda p: train(p, RunConfig()), "train\\(\\) takes a RunConfig first"),
    (lambda p: train(RunConfig(), p, parallel="2"), "train\\(parallel=...\\) must be a number of processes"),
    (lambda p: train(RunConfig(), p, epochs=3), "train\\(\\) has no keyword 'epochs'; settings of the run go in its RunConfig"),
    (lambda p: train(RunConfig(), p, quiet="yes"), "train\\(quiet=...\\) must be True or False"),
    (lambda p: train(RunConfig(), p, {"quiet": True}), "train\\(\\)'s third argument is a RunOptions"),
    (lambda p: train(RunConfig(), p, data={"x": 1}), "data= must be a bpfree Data"),
    (lambda p: load_data(Path("/tmp/x.npz")), "load_data takes a dataset name .* such as 'npz:/tmp/x.npz'"),
    (lambda p: BlockNet([nn.Linear(64, 10)], None, (64,)), "head must be an nn.Module"),
    (lambda p: BlockNet(nn.Linear(64, 10), nn.Linear(10, 1), (64,)), "the head outputs 1 score per example"),
    (lambda p: BlockNet([nn.Linear(64, 10)], nn.Linear(10, 3), 64), "input shape must be positive integers"),
    (lambda p: create_rule("dgl", create_model("mlp", 3, (64,), blocks=2), get_rule("bwbpf").Options()),
     "method dgl takes its own options \\(DGL.Options, a dict, or keywords"),
    (lambda p: create_rule("dgl", create_model("mlp", 3, (64,), blocks=2), {"aux_hed": "linear"}),
     "method dgl has no option 'aux_hed'"),
])
def test_api_mistakes_are_one_line(call, said, tmp_path):
    with pytest.raises(BpfreeError, match=said):
        call(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_rule_options_as_a_dict_equal_keywords_and_a_blocknet_counts_its_classes():
    net = create_model("mlp", 3, (64,), blocks=2)
    assert create_rule("dgl", net, {"aux_head": "linear"}).options == create_rule("dgl", net, aux_head="linear").options
    assert get_rule("dgl")(net, {"aux_head": "mlp"}).options.aux_head == "mlp"
    assert BlockNet([nn.Flatten(), nn.Linear(64, 16)], nn.Linear(16, 7), (1, 8, 8)).num_classes == 7


def test_a_stage_stepped_before_setup_or_a_top_down_stage_stepped_alone_says_what_to_call():
    x, y = images(n=16, shape=(64,))
    dgl = create_rule("dgl", create_model("mlp", 3, (64,), blocks=2))
    with pytest.raises(BpfreeError, match="stage block1 is not set up: call rule.setup"):
        dgl.stages[0].step((x,), y)
    lra = create_rule("reclra", create_model("mlp", 3, (64,), blocks=2)).setup(4)
    lra.stages[0].step((x,), y)                            # a user's loop calling step alone: on its next batch
    with pytest.raises(BpfreeError, match="learns top-down: .*train with rule.train_step"):
        lra.stages[0].step((x,), y)
    lra = create_rule("reclra", create_model("mlp", 3, (64,), blocks=2)).setup(4)
    before = [p.clone() for p in lra.net.parameters()]
    lra.train_step(x, y)                                  # the public step runs the whole protocol
    assert any(not torch.equal(a, b) for a, b in zip(before, lra.net.parameters()))


# --- records name what was trained ------------------------------------------------------------------
def test_in_memory_data_is_recorded_by_name_and_content(tmp_path):
    cfg = RunConfig(method="bwbpf", model="cnn", blocks=2, epochs=1, batch_size=16, model_options={"widths": (8, 8)})
    a, b = mine(seed=0), mine(seed=1)
    train(cfg, tmp_path / "a", data=a, quiet=True)
    train(cfg, tmp_path / "b", data=b, quiet=True)
    ca, cb = (json.loads((tmp_path / r / "config.json").read_text()) for r in "ab")
    assert ca["data"] == cb["data"] == "mine" and ca["data_sha256"] == a.fingerprint() != cb["data_sha256"]
    assert a.fingerprint() == mine(seed=0).fingerprint()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 0
    groups = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert len(groups["groups"] if isinstance(groups, dict) else groups) == 2      # not averaged as seeds
    with pytest.raises(BpfreeError, match="data_sha256"):                        # resumed on other tensors
        train(cfg, tmp_path / "a", data=b, quiet=True, resume=True)


# --- image folders as they are in the wild ---------------------------------------------------------
@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "CACHE", tmp_path / "cache")
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for k, c in enumerate(("cat", "dog")):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((6, 6), 40 + 100 * k + i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_sixteen_bit_and_palette_pngs_are_scaled_not_clipped(folder):
    deep = (np.arange(36, dtype=np.uint16).reshape(6, 6) * 1800)       # up to 63000 of 65535
    Image.fromarray(deep).save(folder / "train" / "cat" / "deep.png")
    assert Image.open(folder / "train" / "cat" / "deep.png").mode.startswith("I;16")
    data = load_data(f"imagefolder:{folder}")
    row = next(i for i, f in enumerate(sorted((folder / "train" / "cat").iterdir())) if f.name == "deep.png")
    assert torch.equal(data.x_train[row, 0], torch.from_numpy(np.rint(deep / 257).astype(np.uint8)))
    palette = Image.fromarray((np.arange(36).reshape(6, 6) % 3).astype(np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(folder / "val" / "dog" / "pal.png")
    rgb = load_data(f"imagefolder:{folder}")
    assert rgb.in_shape == (3, 6, 6)
    last = rgb.x_test[-1]                                   # val/dog/pal.png sorts last
    assert last[:, 0, 0].tolist() == [255, 0, 0] and last[:, 0, 1].tolist() == [0, 255, 0]


def test_symlinks_are_followed_and_broken_ones_named(folder, tmp_path):
    elsewhere = tmp_path / "more"
    elsewhere.mkdir()
    Image.fromarray(np.full((6, 6), 7, np.uint8)).save(elsewhere / "x.png")
    os.symlink(elsewhere, folder / "train" / "cat" / "linked")
    assert len(load_data(f"imagefolder:{folder}").y_train) == 5           # the linked folder's image counts
    os.symlink(folder / "train" / "cat", folder / "train" / "cat" / "loop")
    with pytest.raises(BpfreeError, match="leads back to .* read already \\(a symbolic link loop\\); remove the link"):
        load_data(f"imagefolder:{folder}")
    os.unlink(folder / "train" / "cat" / "loop")
    os.symlink(tmp_path / "gone.png", folder / "train" / "dog" / "gone.png")
    with pytest.raises(BpfreeError, match="gone.png cannot be read \\(a symbolic link to nothing\\)"):
        load_data(f"imagefolder:{folder}")
    os.unlink(folder / "train" / "dog" / "gone.png")
    os.symlink("self.png", folder / "train" / "dog" / "self.png")
    with pytest.raises(BpfreeError, match="self.png cannot be read"):
        load_data(f"imagefolder:{folder}")


def test_a_folder_one_level_too_deep_or_of_one_class_is_refused_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "CACHE", tmp_path / "cache")
    root = tmp_path / "deep"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / "animals" / c).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / split / "animals" / c / "0.png")
    with pytest.raises(BpfreeError, match=r"holds a single class folder, animals; the class folders look one level too "
                                          r"deep \(.*animals/\{cat, dog\}\): move them up"):
        load_data(f"imagefolder:{root}")
    for split in ("train", "val"):
        (root / split / "animals" / "dog" / "0.png").unlink()
        (root / split / "animals" / "dog").rmdir()
    with pytest.raises(BpfreeError, match="holds a single class folder, animals; a classifier needs two or more"):
        load_data(f"imagefolder:{root}")


# --- the command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, said", [
    (["--augment", "crop=40", "--model", "cnn"], "crop=40 pads more than the 8x8 images' side"),
    (["--batch-size", "1", "--method", "dgl", "--model", "cnn"], "--batch-size 1 cannot train BatchNorm layers"),
])
def test_cli_bad_sizes_are_one_line(flags, said, tmp_path, capsys):
    assert main(["train", "--data", "digits", "--epochs", "1", "--quiet", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_parallel_run_ends_without_leaked_semaphore_warnings(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bpfree", "train", "--method", "bwbpf", "--blocks", "2", "--data",
                           "digits", "--train-subset", "200", "--epochs", "1", "--threads", "1", "--parallel", "2",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "leaked" not in done.stderr and "Warning" not in done.stderr, done.stderr[-2000:]


def test_stream_alone_is_true(tmp_path):
    from bpfree.cli import _parser
    args = _parser().parse_args(["train", "--stream", "--workers", "1"])
    assert args.stream is True and args.workers == 1
    assert _parser().parse_args(["train", "--stream", "false"]).stream is False
    assert dataclasses.is_dataclass(RunConfig) and RunConfig(stream=True).stream

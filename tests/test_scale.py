"""Real-scale paths through the one loop: uint8 images normalised per batch, augmentation on the
device (seeded, resumable, the same on every rank), and the published recipes."""
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import quick_config

from bpfree.cli import main
from bpfree.config import RunConfig
from bpfree.data import load_data
from bpfree.run import train

ROOT = Path(__file__).resolve().parents[1]
CNN = dict(model="cnn", model_options={"widths": (8, 8, 8, 8)}, batch_size=32, threads=1)


def strip(summary):
    """What two runs on the same data must share: times aside, and the data's fingerprint (bytes and
    their float copy are other tensors of the same images)."""
    kept = {k: v for k, v in summary.items() if "time" not in k and "per_s" not in k}
    return {**kept, "config": {k: v for k, v in kept["config"].items() if k != "data_sha256"}}


@pytest.fixture(scope="module")
def bytes_npz(tmp_path_factory):
    """Digits as 1x16x16 uint8 images (upsampled), so the uint8 path and the crops are exercised."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = (x.reshape(-1, 1, 8, 8) * 255 / 16).round().astype(np.uint8).repeat(2, axis=2).repeat(2, axis=3)
    path = tmp_path_factory.mktemp("npz") / "digits16.npz"
    np.savez(path, x_train=x[:1400], y_train=y[:1400], x_test=x[1400:], y_test=y[1400:])
    return f"npz:{path}"


def test_uint8_images_stay_bytes_and_train_like_the_float_copy(bytes_npz):
    data = load_data(bytes_npz)
    assert data.x_train.dtype.is_floating_point is False     # 1 byte per value on the device
    cfg = quick_config(data=bytes_npz, epochs=2, **CNN)
    as_bytes = train(cfg, data=data, quiet=True)
    as_floats = train(cfg, data=data.normalized(), quiet=True)   # what bpfree trained on before
    assert strip(as_bytes) == strip(as_floats)


def test_augmentation_is_seeded_changes_learning_and_resumes_exactly(bytes_npz, tmp_path):
    data = load_data(bytes_npz)
    plain = train(quick_config(data=bytes_npz, epochs=2, **CNN), data=data, quiet=True)
    cfg = quick_config(data=bytes_npz, epochs=3, augment="crop=2,flip,cutout=4", **CNN)
    whole = train(cfg, data=data, quiet=True)
    assert strip(train(cfg, data=data, quiet=True)) == strip(whole)           # same seed, same run
    assert whole["stages"][0]["loss"] != plain["stages"][0]["loss"]
    train(cfg, tmp_path / "run", data=data, quiet=True, stop_after=1)        # a stop after epoch 1 ...
    resumed = train(cfg, tmp_path / "run", data=data, quiet=True, resume=True)
    assert strip(resumed) == strip(whole)                                      # ... resumes bit-identically


def test_every_stage_sees_the_same_augmented_batch_on_any_number_of_ranks(bytes_npz):
    # rank 0 augments; the other ranks receive what its stages computed from that batch
    cfg = quick_config(method="dgl", data=bytes_npz, epochs=1, train_subset=256, augment="crop=2,flip", **CNN)
    one = train(cfg)
    two = train(cfg, parallel=2)
    assert one["test_accuracy"] == two["test_accuracy"] and one["stages"] == two["stages"]


def test_a_sequential_schedule_with_augmentation_does_not_cache_the_frozen_prefix(bytes_npz):
    # the cached prefix would feed later stages un-augmented outputs: with augmentation it is recomputed
    data = load_data(bytes_npz)
    base = dict(method="dgl", schedule="sequential", data=bytes_npz, epochs=1, **CNN)
    augmented = train(quick_config(augment="flip", **base), data=data, quiet=True)
    plain = train(quick_config(**base), data=data, quiet=True)
    assert augmented["stages"][-1]["loss"] != plain["stages"][-1]["loss"]


def test_bad_augment_spec_is_one_line(capsys):
    assert main(["train", "--augment", "rotate=5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "crop=P, flip, cutout=S" in err


SHAPES = {"cifar10": (3, 32, 32, 10), "cifar100": (3, 32, 32, 100), "tiny-imagenet": (3, 64, 64, 200),
          "fashion-mnist": (1, 28, 28, 10)}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.json")))
def test_each_published_recipe_runs_one_step(recipe, tmp_path):
    values = json.loads((ROOT / "configs" / recipe).read_text())
    assert values["_source"] and values["_published"]                  # every recipe names its source
    cfg = RunConfig.load(ROOT / "configs" / recipe)
    rng = np.random.default_rng(0)
    if cfg.data.startswith("text:"):            # a text recipe: a file of bytes, enough for one window per split
        path = tmp_path / "data.txt"
        path.write_bytes(bytes(rng.integers(32, 127, 40 * (cfg.context + 1), dtype=np.uint8)))
        data = f"text:{path}"
    else:
        c, h, w, classes = SHAPES[cfg.data]
        n = 10                                      # one training step of 8 (the recipe's model, small batch)
        path = tmp_path / "data.npz"
        np.savez(path, x_train=rng.integers(0, 256, (n, c, h, w), dtype=np.uint8), y_train=np.arange(n) % classes,
                 x_test=rng.integers(0, 256, (8, c, h, w), dtype=np.uint8), y_test=np.arange(8) % classes)
        data = f"npz:{path}"
    out = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs" / recipe), "--data", data, "--epochs", "1",
                 "--batch-size", "8", "--quiet", "--out", str(out)]) == 0
    recorded = json.loads((out / "config.json").read_text())
    assert {k: recorded[k] for k in ("model", "optimizer", "lr", "augment", "lr_schedule")} == \
        {k: values.get(k, getattr(RunConfig(), k)) for k in ("model", "optimizer", "lr", "augment", "lr_schedule")}


def test_a_run_killed_mid_epoch_with_augmentation_resumes_bit_identically(bytes_npz, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    args = ["train", "--method", "dgl", "--model", "cnn", "--model-opt", "widths=(8,8,8,8)", "--data", bytes_npz,
            "--batch-size", "32", "--threads", "1", "--epochs", "3", "--augment", "crop=2,flip,cutout=4", "--quiet"]
    out, reference = tmp_path / "run", tmp_path / "reference"
    process = subprocess.Popen([sys.executable, "-m", "bpfree", *args, "--out", str(out)])
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)                                    # into epoch 2
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert main([*args, "--out", str(reference)]) == 0
    resumed, whole = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert strip({k: v for k, v in resumed.items() if k != "git_commit"}) == \
        strip({k: v for k, v in whole.items() if k != "git_commit"})

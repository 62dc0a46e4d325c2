"""Accuracy per training step: --eval-every records, and steps to a fraction of the first method's
final accuracy in `bpfree compare`."""
import json

import pytest
import torch
from conftest import quick_config
from safetensors.torch import load_file

from bpfree.cli import main
from bpfree.report import accuracy_curve, steps_to, write_comparison
from bpfree.run import train

TIMING = ("epoch_time_s", "samples_per_s", "wall_time_s")


def rows_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def learning(rows: list[dict], keep_evals: bool = True) -> list[dict]:
    """What a run's rows say it learned: everything but wall-clock times (and, if asked, step_evals)."""
    return [{k: v for k, v in r.items() if k not in TIMING and (keep_evals or k != "step_evals")} for r in rows]


def test_records_appear_at_every_nth_step_across_epochs(digits, tmp_path):
    train(quick_config(epochs=3, eval_every=5, val_split=0.1), tmp_path / "run", quiet=True)
    rows = rows_of(tmp_path / "run")
    per_epoch = rows[0]["step"]
    assert [r["step"] for r in rows] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    steps = [e["step"] for r in rows for e in r["step_evals"]]
    assert steps == [s for s in range(5, 3 * per_epoch, 5) if s % per_epoch]      # epoch ends evaluate anyway
    for r in rows:        # each record sits in the epoch it was measured in
        assert all(r["step"] - per_epoch < e["step"] < r["step"] for e in r["step_evals"])
    record = rows[0]["step_evals"][0]
    assert set(record) == {"step", "test_acc", "test_loss", "val_acc", "val_loss"} and 0 <= record["test_acc"] <= 1
    assert len({e["test_acc"] for r in rows for e in r["step_evals"]}) > 1        # it is learning meanwhile


@pytest.mark.parametrize("method, overrides", [
    ("backprop", {}),
    ("kernel", {}),                                   # sequential: steps go on counting across phases
    ("reclra", {}),                                   # top-down; its stages draw noise in training only
    ("al", {"model": "cnn", "blocks": 2, "epochs": 1, "model_options": {"widths": (8, 8, 8, 8)}}),   # BatchNorm
])
def test_evaluating_between_steps_changes_nothing_learned(digits, method, overrides):
    a = train(quick_config(method=method, **overrides), data=digits, quiet=True)
    b = train(quick_config(method=method, eval_every=4, **overrides), data=digits, quiet=True)
    strip = lambda s: {k: v for k, v in s.items() if "time" not in k and "per_s" not in k and k != "config"}  # noqa: E731
    assert strip(a) == strip(b)


def test_same_seed_same_records_and_resume_is_bit_identical(digits, tmp_path):
    cfg = quick_config(epochs=3, eval_every=6, model_options={"widths": (64, 64)}, blocks=2)
    train(cfg, tmp_path / "whole", data=digits, quiet=True)
    train(cfg, tmp_path / "again", data=digits, quiet=True)
    assert learning(rows_of(tmp_path / "whole")) == learning(rows_of(tmp_path / "again"))
    assert train(cfg, tmp_path / "cut", data=digits, quiet=True, stop_after=1) == {}
    train(cfg, tmp_path / "cut", data=digits, quiet=True, resume=True)
    assert learning(rows_of(tmp_path / "cut")) == learning(rows_of(tmp_path / "whole"))
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["al", "reclra"])   # readouts through other ranks' stages; top-down signals
def test_parallel_records_equal_the_one_process_run(method, tmp_path):
    cfg = quick_config(method=method, train_subset=400, batch_size=32, threads=1, eval_every=5, blocks=3,
                       model_options={"widths": (32, 32, 32)})
    train(cfg, tmp_path / "one", quiet=True)
    train(cfg, tmp_path / "two", quiet=True, parallel=2)
    one, two = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    assert sum(len(r["step_evals"]) for r in one) == 4
    assert learning(one) == learning(two)


def test_eval_every_must_be_a_positive_step_count(capsys, tmp_path):
    assert main(["train", "--data", "digits", "--eval-every", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--eval-every" in capsys.readouterr().err and not (tmp_path / "r").exists()


# --- compare: steps to a fraction of the first method's final accuracy ---------------------------
def fake_run(path, evals: list[tuple[int, float]], epochs: list[tuple[int, float]], with_steps: bool = True,
             batch_size: int = 100):
    """A finished run directory: test accuracy `evals` between steps, `epochs` (step, accuracy) at
    epoch ends; without `with_steps`, rows as written before they carried their step count."""
    path.mkdir(parents=True)
    rows, done = [], 0
    for i, (step, acc) in enumerate(epochs):
        rows.append({"epoch": i + 1, "test_acc": acc, "epoch_time_s": 1.0, "wall_time_s": i + 1.0,
                     "samples_per_s": (step - done) * batch_size, "stages": [],
                     **({"step": step, "step_evals": [{"step": s, "test_acc": a} for s, a in evals
                                                      if done < s < step]} if with_steps else {})})
        done = step
    summary = {"method": "x", "schedule": "simultaneous", "test_accuracy": epochs[-1][1], "epochs": len(epochs),
               "train_time_s": float(len(epochs)), "samples_per_s": 1.0, "peak_activation_bytes": 1,
               "stages": [], "torch": "t", "threads": 1, "device": "cpu"}
    (path / "config.json").write_text(json.dumps({"batch_size": batch_size}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "metrics.json").write_text(json.dumps(summary))
    return path


def test_steps_to_a_fraction_of_the_first_methods_final_accuracy(tmp_path):
    first = fake_run(tmp_path / "first", evals=[(10, 0.50), (20, 0.80)], epochs=[(30, 0.90), (60, 1.00)])
    fast = fake_run(tmp_path / "fast", evals=[(10, 0.91), (20, 0.96), (40, 0.992)], epochs=[(30, 0.95), (60, 0.99)])
    # no step records: epoch ends at epoch * steps per epoch (from samples / batch size)
    old = fake_run(tmp_path / "old", evals=[], epochs=[(30, 0.93), (60, 0.97)], with_steps=False)
    never = fake_run(tmp_path / "never", evals=[(10, 0.20)], epochs=[(30, 0.40), (60, 0.85)])
    assert accuracy_curve(rows_of(old), 100) == [(30, 0.93), (60, 0.97)]
    assert steps_to(0.9, accuracy_curve(rows_of(first), 100)) == 30
    text = write_comparison([first, fast, old, never], tmp_path, "t", labels=["first", "fast", "old", "never"])
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [(r["steps_to_90"], r["steps_to_95"], r["steps_to_99"]) for r in runs] == [
        (30, 60, 60), (10, 20, 40), (30, 60, None), (None, None, None)]
    assert "steps to 90/95/99% of first" in text and "10/20/40" in text and "30/60/-" in text
    assert "| 10/20/40 |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "accuracy_vs_step.png").stat().st_size > 0

"""Where users watch their runs: metrics.csv and TensorBoard beside metrics.jsonl (`--log`), and
progress lines when stderr is no terminal (nohup, SLURM)."""
import csv
import sys

import pytest
from conftest import quick_config

from bpfree import BpfreeError, train
from bpfree.cli import main


def test_csv_and_tensorboard_follow_metrics_jsonl_through_a_resume(digits, tmp_path):
    cfg = quick_config(method="dgl", epochs=3, log="csv,tensorboard", eval_every=5)
    out = tmp_path / "run"
    assert train(cfg, out, data=digits, quiet=True, stop_after=2) == {}
    summary = train(cfg, out, data=digits, quiet=True, resume=True)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["test_acc"]) == summary["test_accuracy"]
    assert float(rows[0]["block1/loss"]) > 0 and "block4/test_acc" in rows[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    test_acc = events.Scalars("test_acc")
    assert [e.step for e in test_acc] == [r["step"] for r in (summary_rows(out))]
    assert test_acc[-1].value == pytest.approx(summary["test_accuracy"])
    assert len(events.Scalars("step_evals/test_acc")) > 0 and len(events.Scalars("block2/loss")) == 3


def summary_rows(out):
    import json
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_logs_are_checked_before_anything_trains(digits, tmp_path, monkeypatch, capsys):
    with pytest.raises(BpfreeError, match="unknown --log 'wandb'; choose any of: csv, tensorboard"):
        train(quick_config(log="csv,wandb"), tmp_path / "a", data=digits)
    with pytest.raises(BpfreeError, match="--log writes metrics.csv / tensorboard/ into the run directory"):
        train(quick_config(log="csv"), data=digits)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # the extra not installed
    assert main(["train", "--data", "digits", "--log", "tensorboard", "--out", str(tmp_path / "b")]) == 2
    assert "pip install 'bpfree[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_without_a_terminal_a_progress_line_comes_every_few_seconds(digits, capsys):
    train(quick_config(epochs=1), data=digits, progress_s=0.0)        # stderr is captured: no terminal
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 1: step")]
    assert len(lines) == len(digits.y_train) // 64 and "steps/s, mean local loss net " in lines[-1]
    train(quick_config(epochs=1), data=digits, progress_s=0.0, quiet=True)
    assert "epoch 1: step" not in capsys.readouterr().err

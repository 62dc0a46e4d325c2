"""The run-level guarantees, for every registered rule: the same seed gives the same run, a run
killed at a random moment resumes bit-identically, and model.safetensors gives back the predictions."""
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from bpfree.cli import main
from bpfree.rules import list_rules
from bpfree.run import load_run_data, load_trained

RULES = sorted(list_rules())
ARGS = ["--model", "mlp", "--model-opt", "widths=(32,32,32,32)", "--data", "digits", "--train-subset", "600",
        "--batch-size", "32", "--lr", "0.002", "--threads", "1", "--quiet"]


def run(tmp_path, name, method, *extra):
    out = tmp_path / name
    assert main(["train", "--method", method, *ARGS, *extra, "--out", str(out)]) == 0
    return out


def learned(out) -> dict:
    """What a run learned and measured, without wall-clock times and the commit it ran from."""
    summary = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in summary.items() if "time" not in k and "per_s" not in k and k != "git_commit"}


@pytest.mark.parametrize("method", RULES)
def test_same_seed_same_run_and_the_saved_weights_give_back_the_predictions(method, tmp_path):
    a, b = run(tmp_path, "a", method, "--epochs", "2"), run(tmp_path, "b", method, "--epochs", "2")
    assert learned(a) == learned(b)
    assert (a / "metrics.jsonl").read_text().count("\n") == learned(a)["epochs"] >= 2
    mine, theirs = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)   # bit for bit

    # At the run's own settings (its data and normalisation, threads, batches, layout, precision) a
    # loaded run repeats the run's own arithmetic: exactly the recorded accuracies, on any CPU.
    threads = torch.get_num_threads()
    rule, data = load_trained(a), load_run_data(a)
    accuracy, per_stage = rule.evaluate(data.x_test, data.y_test, data.normalize)
    assert accuracy == learned(a)["test_accuracy"]
    assert per_stage == [s.get("test_acc") for s in learned(a)["stages"]]
    scores = rule.predict(data.normalize(data.x_test))
    assert int((scores.argmax(1) == data.y_test).sum()) / len(data.y_test) == accuracy

    # Another arithmetic path (other batches and thread count) may round differently: its predictions
    # may differ only where the run's top two scores are a near-tie.
    torch.set_num_threads(2)
    try:
        other = rule.predict(data.normalize(data.x_test), batch_size=37)
    finally:
        torch.set_num_threads(threads)
    top2 = scores.float().topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]) / (1 + scores.float().abs().amax(1))
    flipped = other.argmax(1) != scores.argmax(1)
    assert (margin[flipped] < 1e-4).all(), margin[flipped]


@pytest.mark.parametrize("method", RULES)
def test_a_run_killed_at_a_random_moment_resumes_bit_identically(method, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "bpfree", "train", "--method", method, *ARGS, "--epochs", "4", "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(method).uniform(0.0, 0.5))          # somewhere in a later epoch
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert main(["train", "--method", method, *ARGS, "--epochs", "4", "--out", str(out), "--resume"]) == 0
    whole = run(tmp_path, "whole", method, "--epochs", "4")
    assert learned(out) == learned(whole)
    mine, theirs = load_file(str(out / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

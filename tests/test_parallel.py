"""The parallel engine: stages on separate gloo processes, pipelined; equivalence, faults, resume."""
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import quick_config

from bpfree.cli import main
from bpfree.engine.comm import HANG_AT, KILL_AT, RankFailed
from bpfree.engine.launch import _free_port
from bpfree.errors import BpfreeError
from bpfree.io import load_checkpoint
from bpfree.models import balanced_split, partition
from bpfree.run import train


def tiny(**overrides):
    """A run of a few seconds: 400 digits, batch 32, one thread per process."""
    values = dict(method="bwbpf", train_subset=400, batch_size=32, threads=1)
    values.update(overrides)
    return quick_config(**values)


def same_learning(a: dict, b: dict) -> None:
    """Everything a run learned and measured is identical, except wall-clock time."""
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["stages"] == b["stages"]          # per-stage losses, train and test accuracies
    assert a["peak_activation_bytes"] == b["peak_activation_bytes"]


@pytest.mark.parametrize("costs, world, groups", [
    ([1, 1, 1, 1], 2, [[0, 1], [2, 3]]),
    ([5, 1, 1, 1], 2, [[0], [1, 2, 3]]),
    ([1, 1, 1, 6], 2, [[0, 1, 2], [3]]),
    ([3, 3, 0.1], 2, [[0], [1, 2]]),            # a tiny output stage joins the last block
    ([1, 2, 3], 3, [[0], [1], [2]]),
])
def test_placement_balances_contiguous_groups(costs, world, groups):
    assert partition(costs, world) == groups


@pytest.mark.parametrize("in_flight", [1, 4])
def test_parallel_run_equals_one_process_run(in_flight, tmp_path):
    sequential = train(tiny(), tmp_path / "one")
    parallel = train(tiny(), tmp_path / "two", parallel=2, in_flight=in_flight)
    same_learning(sequential, parallel)
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_acc"] for r in lines] == [json.loads(x)["test_acc"] for x in
                                              (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    ranks = parallel["parallel"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sorted(k for r in ranks for k in r["stages"]) == list(range(len(sequential["stages"])))
    assert all(r["compute_s"] > 0 for r in ranks) and ranks[0]["message_bytes"] > 0


def test_two_path_messages_channels_last_and_cross_stage_readouts(tmp_path):
    # AL sends (s, t) between components, its cnn images are channels-last, and each readout
    # decodes through the lower components' decoders, which live on other ranks.
    cfg = tiny(method="al", model="cnn", blocks=3, model_options={"widths": (8, 8, 8)})
    same_learning(train(cfg), train(cfg, parallel=3))


@pytest.mark.parametrize("world", [2, 3])
def test_a_top_down_rule_runs_in_parallel_exactly_as_in_one_process(world):
    # rec-LRA: messages go up, target signals come back down (skip links carry e_L), every rank's
    # updates overlap; with 2 ranks one rank holds two stages and passes the signal between them
    cfg = tiny(method="reclra", blocks=3, model_options={"widths": (32, 32, 32)})
    same_learning(train(cfg), train(cfg, parallel=world))


def test_killed_rank_stops_the_others_and_resume_finishes_identically(tmp_path, monkeypatch):
    cfg = tiny(method="dgl", epochs=3)
    reference = train(cfg)
    monkeypatch.setenv(KILL_AT, "1:2:4")      # rank 1 dies at step 4 of epoch 2
    begin = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 .*SIGKILL.*continue with --resume"):
        train(cfg, tmp_path / "run", parallel=2)
    assert time.monotonic() - begin < 30      # start-up, one epoch, the failure, the clean-up
    monkeypatch.delenv(KILL_AT)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epochs_done"] == 1
    same_learning(reference, train(cfg, tmp_path / "run", resume=True, parallel=2))


def test_a_parallel_checkpoint_resumes_in_one_process(tmp_path):
    cfg = tiny(epochs=3)
    train(cfg, tmp_path / "run", parallel=2, stop_after=1)
    same_learning(train(cfg), train(cfg, tmp_path / "run", resume=True))


@pytest.mark.parametrize("overrides, world, message", [
    (dict(method="dgl", blocks=2), 3, "needs at least 3 stages"),
    (dict(method="backprop"), 2, "E2EBP's backward pass crosses every block"),
    (dict(method="kernel"), 2, "sequential schedule trains one stage after another"),
    (dict(method="dgl"), 0, "only under torchrun"),
])
def test_impossible_settings_fail_before_any_process_starts(overrides, world, message, tmp_path):
    with pytest.raises(BpfreeError, match=message):
        train(tiny(**overrides), tmp_path / "run", parallel=world)
    assert not (tmp_path / "run").exists()


def test_world_size_must_match_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BpfreeError, match="does not match the launcher's world size 2"):
        train(tiny(), parallel=3)


def test_cli_parallel_flag(tmp_path, capsys):
    assert main(["train", "--method", "predsim", "--data", "digits", "--train-subset", "300", "--epochs", "1",
                 "--threads", "1", "--parallel", "2", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert "predsim on mlp/digits: test accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["parallel"]["world_size"] == 2


def test_torchrun_launch(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bpfree", "train", "--method", "bwbpf", "--blocks", "2", "--data", "digits", "--train-subset",
           "300", "--epochs", "1", "--threads", "1", "--quiet", "--parallel", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("bwbpf on mlp/digits: test accuracy") == 1      # rank 0 reports, alone
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["stages"] for r in summary["parallel"]["ranks"]] == [[0], [1]]   # block 2 rides with the output layer


def test_without_a_launcher_the_survivor_detects_the_dead_peer(tmp_path):
    # Two processes joined by environment variables alone (as on two nodes): nobody kills the
    # survivor for us, so it must notice the lost connection itself, name the peer and exit.
    port = _free_port()
    args = [sys.executable, "-m", "bpfree", "train", "--method", "dgl", "--data", "digits", "--epochs", "3",
            "--batch-size", "32", "--threads", "1", "--quiet", "--parallel", "--out", str(tmp_path / "run")]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    survivor = subprocess.Popen(args, env=dict(env, RANK="0"), stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(args, env=dict(env, RANK="1", **{KILL_AT: "1:2:3"}), stderr=subprocess.DEVNULL)
    assert victim.wait(timeout=120) == -9
    begin = time.monotonic()
    _, err = survivor.communicate(timeout=60)
    assert time.monotonic() - begin < 30
    assert survivor.returncode == 1
    assert "rank 0: lost contact with rank 1" in err and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epochs_done"] == 1


@pytest.mark.parametrize("widths, split", [((4096, 8, 8, 8), [1]), ((8, 8, 8, 4096), [3])])
def test_balanced_split_follows_measured_unit_time(widths, split):
    # An even split would put the boundary at unit 2; the one heavy unit deserves a block of its own.
    assert balanced_split("mlp", 10, (64,), 2, batch=128, widths=widths) == split


def test_split_balanced_is_resolved_once_and_recorded(tmp_path):
    assert main(["train", "--method", "dgl", "--data", "digits", "--train-subset", "300", "--epochs", "1",
                 "--blocks", "2", "--split", "balanced", "--model-opt", "widths=(2048,8,8,8)", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["model_options"] == {"widths": [2048, 8, 8, 8]} and recorded["split"] == [1]


def test_a_hung_rank_is_detected_within_the_timeout_and_named(tmp_path, monkeypatch):
    # rank 1 stops responding (alive, silent) in epoch 2: rank 0 waits on it for --timeout seconds,
    # then every rank stops with an error naming the silent one; the checkpoint of epoch 1 is kept.
    # (The timeout bounds set-up collectives too, so it stays well above the set-up time here.)
    monkeypatch.setenv(HANG_AT, "1:2:3")
    begin = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1.*continue with --resume"):
        train(tiny(method="dgl", epochs=3), tmp_path / "run", parallel=2, timeout_s=10)
    assert time.monotonic() - begin < 60
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epochs_done"] == 1


def test_the_timeout_must_be_positive(tmp_path):
    with pytest.raises(BpfreeError, match="--timeout must be a positive number of seconds"):
        train(tiny(), tmp_path / "run", parallel=2, timeout_s=0)

"""The one loop: the protocol order written once, the communicator's points, runs that describe themselves."""
import json

import torch
from conftest import quick_config

from bpfree import RunOptions
from bpfree.engine import LocalComm, Trainer
from bpfree.io import load_checkpoint
from bpfree.rules.step import train_batch
from bpfree.run import build, train


class Recorder(LocalComm):
    """A world of one that writes down every point where a pipeline rank would talk."""

    def __init__(self):
        super().__init__()
        self.log = []

    def send(self, message, labels):
        self.log.append("send")

    def recv_signal(self):
        self.log.append("recv_signal")
        return ()

    def send_signal(self, signal, trained):
        self.log.append("send_signal")

    def share_weights(self, stages):
        self.log.append("share_weights")


class Logged:
    """A stand-in stage that records the protocol calls made on it."""

    precision = "fp32"

    def __init__(self, k, log):
        self.k, self.log = k, log

    def step(self, message, labels):
        self.log.append(f"step{self.k}")
        return message

    def __call__(self, *message):
        self.log.append(f"forward{self.k}")
        return message

    def feedback(self, signal, labels):
        self.log.append(f"feedback{self.k}")
        return signal

    def update(self):
        self.log.append(f"update{self.k}")


def test_the_protocol_order_on_one_batch():
    comm = Recorder()
    stages = [Logged(k, comm.log) for k in range(3)]
    train_batch(stages, [0, 1, 2], [1, 2], (torch.zeros(1),), torch.zeros(1), comm, top_down=True)
    # the frozen stage 0 only forwards; steps bottom-up; the message leaves before the signal comes
    # down; the signal goes on down before this process applies its updates
    assert comm.log == ["forward0", "step1", "step2", "send", "recv_signal", "feedback2", "feedback1",
                        "send_signal", "update1", "update2"]
    comm.log.clear()
    train_batch(stages, [0, 1, 2], [0, 1, 2], (torch.zeros(1),), torch.zeros(1), comm, top_down=False)
    assert comm.log == ["step0", "step1", "step2", "send"]


def test_weights_move_only_for_rules_that_read_other_stages(digits):
    # bwbpf's stages read nothing of each other: its weights are shared once, for the final save;
    # AL's readouts decode through lower components: shared after every epoch
    for method, expected in (("bwbpf", 1), ("al", 3)):
        cfg = quick_config(method=method, epochs=2, train_subset=None)
        comm = Recorder()
        Trainer(build(cfg, digits), digits, cfg, quiet=True, comm=comm).fit()
        assert comm.log.count("share_weights") == expected, method


def test_runs_describe_themselves(digits, tmp_path):
    out = tmp_path / "run"
    summary = train(quick_config(), out, RunOptions(data=digits, quiet=True))
    assert summary["bpfree_version"] and "git_commit" in summary
    assert summary["config"] == json.loads((out / "config.json").read_text())
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"]["method"] == "backprop" and state["bpfree_version"] == summary["bpfree_version"]


def test_options_as_keywords_override_the_options_object(digits, tmp_path):
    summary = train(quick_config(epochs=3), tmp_path / "run", RunOptions(quiet=True), data=digits, stop_after=1)
    assert summary == {}      # stopped before the end: no final summary
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1

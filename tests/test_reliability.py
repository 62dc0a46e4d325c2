"""What a user can rely on when things go wrong: --resume continues the run it names as it was
configured, SIGTERM stops a run like Ctrl-C (one process or every rank), and bad data is refused."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import quick_config

from bpfree.cli import main
from bpfree.errors import BpfreeError
from bpfree.run import train

RUN = ["train", "--method", "dgl", "--data", "digits", "--batch-size", "32", "--threads", "1", "--quiet"]


def strip(summary):
    return {k: v for k, v in summary.items() if "time" not in k and "per_s" not in k}


def test_resume_refuses_a_setting_that_differs_and_names_both_values(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main([*RUN, "--epochs", "2", "--out", out]) == 0
    for flags, named in ((["--epochs", "5"], "--epochs is 5 here and 2 in its config.json"),
                         (["--method", "bwbpf"], "--method is 'bwbpf' here and 'dgl'"),
                         (["--lr", "0.01"], "--lr is 0.01 here and 0.001"),
                         (["--aux-head", "cnn"], "--aux-head is 'cnn' here and None")):
        capsys.readouterr()
        assert main([*RUN[:1], *flags, "--out", out, "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err and "another --out" in err, err
    # the run's own settings, or flags that only say where it runs, resume (here: nothing left to do)
    assert main(["train", "--out", out, "--resume", "--quiet", "--threads", "2"]) == 0
    assert main([*RUN, "--epochs", "2", "--out", out, "--resume"]) == 0


def test_a_library_resume_with_another_config_is_refused(digits, tmp_path):
    cfg = quick_config(epochs=2)
    train(cfg, tmp_path / "run", data=digits, quiet=True, stop_after=1)
    with pytest.raises(BpfreeError, match="--batch-size is 32 here and 64"):
        train(quick_config(epochs=2, batch_size=32), tmp_path / "run", data=digits, quiet=True, resume=True)
    assert strip(train(cfg, tmp_path / "run", data=digits, quiet=True, resume=True)) == \
        strip(train(cfg, data=digits, quiet=True))


def _stop_after_first_epoch(args, out, sig=signal.SIGTERM, launcher=(sys.executable, "-m", "bpfree"), timeout=120):
    """Start `bpfree ARGS`, send `sig` once its first epoch is written, return (exit code, stderr)."""
    process = subprocess.Popen([*launcher, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run's summary, per execution (one process or --parallel 2), made once."""
    made = {}

    def summary(parallel: list[str]) -> dict:
        key = tuple(parallel)
        if key not in made:
            out = tmp_path_factory.mktemp("reference")
            assert main([*RUN, "--epochs", "4", "--train-subset", "800", *parallel, "--out", str(out)]) == 0
            made[key] = json.loads((out / "metrics.json").read_text())
        return made[key]
    return summary


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                             (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("parallel", [[], ["--parallel", "2"]])
def test_a_stop_signal_stops_every_process_with_a_consistent_checkpoint_and_resume_finishes_identically(
        tmp_path, parallel, sig, code, said, uninterrupted):
    out = tmp_path / "run"
    args = [*RUN, "--epochs", "4", "--train-subset", "800", *parallel, "--out", str(out)]
    returned, err = _stop_after_first_epoch(args, out, sig)
    assert returned == code, err
    assert err.strip().splitlines()[-1].startswith(f"bpfree: {said}") and "--resume" in err
    assert "Traceback" not in err
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    time.sleep(2)
    assert (out / "checkpoint.pt").stat().st_mtime_ns == stamp          # no rank is still training
    assert main([*args, "--resume"]) == 0
    resumed, whole = json.loads((out / "metrics.json").read_text()), uninterrupted(parallel)
    for key in ("test_accuracy", "stages", "peak_activation_bytes", "epochs"):
        assert resumed[key] == whole[key], key


def test_sigterm_to_one_rank_stops_the_others_with_one_message(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "bpfree", *RUN, "--epochs", "50", "--parallel", "2",
                                "--out", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    ranks = [int(pid) for pid in children if "spawn_main" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")]
    os.kill(max(ranks), signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "SIGTERM" in err and "--resume" in err and "Traceback" not in err


@pytest.mark.parametrize("other", [["--method", "bwbpf"], ["--model-opt", "widths=(16,16,16,16)"]])
def test_a_foreign_checkpoint_on_resume_is_one_line(tmp_path, capsys, other):
    mine, theirs = str(tmp_path / "mine"), str(tmp_path / "theirs")
    assert main([*RUN, "--epochs", "2", "--train-subset", "300", "--out", mine]) == 0
    assert main([*RUN, "--epochs", "2", "--train-subset", "300", *other, "--out", theirs]) == 0
    (tmp_path / "mine" / "checkpoint.pt").write_bytes((tmp_path / "theirs" / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    assert main(["train", "--out", mine, "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "belongs to another run" in err and "Traceback" not in err


def test_a_truncated_checkpoint_on_resume_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*RUN, "--epochs", "1", "--train-subset", "300", "--out", str(out)]) == 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint" in err and "Traceback" not in err


def test_sigterm_under_torchrun_stops_every_rank(tmp_path):
    # torchrun passes the signal on to each rank, whose `bpfree` stops as under SIGTERM alone
    out = tmp_path / "run"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bpfree")
    returned, err = _stop_after_first_epoch([*RUN, "--epochs", "50", "--parallel", "--out", str(out)], out,
                                            launcher=launcher)
    # each rank says so in one line; torchrun itself also reports the signal (its own SignalException)
    assert returned != 0 and "bpfree: stopped by SIGTERM" in err
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    time.sleep(2)
    assert (out / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_run_files_are_readable_as_a_plain_open_would_leave_them(digits, tmp_path):
    """Written atomically (temporary file + rename), yet with the umask's permissions, not mkstemp's
    owner-only 0600: a lab's group can read a run's results and checkpoints."""
    import stat
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = stat.S_IMODE(plain.stat().st_mode)
    out = tmp_path / "run"
    assert main(["train", "--method", "backprop", "--data", "digits", "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 0
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir() if f.is_file()}
    assert {"checkpoint.pt", "metrics.json", "config.json"} <= set(modes)
    assert set(modes.values()) == {expected}, modes

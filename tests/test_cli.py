"""The command line: happy paths, and user errors as one line with exit code 2 and nothing damaged."""
import json
import os
import pickle
import subprocess
import sys

import pytest

from bpfree.cli import main

QUICK = ["--data", "digits", "--model", "mlp", "--epochs", "1", "--model-opt", "widths=32,32", "--blocks", "2",
         "--quiet"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_writes_a_run(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--method", "backprop", *QUICK, "--out", tmp_path / "r")
    assert code == 0, err
    assert "test accuracy" in out
    summary = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert summary["method"] == "backprop" and summary["epochs"] == 1


def test_train_from_config_reproduces(capsys, tmp_path):
    assert run_cli(capsys, "train", *QUICK, "--seed", "7", "--out", tmp_path / "a")[0] == 0
    assert run_cli(capsys, "train", "--config", tmp_path / "a" / "config.json", "--quiet",
                   "--out", tmp_path / "b")[0] == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["test_accuracy"] == b["test_accuracy"] and b["seed"] == 7


def test_compare_writes_table_and_plots(capsys, tmp_path):
    code, out, err = run_cli(capsys, "compare", "--methods", "backprop", *QUICK, "--out", tmp_path / "c")
    assert code == 0, err
    assert "test acc" in out and "backprop" in out
    for name in ("summary.json", "summary.md", "accuracy_vs_epoch.png", "accuracy_vs_time.png"):
        assert (tmp_path / "c" / name).stat().st_size > 0
    row = json.loads((tmp_path / "c" / "summary.json").read_text())["runs"][0]
    assert row["method"] == "backprop" and "to 95%" in out and "s/epoch" in out
    epochs = [json.loads(x) for x in (tmp_path / "c" / "backprop" / "metrics.jsonl").read_text().splitlines()]
    assert row["epochs_to_95"] == next(e["epoch"] for e in epochs if e["test_acc"] >= 0.95 * epochs[-1]["test_acc"])
    assert row["epoch_time_s"] == pytest.approx(sum(e["epoch_time_s"] for e in epochs) / len(epochs))


def test_epochs_to_a_fraction_of_the_final_accuracy():
    from bpfree.report import epochs_to
    rows = [{"epoch": i + 1, "test_acc": a} for i, a in enumerate([0.5, 0.8, 0.86, 0.9, 0.88])]
    assert epochs_to(0.95, rows) == 3 and epochs_to(1.0, rows) == 4 and epochs_to(0.5, rows) == 1
    assert epochs_to(0.95, []) is None


def test_compare_resume_restarts_a_run_stopped_before_its_first_checkpoint(capsys, tmp_path):
    assert run_cli(capsys, "compare", "--methods", "backprop,dgl", *QUICK, "--out", tmp_path / "c")[0] == 0
    finished = (tmp_path / "c" / "backprop" / "metrics.json").read_text()
    stopped = tmp_path / "c" / "dgl"
    for name in ("checkpoint.pt", "metrics.json", "metrics.jsonl", "model.safetensors"):
        (stopped / name).unlink()                 # as if killed during its first epoch
    code, out, err = run_cli(capsys, "compare", "--methods", "backprop,dgl", *QUICK, "--out", tmp_path / "c",
                             "--resume")
    assert code == 0, err
    assert (stopped / "metrics.json").exists()
    assert (tmp_path / "c" / "backprop" / "metrics.json").read_text() == finished     # kept, not re-run


def test_list_names_everything(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for name in ("backprop", "mlp", "cnn", "vgg11", "resnet18", "digits", "fashion-mnist", "npz:"):
        assert name in out


def _listed(out: str) -> list[str]:
    # entry lines are indented two spaces; a rule's option lines six
    return [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]


@pytest.mark.parametrize("args, header, names", [
    (["models", "resnet1*"], "models:", ["resnet110", "resnet18"]),
    (["rules", "lra*"], "methods (learning rules):", ["lra-e"]),
    (["methods", "*lra*"], "methods (learning rules):", ["lra-e", "reclra"]),
    (["datasets"], "datasets:", ["digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "tiny-imagenet",
                                 "npz:PATH", "imagefolder:PATH"]),
    (["*mnist"], "datasets:", ["fashion-mnist", "mnist"]),       # a lone pattern filters every kind
])
def test_list_one_kind_filtered(capsys, args, header, names):
    code, out, _ = run_cli(capsys, "list", *args)
    assert code == 0 and out.splitlines()[0] == header
    assert _listed(out) == names
    assert sum(line.endswith(":") and not line.startswith(" ") for line in out.splitlines()) == 1


def test_list_rule_keeps_its_options(capsys):
    _, out, _ = run_cli(capsys, "list", "rules", "bwbpf")
    assert "--aux-head {linear,mlp,conv} (default linear)" in out


def test_list_without_a_match_says_so(capsys):
    code, _, err = run_cli(capsys, "list", "colours", "red*")
    assert code == 2 and err == "bpfree: error: bpfree list shows rules, models or datasets, got 'colours'\n"
    assert run_cli(capsys, "list", "models", "nope*")[1] == "models:\n  (none matches 'nope*')\n"
    assert run_cli(capsys, "list", "nope*")[1] == "no rule, model or dataset matches 'nope*'\n"


def test_every_run_setting_is_a_flag(capsys):
    import dataclasses

    from bpfree.cli import _parser
    from bpfree.config import RunConfig
    from bpfree.options import flag
    for command, skipped in (("train", {"rule_options", "data_sha256"}), ("compare", {"rule_options", "data_sha256", "method"})):
        sub = _parser()._subparsers._group_actions[0].choices[command]
        flags = {s for action in sub._actions for s in action.option_strings}
        expected = {flag(f) for f in dataclasses.fields(RunConfig) if f.name not in skipped}
        assert expected <= flags, expected - flags


def test_config_file_with_a_wrong_type_is_one_line(capsys, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"epochs": "ten"}))
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "c.json", "--out", tmp_path / "r")
    assert code == 2 and err == "bpfree: error: --epochs must be an integer, got 'ten'\n"
    assert not (tmp_path / "r").exists()


def test_split_is_a_run_setting(capsys, tmp_path):
    assert run_cli(capsys, "train", *QUICK, "--split", "1", "--out", tmp_path / "r")[0] == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["split"] == [1]
    # an older config.json kept split among the model options: it still loads, into the field
    config["model_options"]["split"] = config.pop("split")
    (tmp_path / "old.json").write_text(json.dumps(config))
    assert run_cli(capsys, "train", "--config", tmp_path / "old.json", "--quiet", "--out", tmp_path / "again")[0] == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["split"] == [1]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("r", "again"))
    assert a["test_accuracy"] == b["test_accuracy"]


@pytest.mark.parametrize("args, expected", [
    (["train", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--model", "nope"], "unknown model"),
    (["train", "--data", "nope"], "unknown dataset"),
    (["train", "--epochs", "0"], "--epochs must be > 0, got 0"),
    (["train", "--epochs", "ten"], "--epochs must be an integer, got 'ten'"),
    (["train", "--stage-epochs", "5,x"], "--stage-epochs must be a list of integers, got '5,x'"),
    (["train", "--split", "odd"], "unknown --split 'odd'; choose one of: even, balanced or a list of integers"),
    (["train", "--method", "al", "--label-grad", "maybe"], "--label-grad must be true or false, got 'maybe'"),
    (["train", "--lr", "-1"], "--lr must be > 0"),
    (["train", "--blocks", "99"], "blocks"),
    (["train", "--optimizer", "rmsprop"], "invalid choice"),
    (["train", "--aux-head", "conv"], "unrecognized argument '--aux-head'"),
    (["train", "--data", "npz:/does/not/exist.npz"], "exist.npz"),
    (["train", "--resume"], "nothing to resume"),
    (["train", "--threads", "0"], "--threads"),
    (["train", "--device", "tpu"], "unknown device"),
    (["compare", "--methods", "backprop,backprop"], "twice"),
    (["compare", "--methods", "dgl[epochs=ten]"], "--epochs must be an integer, got 'ten'"),
    (["compare", "--methods", "dgl[aux_width=wide]"], "--aux-width must be an integer, got 'wide'"),
    (["compare", "--methods", "dgl[epochs]"], "expected KEY=VALUE, got 'epochs'"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_are_one_line_exit_2(capsys, tmp_path, args, expected):
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "run") if args[0] != "frobnicate" else \
        run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bpfree: error:"), err
    assert expected in err
    assert "Traceback" not in err


def test_existing_run_dir_refused_and_left_intact(capsys, tmp_path):
    out = tmp_path / "r"
    assert run_cli(capsys, "train", *QUICK, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(capsys, "train", *QUICK, "--out", out)
    assert code == 2 and "already exists" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_unwritable_output_path(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "train", *QUICK, "--out", blocker / "run")
    assert code == 2 and "cannot write" in err


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_pickle_payload_is_refused(capsys, tmp_path):
    out = tmp_path / "r"
    assert run_cli(capsys, "train", *QUICK, "--epochs", "2", "--out", out)[0] == 0
    (out / "checkpoint.pt").write_bytes(pickle.dumps({"stages": _Evil()}))
    code, _, err = run_cli(capsys, "train", "--resume", "--out", out, "--quiet")
    assert code == 2 and "refusing to load checkpoint" in err


def test_real_entry_point_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bpfree", "train", "--model", "nope", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown model" in proc.stderr


def test_transfer_rank_scores_finished_runs(capsys, tmp_path):
    for method, epochs in (("kernel", "3"), ("backprop", "1")):
        assert run_cli(capsys, "train", "--method", method, *QUICK, "--epochs", epochs,
                       "--out", tmp_path / method)[0] == 0
    code, out, err = run_cli(capsys, "transfer-rank", "--modules", tmp_path / "backprop", tmp_path / "kernel",
                             "--data", "digits", "--estimator", "kernel", "--json")
    assert code == 0, err
    ranked = json.loads(out)
    assert [r["run"] for r in ranked] == [str(tmp_path / "kernel"), str(tmp_path / "backprop")]
    assert 0 < ranked[1]["score"] < ranked[0]["score"] <= 1
    np = pytest.importorskip("numpy")
    np.savez(tmp_path / "other.npz", x_train=np.zeros((20, 5), np.float32), y_train=np.arange(20) % 2,
             x_test=np.zeros((4, 5), np.float32), y_test=np.arange(4) % 2)
    code, _, err = run_cli(capsys, "transfer-rank", "--modules", tmp_path / "kernel", "--data",
                           f"npz:{tmp_path / 'other.npz'}")
    assert code == 2 and "trained on inputs of shape (1, 8, 8)" in err

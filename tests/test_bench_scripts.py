"""Smoke tests of every bench/*.py script: each one's main(argv) runs its real path on tiny data
(digits, a few hundred examples, one round or epoch, small models) into tmp_path, and its result
files must hold sane values. The benches themselves run for minutes to hours; this catches a script
that no longer runs against the library before anyone spends that time."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import quick_config

from bpfree.run import train

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MLP = ["--model", "mlp"]             # its default 256x4: tiny next to the benches' cnn and resnets


def load(name: str, monkeypatch):
    """bench/NAME.py as a fresh module, registered under its name for this test (ranks spawned by a
    parallel bench unpickle its functions by module name, from the bench folder on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))          # sys.path as it was comes back after the test
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def accuracy(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_overhead(tmp_path, monkeypatch):
    overhead = load("overhead", monkeypatch)
    out = tmp_path / "overhead"
    overhead.main(["--data", "digits", *MLP, "--train-subset", "128", "--batch-size", "32",
                   "--rounds", "2", "--threads", "1", "--out", str(out)])
    result = read_json(out.with_suffix(".json"))
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    assert all(positive(r["bpfree_steps_per_s"]) and positive(r["plain_steps_per_s"]) for r in result["rounds"])
    assert all(r["ratio"] == pytest.approx(r["bpfree_steps_per_s"] / r["plain_steps_per_s"]) for r in result["rounds"])
    assert positive(result["median_ratio"]) and result["command"].startswith("python bench/overhead.py --data digits")
    assert "Median ratio" in out.with_suffix(".md").read_text()


def test_epoch_time(tmp_path, monkeypatch):
    epoch_time = load("epoch_time", monkeypatch)
    methods = ["backprop", "dgl[schedule=sequential]"]
    epoch_time.main(["--methods", ",".join(methods), *MLP, "--model-opt", "widths=(32,32,32,32)",
                     "--data", "digits", "--train-subset", "256", "--rounds", "1", "--threads", "1",
                     "--out", str(tmp_path)])
    result = read_json(tmp_path / "epoch-time.json")
    assert list(result["epoch_s"]) == methods and result["model_options"] == {"widths": [32, 32, 32, 32]}
    assert all(positive(s) for s in result["epoch_s"].values())
    assert result["ratio_to_first"]["backprop"] == 1.0 and positive(result["ratio_to_first"][methods[1]])
    assert f"| {methods[1]} |" in (tmp_path / "epoch-time.md").read_text()


def test_k_scaling(tmp_path, monkeypatch, capsys):
    k_scaling = load("k_scaling", monkeypatch)
    out = tmp_path / "out"
    k_scaling.main(["--rules", "dgl,no-such-rule", "--ks", "2,4", *MLP, "--data", "digits", "--subset", "256",
                    "--epochs", "1", "--threads", "1", "--config", str(ROOT / "configs" / "fashion-mnist-cnn.json"),
                    "--runs", str(tmp_path / "runs"), "--out", str(out)])
    assert "rule no-such-rule is not registered here; skipped" in capsys.readouterr().out
    result = read_json(out / "k-scaling.json")
    assert result["data"] == "digits" and result["train_subset"] == 256 and result["epochs"] == 1
    assert [(r["rule"], r["K"]) for r in result["rows"]] == [("dgl", 2), ("dgl", 4)]
    for r in result["rows"]:
        assert accuracy(r["test_accuracy"]) and positive(r["time_ratio"]) and positive(r["memory_ratio"])
        assert r["gap_points"] == pytest.approx(100 * (r["test_accuracy"] - result["backprop"]["test_accuracy"]))
    assert "| dgl |" in (out / "k-scaling.md").read_text() and (out / "k-scaling.png").stat().st_size > 0


def test_convergence(tmp_path, monkeypatch):
    convergence = load("convergence", monkeypatch)
    monkeypatch.setattr(convergence, "RUNS", tmp_path / "runs")    # the run directories, else runs/ of the cwd
    out = tmp_path / "out"
    convergence.main(["--settings", "digits", "--models", "mlp", "--methods", "dgl", "--epochs", "2",
                      "--eval-every", "8", "--threads", "1", "--out", str(out)])
    rules = read_json(out / "convergence.json")["results"]["mlp-digits"]["rules"]
    assert list(rules) == ["backprop", "dgl"]                      # the reference first
    for r in rules.values():
        assert accuracy(r["test_accuracy"]) and accuracy(r["epoch1_accuracy"]) and r["steps"] > 0
        steps = [s for s, _ in r["curve"]]
        assert steps == sorted(steps) and steps[-1] == r["steps"] and len(steps) > 2    # evaluations between epochs
    assert (tmp_path / "runs" / "mlp-digits" / "summary.json").exists()
    assert (out / "convergence-mlp-digits.png").stat().st_size > 0 and "| dgl |" in (out / "convergence.md").read_text()


def test_label_budget(tmp_path, monkeypatch):
    label_budget = load("label_budget", monkeypatch)
    source = tmp_path / "kernel"
    train(quick_config(method="kernel", epochs=1, threads=1, model_options={"widths": (32, 32, 32, 32)}), source,
          quiet=True)
    out = tmp_path / "out"
    label_budget.main(["--source", str(source), "--budgets", "1,10", "--epochs", "1", "--threads", "1",
                       "--out", str(out)])
    result = read_json(out / "label-budget.json")
    assert [r["labels_per_class"] for r in result["rows"]] == [1, 10]
    assert all(accuracy(r["kernel"]) and accuracy(r["backprop"]) and r["backprop_steps"] >= 1 for r in result["rows"])
    full = read_json(source / "metrics.json")["test_accuracy"]
    assert result["kernel_all_labels"] == full
    assert result["kernel_10_over_all"] == pytest.approx(result["rows"][1]["kernel"] / full)
    assert (out / "label-budget.png").stat().st_size > 0


def test_slow_start(tmp_path, monkeypatch):
    slow_start = load("slow_start", monkeypatch)
    runs = {}
    for method in ("backprop", "dgl"):
        runs[method] = tmp_path / method
        train(quick_config(method=method, val_split=0.2, threads=1, model_options={"widths": (32, 32, 32, 32)}),
              runs[method], quiet=True)
    out = tmp_path / "out"
    slow_start.main(["--runs", *(f"{m}={d}" for m, d in runs.items()), "--out", str(out)])
    result = read_json(out / "slow-start.json")
    assert list(result) == ["backprop", "dgl"]
    for method, run in result.items():
        logged = [json.loads(line) for line in (runs[method] / "metrics.jsonl").read_text().splitlines()]
        assert run["val"] == [row["val_acc"] for row in logged] and len(run["val"]) == 2
        assert run["test"] == [row["test_acc"] for row in logged] and all(accuracy(v) for v in run["val"])
    table = (out / "slow-start.md").read_text()
    assert "| backprop |" in table and "| +0.0 | +0.0 |" in table        # the first run against itself
    assert (out / "slow-start.png").stat().st_size > 0


def test_image_folder(tmp_path, monkeypatch):
    import tempfile

    from bpfree import data
    image_folder = load("image_folder", monkeypatch)
    monkeypatch.setattr(data, "CACHE", data.CACHE)        # the script points the library's cache at its scratch
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "out"
    image_folder.main(["--data", "digits", "--train", "100", "--test", "100", "--rounds", "1", "--out", str(out)])
    result = read_json(out / "image-folder.json")
    paths = ["in memory (cached)", "stream, 0 workers", "stream, 1 worker", "stream, 2 workers"]
    assert list(result["samples_per_s"]) == paths and all(positive(v) for v in result["samples_per_s"].values())
    assert positive(result["decode_once_s"]) and positive(result["cached_load_s"])
    accs = set(result["test_accuracy"].values())
    assert len(accs) == 1 and accuracy(accs.pop())       # streamed training equals in-memory training
    assert len(list((tmp_path.glob("bpfree-bench-*/folder/train/*/*.png")))) == 100


@pytest.mark.filterwarnings("ignore:An input array is constant")      # tiny targets: equal accuracies tie
def test_transferability(tmp_path, monkeypatch):
    transferability = load("transferability", monkeypatch)
    out = tmp_path / "out"
    sources, targets = ["kernel 0-4", "dgl 2v4"], ["0,2,4,6", "digits"]
    transferability.main(["--data", "digits", *MLP, "--epochs", "1", "--finetune-epochs", "1",
                          "--train-subset", "300", "--threads", "1", "--sources", ";".join(sources),
                          "--targets", ";".join(targets), "--work", str(tmp_path / "work"), "--out", str(out)])
    result = read_json(out / "transferability.json")
    assert list(result["sources"]) == [*sources, "untrained"] and list(result["targets"]) == targets
    for target in result["targets"].values():
        assert list(target["rows"]) == list(result["sources"])
        for row in target["rows"].values():
            assert sorted(row["scores"]) == sorted(transferability.ESTIMATORS)
            assert all(math.isfinite(s) for s in row["scores"].values())
            assert all(accuracy(row[truth][split]) for truth in ("linear", "finetune") for split in ("val", "test"))
        for by_estimator in target["correlation"].values():
            assert all(math.isnan(c["spearman"]) or -1 <= c["spearman"] <= 1 for c in by_estimator.values())
    assert result["targets"]["digits"]["train"] > 1000           # the embedded digits, at the sources' 8x8
    assert (out / "transferability.png").stat().st_size > 0 and "| digits |" in (out / "transferability.md").read_text()
    with pytest.raises(SystemExit):                                 # names are checked before anything trains
        transferability.main(["--sources", "kernel 0-4;nope", "--work", str(tmp_path / "w"), "--out", str(out)])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_gpu_check(device, tmp_path, monkeypatch):
    # meant for a lent GPU; its whole path runs on the CPU too, here on tiny idx files
    from test_data import make_idx_dir
    gpu_check = load("gpu_check", monkeypatch)
    make_idx_dir(tmp_path / "fm", n_train=200, n_test=50)
    out = tmp_path / "out"
    gpu_check.main(["--data-dir", str(tmp_path / "fm"), "--device", device, "--steps", "1", "--models", "mlp",
                    "--rules", "backprop,dgl,reclra", "--out", str(out)])
    result = read_json(out / "gpu-check.json")
    assert [(r["method"], r["precision"]) for r in result["rows"]] == [
        ("backprop", "fp32"), ("dgl", "fp32"), ("reclra", "fp32"), ("backprop", "bf16"), ("dgl", "bf16")]
    assert all(positive(r["samples_per_s"]) and positive(r["speed_vs_e2ebp"]) for r in result["rows"])
    assert "reclra/mlp/bf16" in result["skipped"][0]
    loop = result["loop_vs_plain"]
    assert len(loop["ratios"]) == 3 and positive(loop["median_ratio"]) and loop["steps_per_epoch"] == 1
    assert "| mlp | bf16 | dgl |" in (out / "gpu-check.md").read_text()


def test_backprop_parallel(monkeypatch, capsys):
    backprop_parallel = load("backprop_parallel", monkeypatch)
    backprop_parallel.main(["--engine", "gpipe", *MLP, "--blocks", "2", "--processes", "2",
                            "--microbatches", "2", "--data", "digits", "--train-subset", "256", "--batch-size", "64"])
    summary = json.loads(capsys.readouterr().out)
    assert (summary["engine"], summary["processes"], summary["microbatches"]) == ("gpipe", 2, 2)
    assert summary["block_groups"] == [[0], [1]] and summary["epochs"] == 1
    assert positive(summary["samples_per_s"]) and accuracy(summary["test_accuracy"])
    assert len(summary["epoch_loss"]) == 1 and positive(summary["epoch_loss"][0])
    with pytest.raises(SystemExit) as stopped:          # an error is a message and exit status 2, not a traceback
        backprop_parallel.main(["--engine", "1f1b", "--data", "digits", "--train-subset", "256", "--batch-size", "64",
                                "--microbatches", "5"])
    assert stopped.value.code == 2 and "equal micro-batches" in capsys.readouterr().err


def test_parallel(tmp_path, monkeypatch):
    parallel = load("parallel", monkeypatch)
    parallel.main(["--method", "bwbpf", *MLP, "--blocks", "2", "--data", "digits", "--train-subset", "256",
                   "--rounds", "1", "--skip-projections", "--out", str(tmp_path)])
    result = read_json(tmp_path / "parallel.json")
    assert list(result["samples_per_s"]) == ["sequential", "parallel", "best-single"]
    assert all(positive(v) for v in result["samples_per_s"].values())
    accs = result["test_accuracy"]          # one thread each: the pipeline learns exactly what one process does
    assert accs["parallel"] == accs["sequential"] and accuracy(accs["best-single"])
    assert [r["stages"] for r in result["ranks"]] == [[0], [1]] and positive(result["stage_balance"])
    model = result["model"]
    assert positive(model["predicted_k2_speedup"]) and positive(model["measured_k2_speedup"])
    assert [(p["model"], p["blocks"]) for p in model["projections"]] == [("mlp", 2), ("mlp", 2)]
    assert "Analytic model at K=2" in (tmp_path / "parallel.md").read_text()


def test_speed(tmp_path, monkeypatch):
    speed = load("speed", monkeypatch)
    speed.main(["--method", "dgl", *MLP, "--blocks", "2", "--data", "digits", "--train-subset", "256",
                "--rounds", "1", "--microbatches", "2", "--skip-projections", "--memory-blocks", "2",
                "--out", str(tmp_path)])
    memory = read_json(tmp_path / "checkpoint-memory.json")
    assert 0 < memory["checkpointed_kept_bytes"] < memory["plain_bytes"]
    result = read_json(tmp_path / "speed.json")
    assert list(result["samples_per_s"]) == list(speed.EXECUTIONS)
    assert all(positive(v) for v in result["samples_per_s"].values())
    assert all(accuracy(v) for v in result["test_accuracy"].values())
    assert all(positive(v) for v in result["ratios"].values())
    assert all(positive(v["predicted"]) and positive(v["measured"]) for v in result["model_check"].values())
    assert [(p["model"], p["K"]) for p in result["projections"]] == [("mlp", 2)]
    md = (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed.png").stat().st_size > 0 and "| gpipe |" in md and "| zbv |" in md and "| dualpipev |" in md
    assert all(positive(b) for name in ("gpipe", "1f1b", "zbv", "dualpipev")
               for b in result["runs"][name][0]["peak_activation_bytes_per_process"])


def test_transformers(tmp_path, monkeypatch):
    transformers = load("transformers", monkeypatch)
    out = tmp_path / "out"
    transformers.main(["--data", "digits", "--subset", "256", "--epochs-vit", "1", "--epochs-gpt", "1",
                       "--vit-ks", "2", "--gpt-ks", "2", "--corpus", str(tmp_path / "corpus.txt"), "--corpus-mb", "0.02",
                       "--model-opt", "gpt:dim=16", "--model-opt", "vit:dim=16", "--evals", "2",
                       "--runs", str(tmp_path / "runs"), "--out", str(out)])
    result = read_json(out / "transformers.json")
    assert result["corpus"]["bytes"] == int(0.02 * 2 ** 20) and len(result["corpus"]["sha256"]) == 64
    vit, gpt = result["parts"]["vit"]["rows"], result["parts"]["gpt"]["rows"]
    assert [r["label"] for r in vit] == ["backprop", "bwbpf K=2", "dgl K=2", "auglocal K=2", "infopro K=2",
                                         "predsim K=2", "al K=2", "kernel K=2"]
    assert [r["label"] for r in gpt] == ["backprop", "bwbpf K=2", "dgl K=2", "auglocal K=2", "infopro K=2"]
    assert all(accuracy(r["test_accuracy"]) and positive(r["time_vs_e2ebp"]) and positive(r["memory_vs_e2ebp"])
               for r in vit + gpt)
    assert vit[0]["gap_pt"] == 0 and gpt[0]["loss_gap"] == 0 and all(positive(r["bits_per_byte"]) for r in gpt)
    assert all(len(r["curve"]) >= 2 for r in vit if r["method"] != "kernel")     # mid-epoch evaluations too
    assert (out / "vit-loss-vs-step.png").exists() and (out / "gpt-loss-vs-step.png").exists()


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_each_script_runs_as_a_program(script, monkeypatch, capsys):
    # `python bench/SCRIPT --help`, in this process: main() reads sys.argv when given no argv
    import runpy
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), "--help"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert stopped.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_shell_scripts_parse(script):
    # they run `bpfree compare` on the full Fashion-MNIST into bench/results: too long to run here
    done = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_bench_script_has_a_smoke_test():
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert {p.stem for p in BENCH.glob("*.py")} <= tested

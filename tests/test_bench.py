"""`bpfree bench` and `bpfree report`: aggregation over seeds, ratios to both E2EBP baselines, resumption."""
import json

import pytest

from bpfree import bench, cli
from bpfree.bench import Suite, accuracy_at_time, run_label, summarise


def _run(tmp, name, method, seed, accs, seconds, memory, rule_options=None, **config):
    """A finished run directory with the given per-epoch test accuracies and cumulative times."""
    d = tmp / name
    d.mkdir(parents=True)
    cfg = {"method": method, "model": "cnn", "data": "digits", "blocks": 4, "epochs": len(accs), "seed": seed,
           "schedule": None, "stage_epochs": None, "threads": 1, "rule_options": rule_options or {}, **config}
    rows = [{"epoch": i + 1, "test_acc": a, "wall_time_s": t, "epoch_time_s": t, "samples_per_s": 100.0,
             "stages": [{"name": "net", "test_acc": a}]} for i, (a, t) in enumerate(zip(accs, seconds))]
    summary = {"test_accuracy": accs[-1], "train_time_s": seconds[-1], "samples_per_s": 100.0,
               "peak_activation_bytes": memory, "cuda_peak_bytes": None, "stages": [{"name": "net", "test_acc": accs[-1]}],
               "torch": "x", "threads": 1, "device": "cpu"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "metrics.json").write_text(json.dumps(summary))
    return d


def _group(tmp):
    _run(tmp, "bp0", "backprop", 0, [0.80, 0.90], [10, 20], 1000)
    _run(tmp, "bp1", "backprop", 1, [0.82, 0.94], [10, 20], 1000)
    _run(tmp, "ck0", "backprop", 0, [0.80, 0.90], [13, 26], 400, {"checkpoint": "blocks"})
    _run(tmp, "ck1", "backprop", 1, [0.82, 0.94], [13, 26], 400, {"checkpoint": "blocks"})
    _run(tmp, "dgl0", "dgl", 0, [0.85, 0.88], [16, 24], 250)
    _run(tmp, "dgl1", "dgl", 1, [0.86, 0.90], [16, 24], 250)


def test_summary_aggregates_seeds_and_takes_ratios_to_both_baselines(tmp_path):
    _group(tmp_path)
    from bpfree.runs import read_run
    runs = [(p, *read_run(p)) for p in bench.find_runs([tmp_path])]
    rows = {r["label"]: r for r in summarise(runs)}
    assert list(rows) == ["backprop", "backprop[checkpoint=blocks]", "dgl"]
    dgl = rows["dgl"]
    assert dgl["seeds"] == [0, 1]
    assert dgl["test_accuracy"] == pytest.approx(0.89)
    assert dgl["test_accuracy_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert dgl["gap_pt"] == pytest.approx(100 * (0.89 - 0.92))
    assert dgl["time_vs_e2ebp"] == pytest.approx(24 / 20)
    assert dgl["memory_vs_e2ebp"] == pytest.approx(0.25)
    assert dgl["time_vs_checkpointed"] == pytest.approx(24 / 26)
    assert dgl["memory_vs_checkpointed"] == pytest.approx(250 / 400)
    # equal wall-clock: E2EBP trained 20 s; dgl's 1st epoch ended at 16 s, its 2nd at 24 s (0.85 and 0.86)
    assert dgl["accuracy_at_e2ebp_time"] == pytest.approx(0.855)
    assert rows["backprop[checkpoint=blocks]"]["accuracy_at_e2ebp_time"] == pytest.approx(0.81)  # 13 s < 20 < 26 s
    assert rows["backprop"]["gap_pt"] == pytest.approx(0.0)


def test_accuracy_at_time_takes_the_last_epoch_within_the_budget():
    epochs = [{"test_acc": 0.5, "wall_time_s": 5}, {"test_acc": 0.7, "wall_time_s": 10}]
    assert accuracy_at_time(epochs, 4) is None
    assert accuracy_at_time(epochs, 9.9) == 0.5
    assert accuracy_at_time(epochs, 10) == 0.7


def test_labels_name_the_rule_and_its_settings():
    assert run_label({"method": "dgl", "rule_options": {}, "schedule": None}) == "dgl"
    assert run_label({"method": "dgl", "rule_options": {"aux_head": "cnn"}, "schedule": "sequential"}) == \
        "dgl[aux_head=cnn,schedule=sequential]"


def test_report_writes_results_and_groups_differing_settings_apart(tmp_path, capsys):
    _group(tmp_path / "runs")
    _run(tmp_path / "runs", "other", "backprop", 0, [0.5], [3], 10, model_options={"widths": [8]})
    out = tmp_path / "report"
    assert cli.main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert text.count("\n## ") == 2                      # the run with another model is its own group
    assert "`dgl` | 89.00 ± 1.41 | -3.00 | 85.50" in text
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 7 and "bpfree_version" in results
    assert (out / "group1-accuracy.png").stat().st_size > 0 and (out / "group1-memory.png").exists()


def test_report_compares_runs_made_before_a_setting_existed_and_flags_unlike_machines(tmp_path):
    _run(tmp_path / "runs", "old", "backprop", 0, [0.90], [10], 1000)       # its config predates eval_every
    new = _run(tmp_path / "runs", "new", "dgl", 0, [0.88], [6], 500, eval_every=None, augment=None)
    summary = json.loads((new / "metrics.json").read_text())
    (new / "metrics.json").write_text(json.dumps({**summary, "threads": 2}))
    out = tmp_path / "report"
    assert cli.main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert text.count("\n## ") == 1 and "`dgl` | 88.00 | -2.00" in text
    assert "torch x, 1 threads, device cpu (backprop)" in text and "torch x, 2 threads, device cpu (dgl)" in text
    assert "time columns do not compare" in text
    _run(tmp_path / "alike", "bp", "backprop", 0, [0.90], [10], 1000)
    _run(tmp_path / "alike", "dgl", "dgl", 0, [0.88], [6], 500)
    assert cli.main(["report", str(tmp_path / "alike"), "--out", str(tmp_path / "r2")]) == 0
    assert "do not compare" not in (tmp_path / "r2" / "results.md").read_text()


def test_report_refuses_a_folder_without_runs(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no finished bpfree run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_profile_is_one_line(capsys):
    assert cli.main(["bench", "--profile", "huge"]) == 2
    err = capsys.readouterr().err
    assert "huge" in err and "quick" in err and err.count("\n") == 1


def test_every_profile_leads_with_both_backprop_baselines():
    for profile in bench.PROFILES:
        for suite in bench.profile_suites(profile):
            assert suite.methods()[:2] == ["backprop", "backprop[checkpoint=blocks]"]


def test_bench_runs_each_seed_skips_finished_runs_and_is_deterministic(tmp_path, monkeypatch, capsys):
    tiny = Suite("tiny", ("--data", "digits", "--model", "cnn", "--blocks", "2", "--epochs", "1",
                          "--model-opt", "widths=8,8,8,8", "--threads", "1"), seeds=(0, 1), rules=("dgl",))
    monkeypatch.setitem(bench.PROFILES, "tiny", ("test", [tiny]))
    argv = ["bench", "--profile", "tiny", "--out", str(tmp_path / "a")]
    assert cli.main(argv) == 0
    runs = sorted((tmp_path / "a").rglob("metrics.json"))
    assert len(runs) == 6                                   # 3 methods x 2 seeds
    stamps = [r.stat().st_mtime_ns for r in runs]
    assert cli.main(argv) == 0                              # again: nothing retrained
    assert [r.stat().st_mtime_ns for r in runs] == stamps
    assert cli.main(["bench", "--profile", "tiny", "--out", str(tmp_path / "b")]) == 0
    acc = lambda root: [json.loads(p.read_text())["test_accuracy"] for p in sorted(root.rglob("metrics.json"))]  # noqa: E731
    assert acc(tmp_path / "a") == acc(tmp_path / "b")
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    rows = {r["label"]: r for r in results["groups"][0]["rows"]}
    assert rows["dgl"]["seeds"] == [0, 1]
    assert rows["backprop[checkpoint=blocks]"]["memory_vs_e2ebp"] < 1


def test_quick_profile_reproduces_the_committed_backprop_rows(tmp_path):
    # The committed quick results come from `bpfree bench --profile quick`; the same seed and settings
    # must give the same accuracy here (the cheap rows: E2EBP and checkpointed E2EBP on digits-mlp).
    from pathlib import Path
    committed = json.loads((Path(__file__).parent.parent / "bench/results/bench-quick/results.json").read_text())
    suite = next(s for s in bench.PROFILES["quick"][1] if s.name == "digits-mlp")
    rows = {r["label"]: r for r in committed["runs"] if r["config"]["model"] == "mlp"}
    threads = rows["backprop"]["summary"]["threads"]          # the threads it ran with (default: the cores)
    argv = bench.compare_argv(Suite(suite.name, suite.flags, rules=()), 0, tmp_path, ["--threads", str(threads)])
    assert cli.main(argv) == 0
    for label, run in (("backprop", "backprop"), ("backprop[checkpoint=blocks]", "backprop_checkpoint-blocks")):
        mine = json.loads((tmp_path / suite.name / "seed-0" / run / "metrics.json").read_text())
        assert mine["test_accuracy"] == rows[label]["summary"]["test_accuracy"]


def test_report_draws_the_k_scaling_and_label_budget_curves(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "bp", "backprop", 0, [0.90], [10], 1000)                       # E2EBP at K=4 only
    for k, acc in ((2, 0.89), (4, 0.87), (8, 0.80)):
        _run(runs, f"dgl{k}", "dgl", 0, [acc], [10], 500, blocks=k)
    for n, (kern, bp) in {1: (0.70, 0.20), 10: (0.80, 0.40), None: (0.85, 0.90)}.items():
        _run(runs, f"lb-bp-{n}", "backprop", 0, [bp], [5], 10, model="mlp", output_labels=n)
        _run(runs, f"lb-k-{n}", "kernel", 0, [kern], [5], 10, model="mlp", output_labels=n, init_modules="src:0-0")
    out = tmp_path / "report"
    assert cli.main(["report", str(runs), "--out", str(out)]) == 0
    sweeps = {s["axis"]: s for s in json.loads((out / "results.json").read_text())["sweeps"]}
    assert set(sweeps) == {"blocks", "output_labels"}
    k = sweeps["blocks"]
    assert k["values"] == ["2", "4", "8"]
    assert k["gap_pt"]["dgl"] == pytest.approx({"2": -1.0, "4": -3.0, "8": -10.0})   # against E2EBP's one run
    lb = sweeps["output_labels"]
    assert lb["values"] == ["1", "10", "all"]
    assert lb["gap_pt"]["kernel (init)"] == pytest.approx({"1": 50.0, "10": 40.0, "all": -5.0})  # same budget
    text = (out / "results.md").read_text()
    assert "| `dgl` | 89.00 (-1.00) | 87.00 (-3.00) | 80.00 (-10.00) |" in text
    assert (out / "sweep1-blocks.png").stat().st_size > 0 and (out / "sweep2-output_labels.png").exists()


def test_no_two_curves_of_a_plot_look_alike():
    """The full profile plots 11 rules: with matplotlib's 10-colour cycle, E2EBP and the 11th looked the same."""
    from bpfree.report import line_style
    styles = [tuple(sorted(line_style(i).items())) for i in range(40)]
    assert len(set(styles)) == 40

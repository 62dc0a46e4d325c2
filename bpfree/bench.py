"""`bpfree bench` and `bpfree report`: every rule against the strongest backprop baselines.

A *profile* is a list of suites. A suite fixes everything but the rule (model, data, K, epoch
budget, augmentation) and is one `bpfree compare` per seed, into OUT/SUITE/seed-S/, with E2EBP
first (the reference row) and E2EBP with activation checkpointing second (the memory baseline a
user would otherwise pick). Finished runs are skipped, so `--profile full` (hours) resumes where an
earlier session stopped.

`bpfree report RUN_DIRS...` reads any finished run directories (or folders holding them), groups
the runs that differ only in rule and seed, and writes what `bench` writes:

    results.json   one record per run: its full config, summary, bpfree version and commit
    results.md     per group: test accuracy mean ± std over seeds, gap to E2EBP (points), time per
                   epoch, samples/s, peak activation memory, time and memory ratios to E2EBP and to
                   checkpointed E2EBP, epochs to 95% of the final accuracy, per-stage readouts; and
                   the equal-wall-clock view: the accuracy each rule had reached by the time E2EBP
                   finished training (the last epoch that ended within E2EBP's training time)
    GROUP-*.png    accuracy vs epoch and vs training time (mean over seeds), memory bars
    sweepN-*.png   a curve wherever runs differ only in rule, seed and one of K (`blocks`: the K-scaling
                   curve), labelled examples per class (`output_labels`: the label-budget curve) or the
                   training subset: test accuracy and its gap to E2EBP against that setting
"""
from __future__ import annotations

import fnmatch
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import BpfreeError
from .io import provenance, write_json
from .report import epochs_to, human_bytes, line_style
from .runs import read_run

REFERENCE = "backprop"
CHECKPOINTED = "backprop[checkpoint=blocks]"


@dataclass(frozen=True)
class Suite:
    """One comparison: `bpfree compare FLAGS --methods METHODS --seed S` for each seed."""
    name: str
    flags: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    rules: tuple[str, ...] | None = None    # None: every registered rule at its defaults

    def methods(self) -> list[str]:
        """E2EBP, checkpointed E2EBP, then the suite's rules (every other registered rule by default)."""
        from .rules import list_rules
        rules = [r for r in (list_rules() if self.rules is None else self.rules) if r != REFERENCE]
        return [REFERENCE, CHECKPOINTED, *rules]


_FMNIST = ("--data", "fashion-mnist")
PROFILES: dict[str, tuple[str, list[Suite]]] = {
    "quick": ("every rule on the embedded digits data, mlp and cnn at K=4, one seed (minutes on 2 CPU cores)", [
        Suite("digits-mlp", ("--data", "digits", "--model", "mlp", "--blocks", "4", "--epochs", "10")),
        Suite("digits-cnn", ("--data", "digits", "--model", "cnn", "--blocks", "4", "--epochs", "10")),
    ]),
    # the cnn on a 10,000-example subset: all 60,000 would take ~30 h of these 2 cores (the gpu profile
    # trains on everything); the mlp takes all of it (~20 min)
    "full": ("Fashion-MNIST, mlp (all 60k) and augmented cnn (a 10k subset) at K=4, 10 epochs, 3 seeds "
             "(hours on CPU; resumable)", [
        Suite("fashion-mnist-mlp", (*_FMNIST, "--model", "mlp", "--blocks", "4", "--epochs", "10"),
              seeds=(0, 1, 2)),
        Suite("fashion-mnist-cnn", (*_FMNIST, "--model", "cnn", "--blocks", "4", "--epochs", "10",
                                    "--train-subset", "10000", "--augment", "crop=2,flip"), seeds=(0, 1, 2)),
    ]),
    "gpu": ("CIFAR-10 with the standard recipe (SGD 0.1, cosine, crop=4 + flip), resnet18 at K=4 and resnet32 "
            "at K=8, bf16, 3 seeds (a GPU)", [
        Suite(f"cifar10-{model}-k{k}", ("--data", "cifar10", "--model", model, "--blocks", str(k), "--epochs",
                                        str(epochs), "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9",
                                        "--weight-decay", "5e-4", "--lr-schedule", "cosine", "--batch-size", "128",
                                        "--augment", "crop=4,flip", "--precision", "bf16", "--device", "cuda"),
              seeds=(0, 1, 2))
        for model, k, epochs in (("resnet18", 4, 100), ("resnet32", 8, 160))
    ]),
}


def profile_suites(profile: str, only: str | None = None) -> list[Suite]:
    if profile not in PROFILES:
        raise BpfreeError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    suites = [s for s in PROFILES[profile][1] if only is None or fnmatch.fnmatchcase(s.name, only)]
    if not suites:
        raise BpfreeError(f"no suite of profile {profile!r} matches {only!r}; suites: "
                          f"{', '.join(s.name for s in PROFILES[profile][1])}")
    return suites


def compare_argv(suite: Suite, seed: int, out: Path, passthrough: list[str]) -> list[str]:
    """The `bpfree compare` command line of one suite and seed (finished runs are kept: --resume)."""
    return ["compare", *suite.flags, *passthrough, "--seed", str(seed), "--methods", ",".join(suite.methods()),
            "--out", str(out / suite.name / f"seed-{seed}"), "--resume", "--quiet"]


# --- report: runs -> groups -> rows ---------------------------------------------------------------
# settings that do not change what is being compared: runs differing only in these share a group
_NOT_GROUPING = {"method", "rule_options", "seed", "schedule", "stage_epochs", "threads", "device", "data_dir",
                 "workers", "stream", "compile", "log"}


def run_label(config: dict) -> str:
    """backprop, dgl[aux_head=cnn], dgl[schedule=sequential]: the rule and what was set on it."""
    settings = {**config.get("rule_options", {}),
                **{k: config[k] for k in ("schedule", "stage_epochs") if config.get(k) is not None}}
    inner = ",".join(f"{k}={v}" for k, v in sorted(settings.items()))
    return f"{config['method']}[{inner}]" if inner else config["method"]


def group_title(config: dict) -> str:
    parts = [config["model"] + (f" K={config['blocks']}" if config.get("blocks") else ""), config["data"],
             f"{config['epochs']} epochs"]
    for key, text in (("train_subset", "train subset {}"), ("augment", "augment {}"), ("precision", "{}"),
                      ("model_options", "model {}")):
        value = config.get(key)
        if value and value not in ("none", "fp32"):
            parts.append(text.format(value))
    return ", ".join(parts)


def find_runs(paths: list[Path]) -> list[Path]:
    """Finished run directories (holding metrics.json) at or below each path, in sorted order. Files
    among the paths (a shell glob's runs/x/*: plots, tables) are skipped; a path that does not exist
    is an error."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise BpfreeError(f"{p} does not exist; give run directories (or folders holding them)")
        if (p / "metrics.json").exists():
            found.append(p)
        elif p.is_dir():
            found += sorted(m.parent for m in p.rglob("metrics.json") if (m.parent / "config.json").exists())
    if not found:
        raise BpfreeError(f"no finished bpfree run (a directory with metrics.json) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def accuracy_at_time(epochs: list[dict], seconds: float) -> float | None:
    """Test accuracy after the last epoch that ended within `seconds` of training (None: none did)."""
    done = [e for e in epochs if e["wall_time_s"] <= seconds * (1 + 1e-9)]
    return done[-1]["test_acc"] if done else None


def summarise(runs: list[tuple[Path, dict, list[dict], dict]]) -> list[dict]:
    """Rows of one group: one per label, aggregated over seeds; ratios against E2EBP and checkpointed E2EBP."""
    by_label: dict[str, list] = {}
    for run in runs:
        by_label.setdefault(run_label(run[1]), []).append(run)
    ref_runs, ckpt_runs = by_label.get(REFERENCE, []), by_label.get(CHECKPOINTED, [])
    # E2EBP's training time per seed, for the equal-wall-clock view
    ref_time = {cfg["seed"]: summ["train_time_s"] for _, cfg, _, summ in ref_runs}

    def mean_of(runs, key):
        return _mean_std([summ.get(key) for _, _, _, summ in runs])[0]

    ref_acc = mean_of(ref_runs, "test_accuracy")
    rows = []
    order = [REFERENCE, CHECKPOINTED] + sorted(k for k in by_label if k not in (REFERENCE, CHECKPOINTED))
    for label in (k for k in order if k in by_label):
        group = by_label[label]
        acc, std = _mean_std([summ["test_accuracy"] for _, _, _, summ in group])
        per_epoch = _mean_std([summ["train_time_s"] / max(1, len(ep)) for _, _, ep, summ in group])[0]
        at_ref = [accuracy_at_time(ep, ref_time[cfg["seed"]]) for _, cfg, ep, _ in group if cfg["seed"] in ref_time]
        row = {
            "label": label, "seeds": sorted(cfg["seed"] for _, cfg, _, _ in group),
            "test_accuracy": acc, "test_accuracy_std": std,
            "gap_pt": None if ref_acc is None else 100 * (acc - ref_acc),
            "accuracy_at_e2ebp_time": _mean_std(at_ref)[0] if at_ref and None not in at_ref else None,
            "epoch_time_s": per_epoch, "train_time_s": mean_of(group, "train_time_s"),
            "samples_per_s": mean_of(group, "samples_per_s"),
            "peak_activation_bytes": mean_of(group, "peak_activation_bytes"),
            "cuda_peak_bytes": mean_of(group, "cuda_peak_bytes"), "train_flops": mean_of(group, "train_flops"),
            "repeated_seeds": len({cfg["seed"] for _, cfg, _, _ in group}) < len(group),
            "epochs_to_95": _mean_std([epochs_to(0.95, ep) for _, _, ep, _ in group])[0],
            "stages": [{"name": s["name"], "test_acc": _mean_std([summ["stages"][i].get("test_acc")
                                                                  for _, _, _, summ in group])[0]}
                       for i, s in enumerate(group[0][3]["stages"])],
        }
        for base, runs_of in (("e2ebp", ref_runs), ("checkpointed", ckpt_runs)):
            t, m = mean_of(runs_of, "train_time_s"), mean_of(runs_of, "peak_activation_bytes")
            f = mean_of(runs_of, "train_flops")
            row[f"time_vs_{base}"] = row["train_time_s"] / t if t else None
            row[f"memory_vs_{base}"] = (row["peak_activation_bytes"] / m
                                        if m and row["peak_activation_bytes"] is not None else None)
            row[f"flops_vs_{base}"] = row["train_flops"] / f if f and row["train_flops"] else None
            row[f"overhead_vs_{base}"] = (row[f"time_vs_{base}"] / row[f"flops_vs_{base}"]
                                          if row[f"time_vs_{base}"] and row[f"flops_vs_{base}"] else None)
        rows.append(row)
    return rows


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {"acc": lambda v: f"{100 * v:.2f}", "pt": lambda v: f"{v:+.2f}", "x": lambda v: f"{v:.2f}x",
            "s": lambda v: f"{v:.1f}" if v >= 10 else f"{v:.2f}", "bytes": human_bytes,
            "n": lambda v: f"{v:.0f}" if v >= 10 else f"{v:.1f}"}[kind](value)


def rows_markdown(rows: list[dict]) -> str:
    head = ("| rule | test acc % | gap to E2EBP (pt) | acc at E2EBP's time % | s/epoch | samples/s | act. memory "
            "| time / memory vs E2EBP | FLOPs vs E2EBP / overhead | time / memory vs ckpt E2EBP | epochs to 95% |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = _fmt(r["test_accuracy"], "acc") + (f" ± {100 * r['test_accuracy_std']:.2f}"
                                                 if r["test_accuracy_std"] is not None else "")
        if r.get("repeated_seeds"):
            acc += " (repeats of one seed, not seeds)"
        lines.append("| " + " | ".join([
            f"`{r['label']}`", acc, _fmt(r["gap_pt"], "pt"), _fmt(r["accuracy_at_e2ebp_time"], "acc"),
            _fmt(r["epoch_time_s"], "s"), _fmt(r["samples_per_s"], "n"), _fmt(r["peak_activation_bytes"], "bytes"),
            f"{_fmt(r['time_vs_e2ebp'], 'x')} / {_fmt(r['memory_vs_e2ebp'], 'x')}",
            f"{_fmt(r.get('flops_vs_e2ebp'), 'x')} / {_fmt(r.get('overhead_vs_e2ebp'), 'x')}",
            f"{_fmt(r['time_vs_checkpointed'], 'x')} / {_fmt(r['memory_vs_checkpointed'], 'x')}",
            _fmt(r["epochs_to_95"], "n")]) + " |")
    return "\n".join(lines)


def _group_key(config: dict, also: tuple[str, ...] = ()) -> str:
    return repr(sorted((k, v) for k, v in config.items() if k not in _NOT_GROUPING and k not in also))


# --- sweeps: one setting varied, every other setting held -----------------------------------------
# setting -> (axis title, what None means); init_modules marks the label (a frozen module reused)
SWEEPS = {"blocks": ("K (modules)", None), "output_labels": ("labelled examples per class", "all"),
          "train_subset": ("training examples", "all")}


def _sweep_label(config: dict) -> str:
    return run_label(config) + (" (init)" if config.get("init_modules") else "")


def sweeps(runs: list[tuple[Path, dict, list[dict], dict]]) -> list[dict]:
    """Curves: runs equal in every grouping setting but one SWEEPS setting, which takes >= 2 values.

    Each curve maps label -> value -> mean test accuracy over seeds, and its gap to E2EBP at that value
    (or to E2EBP's only value, when it ran at one: E2EBP does not depend on K, for instance).
    """
    found = []
    for axis, (title, none_means) in SWEEPS.items():
        buckets: dict[str, list] = {}
        for run in runs:
            buckets.setdefault(_group_key(run[1], also=(axis, "init_modules")), []).append(run)
        for bucket in buckets.values():
            values = sorted({cfg.get(axis) for _, cfg, _, _ in bucket}, key=lambda v: (v is None, v or 0))
            if len(values) < 2:
                continue
            accs: dict[str, dict] = {}
            for _, cfg, _, summ in bucket:
                accs.setdefault(_sweep_label(cfg), {}).setdefault(cfg.get(axis), []).append(summ["test_accuracy"])
            curves = {label: {v: statistics.fmean(a) for v, a in by_value.items()} for label, by_value in accs.items()}
            ref = curves.get(REFERENCE, {})
            gaps = {label: {v: 100 * (acc - ref[v if v in ref else next(iter(ref))])
                            for v, acc in curve.items() if v in ref or len(ref) == 1}
                    for label, curve in curves.items() if label != REFERENCE}
            found.append({"axis": axis, "title": title, "none_means": none_means,
                          "group": group_title({**bucket[0][1], axis: None}), "values": values,
                          "accuracy": curves, "gap_pt": gaps})
    return found


def _value_name(sweep: dict, value) -> str:
    return sweep["none_means"] if value is None else str(value)


def sweep_markdown(sweep: dict) -> str:
    lines = [f"Test accuracy %, and gap to E2EBP (pt), against {sweep['title']} (`{sweep['axis']}`):", "",
             "| rule | " + " | ".join(_value_name(sweep, v) for v in sweep["values"]) + " |", "|---|" + "---:|" * len(sweep["values"])]
    for label, curve in sweep["accuracy"].items():
        gaps = sweep["gap_pt"].get(label, {})
        lines.append(f"| `{label}` | " + " | ".join(
            "-" if v not in curve else f"{100 * curve[v]:.2f}" + (f" ({gaps[v]:+.2f})" if v in gaps else "")
            for v in sweep["values"]) + " |")
    return "\n".join(lines)


def _plot_sweep(sweep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sweep["values"]
    x = {v: i for i, v in enumerate(values)}          # evenly spaced: K and budgets grow geometrically
    fig, axes = plt.subplots(1, 2 if sweep["gap_pt"] else 1, figsize=(11 if sweep["gap_pt"] else 6, 4), squeeze=False)
    for i, (label, curve) in enumerate(sweep["accuracy"].items()):
        points = sorted(curve.items(), key=lambda kv: x[kv[0]])
        if label == REFERENCE and len(points) == 1:   # E2EBP at one setting: a level line
            axes[0][0].axhline(100 * points[0][1], color="black", ls="--", lw=1, label=label)
        else:
            axes[0][0].plot([x[v] for v, _ in points], [100 * a for _, a in points], marker="o",
                            label=label, **line_style(i))
        if label in sweep["gap_pt"]:
            gaps = sorted(sweep["gap_pt"][label].items(), key=lambda kv: x[kv[0]])
            axes[0][1].plot([x[v] for v, _ in gaps], [g for _, g in gaps], marker="o", label=label,
                            **line_style(i))
    ticks = [_value_name(sweep, v) for v in values]
    for ax, ylabel in zip(axes[0], ("test accuracy (%)", "test accuracy − E2EBP (points)")):
        ax.set_xticks(range(len(values)), ticks)
        ax.set_xlabel(sweep["title"])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if sweep["gap_pt"]:
        axes[0][1].axhline(0, color="gray", lw=1, ls="--")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(sweep["group"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(paths: list[Path], out: Path, command: str = "") -> str:
    """results.json, results.md and plots for the finished runs under `paths`; returns results.md's text."""
    runs = [(p, *read_run(p)) for p in find_runs(paths)]
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(_group_key(run[1]), []).append(run)
    out.mkdir(parents=True, exist_ok=True)
    md, records, tables = ["# bpfree bench results", ""], [], []
    if command:
        md += [f"Command: `{command}`", ""]
    for gi, group in enumerate(groups.values(), 1):
        title = group_title(group[0][1])
        rows = summarise(group)
        tables.append({"group": title, "rows": rows})
        envs: dict[tuple, list[str]] = {}                   # where the runs ran -> which runs
        for _, cfg, _, e in group:
            labels = envs.setdefault((e.get("torch"), e.get("threads"), e.get("device")), [])
            labels += [run_label(cfg)] if run_label(cfg) not in labels else []
        where = "; ".join(f"torch {t}, {n} threads, device {d}" + (f" ({', '.join(labels)})" if len(envs) > 1 else "")
                          for (t, n, d), labels in envs.items())
        md += [f"## {gi}. {title}", "", f"seeds {sorted({cfg['seed'] for _, cfg, _, _ in group})}; {where}."
               + (" The runs did not all run alike: their time columns do not compare." if len(envs) > 1 else ""),
               "", rows_markdown(rows), ""]
        stage_lines = [f"- `{r['label']}`: " + ", ".join(f"{s['name']} {100 * s['test_acc']:.2f}%"
                                                        for s in r["stages"] if s["test_acc"] is not None)
                       for r in rows if sum(s["test_acc"] is not None for s in r["stages"]) > 1]
        if stage_lines:
            md += ["Per-stage readout test accuracy (mean over seeds):", ""] + stage_lines + [""]
        md += [f"Plots: `group{gi}-accuracy.png`, `group{gi}-memory.png`.", ""]
        _plot_group(group, rows, out, f"group{gi}", f"{title}, seeds {sorted({cfg['seed'] for _, cfg, _, _ in group})}")
        records += [{"run": str(p), "group": title, "label": run_label(cfg), "config": cfg, "summary": summ}
                    for p, cfg, _, summ in group]
    found = sweeps(runs)
    for si, sweep in enumerate(found, 1):
        md += [f"## Sweep {si}: {sweep['group']}", "", sweep_markdown(sweep), "",
               f"Plot: `sweep{si}-{sweep['axis']}.png`.", ""]
        _plot_sweep(sweep, out / f"sweep{si}-{sweep['axis']}.png")
    md += ["Gap: test accuracy minus E2EBP's (mean over seeds, points). Acc at E2EBP's time: the test accuracy "
           "after the last epoch that ended within E2EBP's total training time, same seed (the equal-wall-clock "
           "view; - when no epoch did). Activation memory: tensors saved for backward in one step of the largest "
           "stage (parameters excluded). Ratios are of total training time and of activation memory. Epochs to "
           "95%: the first epoch reaching 95% of the run's final accuracy.", ""]
    sweeps_json = [{**sw, "values": [_value_name(sw, v) for v in sw["values"]],
                    **{part: {lb: {_value_name(sw, v): x for v, x in c.items()} for lb, c in sw[part].items()}
                       for part in ("accuracy", "gap_pt")}} for sw in found]
    write_json(out / "results.json", {"command": command, **provenance(), "groups": tables, "sweeps": sweeps_json,
                                      "runs": records})
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    return text


def _plot_group(group, rows, out: Path, stem: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[list[dict]]] = {}
    for _, cfg, epochs, _ in group:
        curves.setdefault(run_label(cfg), []).append(epochs)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, r in enumerate(rows):            # mean over seeds, epoch by epoch
        runs = curves[r["label"]]
        n = min(len(e) for e in runs)
        acc = [100 * statistics.fmean(e[i]["test_acc"] for e in runs) for i in range(n)]
        t = [statistics.fmean(e[i]["wall_time_s"] for e in runs) for i in range(n)]
        a1.plot(range(1, n + 1), acc, marker=".", label=r["label"], **line_style(k))
        a2.plot(t, acc, marker=".", label=r["label"], **line_style(k))
    for ax, xlabel in ((a1, "epoch"), (a2, "training time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / f"{stem}-accuracy.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    mem = [(r["label"], (r["peak_activation_bytes"] or 0) / 2**20) for r in rows]
    ax.barh([m[0] for m in mem][::-1], [m[1] for m in mem][::-1],
            color=["tab:red" if m[0] == REFERENCE else "tab:orange" if m[0] == CHECKPOINTED else "tab:blue"
                   for m in mem][::-1])
    ax.set_xlabel("peak activation memory (MiB)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{stem}-memory.png", dpi=110)
    plt.close(fig)


def run_bench(profile: str, out: Path, passthrough: list[str], only: str | None = None,
              dry_run: bool = False, run: Callable[[list[str]], int] | None = None) -> list[list[str]]:
    """Run (`run(argv)`: the CLI's main) or, dry, list every suite x seed of a profile as `bpfree
    compare`, then report on `out`."""
    commands = [compare_argv(s, seed, out, passthrough) for s in profile_suites(profile, only) for seed in s.seeds]
    for argv in commands:
        print("bpfree " + " ".join(argv), flush=True)
        if not dry_run:
            code = run(argv)
            if code:
                raise SystemExit(code)
    return commands

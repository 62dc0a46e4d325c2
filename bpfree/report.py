"""Tables and plots from run directories (reports read runs; they never train)."""
from __future__ import annotations

from pathlib import Path

from .io import write_json
from .runs import read_run


def human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def epoch_line(row: dict) -> str:
    """One compact line per epoch, like airbench's table rows."""
    parts = [f"epoch {row['epoch']:>3}", f"test {row['test_acc']:.4f}"]
    if "val_acc" in row:
        parts.append(f"val {row['val_acc']:.4f}")
    for s in row["stages"]:
        if "loss" in s or "test_acc" in s:
            loss = f"{s['loss']:.3f}" if "loss" in s else "-"
            acc = f"/{s['test_acc']:.3f}" if "test_acc" in s else ""
            parts.append(f"{s['name']} {loss}{acc}")
    parts.append(f"{row['epoch_time_s']:.2f}s")
    return "  ".join(parts)


FRACTIONS = (0.90, 0.95, 0.99)     # of the first method's final accuracy, for steps_to_90 etc.
STEPS_TO = tuple(f"steps_to_{round(100 * f)}" for f in FRACTIONS)
COLUMNS = [("method", "label"), ("schedule", "schedule"), ("test acc", "test_accuracy"),
           ("epochs", "epochs"), ("to 95%", "epochs_to_95"),
           ("steps to " + "/".join(f"{round(100 * f)}" for f in FRACTIONS) + "% of first", STEPS_TO),
           ("train s", "train_time_s"),
           ("s/epoch", "epoch_time_s"), ("samples/s", "samples_per_s"),
           ("act. memory", "peak_activation_bytes"), ("memory vs first", "memory_ratio"),
           ("time vs first", "time_ratio"), ("FLOPs vs first", "flops_ratio"), ("overhead", "overhead_factor")]


def epochs_to(fraction: float, epochs: list[dict]) -> int | None:
    """The first epoch whose test accuracy reaches `fraction` of the last epoch's (convergence speed)."""
    if not epochs:
        return None
    goal = fraction * epochs[-1]["test_acc"]
    return next(e["epoch"] for e in epochs if e["test_acc"] >= goal)


def accuracy_curve(epochs: list[dict], batch_size: int) -> list[tuple[int, float]]:
    """(training step, test accuracy) of a run, in step order: its evaluations between steps
    (`--eval-every`) and at each epoch's end. Steps count every stage's phase (sequential
    schedules train one stage after another). Rows written before they carried their step count
    get it from their samples (steps per epoch = samples / batch size)."""
    points, done = [], 0
    for e in epochs:
        points += [(r["step"], r["test_acc"]) for r in e.get("step_evals", [])]
        done = e.get("step", done + max(1, round(e["samples_per_s"] * e["epoch_time_s"] / batch_size)))
        points.append((done, e["test_acc"]))
    return sorted(points)


def steps_to(goal: float, curve: list[tuple[int, float]]) -> int | None:
    """The first evaluated step whose test accuracy reaches `goal` (None: never)."""
    return next((step for step, acc in curve if acc >= goal), None)


def summary_rows(summaries: list[dict]) -> list[dict]:
    """Add ratios against the first run (the reference, usually backprop).

    Time is compared as total training time: under the sequential schedule each stage trains for
    the given epochs, so its logged epochs are stage-epochs, each cheaper than a full pass."""
    rows, ref = [], summaries[0]
    for s in summaries:
        r = dict(s)
        r["time_ratio"] = s["train_time_s"] / ref["train_time_s"]
        r["memory_ratio"] = (s["peak_activation_bytes"] / ref["peak_activation_bytes"]
                             if ref["peak_activation_bytes"] else None)
        r["flops_ratio"] = s["train_flops"] / ref["train_flops"] if s.get("train_flops") and ref.get("train_flops") else None
        # what bpfree costs beyond the method's own arithmetic: time ratio per FLOP ratio
        r["overhead_factor"] = r["time_ratio"] / r["flops_ratio"] if r["flops_ratio"] else None
        rows.append(r)
    return rows


def _cell(key, value) -> str:
    if isinstance(key, tuple):         # one column for several numbers: "40/72/180"
        return "/".join(_cell(k, v) for k, v in zip(key, value))
    if value is None:
        return "-"
    if key == "peak_activation_bytes":
        return human_bytes(value)
    if key == "test_accuracy":
        return f"{100 * value:.2f}%"
    if key.endswith("ratio") or key == "overhead_factor":
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def table(rows: list[dict], markdown: bool = False) -> str:
    header = [c for c, _ in COLUMNS]
    cells = [[_cell(k, [r.get(x) for x in k] if isinstance(k, tuple) else r.get(k)) for _, k in COLUMNS]
             for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells])


def line_style(i: int) -> dict:
    """Colour and dash of a plot's i-th curve: ten colours, then the same ten dashed, dotted, ...,
    so no two curves of one plot look alike."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}


def plot_title(configs: list[dict]) -> str:
    """What a plot of these runs shows: model, K, data and seeds (the settings they share)."""
    first = configs[0]
    ks = sorted({c.get("blocks") for c in configs if c.get("blocks")})
    seeds = sorted({c["seed"] for c in configs})
    return (f"{first['model']} K={'/'.join(map(str, ks))}, {first['data']}, "
            f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str]) -> list[Path]:
    """Test accuracy vs epoch, vs training wall-clock time and vs training step, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in run_dirs]
    paths = []
    for xkey, xlabel, name in (("epoch", "epoch", "accuracy_vs_epoch.png"),
                               ("wall_time_s", "training time (s)", "accuracy_vs_time.png"),
                               ("step", "training step", "accuracy_vs_step.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, ((config, epochs, _), label) in enumerate(zip(runs, labels)):
            points = (accuracy_curve(epochs, config["batch_size"]) if xkey == "step" else
                      [(e[xkey], e["test_acc"]) for e in epochs])
            ax.plot([x for x, _ in points], [100 * a for _, a in points], marker="o" if xkey != "step" else ".",
                    label=label, **line_style(i))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(plot_title([config for config, _, _ in runs]), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def write_comparison(run_dirs: list[Path], out: Path, title: str, labels: list[str], command: str = "") -> str:
    """summary.json, summary.md and plots for a set of runs; returns the printed table."""
    summaries, goal = [], None
    for d, label in zip(run_dirs, labels):
        config, epochs, summary = read_run(d)
        goal = summary["test_accuracy"] if goal is None else goal        # the first method's final accuracy
        curve = accuracy_curve(epochs, config["batch_size"])
        summaries.append({**summary, "label": label, "epochs_to_95": epochs_to(0.95, epochs),
                          **{key: steps_to(f * goal, curve) for f, key in zip(FRACTIONS, STEPS_TO)},
                          "epoch_time_s": sum(e["epoch_time_s"] for e in epochs) / max(1, len(epochs))})
    rows = summary_rows(summaries)
    write_json(out / "summary.json", {"title": title, "command": command, "runs": rows})
    stage_lines = []
    for r in rows:
        accs = [f"{s['name']} {100 * s['test_acc']:.2f}%" for s in r["stages"] if "test_acc" in s]
        if len(accs) > 1:
            stage_lines.append(f"- {r['label']}: per-stage readout test accuracy: " + ", ".join(accs))
    env = rows[0]
    md = [f"# {title}", "", f"Command: `{command}`", "",
          f"torch {env['torch']}, {env['threads']} threads, device {env['device']}.", "",
          table(rows, markdown=True), ""] + stage_lines + [
        "", "to 95%: the first epoch whose test accuracy reaches 95% of the last epoch's. Steps to 90/95/99% of "
        "first: the first training step (all stages' phases counted) whose test accuracy reaches that fraction "
        "of the first row's final accuracy, evaluated every --eval-every steps when set, else at epoch ends "
        "(-: never). s/epoch: mean "
        "training time per (stage-)epoch. Activation memory: tensors saved for backward during one step "
        "of the largest stage (autograd saved-tensor hooks, parameters excluded). Ratios are against "
        "the first row.", ""]
    (out / "summary.md").write_text("\n".join(md))
    plot_runs(run_dirs, out, labels)
    return table(rows)

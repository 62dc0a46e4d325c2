"""Per-epoch validation and test accuracy of finished runs side by side (issue 20: rules that start slowly).

    python bench/slow_start.py --runs LABEL=RUN_DIR [LABEL=RUN_DIR ...] --out bench/results/slow-start-cnn

Reads each run's metrics.jsonl (and the `align_cos` of its stages, when logged) and writes
slow-start.json, slow-start.md (one row per run: val / test accuracy after each epoch, the gap to the
first run at epoch 1 and at the end) and slow-start.png (validation accuracy vs epoch). The runs
themselves come from `bpfree compare` (their commands: bench/results/NOTES.md); tune on the
validation columns, never on the test ones.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    align = [[c for stage in row["stages"] for c in stage.get("align_cos") or []] for row in rows]
    return {"val": [row.get("val_acc") for row in rows], "test": [row["test_acc"] for row in rows],
            "align_cos": align if any(align) else None}


def table(runs: dict) -> str:
    first = next(iter(runs.values()))
    epochs = len(first["val"])
    head = "| run | " + " | ".join(f"ep {e + 1} val / test" for e in range(epochs)) + " | ep 1 val vs first | last val vs first |"
    lines = [head, "|---|" + "---:|" * (epochs + 2)]
    for label, run in runs.items():
        cells = [f"{100 * v:.1f} / {100 * t:.2f}" for v, t in zip(run["val"], run["test"])]
        gaps = [f"{100 * (run['val'][i] - first['val'][i]):+.1f}" for i in (0, -1)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gaps[0]} | {gaps[1]} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="LABEL=RUN_DIR, the reference first")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runs = {label: read(Path(path)) for label, path in (item.split("=", 1) for item in args.runs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slow-start.json").write_text(json.dumps(runs, indent=1))
    (out / "slow-start.md").write_text(
        f"# Accuracy per epoch (validation / test, %)\n\nCommand: `python bench/slow_start.py --runs "
        f"{' '.join(args.runs)} --out {args.out}`\n\n{table(runs)}\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        ax.plot(range(1, len(run["val"]) + 1), [100 * v for v in run["val"]], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "slow-start.png", dpi=120)


if __name__ == "__main__":
    main()

"""Does the kernel proxy score of a frozen hidden module predict how well it transfers?

    python bench/transferability.py [--data fashion-mnist] [--model mlp] [--epochs 2]
                                    [--train-subset 12000] [--threads 2] [--out bench/results/transferability]

Duan & Principe estimate transferability "at practically no computation overhead" by the proxy
objective of a frozen source module's features on the target task (they recovered the structure of
15 binary CIFAR-10 tasks). Here: source tasks are class subsets of the dataset (5-class and binary
tasks that share 5, 3, 1 or 0 classes with the target, plus an untrained module as a control); a
`kernel` network is trained on each; then, for each target task, every source module is scored by
`bpfree.transfer.transferability` on the target's training split (no training), and its actual
test accuracy is measured after training only a new output layer on the target on top of the
frozen module (`--init-modules SOURCE:0-0`). Reported: Spearman's rank correlation between score
and accuracy per target (the issue's target is rho >= 0.8). Writes JSON, markdown and a scatter plot.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import matplotlib
import numpy as np
from scipy.stats import spearmanr

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.config import RunConfig  # noqa: E402
from bpfree.data import load_data  # noqa: E402
from bpfree.run import build, train  # noqa: E402
from bpfree.runs import load_weights, save_weights  # noqa: E402
from bpfree.transfer import transferability  # noqa: E402

SOURCES = {                       # name -> classes (Fashion-MNIST: 0 T-shirt ... 9 ankle boot)
    "same 0-4": [0, 1, 2, 3, 4], "3 shared": [0, 1, 2, 7, 8], "1 shared": [0, 5, 7, 8, 9],
    "disjoint 5-9": [5, 6, 7, 8, 9], "binary 2v4": [2, 4], "binary 7v9": [7, 9],
}
TARGETS = {"0-4": [0, 1, 2, 3, 4], "0,2,4,6": [0, 2, 4, 6]}


def subset(data, classes: list[int], path: Path) -> str:
    """An npz task with only `classes`, labels remapped to 0..C-1; returns its data spec."""
    arrays = {}
    for split in ("train", "test"):
        x, y = data.normalize(getattr(data, f"x_{split}")), getattr(data, f"y_{split}")
        keep = np.isin(y.numpy(), classes)
        arrays[f"x_{split}"] = x.numpy()[keep]
        arrays[f"y_{split}"] = np.searchsorted(classes, y.numpy()[keep])
    np.savez(path, **arrays)
    return f"npz:{path}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--model", default="mlp")
    p.add_argument("--epochs", type=int, default=2, help="per stage (kernel is sequential)")
    p.add_argument("--train-subset", type=int, default=12000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/bench-transferability")
    p.add_argument("--out", default="bench/results/transferability")
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    full = load_data(args.data, train_subset=args.train_subset, seed=0)
    base = dict(method="kernel", model=args.model, blocks=4, epochs=args.epochs, threads=args.threads)
    runs = {}
    for name, classes in SOURCES.items():            # a kernel network per source task
        run = work / ("source-" + name.replace(" ", "_").replace(",", "-"))
        spec = subset(full, classes, work / f"{run.name}.npz")
        train(RunConfig(data=spec, **base), run, overwrite=True, quiet=True)
        runs[name] = run
    runs["untrained"] = untrained(RunConfig(data=spec, **base), full, work / "source-untrained")
    result = {"command": "python bench/transferability.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "sources": SOURCES, "targets": {}}
    for tname, classes in TARGETS.items():
        spec = subset(full, classes, work / f"target-{tname.replace(',', '-')}.npz")
        target = load_data(spec)
        rows = []
        for name, run in runs.items():
            score = transferability(frozen_hidden(run, RunConfig(data=spec, **base), target),   # no training:
                                    target.normalize(target.x_train), target.y_train)   # a forward pass
            acc = train(RunConfig(data=spec, init_modules=f"{run}:0-0", **base), data=target,
                        quiet=True)["test_accuracy"]          # only the new output layer trains
            rows.append({"source": name, "score": score, "accuracy": acc})
            print(f"target {tname:<8} source {name:<14} score {score:.4f}  accuracy {100 * acc:.2f}%", flush=True)
        rho = spearmanr([r["score"] for r in rows], [r["accuracy"] for r in rows]).statistic
        result["targets"][tname] = {"classes": classes, "rows": rows, "spearman": float(rho)}
    write(result, out)


def frozen_hidden(run: Path, cfg: RunConfig, data):
    """Stage 0 (the hidden module) of a run, in a network built for the target task."""
    stages = build(cfg, data).stages
    load_weights(run / "model.safetensors", stages, [0])
    return stages[:1]


def untrained(cfg: RunConfig, data, path: Path) -> Path:
    """The control source: the network's initial (seeded, untrained) weights saved like a run's."""
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path / "model.safetensors", build(cfg, data).stages)
    return path


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "transferability.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Transferability: kernel proxy score of frozen source modules vs accuracy after training "
             "only the output layer", "", f"Command: `{result['command']}`", ""]
    fig, axes = plt.subplots(1, len(result["targets"]), figsize=(5 * len(result["targets"]), 3.8))
    for ax, t in zip(np.atleast_1d(axes), result["targets"].values()):
        lines += [f"## target classes {t['classes']}: Spearman rho = {t['spearman']:.3f}", "",
                  "| source | proxy score (alignment) | target test accuracy |", "|---|---:|---:|"]
        lines += [f"| {r['source']} | {r['score']:.4f} | {100 * r['accuracy']:.2f}% |"
                  for r in sorted(t["rows"], key=lambda r: -r["score"])] + [""]
        ax.scatter([r["score"] for r in t["rows"]], [100 * r["accuracy"] for r in t["rows"]])
        for r in t["rows"]:
            ax.annotate(r["source"], (r["score"], 100 * r["accuracy"]), fontsize=7)
        ax.set_title(f"target {t['classes']}: rho {t['spearman']:.2f}", fontsize=9)
        ax.set_xlabel("proxy score (no training)")
        ax.set_ylabel("test accuracy, output layer trained (%)")
    fig.tight_layout()
    fig.savefig(out / "transferability.png", dpi=120)
    (out / "transferability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Data efficiency of kernel modular training: test accuracy vs labelled examples per class.

    python bench/label_budget.py --source RUN_DIR [--budgets 1,5,10,50,100] [--epochs 5]
                                 [--threads 2] [--out bench/results/label-budget-MODEL]

RUN_DIR is a finished `kernel` run (e.g. from bench/modular_rules.sh): its hidden module was trained
with pairwise labels of every training example. For each budget N the output layer alone is trained
on N seeded labelled examples per class on top of that frozen module (`--init-modules RUN_DIR:0-0
--output-labels N`), and E2EBP trains the same network from scratch on the same N per class
(`--output-labels N`, same epochs, seed and data). "all" is the source run itself. Note what E2EBP
gets: with 10·N examples per epoch it makes few optimizer steps (one per epoch below N = 13 at batch
128), which is the point of the comparison, not a tuned few-shot baseline. Writes JSON, markdown
(with this command) and a plot.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.config import RunConfig  # noqa: E402
from bpfree.data import load_data  # noqa: E402
from bpfree.run import train  # noqa: E402
from bpfree.runs import read_run  # noqa: E402


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="a finished kernel run directory")
    p.add_argument("--budgets", default="1,5,10,50,100")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)
    config, _, source = read_run(args.source)
    if config["method"] != "kernel":
        sys.exit(f"label_budget: {args.source} is a {config['method']} run; give a kernel run")
    budgets = [int(b) for b in args.budgets.split(",")]
    out = Path(args.out or f"bench/results/label-budget-{config['model']}")
    data = load_data(config["data"], data_dir=config["data_dir"], train_subset=config["train_subset"],
                     val_split=config["val_split"], seed=config["seed"])
    common = {**config, "epochs": args.epochs, "threads": args.threads, "stage_epochs": None}
    rows = []
    for n in budgets:
        kernel = train(RunConfig.from_dict({**common, "init_modules": f"{args.source}:0-0", "output_labels": n}),
                       data=data, quiet=True)
        e2e = train(RunConfig.from_dict({**common, "method": "backprop", "rule_options": {}, "output_labels": n}),
                    data=data, quiet=True)
        steps = args.epochs * max(1, n * data.num_classes // config["batch_size"])
        rows.append({"labels_per_class": n, "kernel": kernel["test_accuracy"], "backprop": e2e["test_accuracy"],
                     "backprop_steps": steps})
        print(f"N={n:<4} kernel {100 * rows[-1]['kernel']:.2f}%  backprop {100 * rows[-1]['backprop']:.2f}%", flush=True)
    full = source["test_accuracy"]
    at10 = next((r["kernel"] for r in rows if r["labels_per_class"] == 10), None)
    result = {"command": "python bench/label_budget.py " + " ".join(shlex.quote(a) for a in argv),
              "source": args.source, "model": config["model"], "data": config["data"],
              "kernel_all_labels": full, "kernel_10_over_all": at10 / full if at10 else None, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "label-budget.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Accuracy vs labelled examples per class: kernel (frozen hidden module) vs E2EBP, "
             f"{config['model']} on {config['data']}", "", f"Command: `{result['command']}`", "",
             f"Source kernel run `{args.source}`: all labels {100 * full:.2f}%. Output layer / E2EBP: "
             f"{args.epochs} epochs, seed {config['seed']}.", "",
             "| labels per class | kernel | backprop (E2EBP) | E2EBP optimizer steps |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['labels_per_class']} | {100 * r['kernel']:.2f}% | {100 * r['backprop']:.2f}% | {r['backprop_steps']} |"
              for r in rows]
    if at10:
        lines += ["", f"kernel with 10 labels per class / all labels: {at10 / full:.3f}"]
    (out / "label-budget.md").write_text("\n".join(lines) + "\n")
    xs = [r["labels_per_class"] for r in rows]
    plt.figure(figsize=(5, 3.5))
    plt.semilogx(xs, [100 * r["kernel"] for r in rows], "o-", label="kernel (output layer only)")
    plt.semilogx(xs, [100 * r["backprop"] for r in rows], "s-", label="backprop (whole network)")
    plt.axhline(100 * full, ls="--", c="gray", label="kernel, all labels")
    plt.xlabel("labelled examples per class")
    plt.ylabel("test accuracy (%)")
    plt.title(f"{config['model']} / {config['data']}")
    plt.legend(fontsize=8)
    plt.tight_layout()
    plt.savefig(out / "label-budget.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Convergence: test accuracy against training steps, every registered rule vs E2EBP (issue 20).

    python bench/convergence.py [--settings digits,2000,4000,8000] [--models cnn,mlp] [--methods all]
                                [--epochs 8] [--batch-size 128] [--blocks 4] [--eval-every 16]
                                [--test-subset 2000] [--threads 1] [--out bench/results/convergence]

A setting is `digits` (the embedded set, its whole test split) or N: Fashion-MNIST with
`--train-subset N`, tested on a seeded subset of `--test-subset` of its 10,000 test images (one
cnn evaluation of all 10,000 costs about as much as 30 training steps on 1 thread, and the runs
evaluate every `--eval-every` steps; the subset is the same for every rule). Every rule trains at
its defaults on identical data, initial weights and seed (backprop first: the reference), each
in its own run directory under runs/bench-convergence/MODEL-SETTING/ with that setting's
`bpfree compare` report beside them. Re-running resumes: finished runs are skipped, unfinished
ones continue from their checkpoint; a run that fails is reported and the others go on.

Writes to --out: convergence.json (per setting, model and rule: final accuracy, accuracy after the
first epoch, steps to reach 90/95/99% of E2EBP's final accuracy, the whole accuracy-vs-step
curve), convergence.md (the tables and the command) and one plot per setting and model,
convergence-MODEL-SETTING.png (test accuracy vs training step, one line per rule).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.config import RunConfig  # noqa: E402
from bpfree.errors import BpfreeError, first_line  # noqa: E402
from bpfree.report import FRACTIONS, STEPS_TO, accuracy_curve, write_comparison  # noqa: E402
from bpfree.rules import list_rules  # noqa: E402
from bpfree.run import load_for, train  # noqa: E402
from bpfree.runs import read_run  # noqa: E402

RUNS = Path("runs/bench-convergence")


def run_config(method: str, model: str, setting: str, args) -> RunConfig:
    data = {"data": "digits"} if setting == "digits" else {"data": "fashion-mnist", "train_subset": int(setting)}
    return RunConfig(method=method, model=model, blocks=args.blocks, epochs=args.epochs, batch_size=args.batch_size,
                     eval_every=args.eval_every, threads=args.threads, **data)


def subset_of_test(data, n: int):
    """The same seeded `n` test examples for every rule (all of them when there are fewer)."""
    if n >= len(data.y_test):
        return data
    keep = torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return dataclasses.replace(data, x_test=data.x_test[keep], y_test=data.y_test[keep])


def run_setting(model: str, setting: str, methods: list[str], args, command: str) -> dict:
    """Train (or resume, or skip) every rule on one setting; its compare report; the curves."""
    folder, data, done = RUNS / f"{model}-{setting}", None, []
    for method in methods:
        cfg, run_dir = run_config(method, model, setting, args), folder / method
        if (run_dir / "config.json").exists():
            saved = RunConfig.load(run_dir / "config.json")
            if dataclasses.replace(saved, threads=cfg.threads) != cfg:
                sys.exit(f"convergence: {run_dir} was run with other settings; delete it or keep these ones")
        if not (run_dir / "metrics.json").exists():
            if data is None:        # every rule sees the very same tensors
                data = subset_of_test(load_for(cfg), args.test_subset)
            resume = (run_dir / "checkpoint.pt").exists()
            print(f"{model} {setting}: {method}", flush=True)
            try:
                train(cfg, run_dir, data=data, quiet=True, resume=resume, overwrite=not resume and run_dir.exists())
            except BpfreeError as e:
                print(f"  failed: {first_line(e)}", flush=True)
                continue
        done.append(method)
    if "backprop" not in done:
        return {}
    write_comparison([folder / m for m in done], folder, f"convergence, {model} / {setting}", labels=done,
                     command=command)
    rows = json.loads((folder / "summary.json").read_text())["runs"]
    result = {}
    for method, row in zip(done, rows):
        config, epochs, _ = read_run(folder / method)
        result[method] = {"test_accuracy": row["test_accuracy"], "epoch1_accuracy": epochs[0]["test_acc"],
                          "steps": epochs[-1]["step"], **{k: row[k] for k in STEPS_TO},
                          "curve": accuracy_curve(epochs, config["batch_size"])}
    return result


def plot(result: dict, model: str, blocks: int, setting: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, r in result.items():
        steps, accs = zip(*r["curve"])
        ax.plot(steps, [100 * a for a in accs], lw=2.2 if method == "backprop" else 1.2, label=method)
    final = 100 * result["backprop"]["test_accuracy"]
    ax.axhline(0.95 * final, ls=":", c="gray", lw=0.8, label="95% of E2EBP's final")
    ax.set_ylim(max(0, final - 40), min(100, final + 5))
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model} K={blocks}, {'digits' if setting == 'digits' else f'Fashion-MNIST {setting} examples'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict) -> list[str]:
    pct = lambda a: f"{100 * a:.2f}%"  # noqa: E731
    head = "/".join(f"{round(100 * f)}" for f in FRACTIONS)
    lines = [f"| rule | final test acc | after epoch 1 | steps to {head}% of E2EBP's final | steps |",
             "|---|---:|---:|---:|---:|"]
    for method, r in result.items():
        reach = "/".join("-" if r[k] is None else str(r[k]) for k in STEPS_TO)
        lines.append(f"| {method} | {pct(r['test_accuracy'])} | {pct(r['epoch1_accuracy'])} | {reach} | {r['steps']} |")
    return lines


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="digits,2000,4000,8000", help="digits and/or Fashion-MNIST subset sizes")
    p.add_argument("--models", default="cnn,mlp")
    p.add_argument("--methods", default="all", help="comma-separated rules (backprop is added first), or all")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=16)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/convergence")
    args = p.parse_args(argv)
    chosen = list(list_rules()) if args.methods == "all" else args.methods.split(",")
    methods = ["backprop"] + [m for m in chosen if m != "backprop"]
    command = "python bench/convergence.py " + " ".join(shlex.quote(a) for a in argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in args.models.split(","):
        for setting in args.settings.split(","):
            result = run_setting(model, setting, methods, args, command)
            if result:
                results[f"{model}-{setting}"] = {"command": command, "torch": torch.__version__,
                                                 "threads": args.threads, "epochs": args.epochs,
                                                 "batch_size": args.batch_size, "blocks": args.blocks,
                                                 "eval_every": args.eval_every,
                                                 "test_subset": None if setting == "digits" else args.test_subset,
                                                 "rules": result}
                plot(result, model, args.blocks, setting, out / f"convergence-{model}-{setting}.png")
    path = out / "convergence.json"        # other settings' results stay
    results = {**(json.loads(path.read_text())["results"] if path.exists() else {}), **results}
    path.write_text(json.dumps({"results": results}, indent=1) + "\n")
    lines = ["# Convergence: test accuracy against training steps, every rule vs E2EBP", "",
             "Each rule at its defaults, seed 0, on identical data and initial weights. Steps count every "
             "stage's phase (a sequential rule's output layer trains last). -: never reached.", ""]
    for key, e in results.items():
        tested = f"a seeded {e['test_subset']}-image test subset" if e["test_subset"] else "the whole test split"
        lines += [f"## {key}", "", f"Command: `{e['command']}`", "",
                  f"{e['epochs']} epochs, batch {e['batch_size']}, K={e['blocks']}, {e['threads']} thread(s), torch "
                  f"{e['torch']}; evaluated on {tested} every {e['eval_every']} steps and at each epoch's end.", "",
                  *table(e["rules"]), "", f"![{key}](convergence-{key}.png)", ""]
    (out / "convergence.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

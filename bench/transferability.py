"""Which transferability estimator predicts how well a frozen source module transfers?

    python bench/transferability.py [--data fashion-mnist] [--model mlp] [--epochs 2] [--train-subset 12000]
                                    [--finetune-epochs 3] [--threads 1] [--sources "NAME;NAME..."]
                                    [--targets "NAME;NAME..."] [--work runs/bench-transferability]
                                    [--out bench/results/transferability]

Sources: networks trained on Fashion-MNIST class subsets of 2 to 10 classes by `kernel` (Duan &
Principe's modular rule), `backprop` and `dgl`, plus an untrained network. Targets: Fashion-MNIST
class subsets (some disjoint from many sources), the embedded 8x8 digits upsampled to 28x28, and
Fashion-MNIST rotated by 90 degrees. For every (source, target) pair, every estimator of
`bpfree.estimators` scores the source's frozen body (its blocks) on the target's training split,
without training; the ground truth is the target *validation* accuracy (20% of the target's
training split held out; the test accuracy is recorded too) after
  linear:   training only a new output layer on the frozen body (`linear_probe`: softmax regression,
            L-BFGS, all target training examples), and
  finetune: training the whole network (the body initialised from the source, a new head) with
            backprop for `--finetune-epochs`.
Reported per target and estimator: Spearman's rho and weighted Kendall's tau (scipy.stats.weightedtau,
which weighs agreement at the top of the ranking most) between the scores and each ground truth;
their means over targets. --sources and --targets keep some of them (names as in SOURCES and TARGETS
below, separated by semicolons). Resumable: trained sources and finished pairs are kept in --work.
Writes transferability.json, transferability.md and transferability.png to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy.stats import spearmanr, weightedtau

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.config import RunConfig  # noqa: E402
from bpfree.data import load_data  # noqa: E402
from bpfree.engine import Trainer  # noqa: E402
from bpfree.estimators import ESTIMATORS, estimate, linear_probe  # noqa: E402
from bpfree.run import build, load_trained, train  # noqa: E402
from bpfree.transfer import features, source_probs  # noqa: E402

ALL = list(range(10))                # Fashion-MNIST: 0 T-shirt 1 trouser 2 pullover 3 dress 4 coat
SOURCES = {                          # 5 sandal 6 shirt 7 sneaker 8 bag 9 ankle boot; name -> (rule, classes)
    "kernel all": ("kernel", ALL), "kernel 0-7": ("kernel", list(range(8))),
    "kernel 0-4": ("kernel", [0, 1, 2, 3, 4]), "kernel 5-9": ("kernel", [5, 6, 7, 8, 9]),
    "kernel 2,4,6": ("kernel", [2, 4, 6]), "kernel 7,8,9": ("kernel", [7, 8, 9]),
    "kernel 2v4": ("kernel", [2, 4]), "kernel 7v9": ("kernel", [7, 9]), "kernel 0v1": ("kernel", [0, 1]),
    "kernel 3v8": ("kernel", [3, 8]),
    "backprop all": ("backprop", ALL), "backprop 0-4": ("backprop", [0, 1, 2, 3, 4]),
    "backprop 2v4": ("backprop", [2, 4]),
    "dgl all": ("dgl", ALL), "dgl 0-4": ("dgl", [0, 1, 2, 3, 4]), "dgl 2v4": ("dgl", [2, 4]),
}
UNTRAINED = "untrained"
TARGETS = {"5-9": [5, 6, 7, 8, 9], "0,2,4,6": [0, 2, 4, 6], "2v6": [2, 6], "digits": "digits", "rotated": "rotated"}
TRUTHS = ("linear", "finetune")


def subset(data, classes: list[int], path: Path, rotate: bool = False) -> str:
    """An npz task with only `classes`, labels remapped to 0..C-1 (images turned 90 degrees if
    `rotate`); returns its data spec."""
    arrays = {}
    for split in ("train", "test"):
        x, y = data.normalize(getattr(data, f"x_{split}")), getattr(data, f"y_{split}")
        keep = np.isin(y.numpy(), classes)
        x = torch.rot90(x, 1, (2, 3)) if rotate else x
        arrays[f"x_{split}"] = x.numpy()[keep]
        arrays[f"y_{split}"] = np.searchsorted(classes, y.numpy()[keep])
    np.savez(path, **arrays)
    return f"npz:{path}"


def digits_28(path: Path, size: tuple[int, int] = (28, 28)) -> str:
    """The embedded 8x8 digits, bilinearly upsampled to Fashion-MNIST's 28x28 (or `size`): another task."""
    d = load_data("digits")
    up = {s: torch.nn.functional.interpolate(getattr(d, f"x_{s}"), size=size, mode="bilinear") for s in ("train", "test")}
    np.savez(path, x_train=up["train"].numpy(), y_train=d.y_train.numpy(), x_test=up["test"].numpy(), y_test=d.y_test.numpy())
    return f"npz:{path}"


def slug(name: str) -> str:
    return name.replace(" ", "_").replace(",", "-")


def sources(full, args, base: dict, work: Path, names: list[str]) -> dict:
    """Each source network of `names` trained (or kept from an earlier run of this bench), and the untrained one."""
    rules = {}
    for name in names:
        method, classes = SOURCES[name]
        run = work / f"source-{slug(name)}"
        if not (run / "metrics.json").exists():
            spec = subset(full, classes, work / f"{run.name}.npz")
            print(f"training source {name} ...", flush=True)
            train(RunConfig(method=method, data=spec, **base), run, overwrite=True, quiet=True)
        rules[name] = load_trained(run)
    rules[UNTRAINED] = build(RunConfig(method="backprop", data=args.data, **base), full)    # seeded init
    rules[UNTRAINED].stages.eval()
    return rules


def finetune(rule, target, base: dict, epochs: int) -> dict:
    """Val and test accuracy after training the whole network, body from `rule`, a new head, by backprop."""
    cfg = RunConfig(method="backprop", data=target.name, **{**base, "epochs": epochs})
    fresh = build(cfg, target)
    fresh.net.blocks.load_state_dict(rule.net.blocks.state_dict())
    summary = Trainer(fresh, target, cfg, quiet=True).fit()
    return {"val": summary["val_accuracy"], "test": summary["test_accuracy"]}


def pair(rule, target) -> dict:
    """Every estimator's score (and seconds) and the linear ground truth for one (source, target)."""
    start = time.perf_counter()
    f_train = features(rule, target.normalize(target.x_train))
    probs = source_probs(rule, target.normalize(target.x_train))
    row = {"forward_s": time.perf_counter() - start, "scores": {}, "seconds": {}}
    for name in ESTIMATORS:
        start = time.perf_counter()
        row["scores"][name] = estimate(name, f_train, target.y_train, probs)
        row["seconds"][name] = time.perf_counter() - start
    row["linear"] = {split: linear_probe(f_train, target.y_train, features(rule, target.normalize(x)), y)
                     for split, x, y in (("val", target.x_val, target.y_val), ("test", target.x_test, target.y_test))}
    return row


def correlations(rows: dict, truth: str, split: str) -> dict:
    """{estimator: {"spearman": rho, "weighted_tau": tau}} over the sources of one target."""
    gt = [r[truth][split] for r in rows.values()]
    out = {}
    for name in ESTIMATORS:
        s = [r["scores"][name] for r in rows.values()]
        out[name] = {"spearman": float(spearmanr(s, gt).statistic), "weighted_tau": float(weightedtau(s, gt).statistic)}
    return out


def _rho(rows: dict, estimator: str, truth: str, rule=None) -> float:
    """Spearman rho over the sources trained by `rule` (None: all), against validation accuracy."""
    keep = [r for name, r in rows.items() if rule is None or SOURCES.get(name, ("",))[0] == rule]
    return float(spearmanr([r["scores"][estimator] for r in keep], [r[truth]["val"] for r in keep]).statistic)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--model", default="mlp")
    p.add_argument("--epochs", type=int, default=2, help="source training, per stage (kernel is sequential)")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=12000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sources", default=";".join(SOURCES), help="semicolon-separated source names (default: all)")
    p.add_argument("--targets", default=";".join(TARGETS), help="semicolon-separated target names (default: all)")
    p.add_argument("--work", default="runs/bench-transferability")
    p.add_argument("--out", default="bench/results/transferability")
    args = p.parse_args(argv)
    chosen = {}
    for kind, names, known in (("source", args.sources, SOURCES), ("target", args.targets, TARGETS)):
        chosen[kind] = [n.strip() for n in names.split(";") if n.strip()]
        unknown = [n for n in chosen[kind] if n not in known] if chosen[kind] else [names]
        if unknown:
            p.error(f"--{kind}s: no {kind} named {'; '.join(map(repr, unknown))}; choose from: {'; '.join(known)}")
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    full = load_data(args.data, train_subset=args.train_subset, seed=0)
    base = dict(model=args.model, blocks=4, epochs=args.epochs, threads=args.threads, seed=0)
    rules = sources(full, args, base, work, chosen["source"])
    cache_path = work / "pairs.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    result = {"command": "python bench/transferability.py " + " ".join(shlex.quote(a) for a in argv),
              "setup": {"model": args.model, "blocks": 4, "source_epochs": args.epochs,
                        "finetune_epochs": args.finetune_epochs, "train_subset": args.train_subset,
                        "threads": args.threads, "target_val_split": 0.2, "seed": 0,
                        "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
              "sources": {n: dict(zip(("rule", "classes"), SOURCES[n])) for n in chosen["source"]} | {UNTRAINED: {}},
              "targets": {}}
    for tname in chosen["target"]:
        classes, path = TARGETS[tname], work / f"target-{slug(tname)}.npz"
        spec = (digits_28(path, size=tuple(full.x_train.shape[-2:])) if classes == "digits"
                else subset(full, ALL, path, rotate=True) if classes == "rotated" else subset(full, classes, path))
        target = load_data(spec, val_split=0.2, seed=0)
        rows = {}
        for sname, rule in rules.items():
            key = f"{sname}|{tname}"
            if key not in cache:
                cache[key] = pair(rule, target)
                cache[key]["finetune"] = finetune(rule, target, base, args.finetune_epochs)
                cache_path.write_text(json.dumps(cache, indent=1))
            rows[sname] = cache[key]
            r = cache[key]
            print(f"{tname:<8} {sname:<13} linear {100 * r['linear']['val']:5.1f}%  finetune "
                  f"{100 * r['finetune']['val']:5.1f}%  " + "  ".join(f"{e} {v:.3f}" for e, v in r["scores"].items()),
                  flush=True)
        result["targets"][tname] = {
            "classes": classes, "train": len(target.y_train), "val": len(target.y_val), "test": len(target.y_test),
            "rows": rows, "correlation": {t: correlations(rows, t, "val") for t in TRUTHS},
            "correlation_test": {t: correlations(rows, t, "test") for t in TRUTHS}}
    result["mean"] = {t: {e: {m: float(np.mean([tr["correlation"][t][e][m] for tr in result["targets"].values()]))
                              for m in ("spearman", "weighted_tau")} for e in ESTIMATORS} for t in TRUTHS}
    result["mean_test"] = {t: {e: float(np.mean([tr["correlation_test"][t][e]["spearman"]
                                                 for tr in result["targets"].values()])) for e in ESTIMATORS}
                           for t in TRUTHS}
    result["seconds"] = {e: float(np.mean([r["seconds"][e] for tr in result["targets"].values()
                                           for r in tr["rows"].values()])) for e in ESTIMATORS}
    result["forward_s"] = float(np.mean([r["forward_s"] for tr in result["targets"].values() for r in tr["rows"].values()]))
    result["wall_s_this_invocation"] = time.perf_counter() - began
    write(result, out)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "transferability.json").write_text(json.dumps(result, indent=1) + "\n")
    s, est = result["setup"], list(ESTIMATORS)
    lines = ["# Transferability estimators vs accuracy after transfer", "",
             f"Command: `{result['command']}`", "",
             f"{len(result['sources'])} sources ({s['model']}, {s['blocks']} blocks, {s['source_epochs']} epochs per "
             f"stage on Fashion-MNIST class subsets of a {s['train_subset']}-example training subset), "
             f"{len(result['targets'])} targets; ground truth = target validation accuracy (20% of the target's "
             f"training split) after training only a new output layer on the frozen body (linear) or the whole "
             f"network for {s['finetune_epochs']} epoch(s) by backprop (finetune). {s['threads']} thread(s), "
             f"torch {s['torch']}. Scores need one forward pass per source (features and the source's "
             f"predictions): {result['forward_s']:.2f} s on average, not counted in the last column.", "",
             "## Mean over targets: Spearman rho / weighted Kendall tau", "",
             "| estimator | linear rho | linear tau_w | finetune rho | finetune tau_w | mean s per score |",
             "|---|---:|---:|---:|---:|---:|"]
    for e in est:
        m = result["mean"]
        lines.append(f"| {e} | {m['linear'][e]['spearman']:.3f} | {m['linear'][e]['weighted_tau']:.3f} | "
                     f"{m['finetune'][e]['spearman']:.3f} | {m['finetune'][e]['weighted_tau']:.3f} | "
                     f"{result['seconds'][e]:.3f} |")
    groups = {"class-subset targets": [t for t in result["targets"].values() if isinstance(t["classes"], list)],
              "other tasks (digits, rotated)": [t for t in result["targets"].values() if not isinstance(t["classes"], list)]}
    lines += ["", "Mean Spearman rho (linear / finetune) by kind of target, over all sources and over the "
              "kernel-trained sources only:", "", "| estimator | " + " | ".join(
                  f"{g} | {g}, kernel sources" for g in groups) + " |", "|---|" + "---:|" * (2 * len(groups))]
    for e in est:
        cells = []
        for ts in groups.values():
            for rule in (None, "kernel"):
                cells.append(" / ".join(f"{np.mean([_rho(t['rows'], e, truth, rule) for t in ts]):.2f}" for truth in TRUTHS))
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += ["", "Spearman rho against test accuracy instead of validation (a check, not used to choose): " +
              ", ".join(f"{e} {result['mean_test']['linear'][e]:.3f} / {result['mean_test']['finetune'][e]:.3f}"
                        for e in est) + " (linear / finetune).", "",
              "## Per target: Spearman rho with linear / finetune accuracy", "",
              "| target | n train/val | " + " | ".join(est) + " |", "|---|---|" + "---:|" * len(est)]
    for tname, t in result["targets"].items():
        c = t["correlation"]
        lines.append(f"| {tname} | {t['train']}/{t['val']} | " + " | ".join(
            f"{c['linear'][e]['spearman']:.2f} / {c['finetune'][e]['spearman']:.2f}" for e in est) + " |")
    for tname, t in result["targets"].items():
        lines += ["", f"### target {tname}: accuracies (val) and scores, by linear accuracy", "",
                  "| source | linear | finetune | " + " | ".join(est) + " |", "|---|---:|---:|" + "---:|" * len(est)]
        for sname, r in sorted(t["rows"].items(), key=lambda kv: -kv[1]["linear"]["val"]):
            lines.append(f"| {sname} | {100 * r['linear']['val']:.1f}% | {100 * r['finetune']['val']:.1f}% | " +
                         " | ".join(f"{r['scores'][e]:.3f}" for e in est) + " |")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, truth in zip(axes, TRUTHS):
        for i, e in enumerate(est):
            per = [t["correlation"][truth][e]["spearman"] for t in result["targets"].values()]
            ax.bar(i, result["mean"][truth][e]["spearman"], color="C0" if e == "kernel" else "C7", alpha=0.8)
            ax.scatter([i] * len(per), per, color="k", s=10, zorder=3)
        ax.axhline(0.8, color="C3", lw=0.8, ls="--")
        ax.set_xticks(range(len(est)), est)
        ax.set_title(f"Spearman rho with {truth} accuracy (bars: mean, dots: targets)", fontsize=9)
    axes[0].set_ylabel("rank correlation")
    fig.tight_layout()
    fig.savefig(out / "transferability.png", dpi=120)
    (out / "transferability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:20]))


if __name__ == "__main__":
    main()

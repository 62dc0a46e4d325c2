"""Block-local rules on transformers against E2EBP at an equal number of steps: a ViT on Fashion-MNIST
(K = 2, 4) and a byte-level GPT on the Python standard library's own sources.

    python bench/transformers.py [--part vit,gpt] [--vit-ks 2,4] [--gpt-ks 4] [--epochs-vit E] [--epochs-gpt E]
                                 [--subset N] [--corpus runs/python-stdlib.txt] [--corpus-mb 4] [--threads 2]
                                 [--runs bench/.runs-transformers] [--out bench/results/transformers]

Every run of a part has the same recipe (configs/vit-fashion-mnist.json, configs/gpt-python-stdlib.json),
seed, data order and step budget; the rules that do not apply to transformers are not run (`bpfree
list` says why). The corpus is every .py file of this Python's standard library (top level and
packages, site-packages excluded), sorted by path and concatenated, cut at --corpus-mb MB: real text
every machine with Python has, no download (its size and SHA-256 are recorded). Re-running resumes:
finished runs are kept, unfinished ones continue from their checkpoint. Writes transformers.json,
transformers.md (with this command) and one loss-vs-step plot per part to --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import sysconfig
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bpfree import RunConfig, train  # noqa: E402
from bpfree.report import human_bytes  # noqa: E402
from bpfree.runs import read_run  # noqa: E402

RULES = {"vit": ["bwbpf", "dgl", "auglocal", "infopro", "predsim", "al", "kernel"], "gpt": ["bwbpf", "dgl", "auglocal", "infopro"]}


def write_corpus(path: Path, megabytes: float) -> dict:
    """The standard library's .py sources, sorted, concatenated and cut at `megabytes` (kept if present)."""
    if not path.exists():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
        limit, chunks, size = int(megabytes * 2 ** 20), [], 0
        for f in files:
            chunks.append(f.read_bytes())
            size += len(chunks[-1])
            if size >= limit:
                break
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(chunks)[:limit])
    blob = path.read_bytes()
    return {"path": str(path), "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
            "python": sysconfig.get_python_version(), "source": "Python standard library .py files (no tests)"}


def run(cfg: RunConfig, out: Path) -> dict:
    """Train (or resume, or keep) one run; its config, epoch rows and summary."""
    if not (out / "metrics.json").exists():
        resume = (out / "checkpoint.pt").exists()
        print(f"{'resuming' if resume else 'training'} {out.name}", flush=True)
        train(cfg, out, quiet=True, resume=resume, overwrite=not resume and out.exists())
    return read_run(out)


def part(name: str, ks: list[int], base: dict, runs: Path) -> list[dict]:
    """E2EBP once, then every rule at every K: one row per run."""
    rows = []
    entries = [("backprop", None)] + [(rule, k) for k in ks for rule in RULES[name]]
    for method, k in entries:
        label = method if k is None else f"{method} K={k}"
        cfg = RunConfig(**{**base, "method": method, **({"blocks": k} if k else {})})
        config, epochs, summary = run(cfg, runs / name / label.replace(" ", "-").replace("=", ""))
        steps = epochs[-1]["step"]
        rows.append({"label": label, "method": method, "K": k, "test_accuracy": summary["test_accuracy"],
                     "test_loss": summary["test_loss"], "bits_per_byte": summary.get("test_bits_per_byte"),
                     "steps": steps, "s_per_step": summary["train_time_s"] / steps,
                     "activation_bytes_per_stage": summary["activation_bytes_per_stage"],
                     "peak_activation_bytes": summary["peak_activation_bytes"],
                     "curve": [(e["step"], e["test_loss"]) for row in epochs
                               for e in row.get("step_evals", [])] + [(r["step"], r["test_loss"]) for r in epochs]})
    e2e = rows[0]
    for r in rows:
        r["gap_pt"] = 100 * (r["test_accuracy"] - e2e["test_accuracy"])
        r["loss_gap"] = r["test_loss"] - e2e["test_loss"]
        r["time_vs_e2ebp"] = r["s_per_step"] / e2e["s_per_step"]
        r["memory_vs_e2ebp"] = r["peak_activation_bytes"] / e2e["peak_activation_bytes"]
    return rows


def plot(name: str, rows: list[dict], out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(rows):
        steps, losses = zip(*sorted(set(r["curve"])))
        ax.plot(steps, losses, label=r["label"], linestyle=("-", "--", ":", "-.")[i % 4])
    ax.set_xlabel("training step")
    ax.set_ylabel("test loss (nats per " + ("byte" if name == "gpt" else "example") + ")")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}-loss-vs-step.png", dpi=110)
    plt.close(fig)


def table(name: str, rows: list[dict]) -> list[str]:
    lm = name == "gpt"
    head = ("| run | test loss | " + ("bits/byte | loss − E2EBP" if lm else "accuracy | gap (pt)") +
            " | s/step | time / E2EBP | activation memory (largest stage) | memory / E2EBP | per stage |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        middle = (f"{r['bits_per_byte']:.3f} | {r['loss_gap']:+.3f}" if lm
                  else f"{100 * r['test_accuracy']:.2f}% | {r['gap_pt']:+.2f}")
        per_stage = " / ".join(human_bytes(b) for b in r["activation_bytes_per_stage"])
        lines.append(f"| {r['label']} | {r['test_loss']:.4f} | {middle} | {r['s_per_step']:.4f} | "
                     f"{r['time_vs_e2ebp']:.2f}x | {human_bytes(r['peak_activation_bytes'])} | "
                     f"{r['memory_vs_e2ebp']:.2f}x | {per_stage} |")
    return lines


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="vit,gpt")
    p.add_argument("--vit-ks", default="2,4")
    p.add_argument("--gpt-ks", default="2,4")
    p.add_argument("--epochs-vit", type=int, help="default: the recipe's")
    p.add_argument("--epochs-gpt", type=int, help="default: the recipe's")
    p.add_argument("--subset", type=int, help="vit: train on a seeded subset of N images (default: all)")
    p.add_argument("--data", default="fashion-mnist", help="vit's data set")
    p.add_argument("--corpus", default="runs/python-stdlib.txt")
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--model-opt", action="append", default=[], metavar="PART:KEY=INT",
                   help="override a recipe's model option, e.g. gpt:dim=32 (tests use tiny models)")
    p.add_argument("--evals", type=int, default=8, help="test-loss evaluations per run, for the curves")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default="bench/.runs-transformers")
    p.add_argument("--out", default="bench/results/transformers")
    args = p.parse_args(argv)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python bench/transformers.py " + " ".join(shlex.quote(a) for a in argv), "parts": {}}
    md = ["# Block-local rules on transformers vs E2EBP (equal steps)", "", f"Command: `{result['command']}`", ""]
    for name in [n.strip() for n in args.part.split(",") if n.strip()]:
        recipe = RunConfig.load(ROOT / "configs" / ("vit-fashion-mnist.json" if name == "vit" else
                                                    "gpt-python-stdlib.json")).to_dict()
        base = {**recipe, "threads": args.threads, "model_options": dict(recipe["model_options"])}
        for item in args.model_opt:
            which, _, kv = item.partition(":")
            if which == name:
                key, _, value = kv.partition("=")
                base["model_options"][key] = int(value)
        if name == "vit":
            base.update(data=args.data, train_subset=args.subset, **({"epochs": args.epochs_vit} if args.epochs_vit else {}))
            ks = [int(k) for k in args.vit_ks.split(",")]
        else:
            corpus = write_corpus(Path(args.corpus), args.corpus_mb)
            result["corpus"] = corpus
            base.update(data=f"text:{args.corpus}", **({"epochs": args.epochs_gpt} if args.epochs_gpt else {}))
            ks = [int(k) for k in args.gpt_ks.split(",")]
        # --eval-every: the test loss a few times per run, for loss-vs-step curves (training is unchanged)
        probe = RunConfig(**{**base, "epochs": 1})
        base["eval_every"] = max(1, _steps_per_epoch(probe) * base["epochs"] // args.evals)
        rows = part(name, ks, base, runs)
        title = (f"{name} on {base['data']}, {base['model_options']}, seed {base['seed']}, {base['epochs']} epochs")
        plot(name, rows, out, title)
        result["parts"][name] = {"config": base, "rows": rows}
        md += [f"## {title}", ""]
        if name == "gpt":
            md += [f"Corpus: {result['corpus']['source']}, Python {result['corpus']['python']}, "
                   f"{result['corpus']['bytes']:,} bytes, SHA-256 {result['corpus']['sha256'][:16]}…", ""]
        md += table(name, rows) + ["", f"![loss vs step]({name}-loss-vs-step.png)", ""]
    (out / "transformers.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "transformers.md").write_text("\n".join(md))
    print("\n".join(md))


def _steps_per_epoch(cfg: RunConfig) -> int:
    if cfg.data.startswith("text:"):
        size = Path(cfg.data[len("text:"):]).stat().st_size
        return max(1, round(size * cfg.text_split[0]) // (cfg.batch_size * cfg.context))
    from bpfree import load_data
    data = load_data(cfg.data, train_subset=cfg.train_subset, val_split=cfg.val_split, seed=cfg.seed)
    return max(1, len(data.y_train) // cfg.batch_size)


if __name__ == "__main__":
    main()

"""Training time per epoch of several rules relative to the first, interleaved round by round.

    python bench/epoch_time.py [--methods "backprop,bwbpf,..."] [--model cnn] [--model-opt K=V] [--blocks 4]
                               [--data fashion-mnist] [--train-subset 6000] [--rounds 3] [--threads 2]
                               [--out bench/results/epoch-time]

`bpfree compare` runs its methods one after another, so on a shared machine its time columns can
be skewed by whatever else ran meanwhile. Here every method trains one epoch on the same subset in
each round, methods interleaved, and each ratio is the median over rounds of time per epoch divided
by the first method's in the same round. A sequential schedule trains K phases of one epoch each,
so its time per epoch is its total training time over K. Writes epoch-time.json and .md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.cli import entry_settings, key_value, parse_entry, split_entries  # noqa: E402
from bpfree.config import RunConfig  # noqa: E402
from bpfree.data import load_data  # noqa: E402
from bpfree.rules import get_rule  # noqa: E402
from bpfree.run import train  # noqa: E402


def config(entry: str, args) -> RunConfig:
    name, settings = parse_entry(entry)
    get_rule(name)
    run, options = entry_settings(name, settings)
    return RunConfig(method=name, model=args.model, data=args.data, blocks=args.blocks, epochs=1,
                     train_subset=args.train_subset, threads=args.threads, rule_options=options,
                     model_options=dict(args.model_opt or []), **run)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="backprop,bwbpf,bwbpf[variant=deep-supervision],dgl,"
                                        "dgl[schedule=sequential],predsim")
    p.add_argument("--model", default="cnn")
    p.add_argument("--model-opt", type=key_value, action="extend", metavar="KEY=VALUE",
                   help="model builder option, e.g. width=16 (repeatable)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-subset", type=int, default=6000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/epoch-time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    entries = split_entries(args.methods)
    configs = [config(e, args) for e in entries]
    data = load_data(args.data, train_subset=args.train_subset, seed=0)
    epoch_s = {e: [] for e in entries}
    for rnd in range(args.rounds):
        for entry, cfg in zip(entries, configs):
            summary = train(cfg, quiet=True, data=data)
            epoch_s[entry].append(summary["train_time_s"] / summary["epochs"])
            print(f"round {rnd + 1} {entry:<34} {epoch_s[entry][-1]:6.2f} s/epoch", flush=True)
    first = entries[0]
    result = {
        "command": "python bench/epoch_time.py " + " ".join(shlex.quote(a) for a in argv),
        "model": args.model, "model_options": dict(args.model_opt or []), "blocks": args.blocks,
        "data": args.data, "train_subset": args.train_subset,
        "threads": args.threads, "torch": torch.__version__,
        "epoch_s": {e: statistics.median(v) for e, v in epoch_s.items()},
        "ratio_to_first": {e: statistics.median(a / b for a, b in zip(v, epoch_s[first]))
                           for e, v in epoch_s.items()},
        "rounds": epoch_s,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "epoch-time.json").write_text(json.dumps(result, indent=2) + "\n")
    model = args.model + "".join(f" {k}={v}" for k, v in (args.model_opt or []))
    lines = [f"# Time per epoch vs {first}: {model} K={args.blocks}, {args.data} subset {args.train_subset}, "
             f"{args.threads} threads", "", f"Command: `{result['command']}` (median of {args.rounds} interleaved "
             "rounds; ratios within each round)", "", "| method | s / epoch | ratio |", "|---|---:|---:|"]
    lines += [f"| {e} | {result['epoch_s'][e]:.2f} | {result['ratio_to_first'][e]:.2f}x |" for e in entries]
    (out / "epoch-time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

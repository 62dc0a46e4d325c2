"""Block-parallel training (`--parallel`) against one process, and a throughput model for K devices.

    python bench/parallel.py [--method bwbpf] [--model cnn] [--blocks 2] [--data fashion-mnist]
                             [--train-subset 12000] [--epochs 1] [--rounds 3] [--split even] [--skip-projections]
                             [--out bench/results/parallel]

Three executions of the same rule, model, data and seed, interleaved round by round (these machines
are noisy, so every ratio is taken between runs of the same round, and the median is reported):

* sequential   one process, 1 thread, the simultaneous schedule (stages one after another per batch)
* parallel     K processes (torch.distributed gloo), 1 thread each, pipelined
* best-single  one process with every core as intra-op threads

Then an analytic model: with one device per rank, a pipeline runs at the pace of its slowest rank,

    T_rank = sum of its stages' step times + receive time of its incoming message (bytes / bandwidth)
    speedup(K) = sum over all stages of step times / max over ranks of T_rank,

fed by per-stage step times measured on one thread (`bpfree.engine.placement.stage_costs`) and by the
message sizes and transfer times measured in the parallel runs. It is checked against the measured
K=2 speedup, then used to predict K = 2, 4, 8 devices (K blocks, one per device; vgg11 for K=8, since the
cnn has 4 units) for the measured localhost link and for 10 Gb/s Ethernet.
Writes parallel.json and parallel.md (with the command) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.config import RunConfig  # noqa: E402
from bpfree.data import load_data  # noqa: E402
from bpfree.engine import Trainer  # noqa: E402
from bpfree.engine.placement import stage_costs  # noqa: E402
from bpfree.models import partition  # noqa: E402
from bpfree.run import build, resolve_split, train  # noqa: E402

ETHERNET_10G = 1.25e9   # bytes/s


def message_bytes(trainer: Trainer) -> list[int]:
    """Bytes each stage sends on per training batch: its output message plus the labels."""
    bs = min(trainer.cfg.batch_size, len(trainer.data.y_train))
    message, sizes = (trainer.data.normalize(trainer.data.x_train[:bs]),), []
    with torch.no_grad():
        for stage in trainer.rule.stages:
            stage.train()
            out = stage.local(message, trainer.data.y_train[:bs]).message
            sizes.append(sum(t.numel() * t.element_size() for t in out) + bs * 8)
            message = tuple(t.detach() for t in out)
    return sizes


def predict(costs: list[float], sizes: list[int], world: int, bandwidth: float, latency: float) -> dict:
    """Pipeline speedup over one device running all stages, with `world` devices."""
    groups = partition(costs, world)
    per_rank = []
    for r, group in enumerate(groups):
        receive = 0.0 if r == 0 else latency + sizes[groups[r - 1][-1]] / bandwidth
        per_rank.append(sum(costs[k] for k in group) + receive)
    return {"groups": groups, "rank_s": per_rank, "speedup": sum(costs) / max(per_rank),
            "balance": max(per_rank) / min(per_rank)}


def profile(cfg: RunConfig, data) -> tuple[list[float], list[int]]:
    torch.set_num_threads(1)
    trainer = Trainer(build(cfg, data), data, cfg, quiet=True)
    bs = min(cfg.batch_size, len(trainer.data.y_train))
    x = trainer.data.normalize(trainer.data.x_train[:bs])
    costs = stage_costs(trainer.rule.stages, trainer.phases[0].stages, x,
                        trainer.data.y_train[:bs], trainer.rule.top_down, repeats=5)
    return costs, message_bytes(trainer)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="bwbpf")
    p.add_argument("--model", default="cnn")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-subset", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--processes", type=int, help="K processes for the parallel runs (default: --blocks)")
    p.add_argument("--split", default="even", help="even, balanced or unit indices like 1,3")
    p.add_argument("--skip-projections", action="store_true", help="no K = 4, 8 or vgg11 projections")
    p.add_argument("--out", default="bench/results/parallel")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = args.split if args.split in ("even", "balanced") else [int(v) for v in args.split.split(",")]
    data = load_data(args.data, train_subset=args.train_subset, seed=0)
    torch.set_num_threads(1)
    base = resolve_split(RunConfig(method=args.method, model=args.model, data=args.data, blocks=args.blocks,
                                   epochs=args.epochs, train_subset=args.train_subset, threads=1,
                                   split=split), data)
    cores = os.cpu_count() or 1
    world = args.processes or args.blocks
    runs = {"sequential": [], "parallel": [], "best-single": []}
    for rnd in range(args.rounds):
        for name in runs:
            cfg = RunConfig(**{**base.to_dict(), "threads": cores if name == "best-single" else 1})
            summary = train(cfg, quiet=True, data=None if name == "parallel" else data,
                            parallel=world if name == "parallel" else None)
            runs[name].append(summary)
            print(f"round {rnd + 1} {name:<12} {summary['samples_per_s']:8.1f} samples/s  "
                  f"test acc {100 * summary['test_accuracy']:.2f}%", flush=True)

    def median(name, key="samples_per_s"):
        return statistics.median(s[key] for s in runs[name])

    ratios = {f"parallel / {name}": statistics.median(p["samples_per_s"] / s["samples_per_s"]
                                                      for p, s in zip(runs["parallel"], runs[name]))
              for name in ("sequential", "best-single")}
    ranks = [{k: statistics.median(s["parallel"]["ranks"][r][k] for s in runs["parallel"])
              for k in ("compute_s", "wait_s", "comm_s")} | {"stages": runs["parallel"][0]["parallel"]["ranks"][r]["stages"]}
             for r in range(world)]
    balance = max(r["compute_s"] for r in ranks) / min(r["compute_s"] for r in ranks)
    # The model's inputs: step times on one thread, message sizes, and the measured transfer cost
    costs, sizes = profile(base, data)
    steps = runs["parallel"][0]["epochs"] * (len(data.y_train) // base.batch_size)
    groups = runs["parallel"][0]["parallel"]["ranks"]
    received = sum(sizes[g["stages"][0] - 1] for g in groups[1:])
    transfer_s = sum(r["comm_s"] for r in ranks[1:]) / steps          # per batch, receivers' side
    bandwidth = received / transfer_s if transfer_s > 0 else float("inf")
    measured_k2 = ratios["parallel / sequential"]
    model_k2 = predict(costs, sizes, world, bandwidth, 0.0)
    projections = []
    settings = [(args.model, 2)]
    if not args.skip_projections:
        settings += [(args.model, 4), ("vgg11", 2), ("vgg11", 4), ("vgg11", 8)]
    for model, k in settings:
        cfg = RunConfig(**{**base.to_dict(), "model": model, "blocks": k, "split": "even", "model_options": {}})
        try:
            c, m = profile(cfg, data)
        except Exception as e:      # a model that does not split into k blocks
            print(f"skip {model} K={k}: {e}")
            continue
        for link, bw in (("localhost gloo (measured)", bandwidth), ("10 Gb/s Ethernet", ETHERNET_10G)):
            pred = predict(c, m, k, bw, 0.0)
            projections.append({"model": model, "blocks": k, "stages": len(c), "devices": k, "link": link,
                                "predicted_speedup": pred["speedup"], "balance": pred["balance"],
                                "stage_step_s": c, "message_bytes": m})
    result = {
        "command": "python bench/parallel.py " + " ".join(shlex.quote(a) for a in argv),
        "config": base.to_dict(), "world_size": world, "cores": cores, "torch": torch.__version__,
        "samples_per_s": {name: median(name) for name in runs},
        "test_accuracy": {name: median(name, "test_accuracy") for name in runs},
        "ratios": ratios, "ranks": ranks, "stage_balance": balance,
        "model": {"stage_step_s": costs, "message_bytes": sizes, "bandwidth_bytes_per_s": bandwidth,
                  "predicted_k2_speedup": model_k2["speedup"], "measured_k2_speedup": measured_k2,
                  "projections": projections},
        "runs": runs,
    }
    (out / "parallel.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "parallel.md").write_text(report(result) + "\n")
    print(report(result))


def report(r: dict) -> str:
    c = r["config"]
    lines = [f"# Block-parallel training: {c['method']} on {c['model']} (K={r['world_size']} blocks, split "
             f"{c.get('split', c['model_options'].get('split'))}), {c['data']} subset {c['train_subset']}, {c['epochs']} epoch(s)",
             "", f"Command: `{r['command']}` ({r['cores']} cores, torch {r['torch']}; medians of "
             f"{len(r['runs']['parallel'])} interleaved rounds)", "",
             "| execution | samples/s | test accuracy |", "|---|---:|---:|"]
    for name, value in r["samples_per_s"].items():
        lines.append(f"| {name} | {value:.1f} | {100 * r['test_accuracy'][name]:.2f}% |")
    lines += ["", "| ratio (same round, median) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["ratios"].items()]
    lines += ["", "| rank | stages | compute s | wait s | comm s |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {i} | {x['stages']} | {x['compute_s']:.2f} | {x['wait_s']:.2f} | {x['comm_s']:.2f} |"
              for i, x in enumerate(r["ranks"])]
    m = r["model"]
    lines += ["", f"Stage balance (slowest rank's compute / fastest): {r['stage_balance']:.2f}.",
              f"Analytic model at K={r['world_size']}: predicted speedup {m['predicted_k2_speedup']:.2f}x, "
              f"measured {m['measured_k2_speedup']:.2f}x (stage step times {[round(t * 1e3, 1) for t in m['stage_step_s']]} "
              f"ms, link {m['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s measured).", "",
              "| model | K blocks = devices | link | predicted speedup | stage balance |",
              "|---|---:|---|---:|---:|"]
    lines += [f"| {p['model']} | {p['devices']} | {p['link']} | {p['predicted_speedup']:.2f}x | {p['balance']:.2f} |"
              for p in m["projections"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

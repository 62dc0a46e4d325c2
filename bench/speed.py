"""The speed table: bpfree's local pipeline against the backprop pipelines (GPipe, 1F1B, ZB-V, DualPipeV), DDP and one process.

    python bench/speed.py [--method dgl] [--model cnn] [--blocks 2] [--data fashion-mnist]
                          [--train-subset 12000] [--epochs 1] [--rounds 2] [--microbatches 8]
                          [--out bench/results/speed]

Same network (initialisation, seed), data order, global batch, optimizer and epoch budget for every
execution; K = --blocks processes of one thread each for the parallel ones:

* local pipeline   `bpfree train --method METHOD --parallel K` (stages on K gloo processes, pipelined)
* local, 1 proc    the same rule in one process (the base of the local pipeline's speedup)
* gpipe, 1f1b      backprop pipelines on torch.distributed.pipelining, M micro-batches (bench/backprop_parallel.py)
* zbv, dualpipev   the zero-bubble V schedules (ScheduleZBVZeroBubble, ScheduleDualPipeV): the same K
                   processes, each holding two of 2K pieces of the same network (so the model needs
                   2K units; the network and its updates are E2EBP's all the same)
* ddp              2-process DistributedDataParallel E2EBP
* e2ebp            `bpfree train --method backprop`, one process; and `--checkpoint blocks`

The executions are interleaved round by round and every ratio is taken within a round (the machine
is shared); medians over rounds are reported.

The analytic K-device model (one device per process, no contention):

    local pipeline   T = max over ranks (its stages' step times + receive time of its input)  (bench/parallel.py)
    backprop pipe    T = (M + K - 1) * max_k (f_k + b_k + 2 m_k / bw)        per batch, GPipe and 1F1B alike
                     f_k, b_k: forward / backward seconds of stage k on one micro-batch (B/M examples),
                     m_k: bytes of its incoming activation (the gradient goes back the same size);
                     bubble fraction (K-1)/(M+K-1); balanced and free of overhead: speedup K M/(M+K-1)
    speedup(K)       one device's time per batch (every stage, whole batch) / T

fed by per-stage times measured on one thread and the link's bandwidth measured in the local pipeline
run; checked against the K=2 measurements, then projected to K = 2, 4, 8 (vgg11 for K=8: the cnn has
4 units), each as x/K beside the published anchors. Writes speed.json, speed.md and speed.png to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backprop_parallel  # noqa: E402
from parallel import predict, profile  # noqa: E402

from bpfree.config import RunConfig  # noqa: E402
from bpfree.data import load_data  # noqa: E402
from bpfree.memory import SavedTensorMeter, parameter_storages, saved_activation_bytes  # noqa: E402
from bpfree.models.modes import channels_last_is_exact  # noqa: E402
from bpfree.run import build, resolve_split, train  # noqa: E402

# x/K at K devices, as quoted in issue 18: GPipe (Huang et al. 2019), DGL (Belilovsky et al. 2020)
ANCHORS = [{"what": "GPipe (backprop pipeline)", "K": 4, "per_K": 0.85},
           {"what": "DGL (local learning)", "K": 2, "per_K": 0.93},
           {"what": "DGL (local learning)", "K": 4, "per_K": 0.76}]
EXECUTIONS = ("local pipeline", "local, 1 proc", "gpipe", "1f1b", "zbv", "dualpipev", "ddp", "e2ebp",
              "e2ebp checkpointed")


def execute(name: str, base: RunConfig, method: str, data, world: int, microbatches: int) -> dict:
    """One training run of execution `name`; its summary (samples/s, test accuracy, ...)."""
    if name in backprop_parallel.V_SHAPED:           # 2K pieces of the same network; DualPipeV needs M >= 2K
        return backprop_parallel.run(dataclasses.replace(base, blocks=2 * world), name, world,
                                     max(microbatches, 2 * world), data=data)
    if name in ("gpipe", "1f1b", "ddp"):
        return backprop_parallel.run(base, name, world, microbatches, data=data)
    cfg = RunConfig(**{**base.to_dict(), "method": method if name.startswith("local") else "backprop",
                       "rule_options": {"checkpoint": "blocks"} if name == "e2ebp checkpointed" else {}})
    return train(cfg, quiet=True, data=None if name == "local pipeline" else data,
                 parallel=world if name == "local pipeline" else None)


def _timed(fn, repeats: int = 4) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return min(times[1:])           # the first call pays one-off set-up costs


def _forward_backward(part: nn.Module, x: torch.Tensor, loss_of) -> tuple[float, float]:
    forward = _timed(lambda: part(x))
    return forward, max(0.0, _timed(lambda: loss_of(part(x)).sum().backward()) - forward)


def backprop_stage_times(cfg: RunConfig, data, k: int, batch: int) -> tuple[list[float], list[float], list[int]]:
    """Forward and backward seconds of each of the k pipeline stages of E2EBP on `batch` examples (one
    thread), and the bytes of each stage's incoming activation."""
    torch.set_num_threads(1)
    net = build(RunConfig(**{**cfg.to_dict(), "method": "backprop", "blocks": k, "rule_options": {}}), data).net
    x = data.normalize(data.x_train[:batch])
    if x.dim() == 4 and channels_last_is_exact(net, torch.device("cpu")):
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = data.y_train[:batch]
    forward, backward, incoming = [], [], []
    for r, group in enumerate(backprop_parallel.block_groups(net.num_blocks, k)):
        last = r == k - 1
        part = nn.Sequential(*(net.blocks[b] for b in group), *([net.head] if last else []))
        x_in = x.detach().requires_grad_(r > 0)
        incoming.append(0 if r == 0 else x.numel() * x.element_size())
        with torch.no_grad():
            out = part(x_in)
        grad_out = torch.randn_like(out)       # the gradient the stage above would send back
        f, b = _forward_backward(part, x_in, partial(F.cross_entropy, target=y) if last else grad_out.mul)
        forward.append(f)
        backward.append(b)
        x = out
    return forward, backward, incoming


def predict_backprop_pipeline(micro: tuple, full: tuple, k: int, m: int, bandwidth: float) -> dict:
    """GPipe / 1F1B seconds per batch on k devices and one device's, from per-stage times (`micro`: on
    one micro-batch, `full`: on the whole batch) and the link's bandwidth."""
    f, b, incoming = micro
    slot = max(f[i] + b[i] + 2 * incoming[i] / bandwidth for i in range(k))
    per_batch, one_device = (m + k - 1) * slot, sum(full[0]) + sum(full[1])
    return {"speedup": one_device / per_batch, "per_batch_s": per_batch, "one_device_s": one_device,
            "bubble": (k - 1) / (m + k - 1)}


def checkpoint_memory(cfg: RunConfig, data, batch: int) -> dict:
    """Activation bytes of one E2EBP step, plain and `--checkpoint blocks`, by bpfree's saved-tensor meter:
    for the checkpointed step, what is kept between the passes and, apart, the largest block recomputation
    the backward pass holds (the meter reports their sum, an upper bound of the peak)."""
    torch.set_num_threads(1)
    rule = build(RunConfig(**{**cfg.to_dict(), "method": "backprop", "rule_options": {"checkpoint": "blocks"}}), data)
    net, stage = rule.net, rule.stages[0]
    x, y = data.normalize(data.x_train[:batch]), data.y_train[:batch]

    def measured(checkpointed: bool) -> SavedTensorMeter:
        stage.checkpoint_blocks = checkpointed
        meter = SavedTensorMeter(exclude=parameter_storages(net))
        with meter.measure():
            F.cross_entropy(stage.local((x,), y).logits, y).backward()
        return meter

    plain, checkpointed = measured(False), measured(True)
    per_block, h = [], x
    for block in net.blocks:
        per_block.append(saved_activation_bytes(block, lambda b=block, i=h: b(i).sum().backward())[1])
        h = block(h).detach()
    return {"model": cfg.model, "blocks": cfg.blocks, "batch": batch, "plain_bytes": plain.bytes,
            "checkpointed_kept_bytes": checkpointed.saved, "block_bytes": per_block,
            "checkpointed_recomputed_bytes": checkpointed.transient,
            "checkpointed_peak_bound_bytes": checkpointed.bytes}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="dgl", help="the local rule run by bpfree's pipeline")
    p.add_argument("--model", default="cnn")
    p.add_argument("--blocks", type=int, default=2, help="K: blocks = processes")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-subset", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--microbatches", type=int, help="pipelines' micro-batches per batch (default 4K)")
    p.add_argument("--skip-projections", action="store_true", help="measure K processes only")
    p.add_argument("--memory-blocks", type=int, default=4,
                   help="K of the plain vs checkpointed E2EBP activation-memory comparison")
    p.add_argument("--memory-only", action="store_true", help="only the activation-memory comparison")
    p.add_argument("--out", default="bench/results/speed")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world, micro = args.blocks, args.microbatches or 4 * args.blocks
    data = load_data(args.data, train_subset=args.train_subset, seed=0)
    torch.set_num_threads(1)
    base = resolve_split(RunConfig(method=args.method, model=args.model, data=args.data, blocks=args.blocks,
                                   epochs=args.epochs, train_subset=args.train_subset, threads=1), data)
    memory = checkpoint_memory(RunConfig(**{**base.to_dict(), "blocks": args.memory_blocks, "split": "even"}),
                               data, base.batch_size)
    memory["command"] = "python bench/speed.py " + " ".join(shlex.quote(a) for a in argv)
    (out / "checkpoint-memory.json").write_text(json.dumps(memory, indent=2) + "\n")
    (out / "checkpoint-memory.md").write_text(memory_report(memory) + "\n")
    print(memory_report(memory))
    if args.memory_only:
        return
    runs = {name: [] for name in EXECUTIONS}
    load_before = os.getloadavg()[0]          # what else was running: the ratios hold either way, the rates less
    for rnd in range(args.rounds):
        for name in EXECUTIONS:
            summary = execute(name, base, args.method, data, world, micro)
            runs[name].append({k: summary[k] for k in ("samples_per_s", "test_accuracy")} |
                              ({"parallel": summary["parallel"]} if "parallel" in summary else {}) |
                              {"peak_activation_bytes_per_process": summary.get("peak_activation_bytes_per_process")})
            print(f"round {rnd + 1} {name:<20} {summary['samples_per_s']:8.1f} samples/s  "
                  f"test acc {100 * summary['test_accuracy']:.2f}%", flush=True)

    def ratio(a: str, b: str) -> float:        # within each round, median over rounds
        return statistics.median(x["samples_per_s"] / y["samples_per_s"] for x, y in zip(runs[a], runs[b]))

    measured = {"local pipeline / local, 1 proc": ratio("local pipeline", "local, 1 proc"),
                **{f"{name} / e2ebp": ratio(name, "e2ebp") for name in EXECUTIONS if name != "e2ebp"}}
    # the link: bytes received per batch / receive time per batch, from the local pipeline's ranks
    ranks = runs["local pipeline"][0]["parallel"]["ranks"]
    steps = args.epochs * (len(data.y_train) // base.batch_size)
    received = sum(r["message_bytes"] for r in ranks[:-1])
    receive_s = statistics.median(sum(r["comm_s"] for r in run["parallel"]["ranks"][1:])
                                  for run in runs["local pipeline"]) / steps
    bandwidth = received / receive_s if receive_s > 0 else float("inf")
    projections = []
    settings = [(args.model, args.blocks)] + ([] if args.skip_projections else
                                              [(args.model, 4), ("vgg11", 2), ("vgg11", 4), ("vgg11", 8)])
    for model, k in dict.fromkeys(settings):
        cfg = RunConfig(**{**base.to_dict(), "model": model, "blocks": k, "split": "even", "model_options": {}})
        costs, sizes = profile(cfg, data)
        local = predict(costs, sizes, k, bandwidth, 0.0)
        m = args.microbatches or 4 * k
        bp = predict_backprop_pipeline(backprop_stage_times(cfg, data, k, base.batch_size // m),
                                       backprop_stage_times(cfg, data, k, base.batch_size), k, m, bandwidth)
        projections.append({"model": model, "K": k, "microbatches": m, "local_speedup": local["speedup"],
                            "local_balance": local["balance"], "backprop_pipeline_speedup": bp["speedup"],
                            "bubble": bp["bubble"],
                            # throughput of the local pipeline over the backprop pipeline's, both on k devices
                            "local_over_backprop": bp["per_batch_s"] / max(local["rank_s"]),
                            "local_stage_s": costs, "message_bytes": sizes})
        print(f"model {model} K={k}: local {local['speedup']:.2f}x, backprop pipeline {bp['speedup']:.2f}x", flush=True)
    k2 = projections[0]
    result = {
        "command": "python bench/speed.py " + " ".join(shlex.quote(a) for a in argv),
        "config": base.to_dict(), "processes": world, "microbatches": micro, "cores": os.cpu_count(),
        "torch": torch.__version__, "load_note": f"1-min load average {load_before:.2f} before the first round; "
                                                  "compare ratios within a round",
        "samples_per_s": {n: statistics.median(r["samples_per_s"] for r in runs[n]) for n in EXECUTIONS},
        "test_accuracy": {n: statistics.median(r["test_accuracy"] for r in runs[n]) for n in EXECUTIONS},
        "ratios": measured, "bandwidth_bytes_per_s": bandwidth,
        "model_check": {"local pipeline": {"predicted": k2["local_speedup"],
                                           "measured": measured["local pipeline / local, 1 proc"]},
                        "gpipe": {"predicted": k2["backprop_pipeline_speedup"], "measured": measured["gpipe / e2ebp"]},
                        "1f1b": {"predicted": k2["backprop_pipeline_speedup"], "measured": measured["1f1b / e2ebp"]}},
        "projections": projections, "anchors": ANCHORS, "runs": runs,
    }
    (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "speed.md").write_text(report(result) + "\n")
    plot(result, out / "speed.png")
    print(report(result))


def report(r: dict) -> str:
    c = r["config"]
    lines = [f"# Speed: {c['method']} pipeline vs backprop pipelines, DDP and one process ({c['model']}, "
             f"K={r['processes']} processes x 1 thread, {c['data']} subset {c['train_subset']}, {c['epochs']} epoch(s))",
             "", f"Command: `{r['command']}` ({r['cores']} cores, torch {r['torch']}; medians of "
             f"{len(r['runs']['e2ebp'])} interleaved rounds; {r['load_note']}; pipelines: M = {r['microbatches']} "
             "micro-batches)", "",
             "| execution | samples/s | vs e2ebp (same round) | x/K | test accuracy | activation peak per process |",
             "|---|---:|---:|---:|---:|---|"]
    for name, value in r["samples_per_s"].items():
        vs = "1" if name == "e2ebp" else f"{r['ratios'][f'{name} / e2ebp']:.2f}x"
        per_k = "" if name.startswith(("e2ebp", "local, 1")) else f"{r['ratios'].get(f'{name} / e2ebp', 1) / r['processes']:.2f}"
        peaks = (r["runs"][name][0].get("peak_activation_bytes_per_process") or [])
        peak = " / ".join(f"{b / 2 ** 20:.2f} MB" for b in peaks) if peaks else "-"
        lines.append(f"| {name} | {value:.1f} | {vs} | {per_k} | {100 * r['test_accuracy'][name]:.2f}% | {peak} |")
    lines += ["", f"Local pipeline / the same rule in one process: {r['ratios']['local pipeline / local, 1 proc']:.2f}x.",
              "", "Analytic model at the measured K (link "
              f"{r['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, measured):", "",
              "| execution | predicted speedup | measured speedup |", "|---|---:|---:|"]
    lines += [f"| {n} | {v['predicted']:.2f}x | {v['measured']:.2f}x |" for n, v in r["model_check"].items()]
    lines += ["", "Projected with one device per process (no shared cores):", "",
              "| model | K | local pipeline | x/K | backprop pipeline (M) | x/K | bubble | local / backprop pipeline |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['model']} | {p['K']} | {p['local_speedup']:.2f}x | {p['local_speedup'] / p['K']:.2f} | "
              f"{p['backprop_pipeline_speedup']:.2f}x ({p['microbatches']}) | "
              f"{p['backprop_pipeline_speedup'] / p['K']:.2f} | {p['bubble']:.2f} | {p['local_over_backprop']:.2f}x |"
              for p in r["projections"]]
    lines += ["", "Published anchors (x/K): " + "; ".join(f"{a['what']} {a['per_K']:.2f} at K={a['K']}"
                                                      for a in r["anchors"]) + "."]
    return "\n".join(lines)


def memory_report(m: dict) -> str:
    mb = lambda n: f"{n / 2**20:.1f} MiB ({n / m['plain_bytes']:.2f}x)"  # noqa: E731
    return "\n".join([
        f"# Activation memory of one E2EBP step, plain vs `--checkpoint blocks` ({m['model']}, K={m['blocks']} "
        f"blocks, batch {m['batch']})", "", f"Command: `{m['command']}`", "",
        "| what | bytes saved for backward |", "|---|---:|",
        f"| plain E2EBP | {mb(m['plain_bytes'])} |",
        f"| checkpointed, kept between the passes | {mb(m['checkpointed_kept_bytes'])} |",
        f"| checkpointed, the largest block recomputation (held during its backward) | {mb(m['checkpointed_recomputed_bytes'])} |",
        f"| checkpointed, bound on the peak: the two together (what bpfree's meter reports) | {mb(m['checkpointed_peak_bound_bytes'])} |",
        "", "Each block's own saved activations: " + ", ".join(f"{b / 2**20:.1f}" for b in m["block_bytes"]) + " MiB."])


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(r["samples_per_s"])
    left.barh(names[::-1], [r["samples_per_s"][n] for n in names[::-1]], color="tab:blue")
    left.set_xlabel("samples/s (measured, shared 2-core CPU)")
    left.set_title(f"K={r['processes']} processes x 1 thread")
    for model in dict.fromkeys(p["model"] for p in r["projections"]):
        ps = [p for p in r["projections"] if p["model"] == model]
        right.plot([p["K"] for p in ps], [p["local_speedup"] / p["K"] for p in ps], "o-", label=f"local pipeline, {model}")
        right.plot([p["K"] for p in ps], [p["backprop_pipeline_speedup"] / p["K"] for p in ps], "s--",
                   label=f"backprop pipeline, {model}")
    for a in r["anchors"]:
        right.plot([a["K"]], [a["per_K"]], "k*", markersize=10)
        right.annotate(a["what"], (a["K"], a["per_K"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    right.set_xscale("log", base=2)
    right.set_xlabel("K devices (projected)")
    right.set_ylabel("speedup / K")
    right.set_ylim(0, 1.1)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

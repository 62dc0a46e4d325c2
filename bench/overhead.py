"""bpfree's E2EBP training loop against a plain hand-written PyTorch loop.

Same model (same initial weights), data, batch order, optimizer, schedule and threads; the two are
interleaved epoch by epoch in one process so machine noise hits both alike. Prints and saves the
ratio of training steps/s (bpfree / plain); the target is >= 0.97.

    python bench/overhead.py --data fashion-mnist --model cnn --train-subset 6400 --rounds 6
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bpfree.config import RunConfig
from bpfree.data import load_data
from bpfree.engine import Trainer
from bpfree.run import build


def plain_epoch(net, opt, sched, x, y, batch_size, generator, normalize) -> float:
    """The loop a user would write by hand (normalising each batch of stored inputs, as bpfree does)."""
    net.train()
    perm = torch.randperm(len(y), generator=generator)
    steps = len(y) // batch_size
    start = time.perf_counter()
    for i in range(steps):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        loss = F.cross_entropy(net(normalize(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return steps / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--train-subset", type=int, default=6400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/overhead")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_data(args.data, train_subset=args.train_subset)
    cfg = RunConfig(method="backprop", model=args.model, data=args.data, epochs=args.rounds + 1,
                    batch_size=args.batch_size, threads=args.threads)
    rule = build(cfg, data)
    trainer = Trainer(rule, data, cfg, quiet=True)
    plain_net = build(cfg, data).net            # same seed: identical initial weights
    x, y = trainer.data.x_train, trainer.data.y_train   # same tensors (and memory layout) for both loops
    normalize = trainer.data.normalize
    if x.dim() == 4:
        plain_net.to(memory_format=torch.channels_last)
    plain_opt = torch.optim.Adam(plain_net.parameters(), lr=cfg.lr, fused=True)
    plain_sched = torch.optim.lr_scheduler.CosineAnnealingLR(plain_opt, T_max=cfg.epochs * trainer.steps(trainer.phases[0]))
    gen = torch.Generator().manual_seed(cfg.seed)
    phase = trainer.phases[0]

    def bpfree_epoch(epoch):
        timing = trainer.train_epoch(phase, epoch, first_step=epoch * trainer.steps(phase))
        return trainer.steps(phase) / timing["epoch_time_s"]

    bpfree_epoch(0)                                # warm-up, not counted
    plain_epoch(plain_net, plain_opt, plain_sched, x, y, args.batch_size, gen, normalize)
    ratios, rows = [], []
    for r in range(args.rounds):
        # alternate who goes first so drift in machine speed does not favour one side
        if r % 2 == 0:
            a = bpfree_epoch(r + 1)
            b = plain_epoch(plain_net, plain_opt, plain_sched, x, y, args.batch_size, gen, normalize)
        else:
            b = plain_epoch(plain_net, plain_opt, plain_sched, x, y, args.batch_size, gen, normalize)
            a = bpfree_epoch(r + 1)
        ratios.append(a / b)
        rows.append({"round": r, "bpfree_steps_per_s": a, "plain_steps_per_s": b, "ratio": a / b})
        print(f"round {r}: bpfree {a:.2f} steps/s, plain {b:.2f} steps/s, ratio {a / b:.3f}", flush=True)
    result = {
        "command": "python bench/overhead.py " + " ".join(shlex.quote(a) for a in argv),
        "data": args.data, "model": args.model, "train_subset": args.train_subset,
        "batch_size": args.batch_size, "threads": args.threads, "rounds": rows,
        "median_ratio": statistics.median(ratios), "target": 0.97,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# bpfree E2EBP loop vs plain PyTorch loop ({args.model} on {args.data}, {args.threads} threads)", "",
          f"Command: `{result['command']}`", "", "| round | bpfree steps/s | plain steps/s | ratio |", "|---|---|---|---|"]
    md += [f"| {r['round']} | {r['bpfree_steps_per_s']:.2f} | {r['plain_steps_per_s']:.2f} | {r['ratio']:.3f} |"
           for r in rows]
    md += ["", f"Median ratio: **{result['median_ratio']:.3f}** (target ≥ 0.97). torch {torch.__version__}, "
           f"{result['cpu_count']} CPUs.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"median ratio {result['median_ratio']:.3f} -> {out}.json, {out}.md")


if __name__ == "__main__":
    main()

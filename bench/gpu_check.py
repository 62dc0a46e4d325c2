"""One command that checks the GPU path of every rule and prints what it costs (about 5 minutes on
one GPU; no network, no install: run it from the checkout).

    PYTHONPATH=. python3 bench/gpu_check.py --data-dir DIR [--steps 100] [--out bench/results/gpu-check]

DIR holds Fashion-MNIST's four idx files. For every registered rule on `cnn` and `resnet18` (K=4),
Fashion-MNIST with `--augment crop=2,flip`, fp32 and bf16, two epochs of `--steps` batches of 128:
samples/s of the second epoch (the first pays cudnn's autotuning), the ratio to E2EBP's, the
largest stage's CUDA step peak relative to E2EBP's, the loss of the last stage and test accuracy
(to catch a path that runs but does not learn). Then bpfree's E2EBP loop against a hand-written
PyTorch loop on the same data, model and augmentation (steps/s ratio, interleaved). Writes
gpu-check.json and gpu-check.md; `--device cpu --steps 2 --models mlp` is a smoke test.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.augment import Augment  # noqa: E402
from bpfree.config import RunConfig  # noqa: E402
from bpfree.data import load_data  # noqa: E402
from bpfree.engine import Trainer  # noqa: E402
from bpfree.errors import BpfreeError  # noqa: E402
from bpfree.rules import list_rules  # noqa: E402
from bpfree.run import build, train  # noqa: E402

AUGMENT = "crop=2,flip"


def run_rule(method: str, model: str, precision: str, data, args) -> dict:
    cfg = RunConfig(method=method, model=model, data="fashion-mnist", epochs=2, batch_size=128,
                    train_subset=None, augment=AUGMENT, precision=precision, device=args.device)
    rows = []
    begin = time.perf_counter()
    summary = train(cfg, data=data, quiet=True, on_epoch=rows.append)
    last = rows[-1]
    peaks = summary["cuda_step_peak_bytes_per_stage"]
    return {"method": method, "model": model, "precision": precision,
            "samples_per_s": last["samples_per_s"], "test_acc": last["test_acc"],
            "loss": next(s["loss"] for s in reversed(last["stages"]) if "loss" in s),
            "cuda_step_peak_bytes": max((p for p in peaks if p is not None), default=None),
            "activation_bytes": summary["peak_activation_bytes"], "wall_s": time.perf_counter() - begin}


def plain_vs_bpfree(data, args, rounds: int = 3) -> dict:
    """E2EBP on the cnn: bpfree's loop vs the loop a user writes by hand (same weights, batches, augmentation)."""
    cfg = RunConfig(method="backprop", model="cnn", data="fashion-mnist", epochs=rounds + 1, batch_size=128,
                    augment=AUGMENT, device=args.device)
    trainer = Trainer(build(cfg, data), data, cfg, quiet=True)
    net = build(cfg, data).net.to(trainer.device)
    if trainer.data.x_train.dim() == 4:
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=True)
    steps = trainer.steps(trainer.phases[0])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    x, y, augment = trainer.data.x_train, trainer.data.y_train, Augment.parse(AUGMENT)
    gen = torch.Generator().manual_seed(0)
    aug_gen = torch.Generator(device=trainer.device).manual_seed(0)

    def sync():
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)

    def plain():
        net.train()
        perm = torch.randperm(len(y), generator=gen).to(trainer.device)
        sync()
        start = time.perf_counter()
        for i in range(steps):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(net(trainer.data.normalize(augment(x[idx], aug_gen))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        sync()
        return steps / (time.perf_counter() - start)

    def ours(epoch):
        return steps / trainer.train_epoch(trainer.phases[0], epoch, first_step=epoch * steps)["epoch_time_s"]

    ours(0)
    plain()                                       # warm-up, not counted
    ratios = []
    for r in range(rounds):
        a, b = (ours(r + 1), plain()) if r % 2 == 0 else (plain(), ours(r + 1))[::-1]
        ratios.append(a / b)
    return {"ratios": ratios, "median_ratio": statistics.median(ratios), "steps_per_epoch": steps}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder with Fashion-MNIST's idx files")
    p.add_argument("--steps", type=int, default=100, help="batches per epoch (two epochs per run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="cnn,resnet18")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--rules", help="comma-separated rules (default: every registered rule)")
    p.add_argument("--budget-s", type=float, default=420, help="stop starting runs after this many seconds")
    p.add_argument("--out", default="bench/results/gpu-check")
    args = p.parse_args(argv)
    begin = time.perf_counter()
    data = load_data("fashion-mnist", data_dir=args.data_dir, train_subset=args.steps * 128)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    rows, skipped = [], []
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            for method in args.rules.split(",") if args.rules else list_rules():
                if time.perf_counter() - begin > args.budget_s:
                    skipped.append(f"{method}/{model}/{precision}: time budget")
                    continue
                try:
                    row = run_rule(method, model, precision, data, args)
                except BpfreeError as e:           # e.g. a rule that trains in fp32 only
                    skipped.append(f"{method}/{model}/{precision}: {e}")
                    continue
                rows.append(row)
                print(f"{model:<9} {precision:<5} {method:<9} {row['samples_per_s']:9.0f} samples/s  "
                      f"loss {row['loss']:.3f}  test {100 * row['test_acc']:.2f}%", flush=True)
    for row in rows:
        ref = next((r for r in rows if r["method"] == "backprop" and r["model"] == row["model"]
                    and r["precision"] == row["precision"]), None)
        row["speed_vs_e2ebp"] = row["samples_per_s"] / ref["samples_per_s"] if ref else None
        row["memory_vs_e2ebp"] = (row["cuda_step_peak_bytes"] / ref["cuda_step_peak_bytes"]
                                  if ref and row["cuda_step_peak_bytes"] and ref["cuda_step_peak_bytes"] else None)
    loop = plain_vs_bpfree(data, args)
    result = {"command": "PYTHONPATH=. python3 bench/gpu_check.py " + " ".join(shlex.quote(a) for a in argv),
              "device": device, "torch": torch.__version__, "steps": args.steps, "augment": AUGMENT,
              "rows": rows, "skipped": skipped, "loop_vs_plain": loop, "total_s": time.perf_counter() - begin}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")

    def ratio(v):
        return "-" if v is None else f"{v:.2f}x"
    md = [f"# GPU check: every rule, cnn and resnet18, Fashion-MNIST + {AUGMENT} ({device}, torch {torch.__version__})",
          "", f"Command: `{result['command']}` ({result['total_s']:.0f} s)", "",
          "| model | precision | rule | samples/s | vs E2EBP | step peak memory vs E2EBP | last-stage loss | test acc |",
          "|---|---|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['precision']} | {r['method']} | {r['samples_per_s']:.0f} | {ratio(r['speed_vs_e2ebp'])} "
           f"| {ratio(r['memory_vs_e2ebp'])} | {r['loss']:.3f} | {100 * r['test_acc']:.2f}% |" for r in rows]
    md += ["", f"bpfree's E2EBP loop vs a hand-written loop (cnn, same batches and augmentation): median "
           f"{loop['median_ratio']:.3f} of its steps/s over {len(loop['ratios'])} interleaved epochs.", ""]
    md += [f"Skipped: {s}" for s in skipped]
    (out / "gpu-check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Backprop on W processes with PyTorch's own engines: the baselines bpfree's `--parallel` is measured against.

    python bench/backprop_parallel.py --engine gpipe|1f1b|zbv|dualpipev|ddp [--model cnn] [--blocks 2] [--processes 2]
                                      [--microbatches 8] [--data fashion-mnist] [--train-subset 12000]
                                      [--epochs 1] [--seed 0]

The network, its initialisation, the optimizer and its schedule, the seed, the global batch and the
data order are a `bpfree train --method backprop` run's (same RunConfig, `bpfree.run.build`); only
the execution differs:

* gpipe, 1f1b  pipeline parallelism (torch.distributed.pipelining, manual `PipelineStage`s): the
               BlockNet's blocks in W contiguous groups, one per process, at the same block
               boundaries as `bpfree train --blocks K --parallel W` (K = W: one block per process;
               the head goes with the last). Each batch is cut into M micro-batches; ScheduleGPipe
               runs every forward, then every backward (Huang et al. 2019); Schedule1F1B alternates
               them once the pipeline is full (Narayanan et al. 2019, PipeDream-Flush). Gradients are
               summed over micro-batches and divided by M (`scale_grads`), so with per-micro-batch
               mean losses they equal the whole batch's mean-loss gradient. Bubble: (W-1)/(M+W-1) of
               each step idles. Default M = 4W, GPipe's guidance (M >= 4K: a negligible bubble).
* zbv,         the zero-bubble V schedules (ScheduleZBVZeroBubble, Qi et al. 2024, section 6;
  dualpipev    ScheduleDualPipeV, DeepSeek-V3's DualPipe in its V form): the blocks in 2W contiguous
               pieces, process r holding pieces r and 2W-1-r (a V: process 0 holds the first piece
               and the last, with the head); the backward pass is split into input gradients (on the
               critical path) and weight gradients (filling the bubble). Needs K >= 2W blocks.
* ddp          data parallelism (DistributedDataParallel): every process holds the whole network and
               trains on its 1/W slice of each batch; gradients are averaged by all-reduce.

Deviations from one-process E2EBP, each inherent to the engine: BatchNorm normalises each
micro-batch (pipeline; as GPipe) or each process's slice (DDP, without SyncBatchNorm) by its own
statistics, so with BN the updates are not the whole batch's; without BN they are (tested).
gloo on the CPU here (nccl on GPUs). Prints one JSON summary: samples/s over the training epochs
(the slowest process's time), test accuracy after the budget, loss per epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleZBVZeroBubble,
)
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bpfree.config import RunConfig  # noqa: E402
from bpfree.engine import launch  # noqa: E402
from bpfree.errors import BpfreeError  # noqa: E402
from bpfree.memory import LiveSavedMeter  # noqa: E402
from bpfree.models.modes import channels_last_is_exact  # noqa: E402
from bpfree.optim import make_optimizer, make_scheduler  # noqa: E402
from bpfree.run import build, load_for  # noqa: E402

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "zbv": ScheduleZBVZeroBubble,
             "dualpipev": ScheduleDualPipeV}
V_SHAPED = ("zbv", "dualpipev")          # two pieces per process, in a V
ENGINES = (*SCHEDULES, "ddp")
EVAL_BATCH = 1024


def block_groups(num_blocks: int, world: int) -> list[list[int]]:
    """Contiguous groups of block indices, one per process, as even as possible (later groups larger,
    as bpfree's even split)."""
    if not 1 <= world <= num_blocks:
        raise BpfreeError(f"a pipeline of {world} processes needs at least {world} blocks, got {num_blocks}")
    base, extra = divmod(num_blocks, world)
    sizes = [base + (r >= world - extra) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world + 1)]
    return [list(range(starts[r], starts[r + 1])) for r in range(world)]


def run(cfg: RunConfig, engine: str, world: int = 2, microbatches: Optional[int] = None, data=None,
        probe: Optional[tuple] = None, timeout_s: float = 600.0) -> dict:
    """Train `cfg`'s network with `engine` on `world` local processes; rank 0's summary. With
    `probe=(x, y)`: no training, one step's parameter gradients on that batch (name -> tensor)."""
    if engine not in ENGINES:
        raise BpfreeError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    cfg = dataclasses.replace(cfg, method="backprop", rule_options={})
    data = data if data is not None else load_for(cfg)
    microbatches = microbatches or 4 * world
    if engine in SCHEDULES and cfg.batch_size % microbatches:
        raise BpfreeError(f"--batch-size {cfg.batch_size} does not split into {microbatches} equal micro-batches")
    if engine == "dualpipev" and microbatches < 2 * world:
        raise BpfreeError(f"dualpipev needs at least as many micro-batches as pieces ({2 * world}), got {microbatches}")
    if engine in V_SHAPED and cfg.blocks < 2 * world:
        raise BpfreeError(f"{engine} runs two pieces of the network per process: it needs --blocks >= {2 * world} "
                          f"for {world} processes, got {cfg.blocks}")
    if probe is None:
        return launch.spawn(world, _rank, (cfg, engine, microbatches, data, None), "gloo", timeout_s)
    with tempfile.TemporaryDirectory() as tmp:     # gradients are too large for the launcher's result pipe
        path = Path(tmp) / "grads.pt"
        launch.spawn(world, _rank, (cfg, engine, microbatches, data, (*probe, path)), "gloo", timeout_s)
        return torch.load(path)


def _rank(cfg: RunConfig, engine: str, microbatches: int, data, probe) -> Optional[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(cfg.threads or 1)
    net = build(cfg, data).net
    channels_last = data.x_train.dim() == 4 and channels_last_is_exact(net, torch.device("cpu"))
    if channels_last:
        net.to(memory_format=torch.channels_last)
    prepare = lambda x: x.contiguous(memory_format=torch.channels_last) if channels_last else x  # noqa: E731
    if engine == "ddp":
        groups, last = [list(range(net.num_blocks))] * world, True
        part = net
        model = DistributedDataParallel(part)
    else:
        v = engine in V_SHAPED
        pieces = 2 * world if v else world
        groups = block_groups(net.num_blocks, pieces)
        held = [rank, pieces - 1 - rank] if v else [rank]       # the pieces this process runs
        last = pieces - 1 in held                                # it holds the head and computes the loss
        parts = _pipeline_parts(net, groups, wire=channels_last)
        part = nn.ModuleList(parts[i] for i in held)
        # Static shapes (example micro-batch in and out): torch's shape inference would otherwise run
        # each stage once in training mode on uninitialised memory, polluting BatchNorm's running statistics.
        micro = prepare(data.normalize(data.x_train[:cfg.batch_size // microbatches]))
        stages = [PipelineStage(parts[i], i, pieces, torch.device("cpu"), input_args=x_in, output_args=x_out)
                  for i in held for x_in, x_out in [_example_io(parts, i, micro)]]
        model = SCHEDULES[engine](stages if v else stages[0], microbatches, loss_fn=F.cross_entropy)
        groups = [[b for i in ([r, pieces - 1 - r] if v else [r]) for b in groups[i]] for r in range(world)]
    mine = groups[rank]
    params = list(part.parameters())

    def train_step(x, y, losses):
        if engine == "ddp":
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            loss = F.cross_entropy(model(prepare(data.normalize(xs))), ys)
            loss.backward()
            losses.append(loss.detach())
        elif rank == 0:                       # (in a V, process 0 also holds the last piece)
            model.step(prepare(data.normalize(x)), **({"target": y, "losses": losses} if last else {}))
        elif last:
            model.step(target=y, losses=losses)
        else:
            model.step()

    if probe is not None:
        x, y, path = probe
        train_step(x, y, [])
        names = {id(p): n for n, p in net.named_parameters()}
        grads = _gather({names[id(p)]: p.grad for p in params}, rank)
        if rank == 0:
            torch.save(grads, path)
        return None

    n, bs = len(data.y_train), min(cfg.batch_size, len(data.y_train))
    steps = max(1, n // cfg.batch_size)
    optimizer = make_optimizer([{"params": params}], cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.epochs * steps)
    shuffle = torch.Generator().manual_seed(cfg.seed)      # the Trainer's data order
    part.train()
    epoch_loss, train_time = [], 0.0
    meter = LiveSavedMeter(exclude={p.untyped_storage().data_ptr() for p in params})
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=shuffle)
        losses: list = []
        dist.barrier()
        start = time.perf_counter()
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            optimizer.zero_grad(set_to_none=True)
            with meter.measure() if i == 0 else contextlib.nullcontext():     # the schedule's activation peak
                train_step(data.x_train[idx], data.y_train[idx], losses)
            optimizer.step()
            scheduler.step()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)     # the epoch ends when the slowest process is done
        train_time += float(elapsed)
        epoch_loss.append(float(torch.stack([loss.detach() for loss in losses]).mean()) if losses else None)
    owned = {k: v for k, v in net.state_dict().items()
             if any(k.startswith(f"blocks.{b}.") for b in mine) or (last and k.startswith("head."))}
    state = _gather(owned, rank)
    rank_losses = [None] * world             # pipelines: the last process computes the loss; DDP: every one
    dist.all_gather_object(rank_losses, epoch_loss)
    peaks = [None] * world
    dist.all_gather_object(peaks, meter.peak)
    if rank != 0:
        return None
    net.load_state_dict(state)
    per_rank = [r for r in rank_losses if r[0] is not None]
    return {
        "engine": engine, "processes": world, "microbatches": microbatches if engine in SCHEDULES else None,
        "block_groups": groups if engine in SCHEDULES else None, "epochs": cfg.epochs,
        "samples_per_s": cfg.epochs * steps * bs / train_time, "train_time_s": train_time,
        "epoch_loss": [sum(ls) / len(ls) for ls in zip(*per_rank)], "test_accuracy": _accuracy(net, data, prepare),
        "peak_activation_bytes_per_process": peaks,        # saved for backward, alive at once, in one step
        "threads": torch.get_num_threads(), "torch": torch.__version__, "config": cfg.to_dict(),
    }


def _pipeline_parts(net, groups: list[list[int]], wire: bool) -> list[nn.Sequential]:
    """Each process's piece of the network: its blocks, the head on the last; with `wire`, channels-last
    activations cross between pieces as contiguous NHWC tensors."""
    last = len(groups) - 1
    return [nn.Sequential(*([_FromWire()] if wire and r > 0 else []), *(net.blocks[k] for k in group),
                          *([net.head] if r == last else [_ToWire()] if wire else []))
            for r, group in enumerate(groups)]


@torch.no_grad()
def _example_io(parts, rank: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Piece `rank`'s input and output on the micro-batch `x`, computed in eval mode (no statistics change)."""
    for part in parts:
        part.eval()
    for part in parts[:rank]:
        x = part(x)
    out = parts[rank](x)
    for part in parts:
        part.train()
    return x.requires_grad_(rank > 0), out.requires_grad_()     # which gradients travel back


class _ToWire(nn.Module):
    """A channels-last activation as the contiguous NHWC tensor it is stored as (gloo sends contiguous
    tensors only; no copy). Other activations pass unchanged."""

    def forward(self, h):
        return h.permute(0, 2, 3, 1).contiguous() if h.dim() == 4 else h


class _FromWire(nn.Module):
    def forward(self, h):
        return _NCHW.apply(h) if h.dim() == 4 else h


class _NCHW(torch.autograd.Function):
    """NHWC -> the channels-last NCHW view; its gradient goes back as a contiguous NHWC tensor."""

    @staticmethod
    def forward(ctx, h):
        return h.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        return grad.permute(0, 2, 3, 1).contiguous()


def _gather(tensors: dict, rank: int) -> Optional[dict]:
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object({k: v.detach().clone() for k, v in tensors.items()}, parts, dst=0)
    return {k: v for p in parts for k, v in p.items()} if rank == 0 else None


@torch.no_grad()
def _accuracy(net: nn.Module, data, prepare) -> float:
    net.eval()
    hits = sum(int((net(prepare(data.normalize(data.x_test[i:i + EVAL_BATCH]))).argmax(1)
                    == data.y_test[i:i + EVAL_BATCH]).sum()) for i in range(0, len(data.y_test), EVAL_BATCH))
    return hits / len(data.y_test)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--model", default="cnn")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--microbatches", type=int, help="micro-batches per batch (pipelines; default 4 x processes)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-subset", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = RunConfig(method="backprop", model=args.model, data=args.data, blocks=args.blocks, epochs=args.epochs,
                    batch_size=args.batch_size, train_subset=args.train_subset, seed=args.seed, threads=1)
    try:
        summary = run(cfg, args.engine, args.processes, args.microbatches)
    except BpfreeError as e:
        print(f"backprop_parallel: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

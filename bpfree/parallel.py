"""Block-parallel training on torch.distributed: each process trains a contiguous group of stages
and batches stream through the processes as a pipeline.

    rank 0: stages 0..a  --(message, labels)-->  rank 1: stages a+1..b  --> ... --> rank W-1

Rank 0 reads the data. Every rank runs its stages' `step` on batch t, posts the outgoing message
(each tensor of the tuple, plus the labels) to the next rank with a non-blocking `isend`, and goes
on with batch t+1 while the next rank works on batch t. At most `in_flight` batches wait in a link
(back-pressure). No rule is special-cased: every rule whose stages train simultaneously runs as is.

Why the metrics equal those of the one-process simultaneous schedule: a stage's update on batch t
depends on its own state and on the message the stage before it computed for batch t, and nothing
downstream ever flows back. Pipelining changes when work happens, not what is computed, so with
deterministic kernels a parallel run reproduces the one-process run exactly, for any `in_flight`
(tested). Rules that draw random numbers inside a step (input noise) draw them from one
generator per rank instead of one shared generator, so those match only in distribution.

Top-down rules (`Rule.top_down`, e.g. rec-LRA) do send something back: after batch t's forward
messages, each rank waits for the signal of batch t from the rank above, runs its stages'
`feedback` top-down, passes the signal on down, and only then applies its own updates, so the
ranks' updates overlap while the cheap signal travels. A rank starts batch t+1 after its batch-t
update, exactly as in one process (tested equal), so these rules do not pipeline across batches.

Which stages a rank gets: with W ranks for S > W stages, contiguous groups chosen to minimise the
slowest rank's time per batch, from each stage's step time measured on a probe batch (rank 0, on
copies of the stages; the weights are untouched). Placement changes speed only, never results.

After each epoch every rank broadcasts its stages' weights, because a readout may use other stages'
modules (AL decodes through the lower components' decoders); the test and validation sets then
stream through the same pipeline, each rank counting its stages' readout hits, summed by an
all-reduce. Rank 0 gathers the stages' optimizer states and writes the one atomic checkpoint in the
format of a one-process run, so either kind of run can resume the other, and no shared file system
is needed across nodes. metrics.json gets a `parallel` section: per rank its stages, compute /
wait / communication seconds, bytes sent per batch and peak activation bytes.

Launch: `torchrun --nproc-per-node W -m bpfree train ... --parallel` (any torchrun rendezvous,
multi-node included), or `bpfree train ... --parallel W`, which checks every setting, then spawns W
local processes and watches them: when one fails, the others are stopped at once and the error
names the failed rank and its cause.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import signal
import socket
import sys
import time
import warnings
from collections import deque
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from .config import RunConfig
from .data import Data
from .errors import BpfreeError
from .memory import saved_activation_bytes
from .models import partition
from .rules import Rule
from .runs import load_checkpoint, save_checkpoint
from .train import (EVAL_BATCH, Phase, Trainer, _freeze, build, load_for, open_run, plan_phases, prepare,
                    resolve_split)

HEADER = 64         # int64 slots describing one message: count, then per tensor dtype, layout, ndim, shape
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
TIMEOUT = timedelta(minutes=10)   # a rank silent this long is declared lost (e.g. a hung peer)
# Fault injection for tests of the failure path: "RANK:EPOCH:STEP" makes that rank SIGKILL itself there.
KILL_AT = "BPFREE_KILL_RANK_AT"


class RankFailed(BpfreeError):
    """Another rank failed; this process stops with the failed rank's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _is_lost_peer(e: BaseException) -> bool:
    """A communication failure (a peer died or hung), as opposed to an error of our own."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        mark in str(e) for mark in ("gloo", "Connection closed", "Connection reset", "NCCL")))


def _lost(rank: int, peer: str, e: BaseException) -> RankFailed:
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cause = cause.split("] ", 1)[-1][:160]          # drop gloo's source location
    return RankFailed(f"rank {rank}: lost {peer} ({cause}); it probably failed (see its error); "
                      "the last checkpoint is intact: continue with --resume")


@contextmanager
def _talking_to(peer: int):
    """Name the neighbour in the error when a point-to-point transfer with it fails."""
    try:
        yield
    except Exception as e:
        if _is_lost_peer(e):
            raise _lost(dist.get_rank(), f"contact with rank {peer}", e) from None
        raise


# --- placement ---------------------------------------------------------------------------------
def stage_costs(trainer: Trainer, phase: Phase, repeats: int = 3) -> list[float]:
    """Seconds per training step of each stage on one batch, measured on copies of the stages."""
    with warnings.catch_warnings():   # a copied scheduler no longer sees its optimizer's step hook
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        stages = copy.deepcopy(trainer.rule.stages)
    rng = torch.get_rng_state()
    bs = min(trainer.cfg.batch_size, len(trainer.data.y_train))
    labels = trainer.data.y_train[:bs]
    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
    for k, stage in enumerate(stages):
        stage.train(k in phase.stages)
    rounds = []
    for _ in range(repeats):          # whole batches: a top-down rule's stage works on the way back too
        elapsed, message = [0.0] * len(stages), (trainer.data.x_train[:bs],)
        for k, stage in enumerate(stages):
            begin = time.perf_counter()
            if k in phase.stages:
                message = stage.step(message, labels)
            else:
                with torch.no_grad():
                    message = stage(*message)
            elapsed[k] += time.perf_counter() - begin
        signal = ()
        for k in reversed(phase.stages if trainer.rule.top_down else []):
            begin = time.perf_counter()
            signal = stages[k].feedback(signal, labels)
            stages[k].update()
            elapsed[k] += time.perf_counter() - begin
        rounds.append(elapsed)
    torch.set_rng_state(rng)
    kept = rounds[1:] or rounds       # the first round pays one-off set-up costs
    return [min(r[k] for r in kept) for k in range(len(stages))]


# --- messages between neighbouring ranks -----------------------------------------------------
class Link:
    """Point-to-point messages to or from one neighbour: a header (dtypes, layouts, shapes), then tensors.

    Channels-last images travel as their NHWC storage (no copy) and are viewed back as NCHW.
    `clock` accumulates `wait_s` (blocked on the neighbour: an empty or a full link) and `comm_s`
    (moving the payload); `last_bytes` is the size of the last payload sent.
    """

    def __init__(self, peer: int, device: torch.device, in_flight: int, clock: dict):
        self.peer, self.device, self.in_flight, self.clock = peer, device, in_flight, clock
        self.pending: deque = deque()
        self.last_bytes = 0

    def send(self, tensors: tuple[torch.Tensor, ...]) -> None:
        begin = time.perf_counter()
        header, bodies = [len(tensors)], []
        for t in tensors:
            channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
                memory_format=torch.channels_last)
            body = t.permute(0, 2, 3, 1) if channels_last else t.contiguous()
            header += [DTYPES.index(t.dtype), int(channels_last), body.dim(), *body.shape]
            bodies.append(body)
        if len(header) > HEADER:
            raise BpfreeError(f"a stage message of {len(tensors)} tensors does not fit the {HEADER}-slot header")
        head = torch.tensor(header + [0] * (HEADER - len(header)), dtype=torch.int64, device=self.device)
        with _talking_to(self.peer):   # keep the buffers referenced until their sends complete
            self.pending.append([(dist.isend(buf, self.peer), buf) for buf in (head, *bodies)])
        self.last_bytes = sum(b.numel() * b.element_size() for b in bodies)
        self.clock["comm_s"] += time.perf_counter() - begin
        while len(self.pending) > self.in_flight:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        begin = time.perf_counter()
        with _talking_to(self.peer):
            for work, _ in self.pending.popleft():
                work.wait()
        self.clock["wait_s"] += time.perf_counter() - begin

    def flush(self) -> None:
        while self.pending:
            self._complete_oldest()

    def recv(self) -> tuple[torch.Tensor, ...]:
        begin = time.perf_counter()
        head = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        with _talking_to(self.peer):
            dist.recv(head, self.peer)
            arrived = time.perf_counter()
            self.clock["wait_s"] += arrived - begin
            h, i, tensors = head.tolist(), 1, []
            for _ in range(h[0]):
                dtype, channels_last, ndim = DTYPES[h[i]], h[i + 1], h[i + 2]
                buf = torch.empty(h[i + 3:i + 3 + ndim], dtype=dtype, device=self.device)
                dist.recv(buf, self.peer)
                tensors.append(buf.permute(0, 3, 1, 2) if channels_last else buf)
                i += 3 + ndim
        self.clock["comm_s"] += time.perf_counter() - arrived
        return tuple(tensors)


# --- the per-rank trainer --------------------------------------------------------------------
class PipelineTrainer(Trainer):
    """The Trainer's epoch loop, checkpoints and metrics, with this rank's stages only.

    Collective steps (weight broadcast, evaluation, checkpoint gathering) happen at the same
    points on every rank, so every rank runs the same `fit` loop.
    """

    def __init__(self, rule: Rule, data: Data, cfg: RunConfig, *, in_flight: int, quiet: bool = False,
                 on_epoch: Optional[Callable[[dict], None]] = None):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        super().__init__(rule, data, cfg, quiet=quiet or self.rank != 0,
                         on_epoch=on_epoch if self.rank == 0 else None)
        if self.schedule != "simultaneous":
            raise BpfreeError(f"--parallel pipelines stages that train at the same time; the {self.schedule} "
                              f"schedule trains one stage after another: run it in one process")
        self.clock = {"compute_s": 0.0, "wait_s": 0.0, "comm_s": 0.0}
        costs = [stage_costs(self, self.phases[0])] if self.rank == 0 else [None]
        dist.broadcast_object_list(costs, src=0)
        self.costs = costs[0]
        self.groups = partition(self.costs, self.world)
        self.mine = self.groups[self.rank]
        comm = torch.device(self.device) if dist.get_backend() == "nccl" else torch.device("cpu")
        self.inbox = Link(self.rank - 1, comm, in_flight, self.clock) if self.rank > 0 else None
        self.outbox = Link(self.rank + 1, comm, in_flight, self.clock) if self.rank < self.world - 1 else None
        # a top-down rule's signals travel the other way: from rank r+1 to rank r
        top_down = rule.top_down
        self.signal_in = Link(self.rank + 1, comm, in_flight, self.clock) if top_down and self.outbox else None
        self.signal_out = Link(self.rank - 1, comm, in_flight, self.clock) if top_down and self.inbox else None
        self.in_flight, self.message_bytes = in_flight, 0

    # --- training ------------------------------------------------------------------------
    def _batches(self, x, y, idx_of):
        """This rank's inputs batch by batch: read from the data (rank 0) or received."""
        for i, idx in enumerate(idx_of):
            if self.inbox is None:
                yield i, (x[idx],), y[idx]
            else:
                *message, labels = self.inbox.recv()
                yield i, tuple(message), labels

    def _train_epoch(self, phase: Phase, epoch: int) -> dict:
        stages = self.rule.stages
        for k in self.mine:
            if k in phase.stages:
                stages[k].train()
                stages[k].requires_grad_(True)
            else:
                _freeze(stages[k])
            stages[k].stats.reset()
        x, y = self.data.x_train, self.data.y_train
        if phase.rows is not None:
            x, y = x[phase.rows], y[phase.rows]
        steps, bs = self.steps(phase), min(self.cfg.batch_size, len(y))
        if self.inbox is None:
            perm = torch.randperm(len(y), generator=self.shuffle).to(self.device)
            idx_of = [perm[i * bs:(i + 1) * bs] for i in range(steps)]
        else:
            idx_of = [None] * steps
        begin = time.perf_counter()
        bar = tqdm(self._batches(x, y, idx_of), total=steps, desc=f"epoch {epoch}", leave=False,
                   disable=self.quiet, file=sys.stderr)          # rank 0 only: the others are quiet
        for i, message, labels in bar:
            computing = time.perf_counter()
            for k in self.mine:
                if k not in phase.stages:
                    with torch.no_grad():
                        message = stages[k](*message)
                elif i == 0:   # activation memory on the first step of every epoch, as in one process
                    message, nbytes = saved_activation_bytes(stages[k], stages[k].step, message, labels)
                    self.activation_bytes[k] = max(self.activation_bytes[k], nbytes)
                else:
                    message = stages[k].step(message, labels)
            self.clock["compute_s"] += time.perf_counter() - computing
            if self.outbox is not None:
                self.outbox.send((*message, labels))
                self.message_bytes = self.outbox.last_bytes
            if self.rule.top_down:
                self._top_down(phase, labels)
            if os.environ.get(KILL_AT) == f"{self.rank}:{epoch}:{i}":
                os.kill(os.getpid(), signal.SIGKILL)
            if i % 20 == 0 or i == steps - 1:
                self._check_finite(phase, epoch, i)
        for link in (self.outbox, self.signal_out):
            if link is not None:
                link.flush()
        elapsed = torch.tensor([time.perf_counter() - begin], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)    # the epoch ends when the last rank is done
        self._sync_weights()
        return {"epoch_time_s": float(elapsed), "train_samples": steps * bs}

    def _top_down(self, phase: Phase, labels: torch.Tensor) -> None:
        """The batch's way back: wait for the signal from the rank above, run this rank's stages'
        `feedback` top-down, pass the signal on down, then apply this rank's updates (so the ranks'
        updates overlap; the next batch starts only once they are done, as in one process)."""
        mine = [k for k in self.mine if k in phase.stages]
        if not mine:                  # frozen stages (a reused prefix) learn nothing: no signal comes
            return
        signal = self.signal_in.recv() if self.signal_in is not None else ()
        computing = time.perf_counter()
        for k in reversed(mine):
            signal = self.rule.stages[k].feedback(signal, labels)
        below = self.groups[self.rank - 1] if self.signal_out is not None else []
        if any(k in phase.stages for k in below):
            self.signal_out.send(signal)
        for k in mine:
            self.rule.stages[k].update()
        self.clock["compute_s"] += time.perf_counter() - computing

    def _sync_weights(self) -> None:
        """Every rank gets every stage's current weights and buffers from the stage's owner."""
        with torch.no_grad():
            for owner, group in enumerate(self.groups):
                for k in group:
                    tensors = list(self.rule.stages[k].state_dict().values())
                    for dtype in dict.fromkeys(t.dtype for t in tensors):
                        same = [t for t in tensors if t.dtype == dtype]
                        flat = (torch.cat([t.reshape(-1) for t in same]) if owner == self.rank else
                                torch.empty(sum(t.numel() for t in same), dtype=dtype, device=same[0].device))
                        dist.broadcast(flat, src=owner)
                        if owner != self.rank:
                            offset = 0
                            for t in same:
                                t.copy_(flat[offset:offset + t.numel()].view(t.shape))
                                offset += t.numel()

    # --- evaluation ----------------------------------------------------------------------
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[Optional[float]]]:
        if len(y) == 0:
            return float("nan"), []
        stages = self.rule.stages
        stages.eval()
        for link in (self.inbox, self.outbox):   # the reported wait / communication times are training's
            if link is not None:
                link.clock = {"wait_s": 0.0, "comm_s": 0.0}
        hits = torch.zeros(len(stages), dtype=torch.float64)
        has_readout = torch.zeros(len(stages), dtype=torch.float64)
        starts = range(0, len(y), EVAL_BATCH)
        with torch.no_grad():
            for _, message, labels in self._batches(x, y, [slice(i, i + EVAL_BATCH) for i in starts]):
                for k in self.mine:
                    message = stages[k](*message)
                    scores = stages[k].readout(message)
                    if scores is not None:
                        hits[k] += float((scores.argmax(1) == labels).sum())
                        has_readout[k] = 1.0
                if self.outbox is not None:
                    self.outbox.send((*message, labels))
        if self.outbox is not None:
            self.outbox.flush()
        for link in (self.inbox, self.outbox):
            if link is not None:
                link.clock = self.clock
        dist.all_reduce(hits)
        dist.all_reduce(has_readout)
        accs = [float(h) / len(y) if r else None for h, r in zip(hits, has_readout)]
        return accs[self.rule.prediction_stage], accs

    # --- metrics and checkpoints ---------------------------------------------------------
    def _gather(self, value) -> list:
        """`value` from every rank, in rank order, on every rank."""
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def _stage_summaries(self, phase: Phase) -> list[dict]:
        mine = {k: self.rule.stages[k].stats.summary() for k in self.mine if k in phase.stages}
        merged = {k: v for part in self._gather(mine) for k, v in part.items()}
        return [merged.get(k, {}) for k in range(len(self.rule.stages))]

    def _save(self) -> None:
        own = {"stages": {k: self.rule.stages[k].training_state() for k in self.mine},
               "torch_rng": torch.get_rng_state(), "activation_bytes": self.activation_bytes}
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(own, parts, dst=0)
        if self.rank != 0:
            return
        stages = {k: s for part in parts for k, s in part["stages"].items()}
        self.activation_bytes = [max(p["activation_bytes"][k] for p in parts) for k in range(len(stages))]
        if self.run:
            state = self._state()
            state["stages"] = [stages[k] for k in range(len(stages))]
            state["rank_torch_rng"] = [p["torch_rng"] for p in parts]
            self.run.write_metrics_rows(self.rows)
            save_checkpoint(self.run.file("checkpoint.pt"), state)

    def resume(self) -> None:
        loaded = [None]
        if self.rank == 0:
            state = load_checkpoint(self.run.file("checkpoint.pt"))
            rows = self.run.read_metrics_rows()[: state["epochs_done"]]
            loaded = [(state, rows)]
        dist.broadcast_object_list(loaded, src=0)
        state, rows = loaded[0]
        if len(rows) != state["epochs_done"]:
            raise BpfreeError("metrics.jsonl has fewer epochs than its checkpoint; cannot resume")
        self._restore(state, rows)
        rank_rng = state.get("rank_torch_rng")
        if rank_rng is not None and len(rank_rng) == self.world:
            torch.set_rng_state(rank_rng[self.rank])

    def _execution(self) -> dict:
        own = {"rank": self.rank, "stages": self.mine, **{k: round(v, 3) for k, v in self.clock.items()},
               "message_bytes": self.message_bytes,
               "activation_bytes": max((self.activation_bytes[k] for k in self.mine), default=0),
               "stage_step_s": [self.costs[k] for k in self.mine]}
        return {"parallel": {"world_size": self.world, "backend": dist.get_backend(),
                             "in_flight": self.in_flight, "ranks": self._gather(own)}}


# --- entry points ----------------------------------------------------------------------------
def _labels_only(data: Data) -> Data:
    """What ranks other than 0 need: labels, sizes and shapes; inputs cut to zero rows."""
    return dataclasses.replace(data, x_train=data.x_train[:0], x_val=data.x_val[:0], x_test=data.x_test[:0])


def check_parallel(rule: Rule, world: int) -> None:
    n = len(rule.stages)
    if world > n:
        why = f" ({rule.stages_note})" if rule.stages_note else ""
        raise BpfreeError(f"--parallel {world} needs at least {world} stages (one or more per process); method "
                          f"{rule.name} has {n} with this model and --blocks{why}")


def run_rank(cfg: RunConfig, out, *, in_flight: int, resume: bool, overwrite: bool, quiet: bool,
             data: Optional[Data], stop_after: Optional[int], on_epoch) -> Optional[dict]:
    """Train as one rank of an initialised process group; rank 0 returns the summary, others None."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run = None
    if rank == 0:
        run, cfg = prepare(cfg, out, resume=resume, overwrite=overwrite)
        data = data if data is not None else load_for(cfg)
        cfg = resolve_split(cfg, data)
        shared = [cfg, _labels_only(data)]
    else:
        shared = [None, None]
    dist.broadcast_object_list(shared, src=0)
    cfg = shared[0]
    if rank != 0:
        data = shared[1]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local))
    device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}" if cfg.device == "cuda" else cfg.device
    rule = build(cfg, data)
    check_parallel(rule, world)
    trainer = PipelineTrainer(rule, data, dataclasses.replace(cfg, device=device), in_flight=in_flight,
                              quiet=quiet, on_epoch=on_epoch)
    if rank == 0:
        open_run(trainer, run, cfg, resume)
    if resume:
        trainer.resume()
    summary = trainer.fit(stop_after=stop_after)
    dist.barrier()      # leave together: no rank tears its connections down while a peer still uses them
    return summary if rank == 0 else None


def _backend(cfg: RunConfig) -> str:
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise BpfreeError(f"the torch.distributed {backend} backend is not available in this PyTorch build; "
                          f"--parallel needs it for --device {cfg.device}")
    return backend


def _in_process_group(cfg: RunConfig, **kwargs) -> Optional[dict]:
    """Join the process group described by the environment (torchrun's variables), train, leave."""
    dist.init_process_group(_backend(cfg), timeout=TIMEOUT)
    rank = dist.get_rank()
    try:
        return run_rank(cfg, **kwargs)
    except RankFailed:
        raise
    except BpfreeError as e:
        e.args = (f"rank {rank}: {e}",)
        raise
    except Exception as e:
        if _is_lost_peer(e):
            raise _lost(rank, "contact with another rank", e) from None
        raise
    finally:
        dist.destroy_process_group()


def _spawned(local_rank: int, world: int, port: int, cfg: RunConfig, kwargs: dict, results) -> None:
    """Body of a process started by `bpfree train --parallel W`."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        summary = _in_process_group(cfg, **kwargs)
    except BpfreeError as e:
        print(f"bpfree: error: {e}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        sys.exit(130)
    if local_rank == 0:
        results.put(summary)
    # Skip interpreter teardown: the work is done and delivered, and a communication thread being
    # destroyed at exit can abort the process (seen once as SIGABRT after a successful run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_parallel(cfg: RunConfig, out, *, world: int, in_flight: int = 2, resume: bool = False,
                   overwrite: bool = False, quiet: bool = False, data: Optional[Data] = None,
                   stop_after: Optional[int] = None, on_epoch=None) -> Optional[dict]:
    """Train with the stages spread over `world` processes.

    Under torchrun (RANK in the environment) this process is one rank (`world` 0: torchrun's world
    size). Otherwise it checks every setting here, spawns `world` local processes and waits for them.
    """
    if in_flight < 1:
        raise BpfreeError(f"--in-flight must be a positive integer, got {in_flight}")
    kwargs = dict(out=out, in_flight=in_flight, resume=resume, overwrite=overwrite, quiet=quiet, data=data,
                  stop_after=stop_after, on_epoch=on_epoch)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launched = int(os.environ["WORLD_SIZE"])
        if world and world != launched:
            raise BpfreeError(f"--parallel {world} does not match the launcher's world size {launched}; "
                              "give --parallel without a number under torchrun")
        return _in_process_group(cfg, **kwargs)
    if world < 1:
        raise BpfreeError("--parallel without a number works only under torchrun; outside it give the "
                          "number of processes, e.g. --parallel 2")
    # Check everything here, where an error is one line and nothing has been started.
    _, checked = prepare(cfg, out, resume=resume, overwrite=overwrite)
    _backend(checked)
    probe = data if data is not None else load_for(checked)
    cfg = checked = resolve_split(checked, probe)   # measured once, here: every rank uses the same split
    rule = build(checked, probe)
    check_parallel(rule, world)
    if plan_phases(rule, checked)[0] != "simultaneous":
        raise BpfreeError("--parallel pipelines stages that train at the same time; the sequential schedule "
                          "trains one stage after another: run it in one process")
    results = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(_spawned, args=(world, _free_port(), cfg, kwargs, results), nprocs=world,
                                 join=False, start_method="spawn")
    try:
        while not context.join(timeout=1.0):
            pass
    except mp.ProcessExitedException as e:
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        raise RankFailed(f"rank {e.error_index} (pid {e.error_pid}) {how}; the other ranks were stopped"
                         f"{_kept(out)}", exit_code=e.exit_code if e.exit_code in (2, 3) else 1) from None
    except mp.ProcessRaisedException as e:
        cause = str(e).strip().splitlines()[-1]
        raise RankFailed(f"rank {e.error_index} failed: {cause}; the other ranks were stopped{_kept(out)}") from None
    return results.get()


def _kept(out) -> str:
    return f"; the last checkpoint in {out} is intact: continue with --resume" if out else ""

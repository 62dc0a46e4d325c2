"""Communicators: everything that differs between training in one process and on W ranks.

The Trainer runs one loop and asks its communicator which stages this process holds, where a
batch comes from and where the outgoing message goes, where the top-down signal comes from and
goes, and for the collectives at the end of an epoch. `LocalComm` is the world of one process:
every batch comes from the data, every send is a no-op, every collective the identity.
`PipelineComm` is one rank of a torch.distributed group (gloo on CPU, nccl on CUDA):

    rank 0: stages 0..a  --(message, labels)-->  rank 1: stages a+1..b  --> ... --> rank W-1
           <--------------- top-down signal (rec-LRA) ----------------

Rank 0 reads the data; each rank `isend`s its outgoing message (all tensors, then the labels) with
a small header (dtype, layout, shape per tensor) and goes on with the next batch while the next
rank works, with at most `in_flight` batches queued per link (back-pressure). A stage's update on
batch t depends only on its own state and the message computed for batch t, so pipelining changes
when work happens, not what is computed: a parallel run reproduces the one-process run exactly
(tested, for any `in_flight`). Rules that draw random numbers inside a step draw them from one
generator per rank, so those match only in distribution.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from ..errors import BpfreeError, first_line
from ..models import partition

HEADER = 64         # int64 slots describing one message: count, then per tensor dtype, layout, ndim, shape
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
# Fault injection for tests of the failure path: "RANK:EPOCH:STEP" makes that rank SIGKILL itself
# (KILL_AT) or stop responding without dying (HANG_AT) once it has finished step STEP of epoch EPOCH.
KILL_AT = "BPFREE_KILL_RANK_AT"
HANG_AT = "BPFREE_HANG_RANK_AT"


class RankFailed(BpfreeError):
    """Another rank failed; this process stops with the failed rank's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def is_lost_peer(e: BaseException) -> bool:
    """A communication failure (a peer died or hung), as opposed to an error of our own."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        mark in str(e) for mark in ("gloo", "Connection closed", "Connection reset", "NCCL")))


def lost(rank: int, peer: str, e: BaseException) -> RankFailed:
    cause = first_line(e).split("] ", 1)[-1][:160]          # drop gloo's source location
    return RankFailed(f"rank {rank}: lost {peer} ({cause}); it probably failed (see its error); "
                      "the last checkpoint is intact: continue with --resume")


def check_pipeline(rule, schedule: str, world: int) -> None:
    """The settings a pipeline of `world` ranks needs; raises before anything starts."""
    n = len(rule.stages)
    if world > n:
        why = f" ({rule.stages_note})" if rule.stages_note else ""
        raise BpfreeError(f"--parallel {world} needs at least {world} stages (one or more per process); method "
                          f"{rule.name} has {n} with this model and --blocks{why}")
    if schedule != "simultaneous":
        raise BpfreeError(f"--parallel pipelines stages that train at the same time; the {schedule} schedule "
                          "trains one stage after another: run it in one process")


class LocalComm:
    """The world of one process: it holds every stage, reads every batch, and talks to nobody."""

    rank, world = 0, 1

    def __init__(self):
        self.clock = {"compute_s": 0.0, "wait_s": 0.0, "comm_s": 0.0}

    @property
    def is_main(self) -> bool:
        """The rank that reads the data, reports progress and writes the run directory."""
        return self.rank == 0

    # --- set-up -------------------------------------------------------------------------------
    def configure(self, cfg):
        """This process's config (a rank may get its own device and thread count)."""
        return cfg

    def share_setup(self, cfg, data):
        """The checked config and the data, as the main rank prepared them."""
        return cfg, data

    def check(self, rule, schedule: str) -> None:
        """Refuse a rule or schedule this world cannot run."""

    def place(self, num_stages: int, measure: Callable[[], list], device: torch.device) -> list[int]:
        """The stages this process holds (`measure()`: seconds per step of each stage; `device`:
        where this process trains)."""
        return list(range(num_stages))

    # --- per batch ----------------------------------------------------------------------------
    def batches(self, source: Callable[[], Iterable], count: int, epoch: Optional[int] = None) -> Iterator:
        """`count` batches of (message, labels): from `source()`, the data (only the main rank reads
        it), or received from the rank below. `epoch` names the training epoch (None: evaluation)."""
        return iter(source())

    def send(self, message, labels: torch.Tensor) -> None:
        """Pass a batch's outgoing message on to the rank above."""

    def recv_signal(self) -> tuple:
        """The top-down signal from the rank above (the top stage starts from nothing)."""
        return ()

    def send_signal(self, signal: tuple, trained) -> None:
        """Pass the top-down signal on to the rank below, if any of its stages learn from it."""

    def flush(self) -> None:
        """Wait until every message posted has been delivered."""

    # --- collectives --------------------------------------------------------------------------
    def max(self, value: float) -> float:
        return value

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        return t

    def gather(self, value) -> list:
        """`value` from every rank, in rank order, on every rank."""
        return [value]

    def gather_to_main(self, value) -> Optional[list]:
        """`value` from every rank on the main rank; None elsewhere."""
        return [value]

    def from_main(self, make: Callable):
        """`make()` computed on the main rank, delivered to every rank."""
        return make()

    def share_weights(self, stages) -> None:
        """Every rank's copy of every stage gets the weights and buffers of the stage's owner."""

    def barrier(self) -> None:
        """Leave together: no rank tears its connections down while a peer still uses them."""

    def describe(self, activation_bytes: int) -> dict:
        """Summary entries that describe how the run was executed (`activation_bytes`: the peak of
        this process's stages)."""
        return {}


class PipelineComm(LocalComm):
    """One rank of an initialised process group, holding a contiguous group of stages.

    Which stages: with W ranks for S >= W stages, contiguous groups chosen to minimise the slowest
    rank's time per batch, from each stage's step time measured on rank 0 (placement changes speed
    only, never results).
    """

    def __init__(self, in_flight: int):
        super().__init__()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.in_flight, self.groups, self.costs = in_flight, [], []
        self.inbox = self.outbox = self.signal_in = self.signal_out = None
        self.training, self.message_bytes = False, 0      # the largest training message sent up
        self.fault = next(((how, tuple(map(int, at[1:]))) for how, at in
                           (("kill", os.environ.get(KILL_AT, "").split(":")),
                            ("hang", os.environ.get(HANG_AT, "").split(":"))) if at[0] == str(self.rank)), None)

    def configure(self, cfg):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local))
        if cfg.device == "cuda":
            return dataclasses.replace(cfg, device=f"cuda:{os.environ.get('LOCAL_RANK', self.rank)}")
        return cfg

    def share_setup(self, cfg, data):
        shared = [cfg, data.labels_only()] if self.is_main else [None, None]
        dist.broadcast_object_list(shared, src=0)
        return (cfg, data) if self.is_main else tuple(shared)

    def check(self, rule, schedule: str) -> None:
        check_pipeline(rule, schedule, self.world)

    def place(self, num_stages, measure, device):
        costs = [measure() if self.is_main else None]
        dist.broadcast_object_list(costs, src=0)
        self.costs = costs[0]
        self.groups = partition(self.costs, self.world)
        device = device if dist.get_backend() == "nccl" else torch.device("cpu")   # gloo talks via the host
        below, above = self.rank - 1, self.rank + 1
        link = lambda peer: Link(peer, device, self.in_flight, self.clock)   # noqa: E731
        self.inbox = link(below) if self.rank > 0 else None
        self.outbox = link(above) if above < self.world else None
        self.signal_in = link(above) if self.outbox else None     # top-down signals come from above
        self.signal_out = link(below) if self.inbox else None
        return self.groups[self.rank]

    def batches(self, source, count, epoch=None):
        self.training = epoch is not None
        if self.inbox is None:
            stream = iter(source())
        else:
            stream = ((tuple(m[:-1]), m[-1]) for m in (self.inbox.recv() for _ in range(count)))
        if self.fault is None or epoch != self.fault[1][0]:
            return stream
        return self._failing(stream)

    def _failing(self, stream: Iterator) -> Iterator:
        how, (_, step) = self.fault
        for i, batch in enumerate(stream):
            if i == step + 1:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                while True:          # alive but silent, as a rank stuck in a driver or on a dead disk
                    time.sleep(3600)
            yield batch

    def send(self, message, labels):
        if self.outbox is not None:
            self.outbox.send((*message, labels))
            if self.training:       # metrics report a training batch's message, not an evaluation batch's
                self.message_bytes = max(self.message_bytes, self.outbox.last_bytes)

    def recv_signal(self):
        return self.signal_in.recv() if self.signal_in is not None else ()

    def send_signal(self, signal, trained):
        below = self.groups[self.rank - 1] if self.signal_out is not None else []
        if any(k in trained for k in below):
            self.signal_out.send(signal)

    def flush(self):
        for link in (self.outbox, self.signal_out):
            if link is not None:
                link.flush()

    def max(self, value):
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def sum_(self, t):
        dist.all_reduce(t)
        return t

    def gather(self, value):
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def gather_to_main(self, value):
        parts = [None] * self.world if self.is_main else None
        dist.gather_object(value, parts, dst=0)
        return parts

    def from_main(self, make):
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def share_weights(self, stages):
        for owner, group in enumerate(self.groups):
            for k in group:
                tensors = list(stages[k].state_dict().values())
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

    def barrier(self):
        dist.barrier()

    def describe(self, activation_bytes: int) -> dict:
        own = {"rank": self.rank, "stages": self.groups[self.rank],
               **{k: round(v, 3) for k, v in self.clock.items()},
               "message_bytes": self.message_bytes,
               "activation_bytes": activation_bytes,
               "stage_step_s": [self.costs[k] for k in self.groups[self.rank]]}
        return {"parallel": {"world_size": self.world, "backend": dist.get_backend(),
                             "in_flight": self.in_flight, "ranks": self.gather(own)}}


@contextmanager
def _talking_to(peer: int):
    """Name the neighbour in the error when a point-to-point transfer with it fails."""
    try:
        yield
    except Exception as e:
        if is_lost_peer(e):
            raise lost(dist.get_rank(), f"contact with rank {peer}", e) from None
        raise


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

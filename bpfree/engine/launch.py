"""Starting the ranks of a parallel run: join a torchrun job, or spawn W local processes and
watch them; a lost peer becomes an error that names it.

`torchrun --nproc-per-node W -m bpfree train ... --parallel` (any rendezvous, multi-node included)
starts the processes itself: each joins the group described by the environment. `bpfree train ...
--parallel W` spawns W local processes; when one fails, the others are stopped at once and the
error names the failed rank and its cause. Without a launcher (processes joined by environment
variables alone), a survivor sees gloo's closed connection on its next transfer and exits naming
the peer.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from ..errors import BpfreeError
from .comm import RankFailed, is_lost_peer, lost


def under_torchrun() -> bool:
    """Whether this process was started by a launcher that describes the group in the environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_world(world: Optional[int]) -> None:
    """`--parallel W` agrees with the launcher's world size (W 0 or None: take the launcher's)."""
    launched = int(os.environ["WORLD_SIZE"])
    if world and world != launched:
        raise BpfreeError(f"--parallel {world} does not match the launcher's world size {launched}; "
                          "give --parallel without a number under torchrun")


def backend(device: str) -> str:
    name = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_available() or not dist.is_backend_available(name):
        raise BpfreeError(f"the torch.distributed {name} backend is not available in this PyTorch build; "
                          f"--parallel needs it for --device {device}")
    return name


def join(body: Callable, args: tuple, backend_name: str, timeout_s: float):
    """Join the process group described by the environment, run `body(*args)`, leave. A peer silent
    for `timeout_s` seconds in a transfer or collective (hung, not dead) is declared lost."""
    dist.init_process_group(backend_name, timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    try:
        return body(*args)
    except RankFailed:
        raise
    except BpfreeError as e:
        e.args = (f"rank {rank}: {e}",)
        raise
    except Exception as e:
        if is_lost_peer(e):
            raise lost(rank, "contact with another rank", e) from None
        raise
    finally:
        dist.destroy_process_group()


def spawn(world: int, body: Callable, args: tuple, backend_name: str, timeout_s: float, out=None):
    """Run `body(*args)` on `world` local processes; returns what rank 0's body returned."""
    results = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(_spawned, args=(world, _free_port(), body, args, backend_name, timeout_s, results),
                                 nprocs=world, join=False, start_method="spawn")
    kept = f"; the last checkpoint in {out} is intact: continue with --resume" if out else ""
    try:
        while not context.join(timeout=1.0):
            pass
    except KeyboardInterrupt:                # Ctrl-C or SIGTERM to the launcher: every rank stops
        _stop(context.processes)
        raise
    except mp.ProcessExitedException as e:
        reported = [value for kind, value in _drain(results) if kind == "error"]
        if reported and not e.signal_name:     # the rank said why (e.g. which peer went silent)
            raise RankFailed(f"{reported[0]}; the other ranks were stopped",
                             exit_code=e.exit_code if e.exit_code in (2, 3) else 1) from None
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        raise RankFailed(f"rank {e.error_index} (pid {e.error_pid}) {how}; the other ranks were stopped{kept}",
                         exit_code=e.exit_code if e.exit_code in (2, 3) else 1) from None
    except mp.ProcessRaisedException as e:
        cause = str(e).strip().splitlines()[-1]
        raise RankFailed(f"rank {e.error_index} failed: {cause}; the other ranks were stopped{kept}") from None
    return next(value for kind, value in _drain(results) if kind == "summary")


def _drain(queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def _stop(processes, grace_s: float = 5.0) -> None:
    """Interrupt every live rank (as Ctrl-C would: it exits cleanly, releasing what it holds), then
    terminate any that is still running after `grace_s` (e.g. blocked in a transfer)."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(5)


def _spawned(local_rank: int, world: int, port: int, body: Callable, args: tuple, backend_name: str,
             timeout_s: float, results) -> None:
    """A process started by `spawn`: rank `local_rank` of a one-node group."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # tqdm's default lock is a multiprocessing semaphore, which this process's fast exit (below) never
    # unlinks ("leaked semaphore" warnings); one process writes its own bars: a thread lock is enough
    tqdm.set_lock(threading.RLock())
    try:
        result = join(body, args, backend_name, timeout_s)
    except BpfreeError as e:
        print(f"bpfree: error: {e}", file=sys.stderr, flush=True)
        results.put(("error", str(e)))       # the launcher's message names the cause
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    if local_rank == 0:
        results.put(("summary", result))
    # Skip interpreter teardown: the work is done and delivered, and a communication thread being
    # destroyed at exit can abort the process (seen once as SIGABRT after a successful run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

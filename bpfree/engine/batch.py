"""One batch of the stage protocol: the order every executor runs a rule's stages in, written once.

    for each held stage k, bottom-up:   message = stage_k.step(message, labels)     (trained)
                                        message = stage_k(*message), no grad        (frozen)
    send (message, labels) to the next process (none in one process)
    top-down rules only:
        signal = the signal from the process above (() for the top)
        for each trained held stage k, top-down:  signal = stage_k.feedback(signal, labels)
        send the signal to the process below (none in one process), then every stage_k.update()

The signal goes down before this process applies its updates, so processes update concurrently;
batch t+1 starts only after batch t's updates, exactly as in one process.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def _plain(k: int, what: str, fn: Callable, *args):
    return fn(*args)


def train_batch(stages, held: Sequence[int], trained: Sequence[int], message, labels: torch.Tensor, comm,
                top_down: bool, call: Optional[Callable] = None):
    """Run one batch through the `held` stages (indices into `stages`); returns the outgoing message.

    `call(k, what, fn, *args)` runs each piece of stage k's work (`what`: "step", "forward",
    "feedback" or "update"); executors wrap it to time stages or to measure activation memory.
    """
    call = call or _plain
    for k in held:
        if k in trained:
            message = call(k, "step", stages[k].step, message, labels)
        else:                      # frozen (a reused or already trained prefix): it only passes data on
            with torch.no_grad():
                message = call(k, "forward", stages[k], *message)
    comm.send(message, labels)
    if top_down:
        learning = [k for k in held if k in trained]
        if learning:               # frozen stages learn nothing: no signal comes to them
            signal = comm.recv_signal()
            for k in reversed(learning):
                signal = call(k, "feedback", stages[k].feedback, signal, labels)
            comm.send_signal(signal, trained)
            for k in learning:
                call(k, "update", stages[k].update)
    return message

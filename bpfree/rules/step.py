"""One batch of the stage protocol: the order every executor runs a rule's stages in, written once
(`Rule.train_step` for a user's loop and for the Trainer; the placement probe on copies of stages).

    for each held stage k, bottom-up:   message = stage_k.step(message, labels)     (trained)
                                        message = stage_k(*message), no grad        (frozen; autocast)
    send (message, labels) to the next process (none in one process: `link` None)
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

from ..precision import autocast


def _plain(k: int, what: str, fn: Callable, *args):
    return fn(*args)


class _Alone:
    """The link of one process holding every stage: nothing to send, no signal from above."""

    def send(self, message, labels) -> None:
        pass

    def recv_signal(self) -> tuple:
        return ()

    def send_signal(self, signal, trained) -> None:
        pass


def train_batch(stages, held: Sequence[int], trained: Sequence[int], message, labels: torch.Tensor, link,
                top_down: bool, call: Optional[Callable] = None):
    """Run one batch through the `held` stages (indices into `stages`); returns the outgoing message.

    `link`: where the message goes and the top-down signal comes from (`send`, `recv_signal`,
    `send_signal`: an engine communicator), or None in one process. `call(k, what, fn, *args)` runs
    each piece of stage k's work (`what`: "step", "forward", "feedback" or "update"); executors wrap
    it to time stages or to measure activation memory.
    """
    call = call or _plain
    link = link or _Alone()
    for k in held:
        if k in trained:
            message = call(k, "step", stages[k].step, message, labels)
        else:                      # frozen (a reused or already trained prefix): it only passes data on,
            with torch.no_grad(), autocast(stages[k].precision, labels.device):   # autocast as in its step
                message = call(k, "forward", stages[k], *message)
    link.send(message, labels)
    if top_down:
        learning = [k for k in held if k in trained]
        if learning:               # frozen stages learn nothing: no signal comes to them
            signal = link.recv_signal()
            for k in reversed(learning):
                signal = call(k, "feedback", stages[k].feedback, signal, labels)
            link.send_signal(signal, trained)
            for k in learning:
                call(k, "update", stages[k].update)
    return message

"""End-to-end backpropagation (E2EBP): the baseline, one stage holding the whole network.

    logits = head(f_K(... f_1(x)))
    L      = CE(logits, y)            one loss; its gradient crosses every block (Rumelhart et al. 1986)

Every other rule is measured against this one, on the same network, data, optimizer and schedule.

`--checkpoint blocks`: activation checkpointing (Chen et al. 2016, "Training deep nets with sublinear
memory cost"), the strongest single-process backprop baseline for memory. Each block runs under
`torch.utils.checkpoint` (non-reentrant): the forward pass keeps only each block's input, and the
backward pass recomputes the block's activations from it, one block at a time, before its gradient:

    kept between the passes:  x_0, ..., x_{K-1} (block inputs) + what the head saves
    at block k's backward:    x_0, ..., x_{k-1} + block k's own activations, recomputed

Same gradients and updates as plain E2EBP (tested bit-identical), one more forward pass per block.
Deviations:
- BatchNorm running statistics are restored after each recomputation: torch's checkpoint reruns the
  block in training mode, which would update them a second time per step (measured: momentum applied
  twice, num_batches_tracked counting 2 per step); with the restore they equal plain E2EBP's.
- The head is not checkpointed: its backward runs first, right after the forward pass ends.
Memory as bpfree measures it (`bpfree.memory`): what is kept between the passes (saved-tensor hooks)
plus the largest block's recomputation, counted as the storages it creates (torch saves those through
its own hooks, which the meter cannot see); an upper bound of the step's true peak.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..memory import recomputation
from ..options import option
from .base import LocalOutput, Rule, Stage, class_loss, register_rule

CHECKPOINT = ("off", "blocks")


@contextmanager
def _keep_buffers(module: torch.nn.Module):
    """Undo whatever a recomputation writes to the module's buffers (BatchNorm's running statistics)."""
    saved = [b.clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(module.buffers(), saved):
                b.copy_(s)


@contextmanager
def _recompute(block: torch.nn.Module):
    """A block's recomputation: counted by the activation meter, leaving its buffers as they were."""
    with recomputation(), _keep_buffers(block):
        yield


class WholeNetwork(Stage):
    def __init__(self, net, checkpoint_blocks: bool = False):
        super().__init__("net")
        self.net = net
        self.checkpoint_blocks = checkpoint_blocks

    def forward(self, x):
        return (self.net(x),)

    def local(self, message, labels):
        h = message[0]
        if self.checkpoint_blocks and torch.is_grad_enabled():
            for block in self.net.blocks:
                h = checkpoint(block, h, use_reentrant=False,
                               context_fn=lambda b=block: (nullcontext(), _recompute(b)))
            logits = self.net.head(h)
        else:
            logits = self.net(h)
        return LocalOutput(class_loss(logits, labels), (logits,), logits)

    def readout(self, message):
        return message[0]


@register_rule
class Backprop(Rule):
    name = "backprop"
    locality = "end-to-end: one gradient through every block"
    update_locked = True
    description = "end-to-end backpropagation through all blocks (the baseline; one stage)"
    schedules = ("simultaneous",)
    stages_note = "E2EBP's backward pass crosses every block, so the whole network is one stage"

    @dataclass
    class Options:
        checkpoint: str = option("off", choices=CHECKPOINT,
                                 help="blocks: recompute each block's activations in the backward pass "
                                      "(activation checkpointing: less memory, one more forward pass)")

    def build_stages(self, net, options):
        return [WholeNetwork(net, checkpoint_blocks=options.checkpoint == "blocks")]

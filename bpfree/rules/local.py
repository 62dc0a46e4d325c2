"""The stage shared by block-local rules: a block trained by its own objective on a detached input.

    h_k           = block_k(detach(h_{k-1}))      no gradient leaves the stage
    loss, logits  = objective_k(h_k, y)           updates block_k and the objective's parameters

An *objective* is a small module with `forward(h, labels) -> (loss, logits)` and
`readout(h) -> logits`; rules differ only in the objective they attach to each block
(BWBPF and DGL: `CrossEntropy` of an auxiliary classifier; pred/sim: prediction + similarity).
"""
from __future__ import annotations

from torch import nn

from .base import LocalOutput, Stage, class_loss


class LocalBlock(Stage):
    def __init__(self, name: str, block: nn.Module, objective: nn.Module):
        super().__init__(name)
        self.block, self.objective = block, objective

    def forward(self, x):
        return (self.block(x),)

    def local(self, message, labels):
        h = self.block(message[0])          # message[0] arrives detached: no gradient leaves this stage
        loss, logits = self.objective(h, labels)
        return LocalOutput(loss, (h,), logits)

    def readout(self, message):
        return self.objective.readout(message[0])


class CrossEntropy(nn.Module):
    """Cross-entropy of a classifier on the block's output."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, h, labels):
        logits = self.classifier(h)
        return class_loss(logits, labels), logits

    def readout(self, h):
        return self.classifier(h)

"""End-to-end backpropagation (E2EBP): the baseline, one stage holding the whole network.

    logits = head(f_K(... f_1(x)))
    L      = CE(logits, y)            one loss; its gradient crosses every block (Rumelhart et al. 1986)

Every other rule is measured against this one, on the same network, data, optimizer and schedule.
Deviations: none.
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import LocalOutput, Rule, Stage, register_rule


class WholeNetwork(Stage):
    def __init__(self, net):
        super().__init__("net")
        self.net = net

    def forward(self, x):
        return (self.net(x),)

    def local(self, message, labels):
        logits = self.net(message[0])
        return LocalOutput(F.cross_entropy(logits, labels), (logits,), logits)

    def readout(self, message):
        return message[0]


@register_rule
class Backprop(Rule):
    name = "backprop"
    description = "end-to-end backpropagation through all blocks (the baseline; one stage)"
    schedules = ("simultaneous",)
    stages_note = "E2EBP's backward pass crosses every block, so the whole network is one stage"

    def build_stages(self, net, options):
        return [WholeNetwork(net)]

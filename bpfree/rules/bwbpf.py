"""BWBPF: block-wise BP-free training (Cheng et al., "Unlocking Deep Learning: A BP-Free Approach for
Parallel Block-Wise Training of Neural Networks", arXiv 2312.13311, ICASSP 2024; our spec:
shared/papers/bwbpf-spec.md).

Per batch (every block's update is independent of the others', so they can run in parallel):

    h_k = block_k(detach(h_{k-1}))                   every block sees a detached input
    L_k = CE(aux_k(h_k), y)   updates block_k, aux_k   local error signal of block k
    L   = CE(output(detach(h_K)), y)                  the global loss updates only the output layer

Prediction uses the main path, output(block_K(... block_1(x))), never the aux heads.

Deviations from the paper and its released code, each with why:
* Block inputs are detached: the released code never detaches them, so every loss reaches all
  earlier blocks (end-to-end backprop with deep supervision); that is `--variant deep-supervision`.
* Aux heads pool adaptively: the released fixed kernels (20x20 on a 32x32 map) see only one corner.
* `--aux-head linear` (average pool + one linear layer, the paper's head) is the default;
  `--aux-head conv` is offered because it was the stronger design in shared/evidence/README.md.
* Blocks: the models' K=4 split, which cuts resnet18 at its 4 stages and cnn at its pooling stages
  as the paper cuts ResNets and VGG.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn

from .backprop import WholeNetwork
from .base import LocalOutput, Rule, register_rule
from .heads import AUX_HEADS, make_aux_head
from .local import CrossEntropy, LocalBlock

VARIANTS = ("bp-free", "deep-supervision")


class DeepSupervision(WholeNetwork):
    """The released code's behaviour: end-to-end backprop of final CE + sum of aux CEs (no detach)."""

    def __init__(self, net, aux_heads):
        super().__init__(net)
        self.aux_heads = aux_heads

    def local(self, message, labels):
        h, loss = message[0], 0.0
        for block, aux in zip(self.net.blocks, self.aux_heads):
            h = block(h)
            loss = loss + F.cross_entropy(aux(h), labels)
        logits = self.net.head(h)
        return LocalOutput(loss + F.cross_entropy(logits, labels), (logits,), logits)


@register_rule
class BWBPF(Rule):
    name = "bwbpf"
    description = "block-wise BP-free: each block learns from its aux head, the global loss trains only the output layer"

    @dataclass
    class Options:
        aux_head: str = field(default="linear", metadata={"choices": AUX_HEADS,
                              "help": "auxiliary classifier per block (paper: linear)"})
        aux_width: int = field(default=128, metadata={"positive": True, "help": "channels/units of conv and mlp aux heads"})
        variant: str = field(default="bp-free", metadata={"choices": VARIANTS,
                             "help": "deep-supervision = the released code (no detach; not BP-free)"})

    def build_stages(self, net, options):
        shapes = net.block_shapes()
        heads = [make_aux_head(options.aux_head, s, net.num_classes, options.aux_width) for s in shapes]
        if options.variant == "deep-supervision":
            return [DeepSupervision(net, nn.ModuleList(heads))]
        blocks = [LocalBlock(f"block{k + 1}", b, CrossEntropy(h)) for k, (b, h) in enumerate(zip(net.blocks, heads))]
        # The output layer is a stage of its own: an identity "block" whose objective is the global loss.
        return blocks + [LocalBlock("output", nn.Identity(), CrossEntropy(net.head))]

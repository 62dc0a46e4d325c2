"""BWBPF: block-wise BP-free training (Cheng et al., "Unlocking Deep Learning: A BP-Free Approach for
Parallel Block-Wise Training of Neural Networks", arXiv 2312.13311, ICASSP 2024; our spec:
shared/papers/bwbpf-spec.md; released code: Belis0811/BWBPF, distributed/ResNet_4out.py + Main_4out.py).

Per batch (every stage's update is independent of the others', so they can run in parallel):

    h_k = block_k(detach(h_{k-1}))                   every block sees a detached input
    L_k = CE(aux_k(h_k), y)        k < K             updates block_k and aux_k (local error signal)
    L   = CE(output(h_K), y)                         the global loss updates block_K and the output
                                                     layer together (the released optimizer groups
                                                     layer4 with fc4: K-1 aux heads)

`--global-loss output-only` is the abstract's reading instead ("the global loss is responsible only
for the output layer"): block K gets an aux head of its own and the output layer is a stage apart,
trained on detach(h_K). Prediction uses the main path, output(block_K(... block_1(x))), never an
aux head.

Deviations from the paper and its released code, each with why:
* Block inputs are detached: the released code never detaches them, so every loss reaches all
  earlier blocks (end-to-end backprop with deep supervision); that is `--variant deep-supervision`
  (the released code's K-1 aux losses plus the global loss, one stage).
* Aux heads pool adaptively: the released fixed kernels (20x20 on a 32x32 map) see only one corner.
* `--aux-head linear` (average pool + one linear layer, the released head) is the default;
  `--aux-head conv` (conv3x3 with the block's own C channels, BN, ReLU, 2x2 pool, linear) is offered
  because it was the stronger design in shared/evidence/README.md; `mlp` is DGL's (heads.py).
* Blocks: the models' K=4 split, which cuts resnet18 at its 4 stages and cnn at its pooling stages
  as the paper cuts ResNets and VGG. The released ResNet ends in a linear layer on the average-pooled
  map, as bpfree's models do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..errors import BpfreeError
from ..options import option
from .backprop import WholeNetwork
from .base import LocalOutput, Rule, class_loss, register_rule
from .heads import make_aux_head
from .local import CrossEntropy, LocalBlock

VARIANTS = ("bp-free", "deep-supervision")
GLOBAL_LOSS = ("last-block", "output-only")
HEADS = ("linear", "mlp", "conv")


class DeepSupervision(WholeNetwork):
    """The released code's behaviour: end-to-end backprop of the final CE plus the aux CEs of blocks
    1..K-1 (no detach: every loss reaches every block below it)."""

    def __init__(self, net, aux_heads):
        super().__init__(net)
        self.aux_heads = aux_heads

    def local(self, message, labels):
        h, loss = message[0], 0.0
        for k, block in enumerate(self.net.blocks):
            h = block(h)
            if k < len(self.aux_heads):
                loss = loss + class_loss(self.aux_heads[k](h), labels)
        logits = self.net.head(h)
        return LocalOutput(loss + class_loss(logits, labels), (logits,), logits)


@register_rule
class BWBPF(Rule):
    name = "bwbpf"
    locality = "strictly local: a block learns from its own input and the labels"
    description = ("block-wise BP-free: blocks 1..K-1 learn from their aux heads, the global loss trains the "
                   "last block with the output layer (released code; --global-loss output-only: the output layer alone)")

    @dataclass
    class Options:
        aux_head: str = option("linear", choices=HEADS,
                               help="auxiliary classifier per block (released code: linear)")
        aux_width: Optional[int] = option(None, positive=True,
                                          help="channels of the conv head / width of the mlp head (default: "
                                               "the block's own)")
        variant: str = option("bp-free", choices=VARIANTS,
                              help="deep-supervision = the released code (no detach; not BP-free)")
        global_loss: str = option("last-block", choices=GLOBAL_LOSS,
                                  help="what the global loss trains: the last block and the output layer "
                                       "(released code) or the output layer alone (the abstract)")

        def validate(self) -> None:
            if self.variant == "deep-supervision" and self.global_loss == "output-only":
                raise BpfreeError("--global-loss output-only needs --variant bp-free: without the detach the "
                                  "global loss reaches every block")

    def build_stages(self, net, options):
        own_head = options.global_loss == "output-only"          # block K has an aux head of its own
        n_aux = net.num_blocks if own_head else net.num_blocks - 1
        heads = [make_aux_head(options.aux_head, s, net.num_classes, options.aux_width, net.per_position)
                 for s in net.block_shapes()[:n_aux]]
        if options.variant == "deep-supervision":
            return [DeepSupervision(net, nn.ModuleList(heads))]
        stages = [LocalBlock(f"block{k + 1}", b, CrossEntropy(h)) for k, (b, h) in enumerate(zip(net.blocks, heads))]
        if own_head:   # the output layer is a stage of its own: an identity "block" whose objective is the global loss
            return stages + [LocalBlock("output", nn.Identity(), CrossEntropy(net.head))]
        return stages + [LocalBlock(f"block{net.num_blocks}", net.blocks[-1], CrossEntropy(net.head))]

"""DGL: decoupled greedy learning (Belilovsky, Eickenberg, Oyallon, "Decoupled Greedy Learning of CNNs",
ICML 2020, arXiv 1901.08164; released code: eugenium/DGL, auxiliary_nets_study/ and learning_curves/).

    h_k = block_k(detach(h_{k-1}))
    L_k = CE(aux_k(h_k), y)        k < K: updates block_k and its auxiliary network
    L_K = CE(head(h_K), y)         the last block trains through the network's own output head

Schedules:
* simultaneous (default; "decoupled"): every block updates on every batch, in parallel in principle;
* sequential ("greedy", layer-wise): block k trains to completion and is frozen before k+1 starts.

The auxiliary networks are DGL's, under DGL's names (heads.py): `mlp-sr` (the default of DGL's code:
spatial averaging to 1/4 of the side, three 1x1 conv-BN-ReLU layers, averaging to 2x2, an MLP with
three hidden Linear-BN-ReLU layers of width 4C), `mlp` (the same without the 1x1 convolutions) and
`cnn` (two 3x3 conv-BN-ReLU layers, 2x2 averaging, BN, linear). `linear` and `conv` are offered
for comparison with bwbpf. The default is mlp-sr on feature maps and mlp on vectors (an mlp's
blocks) and tokens: on a vector, mlp-sr's 1x1 convolutions are three more dense layers as wide as
the block, which doubled the head's FLOPs for no spatial reduction to make.

Deviations, each with why:
* The last block trains through the model's head (GAP + linear for bpfree's conv nets), not DGL's
  pooled 2-hidden-layer MLP: every rule trains the same network, so the comparison is of rules.
* bpfree's models and blocks (e.g. cnn split into K=4), not DGL's CIFAR networks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..options import option
from .base import Rule, register_rule
from .heads import AUX_HEADS, make_aux_head
from .local import CrossEntropy, LocalBlock


@register_rule
class DGL(Rule):
    name = "dgl"
    locality = "strictly local: a block learns from its own input and the labels"
    description = ("decoupled greedy learning: each block trained by its own aux network (DGL's mlp-sr on maps, mlp "
                   "on vectors; simultaneous or greedy)")

    @dataclass
    class Options:
        aux_head: Optional[str] = option(None, choices=AUX_HEADS,
                                         help="auxiliary network per block (default: DGL's mlp-sr on feature"
                                              " maps, its mlp on vectors and tokens)")
        aux_width: Optional[int] = option(None, positive=True,
                                          help="channels W of the aux convs, MLP width 4W (default: the "
                                               "block's own C)")

    def build_stages(self, net, options):
        shapes = net.block_shapes()
        objectives = [CrossEntropy(make_aux_head(options.aux_head or ("mlp-sr" if len(s) == 3 else "mlp"), s,
                                                 net.num_classes, options.aux_width, net.per_position))
                      for s in shapes[:-1]] + [CrossEntropy(net.head)]
        return [LocalBlock(f"block{k + 1}", b, o) for k, (b, o) in enumerate(zip(net.blocks, objectives))]

"""DGL: decoupled greedy learning (Belilovsky, Eickenberg, Oyallon, "Decoupled Greedy Learning of CNNs",
ICML 2020, arXiv 1901.08164).

    h_k = block_k(detach(h_{k-1}))
    L_k = CE(aux_k(h_k), y)        k < K: updates block_k and its aux classifier
    L_K = CE(head(h_K), y)         the last block trains through the network's own output head

Schedules:
* simultaneous (default; "decoupled"): every block updates on every batch, in parallel in principle;
* sequential ("greedy", layer-wise): block k trains to completion and is frozen before k+1 starts.

The aux head is DGL's for CNNs: spatial averaging to 2x2, then a small MLP (`--aux-head mlp`).
Deviations: DGL's default "mlp-sr" head (1x1 convolutions before the pooling) is not implemented;
the other heads of `heads.py` can be chosen instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import Rule, register_rule
from .heads import AUX_HEADS, make_aux_head
from .local import CrossEntropy, LocalBlock


@register_rule
class DGL(Rule):
    name = "dgl"
    description = "decoupled greedy learning: each block trained by its own aux classifier (simultaneous or greedy)"

    @dataclass
    class Options:
        aux_head: str = field(default="mlp", metadata={"choices": AUX_HEADS,
                              "help": "auxiliary classifier per block (DGL: pooled MLP)"})
        aux_width: int = field(default=256, metadata={"positive": True, "help": "hidden units of the aux MLP / conv channels"})

    def build_stages(self, net, options):
        shapes = net.block_shapes()
        objectives = [CrossEntropy(make_aux_head(options.aux_head, s, net.num_classes, options.aux_width))
                      for s in shapes[:-1]] + [CrossEntropy(net.head)]
        return [LocalBlock(f"block{k + 1}", b, o) for k, (b, o) in enumerate(zip(net.blocks, objectives))]

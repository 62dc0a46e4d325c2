"""The LRA-E and rec-LRA rules: options, the feedback matrices, and the cut into one stage per block."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...options import option
from ..base import Rule, refuse, register_rule
from .graph import Graph, Residual, build_graph, entries
from .probe import alignment
from .stage import LRAStage

FEEDBACK_UPDATES = ("transpose", "error-product", "fixed")
SKIP_UPDATES = ("fixed", "kp", "product")
FEEDBACK_INITS = ("forward", "random")


def _feedback_matrices(graph: Graph, opts, num_classes: int) -> dict[str, tuple[int, nn.Parameter]]:
    """Every feedback matrix, name -> (the node whose stage owns it, E), drawn in one fixed order so
    the network's E does not depend on how it is cut into stages."""
    def like(j):
        weight = graph.layers[j].weight.weight
        if opts.feedback_init == "forward":      # E_0 = W_0: Kolen-Pollack's fixed point from the start
            return nn.Parameter(weight.detach().clone())
        return nn.Parameter(torch.randn(weight.shape) * opts.feedback_init_std)
    out = {}
    for k in range(len(graph.nodes) - 1):
        if graph.skip[k]:                    # E_{L->k}: classes x prod(node k's output)
            shape = (num_classes, math.prod(graph.out_shapes[k]))
            out[f"S{k}"] = (k, nn.Parameter(torch.randn(shape) * opts.feedback_init_std))
        else:                                # E_j: the shape of W_j, for each layer reading node k
            for j in entries(graph.nodes[k + 1]):
                out[f"W{j}"] = (k + 1, like(j))
    for k, node in enumerate(graph.nodes):   # inside residual bodies: layer to layer
        if isinstance(node, Residual):
            for j in node.body[1:]:
                out[f"W{j}"] = (k, like(j))
    return out


@dataclass
class LRAOptions:
    beta: float = option(0.1, positive=True,
                         help="target nudge: y_l = phi(h_l - beta d_l) (LRA-E code: 0.1; rec-LRA value "
                              "unverified)")
    gamma: float = option(1.0, min=0.0, help="feedback update scale gamma (LRA-E code: 1.0)")
    feedback_update: str = option("transpose", choices=FEEDBACK_UPDATES,
                                  help="transpose: dE = gamma dW^T (LRA-E code); error-product: dE = -gamma "
                                       "d e^T (rec-LRA Eq. 6 as reported by a port, unverified); fixed: E "
                                       "never changes")
    feedback_init_std: float = option(0.01, positive=True,
                                      help="--feedback-init random and skip links: E ~ N(0, std^2) at start "
                                           "(LRA-E code: 1.0; 0.01 aligns far sooner, measured)")
    feedback_init: str = option("random", choices=FEEDBACK_INITS,
                                help="random: E ~ N(0, std^2) (LRA-E code); forward: E_j starts as a copy of"
                                     " W_j (weight transport: with the transpose rule E_j = W_j from then "
                                     "on, so the paper's premise is gone; a diagnostic that starts much "
                                     "faster), skip links random")
    feedback_lr_mult: float = option(1.0, positive=True,
                                     help="feedback matrices' lr = this x --lr (LRA-E code: same optimizer, "
                                          "1)")
    clip: float = option(1.0, min=0.0,
                         help="update-norm ball radius c per tensor, 0 = off (used in every rec-LRA run; "
                              "value unverified)")
    input_noise: float = option(0.0, min=0.0,
                                help="std of Gaussian noise added to the input in training (rec-LRA "
                                     "appendix: 0.1, unverified)")
    scale_errors: bool = option(True,
                                help="error units per unit of target step, e_l = (z_l - y_l) / beta (ours: "
                                     "the raw z_l - y_l shrinks by beta per layer and is float32 rounding "
                                     "noise 10 layers down); a local derivative: -> phi'(h) d as beta -> 0")
    bn_project: bool = option(True,
                              help="remove from each error what the layer's BatchNorm cancels (per-channel "
                                   "batch mean and xhat component; our BN adaptation: the papers give BN no "
                                   "rule); a local derivative: BN's input Jacobian without 1/sigma")
    decay: float = option(0.0, min=0.0,
                          help="decoupled weight decay of every W and learned E: p <- p (1 - lr decay) per "
                               "step, AdamW's form on any optimizer (LRA-E code: AdamW, 0.01); E - W shrinks"
                               " by it under the transpose rule (Kolen-Pollack)")
    probe_size: int = option(64, min=0,
                             help="samples of the per-epoch update/gradient alignment probe (0 = off)")


@dataclass
class RecLRAOptions(LRAOptions):
    skip_every: int = option(2, min=1,
                             help="error-skip link from the output every m layers below it (port: 2; "
                                  "unverified)")
    skip_update: str = option("fixed", choices=SKIP_UPDATES,
                              help="learning rule of the skip links E_{L->k}: fixed; kp: dE = gamma e_L "
                                   "z_k^T (the update a forward link z_k -> logits would get, "
                                   "Kolen-Pollack-style); product: dE = -gamma e_L^T d_k (rec-LRA Eq. 6 as a"
                                   " port reports it: grows along E, bounded only by --decay); off under "
                                   "--feedback-update fixed")


@register_rule
class LRAE(Rule):
    name = "lra-e"
    locality = "cross-module feedback: targets sent down from the stage above"
    update_locked = True
    description = ("LRA-E: targets y_l = phi(h_l - beta E e_{l+1}) from the error above, "
                   "Hebbian local updates e_l u_l^T, learned feedback E (Ororbia & Mali 2019; a stage per block)")
    schedules = ("simultaneous",)
    recursive = False
    Options = LRAOptions
    top_down = True

    @property
    def needs_all_stages(self) -> bool:   # the alignment probe runs the stages above each stage
        return self.options.probe_size > 0

    def build_stages(self, net, options):
        refuse(self.name, net, "its targets pass down through each layer's own inverse structure, and "
                               "attention mixes tokens in ways its target rules do not cover", tokens=True)
        graph = build_graph(net, self.recursive, getattr(options, "skip_every", 1))
        feedback, num_nodes = _feedback_matrices(graph, options, net.num_classes), len(graph.nodes)
        # one stage per block: a stage ends where the next node belongs to another block
        cuts = [k for k in range(1, num_nodes) if graph.block[k] != graph.block[k - 1]] + [num_nodes]
        stages, start = [], 0
        for stop in cuts:
            owned = {name: E for name, (k, E) in feedback.items() if start <= k < stop}
            stages.append(LRAStage(graph, start, stop, owned, options, net.num_classes))
            start = stop
        for i, stage in enumerate(stages):
            stage.above = stages[i + 1:]
        return stages

    def alignment(self, x, labels) -> list[float]:
        """The update/gradient cosine of every weight layer, bottom to top (see `probe.alignment`)."""
        return [cosine for stage in alignment(list(self.stages), x, labels) for cosine in stage]


@register_rule
class RecLRA(LRAE):
    name = "reclra"
    locality = "cross-module feedback: targets sent down from the stages above and the output error"
    update_locked = True
    description = ("rec-LRA: LRA-E plus error-skip links from the output every m layers, fixed random by "
                   "default (--skip-update kp|product learn them) (Ororbia et al. 2023; mlp, cnn, resnet18 via "
                   "residual nodes; a stage per block)")
    recursive = True
    Options = RecLRAOptions

"""pred/sim local losses (Nøkland & Eidnes, "Training Neural Networks with Local Error Signals",
ICML 2019, arXiv 1901.06656).

Every block but the last learns, on a detached input, from

    L_pred = CE(W_pred · pool(h), y)                      a linear classifier on pooled features
    L_sim  = || S(conv(h)) - S(onehot(y)) ||²_mean        similarity matching
    L      = (1 - beta) · L_pred + beta · L_sim            beta = 0.99 in the paper

where S(z) is the batch's cosine-similarity matrix: each example's vector (for feature maps, the
per-channel standard deviation over space) is mean-centred and L2-normalised, S = z zᵀ. `conv` is
a 3x3 convolution (a linear map for vector features) used by the sim loss only. The last block is
trained through the network's output head with cross-entropy, as in the paper.
`--loss pred` and `--loss sim` keep one term alone (the paper's "pred" and "sim" columns).

Deviations, each with why:
* pool is an adaptive average pool to at most `--pool-dim` values, the bound the paper's
  dim_in_decoder sets: the classifier stays small whatever the block's map size.
* The paper's dropout, leaky-ReLU and VGG8b are not reproduced: every rule trains bpfree's models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Rule, register_rule
from .local import CrossEntropy, LocalBlock

LOSSES = ("predsim", "pred", "sim")


def similarity_matrix(z: torch.Tensor) -> torch.Tensor:
    """Cosine similarities between the examples of a batch (mean-centred, as in the paper's code)."""
    if z.dim() == 4:
        z = z.flatten(2).std(dim=2)                   # (B, C): per-channel spread over space
    z = z.flatten(1)
    z = z - z.mean(dim=1, keepdim=True)
    z = z / (z.norm(dim=1, keepdim=True) + 1e-8)
    return (z @ z.t()).clamp(-1, 1)


class PredSim(nn.Module):
    def __init__(self, in_shape, num_classes, beta: float, loss: str, pool_dim: int):
        super().__init__()
        self.beta, self.loss, self.num_classes = beta, loss, num_classes
        if len(in_shape) == 3:
            c, h, w = in_shape
            # Average-pool so that the flattened size is at most pool_dim (the paper's dim_in_decoder).
            side = max(1, min(h, int(math.sqrt(pool_dim / c))))
            self.pool = nn.AdaptiveAvgPool2d(side)
            self.sim_map = nn.Conv2d(c, c, 3, padding=1, bias=False)
            d = c * side * side
        else:
            self.pool = nn.Identity()
            self.sim_map = nn.Linear(in_shape[0], in_shape[0], bias=False)
            d = in_shape[0]
        self.classifier = nn.Sequential(self.pool, nn.Flatten(), nn.Linear(d, num_classes))

    def forward(self, h, labels):
        logits = self.classifier(h)
        pred = F.cross_entropy(logits, labels)
        if self.loss == "pred":
            return pred, logits
        target = similarity_matrix(F.one_hot(labels, self.num_classes).float())
        sim = F.mse_loss(similarity_matrix(self.sim_map(h)), target)
        if self.loss == "sim":
            return sim, logits.detach()        # the readout is reported but not trained
        return (1 - self.beta) * pred + self.beta * sim, logits

    def readout(self, h):
        return self.classifier(h)


@register_rule
class PredSimRule(Rule):
    name = "predsim"
    description = "Nøkland & Eidnes local losses: prediction + similarity matching per block"

    @dataclass
    class Options:
        loss: str = field(default="predsim", metadata={"choices": LOSSES, "help": "local loss of hidden blocks"})
        beta: float = field(default=0.99, metadata={"min": 0.0, "max": 1.0, "help": "weight of the sim loss in predsim"})
        pool_dim: int = field(default=2048, metadata={"positive": True, "help": "max flattened size fed to the pred classifier"})

    def build_stages(self, net, options):
        shapes = net.block_shapes()
        objectives = [PredSim(s, net.num_classes, options.beta, options.loss, options.pool_dim)
                      for s in shapes[:-1]] + [CrossEntropy(net.head)]
        return [LocalBlock(f"block{k + 1}", b, o) for k, (b, o) in enumerate(zip(net.blocks, objectives))]

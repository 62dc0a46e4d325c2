"""pred/sim local losses (Nøkland & Eidnes, "Training Neural Networks with Local Error Signals",
ICML 2019, arXiv 1901.06656; released code: anokland/local-loss, train.py).

Every block k, the last included, learns on a detached input from its output *before* the pooling
layer it ends with (the reference computes each layer's loss before the max-pool that follows it):

    a_k    = body_k(pool_{k-1}(detach(a_{k-1})))          body_k: block k without its trailing pool
    L_pred = CE(W_k · avgpool(a_k), y)                    W_k starts at zero (the reference's decoder_y)
    L_sim  = mean((S(conv_k(a_k)) - S(onehot(y)))²)       similarity matching
    L_k    = (1 - beta) · L_pred + beta · L_sim            beta = 0.99
    output layer:  L = CE(V · avgpool(N(pool_K(detach(a_K)))), y)   trained alone, on the detached
                                                                     last map; V starts at zero

N standardises each channel with batch statistics (running ones at test time) and has no parameters;
avgpool is the decoders' (to at most `--pool-dim` values, flattened), as the reference's output layer
reads its last map flattened. On vector features (the mlp) V is the model's head.

S(z) is the batch's cosine-similarity matrix: each example's vector (for a feature map with more than
one position and more than 3 channels, its per-channel standard deviation over space; otherwise the
flattened map) is mean-centred and L2-normalised, S = z zᵀ. conv_k is a 3x3 convolution (a linear
map for vector features) used by the sim loss only. Stage k sends a_k on; block k's pooling layer
runs at the start of stage k+1 (on a detached input, so it saves nothing for backward).
`--loss pred` and `--loss sim` keep one term alone (the paper's "pred" and "sim" columns).

On transformer blocks (`vit`: tokens (T, D), one class per example) the losses read pooled tokens:
L_pred = CE(W_k · mean_t(a_k), y) and L_sim on S(mean_t(conv_k(a_k))) with conv_k a linear map per
token; the output layer is the model's head (LayerNorm, pooling, Linear; its weight started at zero,
no N: the head's LayerNorm holds the scale). A language model is refused: S compares examples, and
it has a label per token.

Deviations, each with why:
* avgpool is adaptive, to at most `--pool-dim` values (the reference doubles an AvgPool2d kernel to
  the same bound, dim_in_decoder: 2048 in its CIFAR-10 runs): one rule for any map size.
* The output loss is not scaled by (1 - beta) as in the reference: under Adam (its optimizer and
  ours) that factor changes nothing, and the logged loss stays a plain cross-entropy.
* N is ours (`--output-norm false` drops it): the sim loss is blind to the features' scale, and in the
  reference every block ends in BatchNorm, which holds it; bpfree's mlp has none, its features shrank
  ~100x by block 4 on digits and the zero-started output layer, moving ~lr per Adam step, stayed near
  chance for epochs. N keeps the output layer's input at unit scale whatever the blocks do.
* On a map the output layer is not the model's head (GAP + linear for bpfree's conv nets) but V, as
  above: the sim loss shapes each channel's spread over space, which a global average discards
  (`--output-head model` keeps the model's head, weight started at zero); the reference's VGGs also
  add a locally trained hidden FC layer before it, which bpfree's models do not have.
* Blocks are bpfree's (K of them, each a group of layers) rather than every conv layer; the
  reference's dropout, leaky-ReLU and VGG8b are not reproduced: every rule trains bpfree's models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.modes import evaluating
from ..models.transformer import Pool
from ..options import option
from .base import Rule, refuse, register_rule
from .local import CrossEntropy, LocalBlock

LOSSES = ("predsim", "pred", "sim")
OUTPUT_HEADS = ("flatten", "model")
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)


def similarity_matrix(z: torch.Tensor) -> torch.Tensor:
    """Cosine similarities between the examples of a batch (mean-centred, as in the reference code)."""
    if z.dim() == 4 and z.shape[1] > 3 and z.shape[2] * z.shape[3] > 1:
        z = z.flatten(2).std(dim=2)                   # (B, C): per-channel spread over space
    z = z.flatten(1)                                  # a 1x1 map or few channels: the values themselves
    z = z - z.mean(dim=1, keepdim=True)
    z = z / (z.norm(dim=1, keepdim=True) + 1e-8)
    return (z @ z.t()).clamp(-1, 1)


def split_trailing_pool(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, pool): `block` without the pooling layer it ends with, and that layer (nn.Identity() if
    it ends with none). Both reuse the block's modules: pool(body(x)) computes block(x)."""
    if isinstance(block, _POOLS):
        return nn.Identity(), block
    if isinstance(block, nn.Sequential) and len(block):
        body, pool = split_trailing_pool(block[-1])
        if not isinstance(pool, nn.Identity):
            rest = list(block)[:-1] + ([] if isinstance(body, nn.Identity) else [body])
            return nn.Sequential(*rest), pool
    return block, nn.Identity()


def pooled_linear(in_shape, num_classes: int, pool_dim: int) -> nn.Sequential:
    """Linear class scores from a map average-pooled to at most `pool_dim` values and flattened (the
    reference's dim_in_decoder), or from a vector; the weight starts at zero, as the reference's."""
    pool, d = nn.Identity(), in_shape[-1]
    if len(in_shape) == 2:                      # tokens (T, D): their mean
        pool = Pool("mean")
    elif len(in_shape) == 3:
        c, h, _ = in_shape
        side = max(1, min(h, int(math.sqrt(pool_dim / c))))
        pool, d = nn.AdaptiveAvgPool2d(side), c * side * side
    linear = nn.Linear(d, num_classes)
    nn.init.zeros_(linear.weight)
    return nn.Sequential(pool, nn.Flatten(), linear)


class PredSim(nn.Module):
    def __init__(self, in_shape, num_classes, beta: float, loss: str, pool_dim: int):
        super().__init__()
        self.beta, self.loss, self.num_classes = beta, loss, num_classes
        c = in_shape[0] if len(in_shape) == 3 else in_shape[-1]      # channels, features or token width
        self.sim_map = nn.Conv2d(c, c, 3, padding=1, bias=False) if len(in_shape) == 3 else nn.Linear(c, c, bias=False)
        self.tokens = len(in_shape) == 2
        self.classifier = pooled_linear(in_shape, num_classes, pool_dim)     # the reference's decoder_y

    def forward(self, h, labels):
        logits = self.classifier(h)
        pred = F.cross_entropy(logits, labels)
        if self.loss == "pred":
            return pred, logits
        target = similarity_matrix(F.one_hot(labels, self.num_classes).float())
        z = self.sim_map(h)
        sim = F.mse_loss(similarity_matrix(z.mean(1) if self.tokens else z), target)
        if self.loss == "sim":
            return sim, logits.detach()        # the readout is reported but not trained
        return (1 - self.beta) * pred + self.beta * sim, logits

    def readout(self, h):
        return self.classifier(h)


@torch.no_grad()
def _body_shapes(net, parts) -> list[tuple[int, ...]]:
    """Output shape of each block's body (before its trailing pool), and last the shape after the last
    block's pool, traced in eval mode."""
    x, shapes = torch.zeros(2, *net.in_shape), []
    with evaluating(net):
        for body, pool in parts:
            x = body(x)
            shapes.append(tuple(x.shape[1:]))
            x = pool(x)
    return shapes + [tuple(x.shape[1:])]


def _zero_last_linear(head: nn.Module) -> None:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if linears:
        nn.init.zeros_(linears[-1].weight)       # as the reference's output layer under local learning


@register_rule
class PredSimRule(Rule):
    name = "predsim"
    locality = "strictly local: a block learns from its own input and the labels"
    description = ("Nøkland & Eidnes local losses: prediction + similarity matching on every block (before "
                   "its pooling); the output layer trained alone on the detached last features")
    predicts_through = "its own output layer on the last block's pooled, standardised features (not the model's head)"

    @dataclass
    class Options:
        loss: str = option("predsim", choices=LOSSES, help="local loss of the blocks")
        beta: float = option(0.99, min=0.0, max=1.0, help="weight of the sim loss in predsim")
        pool_dim: int = option(2048, positive=True, help="max flattened size fed to the pred classifier")
        output_head: str = option("flatten", choices=OUTPUT_HEADS,
                                  help="output layer on a map: flatten (linear on the map pooled to at most "
                                       "--pool-dim values, as the reference's) or model (the model's own "
                                       "head: GAP + linear on bpfree's conv nets)")
        output_norm: bool = option(True,
                                   help="standardise the output layer's input per channel (BatchNorm without"
                                        " affine): the sim loss leaves the features' scale free")

    def build_stages(self, net, options):
        refuse(self.name, net, "its similarity loss compares examples by their one class", per_position=True)
        parts = [split_trailing_pool(b) for b in net.blocks]
        *shapes, last = _body_shapes(net, parts)
        if options.output_head == "flatten" and len(last) == 3:
            head = pooled_linear(last, net.num_classes, options.pool_dim)   # net.head is left unused
        else:
            head = net.head
            _zero_last_linear(head)
        stages, pool = [], nn.Identity()        # pool: the previous block's trailing pooling layer
        for k, ((body, next_pool), shape) in enumerate(zip(parts, shapes)):
            objective = PredSim(shape, net.num_classes, options.beta, options.loss, options.pool_dim)
            block = body if isinstance(pool, nn.Identity) else nn.Sequential(pool, body)
            stages.append(LocalBlock(f"block{k + 1}", block, objective))
            pool = next_pool
        if options.output_norm and len(last) != 2:     # parameter-free: running statistics only
            pool = nn.Sequential(pool, nn.BatchNorm2d(last[0], affine=False) if len(last) == 3
                                 else nn.BatchNorm1d(last[0], affine=False))
        return stages + [LocalBlock("output", pool, CrossEntropy(head))]

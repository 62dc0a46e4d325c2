"""InfoPro: information propagation (Wang, Ni, Song, Yang, Huang, "Revisiting Locally Supervised
Learning: an Alternative to End-to-end Training", ICLR 2021; released code: blackfeather-wang/
InfoPro-Pytorch, "Experiments on CIFAR-SVHN-STL10": networks/resnet.py, auxiliary_nets.py, configs.py,
comand.sh).

Greedy local losses discard task-relevant information too early; InfoPro makes each module keep
information about its input (a decoder must reconstruct the image) while it gains information about
the label (an auxiliary classifier). The network is cut into K modules; the last trains through the
network's own head:

    h_k      = block_k(detach(h_{k-1}))                           h_0 = x, the (augmented) input image
    L_k      = λ1_k · MSE(decoder_k(h_k), x) + λ2_k · L_y(aux_k(h_k), y)      k = 1..K-1
    L_K      = CE(head(h_K), y)
    λ_k      = λ_first · (1 - r_k) + λ_last · r_k,  r_k = (k-1)/(K-2)  (r = 0 when K = 2)
    decoder  : upsample h_k to x's size (bilinear), conv3x3 -> 12·widen, BN, ReLU, conv3x3 -> channels of x
    aux "XcYf": X convs (the first doubles C up to the network's last width, stride 2 while it
               doubles; a second keeps it; conv3x3, BN, ReLU), global average pool, Y linear layers
               (hidden width 128·widen, ReLU); out: the classes (`--aux-loss ce`) or a 128-d embedding
    L_y      : CE (the paper's InfoPro (Softmax)) or `--aux-loss contrast`: the supervised contrastive
               loss of Khosla et al. on the unit-norm embedding, temperature 0.07 (InfoPro (Contrast))

λ_first = (ixx_1, ixy_1) and λ_last = (ixx_2, ixy_2), the released code's names, interpolated over
the K-1 local modules as the released code does. Defaults: the released ResNet-32 CIFAR-10 commands
(comand.sh) for K = 2, 4, 8, 16 (for another K: those of the largest of these not above it):

    K=2: (5, 1) -> (0, 0)    K=4: (6, 0) -> (1, 2)    K=8: (5, 0) -> (0, 2)    K=16: (5, 0.05) -> (0.2, 0.5)

On transformer blocks (token sequences (T, D)), reconstruction is of what the embedding encodes:

    vit:  decoder = per patch token LayerNorm, Linear(D, D·widen), GELU, Linear to the patch's C·p·p
          pixels (the class token is not decoded), folded back into the image; MSE to x, as above
    gpt:  decoder = per token LayerNorm, Linear(D, D·widen), GELU, Linear(·, vocabulary);
          cross-entropy to the input token x_t itself (the discrete form of reconstructing x)
    aux:  LayerNorm, Y linear layers (hidden `--feature-dim`, GELU) on the mean token (per position
          for a language model, predicting the next token); X convs have no meaning across tokens

The image (or the token ids) rides along with the message, (h_k, x), so every module has its
reconstruction target on any executor (under --parallel each rank also ships x). A term weighted 0 is not computed: with
λ2 = 0 (module 1 at K = 4 and 8) the aux net never trains, so that module has no readout (its
classifier would only log chance).

Deviations from the released code, each with why:
* The reconstruction loss is MSE to the normalised image with a linear last layer, not BCE of a
  sigmoid to the image restored to [0, 1]: a stage sees only the normalised input, not the dataset's
  statistics. The released λ1 were tuned for BCE; MSE on normalised pixels weighs errors more.
* `--aux-loss ce` is the default (the released commands use contrast): it gives every module a class
  readout, logged per epoch; contrast modules log their loss only.
* Vector features (mlp) or vector inputs: the decoder is Linear(D, D·widen), BN, ReLU, Linear to the
  flattened input, and the aux convs are 1x1: reconstruction of x from h is the same objective
  without a spatial map.
* The aux convs' widths follow one rule (double, up to the last block's width) instead of the
  released table for 16/32/64 channels, which it reproduces: every model gets an aux net.
* PyTorch's default initialisation, as every bpfree model; the released code re-draws convs He-normal.
* Simultaneous schedule only, as the paper (all modules update on every batch).
* Tokens: the target is the input (patch pixels, token ids), not the input *embedding*: the embedding
  is learned by module 1 itself, so reconstructing it would reward a collapsed embedding. The
  contrastive aux loss is refused on a language model (it compares every pair of B·T positions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BpfreeError
from ..models.transformer import Pool
from ..options import option
from .base import LocalOutput, Rule, Stage, refuse, register_rule
from .local import CrossEntropy

AUX_NETS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")
AUX_LOSSES = ("ce", "contrast")
UPSAMPLE = ("bilinear", "nearest")
# comand.sh, ResNet-32 on CIFAR-10: K -> (ixx_1, ixy_1, ixx_2, ixy_2)
RELEASED_LAMBDAS = {2: (5.0, 1.0, 0.0, 0.0), 4: (6.0, 0.0, 1.0, 2.0), 8: (5.0, 0.0, 0.0, 2.0),
                    16: (5.0, 0.05, 0.2, 0.5)}
TEMPERATURE = 0.07


def released_lambdas(k: int) -> tuple[float, float, float, float]:
    """(ixx_1, ixy_1, ixx_2, ixy_2) of the released command for the largest K in the table not above k."""
    return RELEASED_LAMBDAS[max([n for n in RELEASED_LAMBDAS if n <= k] or [2])]


def lambda_schedule(first: tuple[float, float], last: tuple[float, float], k: int) -> list[tuple[float, float]]:
    """(λ1, λ2) of each of the K-1 local modules, linear from `first` to `last` over depth."""
    n = k - 1
    ratios = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    return [(first[0] * (1 - r) + last[0] * r, first[1] * (1 - r) + last[1] * r) for r in ratios]


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Khosla et al. 2020 with one view: for each anchor, minus the mean log-probability of its
    same-class examples among all others, from unit-norm z (B, D). Anchors without a positive add 0."""
    b = z.shape[0]
    itself = torch.eye(b, dtype=torch.bool, device=z.device)
    sim = (z @ z.t() / temperature).float().masked_fill(itself, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~itself
    mean_positive = log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp(min=1)
    return -mean_positive.mean()


class Contrast(nn.Module):
    """The supervised contrastive loss of an embedding network; no class scores."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, h, labels):
        return supervised_contrastive(F.normalize(self.embed(h), dim=1), labels), None

    def readout(self, h):
        return None


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def aux_net(config: str, shape: tuple[int, ...], last_width: int, out: int, widen: float = 1.0,
            feature_dim: int = 128) -> nn.Module:
    """InfoPro's AuxClassifier `config` ("XcYf": X convs, Y linear layers) for a block output of
    `shape` (C, H, W) or (D,), in a network whose last block has `last_width` channels."""
    convs, fcs = int(config[0]), int(config[2])
    vector = len(shape) == 1
    c = shape[0]
    layers: list[nn.Module] = [nn.Unflatten(1, (c, 1, 1))] if vector else []
    kernel = 1 if vector else 3
    if convs:
        w = min(2 * c, max(c, last_width))           # 16 -> 32, 32 -> 64, 64 -> 64 in a resnet32
        stride = 2 if w > c and not vector else 1
        w = int(w * widen)
        layers += _conv_bn_relu(c, w, kernel, stride)
        if convs == 2:
            layers += _conv_bn_relu(w, w, kernel)
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    hidden = int(feature_dim * widen)
    for _ in range(fcs - 1):
        layers += [nn.Linear(c, hidden), nn.ReLU()]
        c = hidden
    return nn.Sequential(*layers, nn.Linear(c, out))


class Decoder(nn.Module):
    """Reconstructs the input x (shape `image`) from a block output of shape `shape`."""

    def __init__(self, shape: tuple[int, ...], image: tuple[int, ...], widen: float = 1.0, upsample: str = "bilinear"):
        super().__init__()
        self.image, self.upsample = tuple(image), upsample
        self.spatial = len(shape) == 3 and len(image) == 3
        if self.spatial:       # the released Decoder, its sigmoid left out (MSE to normalised pixels)
            w = int(12 * widen)
            self.net = nn.Sequential(nn.Conv2d(shape[0], w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                                     nn.Conv2d(w, image[0], 3, padding=1))
        else:
            d = math.prod(shape)
            w = int(d * widen)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, w), nn.BatchNorm1d(w), nn.ReLU(),
                                     nn.Linear(w, math.prod(image)))

    def loss(self, h, x):
        return F.mse_loss(self(h), x)

    def forward(self, h):
        if self.spatial:
            size = self.image[1:]
            h = (F.interpolate(h, size=size, mode="bilinear", align_corners=True) if self.upsample == "bilinear"
                 else F.interpolate(h, size=size, mode="nearest"))
            return self.net(h)
        return self.net(h).reshape(-1, *self.image)


def patch_size(tokens: int, image: tuple[int, ...]) -> tuple[int, int]:
    """(p, leading): the patch side p such that the image's patches number `tokens` or one fewer (a
    class token first), and how many leading tokens are not patches."""
    c, h, w = image
    for leading in (0, 1):
        n = tokens - leading
        p = round(math.sqrt(h * w / n)) if n > 0 else 0
        if p and n * p * p == h * w and h % p == 0 and w % p == 0:
            return p, leading
    raise BpfreeError(f"method infopro: {tokens} tokens are not the patches of a {h}x{w} image "
                      "(with or without one class token), so the image cannot be reconstructed from them")


class TokenDecoder(nn.Module):
    """Reconstructs the input from tokens (B, T, D): a vit's image from its patch tokens (MSE), or a
    language model's input token ids at every position (cross-entropy)."""

    def __init__(self, shape: tuple[int, int], image: tuple[int, ...], vocab: int, widen: float = 1.0):
        super().__init__()
        dim, w = shape[1], int(shape[1] * widen)
        self.image = tuple(image)
        self.ids = len(image) == 1
        if not self.ids:
            self.patch, self.leading = patch_size(shape[0], self.image)
        out = vocab if self.ids else image[0] * self.patch ** 2
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, w), nn.GELU(), nn.Linear(w, out))

    def loss(self, h, x):
        y = self.net(h)
        if self.ids:
            return F.cross_entropy(y.flatten(0, 1), x.flatten())
        c, side_h, side_w = self.image
        y = y[:, self.leading:].transpose(1, 2)                             # (B, C·p·p, patches)
        image = F.fold(y, (side_h, side_w), self.patch, stride=self.patch)
        return F.mse_loss(image, x)


def token_aux(dim: int, out: int, fcs: int, hidden: int, per_position: bool) -> nn.Module:
    """InfoPro's aux net on tokens: LayerNorm, `fcs` linear layers (hidden width, GELU), on the mean
    token or at every position."""
    layers: list[nn.Module] = ([] if per_position else [Pool("mean")]) + [nn.LayerNorm(dim)]
    for _ in range(fcs - 1):
        layers += [nn.Linear(dim, hidden), nn.GELU()]
        dim = hidden
    return nn.Sequential(*layers, nn.Linear(dim, out))


class InfoProBlock(Stage):
    """One module: its block on detach(h), then λ1 · reconstruction of x + λ2 · the aux loss.
    Messages are (h, x) (the first module gets (x,)); the last module sends (h,) and has no decoder."""

    def __init__(self, name: str, block: nn.Module, objective: nn.Module, decoder: Optional[nn.Module] = None,
                 lambdas: tuple[float, float] = (0.0, 1.0)):
        super().__init__(name)
        self.block, self.objective, self.decoder = block, objective, decoder
        self.lambda_x, self.lambda_y = lambdas

    def forward(self, h, x=None):
        x = h if x is None else x
        out = self.block(h)
        return (out,) if self.decoder is None else (out, x)

    def local(self, message, labels):
        x = message[-1]
        h = self.block(message[0])               # message arrives detached: no gradient leaves this stage
        loss, logits = 0.0 * h.sum(), None      # (a module weighted 0 on both terms learns nothing)
        if self.lambda_y:
            loss_y, logits = self.objective(h, labels)
            loss = loss + self.lambda_y * loss_y
        if self.decoder is not None and self.lambda_x:
            loss = loss + self.lambda_x * self.decoder.loss(h, x)
        return LocalOutput(loss, (h,) if self.decoder is None else (h, x), logits)

    def readout(self, message):
        return self.objective.readout(message[0]) if self.lambda_y else None


@register_rule
class InfoPro(Rule):
    name = "infopro"
    locality = "strictly local: a module learns from its own input, the labels and the image"
    description = ("InfoPro: each module learns λ1·reconstruction of the input image + λ2·aux loss "
                   "(CE or supervised contrastive), λ interpolated over depth; the last module trains through the head")
    schedules = ("simultaneous",)

    @dataclass
    class Options:
        aux_loss: str = option("ce", choices=AUX_LOSSES, help="the aux net's loss: ce (InfoPro (Softmax)) or "
                               "contrast (InfoPro (Contrast), the released commands')")
        aux_net: str = option("1c2f", choices=AUX_NETS, help="aux net: X convs, Y linear layers (released: 1c2f)")
        aux_widen: float = option(1.0, positive=True, help="width multiplier of the aux nets and decoders")
        feature_dim: int = option(128, positive=True, help="hidden width of the aux MLP and the contrast embedding")
        upsample: str = option("bilinear", choices=UPSAMPLE, help="how the decoder resizes h to the image")
        ixx_1: Optional[float] = option(None, min=0.0, help="λ1 (reconstruction) of the first module "
                                        "(default: the released ResNet-32 command for this K)")
        ixy_1: Optional[float] = option(None, min=0.0, help="λ2 (aux loss) of the first module (default: released)")
        ixx_2: Optional[float] = option(None, min=0.0, help="λ1 of the last local module (default: released)")
        ixy_2: Optional[float] = option(None, min=0.0, help="λ2 of the last local module (default: released)")

    def build_stages(self, net, options):
        if options.aux_loss == "contrast":
            refuse(self.name, net, "the contrastive aux loss compares every pair of B·T positions; use "
                                   "--aux-loss ce", per_position=True)
        k = net.num_blocks
        given = (options.ixx_1, options.ixy_1, options.ixx_2, options.ixy_2)
        ixx_1, ixy_1, ixx_2, ixy_2 = (r if g is None else g for g, r in zip(given, released_lambdas(k)))
        lambdas = lambda_schedule((ixx_1, ixy_1), (ixx_2, ixy_2), k)
        shapes = net.block_shapes()
        out = net.num_classes if options.aux_loss == "ce" else options.feature_dim
        stages = []
        hidden = int(options.feature_dim * options.aux_widen)
        for i, (block, shape, lam) in enumerate(zip(net.blocks, shapes, lambdas)):
            if len(shape) == 2:               # tokens (T, D)
                aux = token_aux(shape[1], out, int(options.aux_net[2]), hidden, net.per_position)
                decoder = TokenDecoder(shape, net.in_shape, net.num_classes, options.aux_widen)
            else:
                aux = aux_net(options.aux_net, shape, shapes[-1][0], out, options.aux_widen, options.feature_dim)
                decoder = Decoder(shape, net.in_shape, options.aux_widen, options.upsample)
            objective = CrossEntropy(aux) if options.aux_loss == "ce" else Contrast(aux)
            stages.append(InfoProBlock(f"block{i + 1}", block, objective, decoder, lam))
        return stages + [InfoProBlock(f"block{k}", net.blocks[-1], CrossEntropy(net.head))]

"""Kernel-based strictly modular training (Duan, Yu & Principe, "Modularizing Deep Learning via
Pairwise Learning With Kernels", IEEE TNNLS 2022, arXiv 2005.05541; our notes:
shared/papers/kernel-modular-spec.md and notes-kernel-al.md).

A network is read as linear models stacked on feature maps: the output layer is linear on
phi(F(x)), so the kernel it sees is k(x, x') = <phi(F(x)), phi(F(x'))>. For classification the best
hidden representation is one whose kernel matrix is the *ideal kernel*, a target that needs only
pairwise labels ("same class or not"):

    phi(z)  = unit-L2-normalise(flatten(avgpool(ReLU(z))))        avgpool only for conv maps
    K_ij    = <phi_i, phi_j>                         cosine       (k_min = 0, k_max = 1 on ReLU features)
            | exp(-||phi_i - phi_j||^2 / (2 sigma^2))  gaussian   (k_max = 1, infimum 0)
    G*_ij   = k_max if y_i = y_j else k_min
    hidden module F_k:  min_{F_k} proxy(K(F_k(x)), G*)   on its detached input (`kernel_proxy_loss`:
                        alignment 1 - A (the paper's), raw, neo, mse, contrastive)
    output module:      min_{head} CE(head(phi(F(x))), y)

Strictly modular: no gradient crosses a module boundary. `sequential` (the default) trains F_1 to
completion, freezes it, then F_2 on its outputs, ..., then the output module; `simultaneous`
trains every module on every batch from its detached input.

The default `--hidden-modules 1` trains the whole body (all K blocks) as ONE hidden module on the
proxy, then the output layer: the two-module set-up of the paper's main experiments. It is not
block-local: the hidden module's backward pass crosses every block, so its activation memory is
E2EBP's on the body. `--hidden-modules N` cuts the body into N modules trained one after another.

Choices the paper leaves to the implementation, each with why:
* phi is applied inside the proxy and again in front of the output layer: the head is linear on phi(F(x)).
* Hidden modules pass on their raw block output: blocks end in ReLU, so phi's ReLU is idempotent.
* The last hidden module's phi pools as the head does (global average pool for `cnn`/`vgg11`/
  `resnet18`): the last one's phi is the output layer's input map. Earlier modules' phi average-pools
  by 4 as kerNET's does (its phi for conv maps: ReLU, avg_pool2d(4), flatten, unit norm): to
  max(1, side // 4) per side, adaptively, which is kerNET's window of 4 whenever the side is a
  multiple of 4 (CIFAR's 32/16/8) and still covers the whole map otherwise; `--pool P` pools to P x P.
* Hidden modules have no readout: they learn from pairwise labels, with no classifier of their own.
* Hidden stages see labels only through `same_class` (pairwise labels): only the output stage
  reads class identities, so a per-stage label budget (`--output-labels`) concerns it alone.

Deviations, each with why (measurements: bench/results/NOTES.md, "kernel design choices"):
* neo adds NEO_SHIFT to phi's input before normalising: else dead (all-zero) features are a free minimum.
* raw weighs its two groups of pairs equally, where kerNET weighs every pair alike (see
  `kernel_proxy_loss`): kerNET's weighting learned markedly worse in our digits runs (mlp and cnn, 3 seeds).
* `--output-lr-mult 30`: a linear layer on unit-norm features starts with near-zero logits and
  under-trains at the shared lr; 30 also suits SGD without nearing the step size where it oscillates.
* Not reproduced: best-validation checkpoint selection per module, the optional projection head,
  tanh kernels (k_min = -1) and the authors' SGD schedules (`--optimizer sgd --lr 0.1
  --output-lr-mult 1` comes closest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BpfreeError
from ..models.modes import evaluating
from ..options import option
from .base import SCHEDULES, LocalOutput, Rule, Stage, refuse, register_rule

PROXIES = ("alignment", "raw", "neo", "mse", "contrastive")
KERNELS = ("cosine", "gaussian")
K_MIN, K_MAX = 0.0, 1.0       # range of both kernels on ReLU features (unit-normalised)
# neo only: phi adds this before normalising. Without it an all-zero feature vector (every ReLU
# off) has k = 0 with everything, a free minimum of the negative-only loss (measured collapse:
# bench/results/NOTES.md). With the shift a dead example maps to the uniform direction, similar
# to every other.
NEO_SHIFT = 1e-2
_EPS = 1e-8


# --- feature map, kernels, ideal kernel -----------------------------------------------------------
def _phi_shaped(z: torch.Tensor, pool: Optional[int], shift: float = 0.0) -> torch.Tensor:
    """phi(z), keeping the tensor's layout: ReLU, average-pool conv maps to pool x pool (None: no
    pooling), add `shift` (0 except for the neo proxy), then scale each example to unit L2 norm
    over all its entries (an all-zero example stays zero)."""
    z = F.relu(z)
    if z.dim() == 4 and pool:
        z = F.adaptive_avg_pool2d(z, pool)
    if shift:
        z = z + shift
    norm = z.flatten(1).norm(dim=1).clamp_min(_EPS)
    return z / norm.view(-1, *([1] * (z.dim() - 1)))


def feature_map(z: torch.Tensor, pool: Optional[int] = 1, shift: float = 0.0) -> torch.Tensor:
    """phi(z) as one row per example: ReLU -> average pool (conv maps) -> flatten -> unit L2 norm."""
    return _phi_shaped(z, pool, shift).flatten(1)


def kernel_matrix(phi: torch.Tensor, kind: str = "cosine", sigma: float = 0.5) -> torch.Tensor:
    """The n x n batch kernel matrix of feature rows `phi` (already unit-normalised).

    cosine:   K_ij = <phi_i, phi_j>                        (k_min = 0, k_max = 1 on ReLU features)
    gaussian: K_ij = exp(-||phi_i - phi_j||^2 / (2 sigma^2))  (k_max = 1, infimum 0)
    """
    gram = phi @ phi.t()
    if kind == "cosine":
        return gram
    if kind == "gaussian":
        sq = gram.diagonal()
        d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
        return torch.exp(-d2 / (2 * sigma ** 2))
    raise BpfreeError(f"unknown kernel {kind!r}; choose one of: {', '.join(KERNELS)}")


def same_class(labels: torch.Tensor) -> torch.Tensor:
    """The pairwise labels: an n x n boolean matrix, True where y_i = y_j. All a hidden module sees."""
    return labels[:, None] == labels[None, :]


# --- proxy losses -----------------------------------------------------------------------------------
def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # mean over the masked entries; 0 (with a graph) when there are none
    return (values * mask).sum() / mask.sum().clamp_min(1)


def kernel_proxy_loss(K: torch.Tensor, same: torch.Tensor, kind: str = "alignment", *,
                      k_min: float = K_MIN, k_max: float = K_MAX, temperature: float = 1.0) -> torch.Tensor:
    """A proxy loss between a batch kernel matrix `K` and the ideal kernel built from the pairwise
    labels `same` (n x n booleans). Only the strict upper triangle is used: the diagonal is k_max by
    construction and K is symmetric. Every kind is minimised by K = G* on those pairs (same-class
    features coincide, different classes orthogonal); written k for K_ij, g for G*_ij, i < j:

    alignment:   1 - A,  A = <k, g> / (||k|| ||g||)
                 (kernel-target alignment of Cristianini et al., the paper's hidden objective;
                 kerNET's recipe uses this upper-triangle variant). In [0, 1] for k >= 0.
    raw:         (k_max - mean_{y_i = y_j} k) + (mean_{y_i != y_j} k - k_min)
                 (maximise same-class similarity minus different-class similarity; per-group means.
                 kerNET's srs_raw divides both sums by the number of pairs instead, so each pair
                 weighs the same and the different-class pairs, ~9x as many with 10 classes, dominate)
    neo:         mean_{y_i != y_j} (k - k_min)
                 (negative-only: uses only "these two differ" labels. With unit-norm non-negative
                 features, classes with mutually orthogonal features are linearly separable, so
                 same-class pairs need no target; an all-zero row would also attain it, see
                 NEO_SHIFT)
    mse:         mean (k - g)^2   (squared distance to the ideal kernel, ||K - G*||^2 / #pairs)
    contrastive: -log( sum_{y_i = y_j} e^{k/t} / sum_{all} e^{k/t} )
                 (softmax of same-class pairs among all pairs, t = temperature; 0 loss when the
                 batch has no same-class pair)
    """
    n = K.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=K.device).triu(1)
    k, s = K[upper], same[upper]
    if k.numel() == 0:
        return K.sum() * 0
    d = ~s
    if kind == "alignment":
        g = torch.where(s, k_max, k_min).to(k.dtype)
        return 1 - (k * g).sum() / (k.norm() * g.norm()).clamp_min(_EPS)
    if kind == "raw":
        return _masked_mean(k_max - k, s) + _masked_mean(k - k_min, d)
    if kind == "neo":
        return _masked_mean(k - k_min, d)
    if kind == "mse":
        g = torch.where(s, k_max, k_min).to(k.dtype)
        return ((k - g) ** 2).mean()
    if kind == "contrastive":
        if not s.any():
            return k.sum() * 0
        logits = k / temperature
        return torch.logsumexp(logits, 0) - torch.logsumexp(logits[s], 0)
    raise BpfreeError(f"unknown proxy {kind!r}; choose one of: {', '.join(PROXIES)}")


# Objective = OFFSET - loss, so that higher is better (alignment: A itself; raw: the same-minus-
# different similarity gap; the others: minus the loss).
_OFFSET = {"alignment": 1.0, "raw": K_MAX - K_MIN, "neo": 0.0, "mse": 0.0, "contrastive": 0.0}


@dataclass
class KernelProxy:
    """A hidden module's objective: phi, the kernel and the proxy, applied to pairwise labels only."""

    kind: str = "alignment"
    kernel: str = "cosine"
    sigma: float = 0.5
    temperature: float = 1.0
    pool: Optional[int] = 1

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """phi(z), the rows whose kernel the proxy shapes."""
        return feature_map(z, self.pool, NEO_SHIFT if self.kind == "neo" else 0.0)

    def loss(self, z: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        K = kernel_matrix(self.features(z), self.kernel, self.sigma)
        return kernel_proxy_loss(K, same, self.kind, temperature=self.temperature)

    def objective(self, z: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """The proxy as a score to maximise (alignment A, etc.): `OFFSET - loss`."""
        return _OFFSET[self.kind] - self.loss(z, same)


# --- stages -----------------------------------------------------------------------------------------
class HiddenModule(Stage):
    """A group of blocks trained by the kernel proxy on its (detached) input; no readout."""

    uses_class_labels = False      # it reads labels only through the same-class matrix

    def __init__(self, name: str, body: nn.Module, proxy: KernelProxy):
        super().__init__(name)
        self.body, self.proxy = body, proxy

    def forward(self, x):
        return (self.body(x),)

    def local(self, message, labels):
        z = self.body(message[0])
        return LocalOutput(self.proxy.loss(z, same_class(labels)), (z,), None)

    def feature_pool(self) -> Optional[int]:
        """phi pools as this module's proxy does (so transferability scores what training shaped)."""
        return self.proxy.pool


class OutputModule(Stage):
    """The network's head, a linear model on phi(F(x)), trained with cross-entropy."""

    def __init__(self, name: str, head: nn.Module, pool: Optional[int], lr_mult: float = 1.0):
        super().__init__(name)
        self.head, self.pool, self.lr_mult = head, pool, lr_mult

    def forward(self, z):
        return (self.head(_phi_shaped(z, self.pool)),)

    def local(self, message, labels):
        logits = self.head(_phi_shaped(message[0], self.pool))
        return LocalOutput(F.cross_entropy(logits, labels), (logits,), logits)

    def readout(self, message):
        return message[0]

    def param_groups(self, cfg):
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": cfg.lr * self.lr_mult}]

    def extracts_features(self) -> bool:
        return False               # its output is class scores, not features


def _output_pool(net) -> Optional[int]:
    """1 when the head takes globally pooled maps (C, 1, 1) (the GAP heads of the zoo's conv nets),
    so phi pools as the head would; None for vector features or a head that needs the full map."""
    shape = net.block_shapes()[-1]
    if len(shape) != 3:
        return None
    try:
        with evaluating(net.head), torch.no_grad():
            ok = tuple(net.head(torch.zeros(2, shape[0], 1, 1)).shape) == (2, net.num_classes)
    except RuntimeError:
        ok = False
    return 1 if ok else None


def _pool_by_four(shape: tuple[int, ...]) -> Optional[int]:
    """kerNET's pooling of a conv map by windows of 4, as an output side: max(1, side // 4)."""
    return max(1, min(shape[1:]) // 4) if len(shape) == 3 else None


def group_blocks(blocks, n: int) -> list[nn.Sequential]:
    """Consecutive blocks in n groups as equal as possible, the extra ones to the later groups."""
    blocks = list(blocks)
    if not 1 <= n <= len(blocks):
        raise BpfreeError(f"--hidden-modules must be in 1..{len(blocks)} (the number of blocks), got {n}")
    base, extra = divmod(len(blocks), n)
    sizes = [base + (i >= n - extra) for i in range(n)]
    bounds = [sum(sizes[:i]) for i in range(n + 1)]
    return [nn.Sequential(*blocks[a:b]) for a, b in zip(bounds, bounds[1:])]


@register_rule
class KernelModular(Rule):
    name = "kernel"
    locality = "strictly local, one module after another: pairwise (same-class) labels, then the output layer"
    description = ("Duan & Principe kernel modular training: hidden modules fit the ideal pairwise kernel, "
                   "then the output layer on frozen features (strictly modular; the default --hidden-modules 1 "
                   "trains the whole body as one module, the paper's two-module set-up)")
    schedules = SCHEDULES
    default_schedule = "sequential"
    predicts_through = "the network's head on unit-normalised penultimate features"

    @dataclass
    class Options:
        proxy: str = option("alignment", choices=PROXIES,
                            help="hidden modules' loss against the ideal kernel")
        kernel: str = option("cosine", choices=KERNELS,
                             help="kernel on phi = unit-normalised pooled ReLU features")
        sigma: float = option(0.5, positive=True, help="bandwidth of the gaussian kernel")
        temperature: float = option(1.0, positive=True, help="temperature of the contrastive proxy")
        hidden_modules: int = option(1, min=1,
                                     help="hidden modules the blocks are grouped into (1: the whole body is "
                                          "one module, 2 with the output)")
        pool: Optional[int] = option(None, min=1,
                                     help="phi of hidden modules before the last pools conv maps to pool x "
                                          "pool (default: by 4, as kerNET)")
        output_lr_mult: float = option(30.0, positive=True, help="lr of the output layer = lr x this")

    def build_stages(self, net, options):
        refuse(self.name, net, "its proxy compares examples by class (same class or not), one class per "
                               "example", per_position=True)
        groups = group_blocks(net.blocks, options.hidden_modules)
        out_pool = _output_pool(net)
        shapes = net.block_shapes()
        stages: list[Stage] = []
        end = 0
        for i, body in enumerate(groups):
            end += len(body)
            pool = out_pool if i == len(groups) - 1 else options.pool or _pool_by_four(shapes[end - 1])
            proxy = KernelProxy(options.proxy, options.kernel, options.sigma, options.temperature, pool)
            stages.append(HiddenModule(f"hidden{i + 1}", body, proxy))
        stages.append(OutputModule("output", net.head, out_pool, options.output_lr_mult))
        return stages

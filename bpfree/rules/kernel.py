"""Kernel-based strictly modular training (Duan, Yu & Principe, "Modularizing Deep Learning via
Pairwise Learning With Kernels", IEEE TNNLS 2022, arXiv 2005.05541).

A network is read as linear models stacked on feature maps: the output layer is a linear model on
phi(F(x)), so the kernel it sees is k(x, x') = <phi(F(x)), phi(F(x'))>. For classification the best
hidden representation is one whose kernel matrix equals the *ideal kernel*
G*_ij = k_max if y_i = y_j else k_min, a target that needs only pairwise labels ("same class or
not"). Training is strictly modular (no gradient ever crosses a module boundary):

1. hidden module F_k (a group of the BlockNet's blocks) is trained on its frozen input with a proxy
   loss between the batch kernel matrix K_ij = k(F_k(x_i), F_k(x_j)) and G* (`proxy_loss`);
2. it is frozen and F_{k+1} trains on its outputs (the `sequential` schedule, the default);
3. the output module, the network's own head on phi(F(x)), is trained with cross-entropy.

Here phi(z) = unit-L2-normalise(flatten(avgpool(ReLU(z)))) (the paper's feature map for ReLU
networks; the pooling only for conv maps). With ReLU features the cosine kernel lies in [0, 1], so
k_min = 0 and k_max = 1; the Gaussian kernel exp(-||phi - phi'||^2 / (2 sigma^2)) on the same
features also has k_max = 1 and infimum 0, so both use the same ideal kernel.

Choices made here (the paper leaves them to the implementation):
* phi is applied inside the proxy and again in front of the output layer, as in the paper
  (the head is linear on phi(F(x))). Hidden modules pass on their raw block output, as the network
  computes it: blocks end in ReLU, so phi's ReLU is idempotent and no block ReLU needs removing.
* The last hidden module's phi is exactly the output layer's input map: ReLU, global average pool
  (what `cnn`/`vgg11`/`resnet18` heads do) and unit-normalise. Earlier hidden modules pool conv maps
  to `--pool` x `--pool` before normalising.
* Hidden modules have no readout (no class scores of their own).
* Hidden stages see labels only through the same-class matrix (`same_class`), so they learn from
  pairwise labels alone; only the output stage reads class identities. A later per-stage label
  budget therefore concerns the output stage only.
* neo adds a small constant to phi's input before normalising (NEO_SHIFT, below), so that dead
  (all-zero) features are not a free minimum of the negative-only loss.
* `--output-lr-mult` (default 30): the output layer is linear on unit-norm features, so its logits
  start near zero and at the shared lr it is under-trained in short runs. Measured on digits
  (validation split 0.2, 3 epochs per stage, batch 64, Adam lr 2e-3, mlp 64x64 | cnn 16-32-64-64,
  mean validation accuracy over 5 seeds): x1 0.49 | 0.65 (2 seeds), x10 0.938 | 0.965,
  x30 0.945 | 0.977, x100 0.950 | 0.984; at 10 epochs per stage every multiplier from 1 to 100 is
  within 0.01. 30 rather than 100 because it also suits SGD (lr 0.05: x1 0.942 | 0.818, x30
  0.955 | 0.959) without approaching the step size at which a linear softmax layer on unit inputs
  oscillates. (kerNET's recipe, SGD, trains the output layer at lr 0.1 for 20 epochs.)

Not reproduced: best-validation checkpoint selection per module, the optional projection head,
tanh kernels (k_min = -1) and the authors' SGD schedules (`--optimizer sgd --lr 0.1
--output-lr-mult 1` comes closest; see shared/papers/notes-kernel-al.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BpfreeError
from .base import SCHEDULES, LocalOutput, Rule, Stage, register_rule

PROXIES = ("alignment", "raw", "neo", "mse", "contrastive")
KERNELS = ("cosine", "gaussian")
K_MIN, K_MAX = 0.0, 1.0       # range of both kernels on ReLU features (unit-normalised)
# neo only: phi adds this before normalising. Without it an all-zero feature vector (every ReLU
# off) has k = 0 with everything, a free minimum of the negative-only loss; on digits (mlp 64x64,
# 10 epochs) hidden features collapsed that way and validation accuracy fell to 0.19-0.25. With
# the shift a dead example maps to the uniform direction, similar to every other: 0.94.
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


def ideal_kernel(labels: torch.Tensor, k_min: float = K_MIN, k_max: float = K_MAX) -> torch.Tensor:
    """G*_ij = k_max if y_i = y_j else k_min (the paper's ideal kernel matrix)."""
    return torch.where(same_class(labels), k_max, k_min).to(torch.get_default_dtype())


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
                 (maximise same-class similarity minus different-class similarity; per-group means)
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


def proxy_loss(features: torch.Tensor, labels: torch.Tensor, kind: str = "alignment", *,
               kernel: str = "cosine", sigma: float = 0.5, temperature: float = 1.0,
               pool: Optional[int] = 1) -> torch.Tensor:
    """The proxy loss of a module's output `features` (B, ...) on a batch with class `labels`:
    phi (ReLU, pool, unit norm), the batch kernel matrix, then `kernel_proxy_loss` against the ideal
    kernel of the pairs (see there for each kind's equation). Labels are used only through
    `same_class(labels)`. phi is idempotent on non-negative unit rows, so toy features may be
    passed already mapped."""
    return KernelProxy(kind, kernel, sigma, temperature, pool).loss(features, same_class(labels))


def proxy_objective(features: torch.Tensor, labels: torch.Tensor, kind: str = "alignment",
                    **kw) -> torch.Tensor:
    """`proxy_loss` as a score, higher = better (alignment: A in [0, 1])."""
    return _OFFSET[kind] - proxy_loss(features, labels, kind, **kw)


# --- stages -----------------------------------------------------------------------------------------
class HiddenModule(Stage):
    uses_class_labels = False      # it reads labels only through the same-class matrix
    """A group of blocks trained by the kernel proxy on its (detached) input; no readout."""

    def __init__(self, name: str, body: nn.Module, proxy: KernelProxy):
        super().__init__(name)
        self.body, self.proxy = body, proxy

    def forward(self, x):
        return (self.body(x),)

    def local(self, message, labels):
        z = self.body(message[0])
        return LocalOutput(self.proxy.loss(z, same_class(labels)), (z,), None)

    def features(self, message) -> torch.Tensor:
        """phi of this module's output message: the rows whose kernel the proxy shapes."""
        return self.proxy.features(message[0])


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


def _output_pool(net) -> Optional[int]:
    """1 when the head takes globally pooled maps (C, 1, 1) (the GAP heads of the zoo's conv nets),
    so phi pools as the head would; None for vector features or a head that needs the full map."""
    shape = net.block_shapes()[-1]
    if len(shape) != 3:
        return None
    modes = [(m, m.training) for m in net.head.modules()]
    net.head.eval()
    try:
        with torch.no_grad():
            ok = tuple(net.head(torch.zeros(2, shape[0], 1, 1)).shape) == (2, net.num_classes)
    except RuntimeError:
        ok = False
    finally:
        for m, mode in modes:
            m.training = mode
    return 1 if ok else None


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
    description = ("Duan & Principe kernel modular training: hidden modules fit the ideal pairwise kernel, "
                   "then the output layer on frozen features (strictly modular)")
    schedules = SCHEDULES
    default_schedule = "sequential"

    @dataclass
    class Options:
        proxy: str = field(default="alignment", metadata={"choices": PROXIES,
                           "help": "hidden modules' loss against the ideal kernel"})
        kernel: str = field(default="cosine", metadata={"choices": KERNELS,
                            "help": "kernel on phi = unit-normalised pooled ReLU features"})
        sigma: float = field(default=0.5, metadata={"positive": True, "help": "bandwidth of the gaussian kernel"})
        temperature: float = field(default=1.0, metadata={"positive": True, "help": "temperature of the contrastive proxy"})
        hidden_modules: int = field(default=1, metadata={"min": 1, 
            "help": "hidden modules the blocks are grouped into (1: all blocks, K=2 with the output)"})
        pool: int = field(default=1, metadata={"min": 1, 
            "help": "phi pools conv maps of hidden modules before the last to pool x pool"})
        output_lr_mult: float = field(default=30.0, metadata={"positive": True, "help": "lr of the output layer = lr x this"})

    def build_stages(self, net, options):
        groups = group_blocks(net.blocks, options.hidden_modules)
        out_pool = _output_pool(net)
        stages: list[Stage] = []
        for i, body in enumerate(groups):
            pool = out_pool if i == len(groups) - 1 else options.pool
            proxy = KernelProxy(options.proxy, options.kernel, options.sigma, options.temperature, pool)
            stages.append(HiddenModule(f"hidden{i + 1}", body, proxy))
        stages.append(OutputModule("output", net.head, out_pool, options.output_lr_mult))
        return stages

    def hidden_stages(self) -> list[HiddenModule]:
        """The trained feature extractors (everything but the output module)."""
        return list(self.stages)[:-1]

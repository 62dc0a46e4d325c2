"""Associated Learning (AL): Kao & Chen, "Associated Learning: Decomposing End-to-end Backpropagation
based on Auto-encoders and Target Propagation", arXiv 1906.05560, Neural Computation 33(1), 2021.

Sources: the paper's abstract, the authors' released TensorFlow code (SamYWK/Associated_Learning,
read for the loss forms, stop-gradients, widths, activations and init) and our notes
(shared/papers/associated-learning-spec.md, notes-kernel-al.md §2); the paper's full text was not
reachable here, so the comments cite the formulas below, not equation numbers.

Each block i = 1..K of the BlockNet becomes a *component* with four maps and one local objective:

    s_i  = f_i(s_{i-1})        s_0 = x            the network's own block i (data path)
    t_i  = g_i(t_{i-1})        t_0 = onehot(y)    label-path encoder: Linear + act
    b_i(s_i) ≈ t_i                                bridge: pool, flatten, Linear(5d) + act, Linear(d) + act
    h_i(t_i) ≈ t_{i-1}                            label-path decoder: Linear + act (h_1 outputs C scores)

    L_i = MSE(b_i(s_i), sg(t_i))      associated loss: trains f_i and b_i
        + MSE(h_i(t_i + ε), t_{i-1})  autoencoder loss: trains h_i and, through t_i, g_i
                                      (ε ~ N(0, σ²), σ = `--ae-noise`, 0.3; the paper: ε = 0)

s_{i-1} and t_{i-1} arrive detached (the base `Stage.step` detaches every incoming message), so no
gradient crosses a component. `sg` is the released code's stop-gradient on the association target:
g_i learns only to be invertible by h_i, so the label path cannot collapse onto the bridge's output.

Inference (no labels; `predict`): x → f_1 … f_K gives s_K, the top bridge gives t̂_K = b_K(s_K),
and the decoders run down t̂_{i-1} = h_i(t̂_i) to t̂_0, the class scores (argmax). Every component
keeps its bridge, so the network has a "shortcut" at each depth: bridge at component j and decode
h_j … h_1, skipping f_{j+1..K} (`--inference shortcut --bridge-at J`, the AL group's early exit).
Each stage's `readout` is that shortcut's class scores, so the per-stage test accuracies are those
of every inference variant; the last stage's equals `--inference top`.

Messages: the first stage receives `(x,)` plus the labels and builds t_0 itself; during training
every stage sends `(s_i, t_i)`. At inference (`forward`) only the data path travels: `(s_i,)`.

Options beside the paper: `--label-grad true` drops the stop-gradient (the loss ‖b_i(s_i) − t_i‖²
as written); `--label-loss ce` trains h_1's logits by cross-entropy (Wu et al., ICLR 2022).

Deviations from the paper and its released code, each with why (measurements: bench/results/NOTES.md,
"AL design choices"):
* f_i are bpfree's blocks (ReLU, BN, PyTorch init), not the released ELU/He-normal layers: every
  rule trains the same networks. g, h and b do use the released He-normal weights and zero biases.
* Components are the models' shared K-block split (the released CNN has one every two convs:
  `--blocks` and `--model-opt split=` do that): the same cut as every other rule.
* The bridge average-pools conv maps to at most `--pool-dim` values before flattening: the released
  full flatten makes the bridge's first layer larger than the whole CNN on a 28×28 map.
* One optimizer per stage, not one Adam per loss: the losses touch disjoint parameters and Adam is
  per-parameter, so it is the same update (the label path's group gets `--ae-lr-mult` × lr, 2 as released).
* MSE is the mean over elements (as tf.losses.mean_squared_error), as the released code computes it.
* No loss weights, as in the paper: under Adam a weight on either term would be nearly a no-op.
* The network's own output head is in no stage: AL predicts through the bridge and the decoders.
* g, h and the bridge output default to tanh, not the released sigmoid: with sigmoid h_1 sits on the
  class-prior plateau and the top stays at chance for tens of epochs (`--label-act sigmoid` restores it).
* The bridge's hidden layer defaults to tanh (`--bridge-act`): more robust early and better on the
  mlp; sigmoid (released) is better on the cnn; the authors' PyTorch follow-up uses tanh bridges.
* Denoising decoders, `--ae-noise 0.3` (paper: 0), the cause of AL's slow start (issue 20): the
  decoders see only the C class codes t_i, but the bridges' outputs land far from them (mean
  distance 3.5 against 5.4-7.7 between two codes), where an h_i trained on C points decodes them
  badly: after 8 epochs on 4,000 Fashion-MNIST images (cnn, K=4, validation split) the top exit
  decoded 78.4% while the nearest class code to the same bridge output was right 85.2% of the
  time, and denoising copies of the trained decoders (σ 0.3, fitted afterwards) decoded 84.4%.
  Trained that way from the start, the top reaches 70.7% after epoch 1 (before: 53.0%; E2EBP
  76.6%) and 86.9% after 8 (before 78.4%, E2EBP 88.0%; bench/results/slow-start-cnn). Not the cause: tanh saturation (no label code and 2-4% of bridge outputs beyond |0.95|).
* lr = the run's `--lr` × `--lr-mult` (released: Adam 1e-4 for 200 epochs), so AL shares the run's
  budget; above ~2e-3 the wide bridges saturate: lower `--lr-mult` rather than raise it.
* Schedules: simultaneous only. The sequential schedule would need the label path t_{i-1} of a
  frozen prefix, but the trainer caches only the prefix's data path (and passes it no labels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BpfreeError
from ..options import option
from .base import LocalOutput, Rule, Stage, StageStats, refuse, register_rule

INFERENCE = ("top", "shortcut")
LABEL_ACTS = ("sigmoid", "tanh", "relu")
BRIDGE_ACTS = ("sigmoid", "tanh", "relu", "elu")
LABEL_LOSSES = ("mse", "ce")


def _act(name: str) -> nn.Module:
    return {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}[name]()


def make_bridge(in_shape: tuple[int, ...], width: int, hidden: int, pool_dim: int,
                hidden_act: str, out_act: str) -> nn.Module:
    """b_i: block output (C, H, W) or (D,) -> estimate of t_i (width,). Two dense layers as released."""
    if len(in_shape) == 3:
        c, h, w = in_shape
        side = max(1, min(h, w, int(math.sqrt(pool_dim / c))))
        pool, d = [nn.AdaptiveAvgPool2d(side)], c * side * side
    else:
        pool, d = [], math.prod(in_shape)
    return nn.Sequential(*pool, nn.Flatten(), nn.Linear(d, hidden), _act(hidden_act),
                         nn.Linear(hidden, width), _act(out_act))


@dataclass
class ALOutput(LocalOutput):
    """LocalOutput plus the two terms of the component's loss (detached), for the metrics."""

    assoc: Optional[torch.Tensor] = None
    ae: Optional[torch.Tensor] = None


class ALStats(StageStats):
    """Stage statistics with the associated and autoencoder losses kept apart."""

    def reset(self):
        super().reset()
        self.assoc_sum, self.ae_sum = 0.0, 0.0

    def add(self, out, labels):
        super().add(out, labels)
        if isinstance(out, ALOutput):
            self.assoc_sum = self.assoc_sum + out.assoc
            self.ae_sum = self.ae_sum + out.ae

    def summary(self) -> dict:
        row = super().summary()
        if self.steps:
            row["assoc_loss"] = float(self.assoc_sum) / self.steps
            row["ae_loss"] = float(self.ae_sum) / self.steps
        return row


class Component(Stage):
    """One AL component: f_i (a model block), g_i, b_i, h_i and the loss L_i."""

    def __init__(self, name: str, index: int, block: nn.Module, block_shape: tuple[int, ...],
                 num_classes: int, t_in: int, opts, lower: list["Component"]):
        super().__init__(name)
        self.index, self.num_classes = index, num_classes
        self.encoder = block                                                        # f_i
        d = opts.label_width
        self.label_encoder = nn.Sequential(nn.Linear(t_in, d), _act(opts.label_act))       # g_i
        self.label_ce = index == 0 and opts.label_loss == "ce"     # h_1 gives logits, trained by CE
        self.decoder = nn.Sequential(nn.Linear(d, t_in),                                   # h_i
                                     nn.Identity() if self.label_ce else _act(opts.label_act))
        self.bridge = make_bridge(block_shape, d, opts.bridge_width or 5 * d,             # b_i
                                  opts.pool_dim, opts.bridge_act, opts.label_act)
        for layer in [*self.label_encoder, *self.decoder, *self.bridge]:
            if isinstance(layer, nn.Linear):       # He-normal weights, zero biases: the released code's init
                nn.init.kaiming_normal_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.label_grad, self.lr_mult, self.ae_lr_mult = opts.label_grad, opts.lr_mult, opts.ae_lr_mult
        self.ae_noise = opts.ae_noise
        # the noise comes from this component's own seeded stream, indexed by its step count (saved
        # with the weights), so one process and --parallel ranks draw the same noise, and resume too
        self.noise_seed = torch.initial_seed() * 1009 + index
        self.register_buffer("noise_steps", torch.zeros((), dtype=torch.long))
        # The components below, for decoding only (readout). A plain list, so their parameters are
        # not registered here: each parameter belongs to exactly one stage and one optimizer.
        self._lower = list(lower)
        self.stats = ALStats()

    # --- inference ---------------------------------------------------------------------------
    def forward(self, s, t=None):
        s = self.encoder(s)
        return (s,) if t is None else (s, self.label_encoder(t))

    def decode(self, t: torch.Tensor) -> torch.Tensor:
        """t̂_i -> t̂_0: h_i, then the decoders of the components below."""
        for component in [self] + self._lower[::-1]:
            t = component.decoder(t)
        return t

    def readout(self, message):
        """Class scores of the shortcut through this component: h_1(…h_i(b_i(s_i)))."""
        return self.decode(self.bridge(message[0]))

    # --- training ----------------------------------------------------------------------------
    def local(self, message, labels):
        if self.index == 0:
            if len(message) != 1:
                raise BpfreeError(f"AL's first component expects the input alone, "
                                  f"got {len(message)} tensors")
            s_prev = message[0]
            t_prev = F.one_hot(labels, self.num_classes).to(s_prev.dtype)      # t_0 = y
        else:
            if len(message) != 2:
                raise BpfreeError(f"AL component {self.index + 1} expects (s, t), "
                                  f"got {len(message)} tensors")
            s_prev, t_prev = message
        s = self.encoder(s_prev)                                                # s_i = f_i(s_{i-1})
        t = self.label_encoder(t_prev)                                          # t_i = g_i(t_{i-1})
        target = t if self.label_grad else t.detach()                          # sg(t_i)
        assoc = F.mse_loss(self.bridge(s), target)                              # ‖b_i(s_i) − sg(t_i)‖²
        # denoising (--ae-noise): h_i also inverts points near t_i, where the bridges' outputs land
        t_seen = t + self.ae_noise * self._noise(t) if self.ae_noise > 0 else t
        if self.label_ce:
            ae = F.cross_entropy(self.decoder(t_seen), labels)                  # CE(h_1(t_1 + ε), y)
        else:
            ae = F.mse_loss(self.decoder(t_seen), t_prev)                       # ‖h_i(t_i + ε) − t_{i−1}‖²
        # No train-time readout: decoding needs the lower components' decoders, and a step reads
        # only its own parameters. Per-component accuracies come from the test-time readouts.
        return ALOutput(assoc + ae, (s, t), None, assoc=assoc.detach(), ae=ae.detach())

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(like.device).manual_seed(self.noise_seed + int(self.noise_steps))
        self.noise_steps += 1
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    def param_groups(self, cfg):
        data_path = list(self.encoder.parameters()) + list(self.bridge.parameters())
        label_path = list(self.label_encoder.parameters()) + list(self.decoder.parameters())
        lr = cfg.lr * self.lr_mult
        return [{"params": [p for p in data_path if p.requires_grad], "lr": lr},
                {"params": [p for p in label_path if p.requires_grad], "lr": lr * self.ae_lr_mult}]


@register_rule
class AssociatedLearning(Rule):
    name = "al"
    locality = "local pairs: a component learns from its own input and the label path's neighbouring codes"
    description = ("associated learning: per block a bridge to a label-path autoencoder; predict by "
                   "bridging at the top and decoding down (Kao & Chen 2021)")
    schedules = ("simultaneous",)
    needs_all_stages = True      # component k's readout decodes through the decoders of components < k
    predicts_through = "the top bridge and the label path's decoders, not the network's head"

    @dataclass
    class Options:
        inference: str = option("top", choices=INFERENCE,
                                help="top: bridge at the last component, decode through every h (the paper);"
                                     " shortcut: bridge at --bridge-at and decode from there")
        bridge_at: int = option(1, positive=True,
                                help="component (1..K) whose bridge --inference shortcut uses")
        label_width: int = option(256, positive=True,
                                  help="width d of the label path t_i (released: 256 CNN, 1024 MLP)")
        bridge_width: int = option(0, min=0,
                                   help="hidden units of the bridge (0: 5 x label width, as released)")
        label_act: str = option("tanh", choices=LABEL_ACTS,
                                help="activation of g, h and the bridge output (paper: sigmoid, slow to "
                                     "start)")
        bridge_act: str = option("tanh", choices=BRIDGE_ACTS,
                                 help="activation of the bridge's hidden layer (paper: sigmoid)")
        pool_dim: int = option(2048, positive=True,
                               help="max flattened size of conv features fed to a bridge")
        label_loss: str = option("mse", choices=LABEL_LOSSES,
                                 help="component 1's autoencoder loss: mse of h_1 vs one-hot (paper) or ce "
                                      "on h_1's logits (the authors' PyTorch follow-up)")
        lr_mult: float = option(1.0, positive=True,
                                help="AL's lr = this x --lr (the released code used Adam 1e-4)")
        ae_lr_mult: float = option(2.0, positive=True,
                                   help="label path (g, h) lr = this x AL's lr (released: 2)")
        ae_noise: float = option(0.3, min=0.0,
                                 help="std of Gaussian noise on t_i in the autoencoder loss, h_i(t_i + "
                                      "noise) ≈ t_{i-1} (paper: 0): decoders that also invert points near "
                                      "the class codes, where the bridges' outputs land")
        label_grad: bool = option(False,
                                  help="let the associated loss train g_i too (released code: no, "
                                       "stop-gradient)")

    def build_stages(self, net, options):
        refuse(self.name, net, "its label path encodes one class per example", per_position=True)
        k = net.num_blocks
        if options.inference == "shortcut" and options.bridge_at > k:
            raise BpfreeError(f"--bridge-at must be in 1..{k} (the number of blocks), "
                              f"got {options.bridge_at}")
        stages: list[Component] = []
        t_in = net.num_classes
        for i, (block, shape) in enumerate(zip(net.blocks, net.block_shapes())):
            stages.append(Component(f"component{i + 1}", i, block, shape, net.num_classes, t_in,
                                    options, stages))
            t_in = options.label_width
        return stages

    @property
    def prediction_stage(self) -> int:
        """The component whose bridge the prediction uses (0-based); `predict` runs f_1 … f_j only."""
        return len(self.stages) - 1 if self.options.inference == "top" else self.options.bridge_at - 1

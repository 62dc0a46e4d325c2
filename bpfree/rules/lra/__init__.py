"""Local representation alignment: LRA-E and recursive LRA (rec-LRA), gradient-free credit assignment.

Sources: Ororbia & Mali, "Biologically Motivated Algorithms for Propagating Local Target
Representations" (LRA-E, AAAI 2019, arXiv 1805.11703) and its official code (AnkurMali/LRA-E, read
for the update forms); Ororbia, Mali, Kifer, Giles, "Large-Scale Gradient-Free Deep Learning with
Recursive Local Representation Alignment" (arXiv 2002.03911, AAAI 2023). Our specs:
shared/papers/rec-lra-spec.md and notes-bwbpf-lra.md §2-3. The rec-LRA text itself could not be
retrieved; what comes only from a third-party port is marked *unverified*.

The network is read as a stack of L weight layers (the BlockNet's Linear/Conv2d layers, head
included), each with an elementwise nonlinearity phi_l (`graph.py`):

    u_l = pool_l(z_{l-1})             shape-only ops between layers (Flatten, MaxPool, global pool)
    h_l = W_l u_l + b_l               (conv: W_l * u_l)
    z_l = phi_l(h_l)                  phi_L = identity: z_L are the logits

One training step on a batch of B examples (`stage.py`: `step` is (1), `feedback` (2)-(3),
`update` (4)-(6)):

    (1) forward                       z_0 = x (+ N(0, sigma^2) input noise), h_l, z_l for l = 1..L
    (2) output error                  e_L = softmax(z_L) - onehot(y)            (LRA-E code)
    (3) top-down target sweep, l = L-1 .. 1:
          d_l = E_{l+1} e_{l+1}       adjacent link (LRA-E)
          d_l = E_{L->l} e_L          rec-LRA error-skip link, every m-th node below the output
          y_l = phi_l(h_l - beta d_l)                                       target
          e_l = (z_l - y_l) / beta                                          error units
    (4) local updates, independent per layer once e_l is known:
          dW_l = e_l u_l^T / B        no activation derivative, no chain across layers
          dE   = gamma dW_{l+1}^T     "transpose" (LRA-E code; E tracks W, Kolen-Pollack-like)
          dE   = -gamma d_l e_j^T / B "error-product" (rec-LRA Eq. 6 as a port reports it; unverified)
        skip links E_{L->k} (`--skip-update`): fixed (default); kp: dE = gamma e_L z_k^T / B, the
          update a forward link z_k -> logits would get; product: dE = -gamma e_L^T d_k / B
    (5) ball projection               Delta <- c Delta / ||Delta|| when ||Delta|| > c, per tensor
    (6) p.grad = Delta for every W, b, E; with `--decay lambda`, W and learned E first shrink by
        (1 - lr lambda) (AdamW's decoupled decay: under "transpose" E - W shrinks by it, Kolen-Pollack);
        the stage's optimizer steps (Adam/SGD + schedule as usual).

BatchNorm (no LRA rule exists for it) is part of phi_l with its affine fixed at initialisation:
phi_l(h) = act((h - mu_B) / sigma_B). The target pass reuses the forward's batch statistics
(detached), so phi_l is one fixed map for z_l and y_l; running statistics update as usual. Before
its update each error loses what train-mode BN cancels (`LRALayer.bn_project`, per channel over
batch and space):  e_l <- e_l - mean(e_l) - xhat_l mean(e_l xhat_l).

Residual blocks (resnet18) are nodes z_out = relu(h_out), h_out = BN(W_b phi_a(W_a z_in)) + skip(z_in)
(skip: identity, or a 1x1 conv + BN). Targets are set for node outputs first, then inside the
blocks, so no derivative ever crosses a layer:

    d_out = displacement from the node above (or E_{L->k} e_L for a skip-linked node)
    e_out = (z_out - relu(h_out - beta d_out)) / beta    the block's output error
    e_b = P_b(e_out) / sigma_b, e_s likewise      the last body conv and the shortcut conv write h_out
                                                  through their BNs (P: the BN projection above)
    e_a = (z_a - phi_a(h_a - beta E_b^T e_b)) / beta     the first conv, from the second's error
    d_in = E_a^T e_a + (e_out | E_s^T e_out)      what the block sends down: its entry convs' errors
                                                  through their feedback kernels, plus the block error
                                                  itself through an identity shortcut

How the equations map onto tensors:
* dW_l is computed directly (`LRALayer.weight_update`): e_l^T u_l for a Linear layer, the conv
  backward kernel's weight gradient (`graph.conv_backward`, given the real u_l and W_l) for a Conv2d;
  "error-product" dE likewise, and d = E^T e is the same kernel's input gradient; no autograd call at
  all (tested against autograd on one layer at a time). h_l is still recorded by autograd, never
  differentiated, so the activation meter counts the u_l the update holds. Each update reaches the
  optimizer in its parameter's memory layout (the fused optimizers step over memory).
* BN batch statistics are computed once per layer (BN's own kernel), reused by phi_l and the targets
  (one normalising function for both, so z_l - y_l is exactly 0 where d_l is); the BN projection is
  BN's own input-gradient kernel at gamma = 1 (one fused pass), its rescaling folded into one product
  with 1/beta.
* E_{l+1} has W_{l+1}'s shape and is applied as the transposed convolution with W_{l+1}'s
  stride/padding (Linear: e_{l+1} E_{l+1}, E stored transposed), so "dE = gamma dW^T" is gamma dW_{l+1}.
* Shape-only ops are undone on d by nearest upsampling / broadcasting over space (pooling's
  transpose up to a scale, which beta absorbs). E_{L->l} is dense: classes -> C_l H_l W_l.
* Stages: one per BlockNet block (the output layer rides with the last), `top_down`. A batch is
  `step` bottom-up, `feedback` top-down (the signal to the stage below is (e_L, d), or (e_L,) when
  the node under the boundary is skip-linked), `update`. Feedback matrices are drawn in one global
  order and each belongs to the stage of the layer whose error it carries, so any cut learns
  exactly what one stage learns (tested), on one process or several (`--parallel`).

Deviations, each with why (measurements: bench/results/NOTES.md, "LRA design choices" and "Slow starts"):
* Cause of rec-LRA's slow start (issue 20), measured on the cnn (K=4, 4,000 Fashion-MNIST images,
  validation split), left unfixed by default: with random E every hidden layer's update/gradient
  cosine stays within -0.2..0.3 over the first epoch (E = E_0 + (W - W_0) tracks W's change, not W)
  and validation accuracy is 40% after it (E2EBP 77%); a decay fast enough to matter in 256 steps
  shrinks the head too (`--decay` 10 / 30: 19% / 9% after 32 steps). `--feedback-init forward`
  (E_j = W_j at the start) aligns the adjacent layers at once (0.64-0.76 under the head) and lifts
  rec-LRA to 65% after epoch 1 and 83% after 7 (random: 78%), but it is weight transport, and with
  the transpose rule E_j = W_j for the whole run: the method would no longer be LRA, so it is an
  option, not the default.
* Skip links stay random and fixed: with them the skip-linked layers keep cosines near 0 for the
  whole run (layers 1 and 3 of the cnn: -0.6..0.2), the remaining cause of rec-LRA's lag; the kp rule
  raises layer 1's cosine to 0.4-0.5 within 32 steps but not the accuracy (37% vs 40%), so the default
  stays fixed (measured on the same validation split).
* E ~ N(0, 0.01^2) under `--feedback-init random`, not N(0, 1): E - W stays E_0 - W_0, so a small E_0 tracks W.
* e_l divided by beta (`--scale-errors`): raw z_l - y_l shrinks by beta per layer, to float32 noise 10
  nodes down. This is a local derivative: (z_l - phi(h_l - beta d_l)) / beta -> phi'(h_l) d_l as beta -> 0.
* `--bn-project`: the shift/scale parts of e_l that BN cancels move W_l without moving the network.
  Also a local derivative: BN's input Jacobian without its 1/sigma (one layer's own, no chain).
* BN affine fixed, targets through the forward's batch statistics: the papers give BN no rule.
* Max-pool switches are not used when unpooling d: they would be an activation derivative.
* Skip links E_{L->l} stay fixed by default (`--skip-update fixed`): they have no forward weight to
  track; the kp and product rules are options (measured below).
* Output error softmax - onehot, as the LRA-E code; the paper's alpha-mixed sign errors are not implemented.
* Skip links attach to node outputs: our reading of rec-LRA's "targets for block outputs first" (unverified).

Results on Fashion-MNIST (`bash bench/lra.sh`) and time per epoch: bench/results/NOTES.md
(`lra-mlp/`, `lra-resnet18/`, `epoch-time-lra-*`).

`build_stages` refuses models containing anything but Linear/Conv2d, BatchNorm, elementwise
activations, pooling, Flatten and bpfree's residual `BasicBlock`.
"""
from .graph import Graph, LRALayer, Residual
from .probe import alignment
from .rules import FEEDBACK_UPDATES, LRAE, LRAOptions, RecLRA, RecLRAOptions
from .stage import LRAStage, LRAStats

__all__ = ["FEEDBACK_UPDATES", "Graph", "LRAE", "LRALayer", "LRAOptions", "LRAStage", "LRAStats", "RecLRA",
           "RecLRAOptions", "Residual", "alignment"]

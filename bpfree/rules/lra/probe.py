"""The update/gradient alignment probe: how closely each layer's LRA update follows backprop.

A diagnostic, not part of the rule: it runs backprop on purpose (one chained graph through every
stage) and reports cos(dW_l, dCE/dW_l) per layer. `LRAStage.step` runs it once per epoch on
`--probe-size` examples (`align_cos` in the metrics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .graph import NORMS, walk


def _bn_buffers(stages):
    return [(module, module.running_mean.clone(), module.running_var.clone(), module.num_batches_tracked.clone())
            for stage in stages for module in stage.modules()
            if isinstance(module, NORMS) and module.track_running_stats]


def alignment(stages: list, x: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Cosine between each layer's LRA weight update and the true backprop gradient of the
    cross-entropy on (x, labels), per stage (`stages`: consecutive LRAStages, the last holding the output;
    x: the first one's input). The output layer's is 1: its LRA update is the CE gradient.
    Nothing is updated; BN running statistics are left as they were."""
    saved = _bn_buffers(stages)
    try:
        passes, message = [], x.detach()
        for stage in stages:
            passes.append(stage._forward(message, noise=False))
            message = passes[-1].out
        signal, errors = (), [None] * len(stages)
        for i in range(len(stages) - 1, -1, -1):
            errors[i], signal = stages[i]._sweep(passes[i], signal, labels)
        dws = [stage._updates(fwd, err)[0] for stage, fwd, err in zip(stages, passes, errors)]
        z = x.detach()                                  # the true gradient: one chained graph
        for stage in stages:
            z = walk(stage._nodes(), z, stage._plain)[0]
        weights = [stage.layer(j).weight.weight for stage in stages for j in stage.own]
        grads = iter(torch.autograd.grad(F.cross_entropy(z, labels), weights))
    finally:
        for module, mean, var, n in saved:
            module.running_mean.copy_(mean), module.running_var.copy_(var), module.num_batches_tracked.copy_(n)
    return [[float(F.cosine_similarity(dw[j][0].flatten(), next(grads).flatten(), dim=0)) for j in stage.own]
            for stage, dw in zip(stages, dws)]

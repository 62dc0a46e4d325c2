"""Transferability estimators: how well frozen features suit a target task, without training them.

Every estimator reads the frozen module's features on the target's labelled examples (an N x D
float tensor f, labels y in N); `leep` and `nce` also read the *source's own classifier*: its class
probabilities theta(x) (N x C_s) on the same target inputs. Higher is better for every one.

    kernel  mean over seeded batches of the kernel proxy objective (alignment A of phi(f)'s cosine
            kernel with the ideal kernel; Duan, Yu & Principe, arXiv 2005.05541)
    logme   mean over classes c of the log maximum evidence / N of Bayesian linear regression
            y_c = f w + noise, w ~ N(0, 1/alpha), noise ~ N(0, 1/beta), y_c the one-hot column
            (You et al., ICML 2021; fixed point of thuml/LogME's `_fit_fixed_point`)
    leep    (1/N) sum_i log sum_z P(y_i | z) theta_z(x_i),  P(y, z) = (1/N) sum_{i: y_i = y} theta_z(x_i)
            (Nguyen et al., ICML 2020)
    hscore  tr(cov(f)^+ cov(E[f | y]))   (Bao et al., ICIP 2019)
    nce     -H(Y | Z) = sum_{y,z} P(y, z) log P(y | z),  Z = argmax_z theta_z(x)  (Tran et al., ICCV 2019)
    probe   held-out accuracy of a linear layer trained on `shots` seeded examples per class (a cheap
            trained baseline)

`estimate(name, features, labels, source_probs)` scores; `ESTIMATORS.describe()` lists them.
Deterministic for a fixed seed and thread count.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import BpfreeError
from .registry import Registry
from .rules.kernel import PROXIES, KernelProxy, same_class

_EPS = 1e-5          # thuml/LogME's guard on the fixed point's denominators


@dataclass(frozen=True)
class Estimator:
    """A scoring function fn(features, labels, source_probs, seed, **options) -> float, and whether
    it needs the source's own classifier (`source_probs`)."""
    fn: Callable[..., float]
    needs_source_classifier: bool = False


ESTIMATORS: Registry[Estimator] = Registry("estimator", sort=False)


def _register(name: str, description: str, needs_source_classifier: bool = False):
    def decorate(fn):
        ESTIMATORS.register(name, Estimator(fn, needs_source_classifier), description)
        return fn
    return decorate


def estimate(name: str, features: torch.Tensor, labels: torch.Tensor, source_probs: Optional[torch.Tensor] = None,
             *, seed: int = 0, **options) -> float:
    """Score frozen `features` (N x D) for the target `labels` (N integers, any values) with the
    estimator `name`; `source_probs` (N x C_s) are the source classifier's probabilities on the same
    inputs (needed by leep and nce). Options go to the estimator (kernel: proxy, batch_size, ...)."""
    est = ESTIMATORS.get(name)
    if features.dim() != 2 or len(features) != len(labels):
        raise BpfreeError(f"estimators need N x D features and N labels, got {tuple(features.shape)} "
                          f"and {tuple(labels.shape)}")
    if est.needs_source_classifier:
        if source_probs is None:
            raise BpfreeError(f"{name} needs the source's own classifier; this source has none")
        if source_probs.shape[0] != len(labels):
            raise BpfreeError(f"{name}: {len(source_probs)} source predictions for {len(labels)} labels")
    unknown = set(options) - set(inspect.signature(est.fn).parameters)
    if unknown:
        raise BpfreeError(f"the {name} estimator takes no option {', '.join(sorted(unknown))}")
    labels = torch.unique(labels, return_inverse=True)[1].to(features.device)    # -> 0..C-1
    return float(est.fn(features, labels, source_probs, seed, **options))


# --- kernel: the proxy objective of the hidden modules ----------------------------------------------------
@_register("kernel", "kernel proxy objective of phi(features) against the target's ideal kernel (Duan & Principe)")
def _kernel(f, y, source_probs, seed, *, proxy: str = "alignment", kernel: str = "cosine", sigma: float = 0.5,
            temperature: float = 1.0, batch_size: int = 256, max_examples: Optional[int] = None) -> float:
    """Batches of `batch_size` in one seeded random order (so batches mix classes even when the
    target is sorted by class), batches of fewer than 2 skipped, the rest averaged weighted by their
    number of pairs. phi = ReLU, unit norm (features come pooled). Objective: alignment A in
    [0, 1]; raw: same-class minus different-class mean kernel; neo, mse, contrastive: minus their loss."""
    if proxy not in PROXIES:
        raise BpfreeError(f"unknown proxy {proxy!r}; choose one of: {', '.join(PROXIES)}")
    if batch_size < 2:
        raise BpfreeError(f"batch_size must be at least 2 (the proxy compares pairs), got {batch_size}")
    scorer = KernelProxy(proxy, kernel, sigma, temperature, pool=None)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_examples]
    total, weight = 0.0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size].to(f.device)
        if len(idx) < 2:
            continue
        pairs = len(idx) * (len(idx) - 1) // 2
        total += float(scorer.objective(f[idx], same_class(y[idx]))) * pairs
        weight += pairs
    if weight == 0:
        raise BpfreeError("the kernel estimator needs at least 2 target examples")
    return total / weight


# --- LogME ----------------------------------------------------------------------------------------------
@_register("logme", "log marginal evidence of a Bayesian linear model on the features (You et al. 2021)")
def _logme(f, y, source_probs, seed, *, iterations: int = 11, tol: float = 1e-3) -> float:
    """With f = U diag(s) V^T (k = min(N, D) singular values), sigma = s^2, and per class c the
    projection x = U^T y_c, alternate (MacKay's fixed point, t = alpha / beta):
        gamma = sum sigma / (sigma + t)            effective number of parameters
        |m|^2 = sum sigma x^2 / (sigma + t)^2      m = (F^T F + t)^-1 F^T y_c, the posterior mean
        |r|^2 = sum x^2 t^2 / (sigma + t)^2 + |y_c|^2 - |x|^2          r = y_c - F m
        alpha = gamma / |m|^2,  beta = (N - gamma) / |r|^2     until t changes by < tol (relative)
    evidence/N = (D log alpha + N log beta - log|alpha I + beta F^T F| - beta |r|^2 - alpha |m|^2
                  - N log 2 pi) / 2N;  score = mean over classes.
    Deviation: log|A| counts all D eigenvalues, the (D - k) missing ones as log alpha; the
    reference sums only over f's k singular values, which inflates the evidence of wide features
    (N < D)."""
    f = f.double()
    n, d = f.shape
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    sigma = s ** 2
    evidences = []
    for c in range(int(y.max()) + 1):
        yc = (y == c).double()
        x2 = (u.T @ yc) ** 2
        outside = float(yc @ yc - x2.sum())             # |y_c|^2 outside f's column space
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
            r2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + outside
            alpha, beta = gamma / (m2 + _EPS), (n - gamma) / (r2 + _EPS)
            if abs(alpha / beta - t) / t <= tol:
                break
        logdet = float(torch.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
        evidences.append((d * math.log(alpha) + n * math.log(beta) - logdet - beta * r2 - alpha * m2
                          - n * math.log(2 * math.pi)) / (2 * n))
    return sum(evidences) / len(evidences)


# --- LEEP and NCE: the source classifier's predictions -----------------------------------------------------
def _joint(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Empirical joint P(y, z) (C x C_s) of target label y and source label z with weights p (N x C_s)."""
    joint = torch.zeros(int(y.max()) + 1, p.shape[1], dtype=torch.float64, device=p.device)
    return joint.index_add_(0, y.to(p.device), p.double()) / len(y)


@_register("leep", "log expected empirical prediction of the source classifier (Nguyen et al. 2020)", True)
def _leep(f, y, source_probs, seed) -> float:
    """P(y | z) = P(y, z) / P(z) from the soft source predictions theta(x); LEEP = mean_i log of the
    "expected empirical predictor" sum_z P(y_i | z) theta_z(x_i). A source label z no target
    example is given any weight to has P(z) = 0 and no say."""
    joint = _joint(y, source_probs)
    cond = joint / joint.sum(0).clamp_min(1e-300)
    eep = source_probs.double() @ cond.T                 # N x C
    return float(eep.gather(1, y.to(eep.device)[:, None]).log().mean())


@_register("nce", "negative conditional entropy of the target label given the source's label (Tran et al. 2019)",
           True)
def _nce(f, y, source_probs, seed) -> float:
    """Z = the source's argmax label; NCE = sum_{y,z} P(y, z) log P(y | z), with 0 log 0 = 0."""
    hard = F.one_hot(source_probs.argmax(1), source_probs.shape[1])
    joint = _joint(y, hard)
    cond = joint / joint.sum(0).clamp_min(1e-300)
    return float((joint * cond.clamp_min(1e-300).log()).sum())


# --- H-score ----------------------------------------------------------------------------------------------
@_register("hscore", "tr(cov(f)^-1 cov(E[f|y])): class-mean spread in the features' own metric (Bao et al. 2019)")
def _hscore(f, y, source_probs, seed) -> float:
    """cov(f) (N - 1 normalised) inverted by the pseudo-inverse at torch's default relative cutoff:
    features often have dead (constant) units, whose covariance directions are zero.
    Deviation: the usual reference code inverts with rcond 1e-15, where round-off in those
    directions can dominate the score. Degenerate when N - 1 <= D: every C-class target then
    scores C - 1 (its maximum), whatever the features."""
    f = f.double()
    f = f - f.mean(0)
    counts = torch.bincount(y).double()
    means = torch.zeros(len(counts), f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, y, f)
    g = (means / counts[:, None])[y]                  # E[f | y] per example (centred, as f is)
    cov_f, cov_g = f.T @ f / (len(f) - 1), g.T @ g / (len(f) - 1)
    return float(torch.trace(torch.linalg.pinv(cov_f, hermitian=True) @ cov_g))


# --- few-shot linear probe --------------------------------------------------------------------------------
def linear_probe(f_train: torch.Tensor, y_train: torch.Tensor, f_eval: torch.Tensor, y_eval: torch.Tensor,
                 *, steps: int = 100, l2: float = 1e-4) -> float:
    """Accuracy on (f_eval, y_eval) of a linear layer (softmax regression) trained on (f_train,
    y_train): features standardised with the training rows' statistics, weights from zero, full-batch
    L-BFGS for `steps` iterations on cross-entropy + l2 |W|^2 (a convex problem: no seed involved)."""
    f_train, f_eval = f_train.float(), f_eval.float()
    mean, std = f_train.mean(0), f_train.std(0, unbiased=False).clamp_min(1e-6)
    a, b = (f_train - mean) / std, (f_eval - mean) / std
    classes = int(max(y_train.max(), y_eval.max())) + 1
    w = torch.zeros(a.shape[1] + 1, classes, device=a.device, requires_grad=True)
    ones = torch.ones(len(a), 1, device=a.device)
    opt = torch.optim.LBFGS([w], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.cat([a, ones], 1) @ w, y_train) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (torch.cat([b, torch.ones(len(b), 1, device=b.device)], 1) @ w).argmax(1)
    return float((pred == y_eval).double().mean())


@_register("probe", "held-out accuracy of a linear layer trained on a few seeded examples per class")
def _probe(f, y, source_probs, seed, *, shots: int = 10) -> float:
    """`shots` examples per class drawn with `seed` train the layer (`linear_probe`); every other
    example is held out and scored."""
    counts = torch.bincount(y)
    if int(counts.min()) <= shots:
        raise BpfreeError(f"probe needs more than {shots} examples of every class (one is held out); "
                          f"the smallest class has {int(counts.min())}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(y.device)
    train = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for c in range(len(counts)):
        train[order[y[order] == c][:shots]] = True
    return linear_probe(f[train], y[train], f[~train], y[~train])

"""Kernel modular training (Duan & Principe) and transferability: what the paper's method promises."""
import math

import pytest
import torch
from conftest import quick_config
from torch import nn

import bpfree.rules.kernel as kernel_mod
from bpfree.engine import Trainer
from bpfree.errors import BpfreeError
from bpfree.models import create_model
from bpfree.rules import get_rule, make_options
from bpfree.rules.kernel import (
    KERNELS,
    PROXIES,
    KernelProxy,
    OutputModule,
    feature_map,
    kernel_matrix,
    kernel_proxy_loss,
    same_class,
)
from bpfree.run import build, train
from bpfree.transfer import rank_sources, transferability

MLP = {"model": "mlp", "model_options": {"widths": (64, 64)}, "blocks": 2}
CNN = {"model": "cnn", "model_options": {"widths": (16, 32, 64, 64)}, "blocks": 4}


# --- the proxy on toy batches ---------------------------------------------------------------------
def proxy_loss(features, labels, kind="alignment", **kw):
    """A hidden module's proxy loss of `features` on a batch with class `labels`."""
    return KernelProxy(kind, **kw).loss(features, same_class(labels))


def proxy_objective(features, labels, kind="alignment", **kw):
    return KernelProxy(kind, **kw).objective(features, same_class(labels))


def _toy(classes=3, per_class=4, dim=8):
    labels = torch.arange(classes).repeat_interleave(per_class)
    ideal = torch.eye(dim)[labels]                       # same class: identical; classes: orthogonal
    return labels, ideal


def test_same_class():
    y = torch.tensor([0, 1, 0, 2])
    G = torch.tensor([[1., 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])
    assert torch.equal(same_class(y), G.bool())


def test_feature_map_relu_pool_unit_norm():
    torch.manual_seed(0)            # unseeded, a row of randn(4, 7) is all negative ~3% of the time
    z = torch.randn(5, 3, 4, 4)
    z[2] = -z[2].abs()                                   # every unit off: stays zero, no NaN
    phi = feature_map(z)
    assert phi.shape == (5, 3)
    expected = torch.relu(z).mean((2, 3))
    live = [0, 1, 3, 4]
    assert torch.allclose(phi[live], nn.functional.normalize(expected[live], dim=1), atol=1e-6)
    assert torch.equal(phi[2], torch.zeros(3))
    assert feature_map(z, pool=2).shape == (5, 12)
    assert torch.allclose(feature_map(torch.randn(4, 7)).norm(dim=1), torch.ones(4))


def test_cosine_and_gaussian_kernels():
    torch.manual_seed(0)            # unseeded, a row of randn(6, 10) is all negative (phi = 0) ~0.6% of the time
    phi = feature_map(torch.randn(6, 10))
    K = kernel_matrix(phi, "cosine")
    assert torch.allclose(K, nn.functional.cosine_similarity(phi[:, None], phi[None], dim=2), atol=1e-6)
    assert K.min() >= 0 and torch.allclose(K.diagonal(), torch.ones(6))     # k in [k_min, k_max] = [0, 1]
    sigma = 0.7
    Kg = kernel_matrix(phi, "gaussian", sigma)
    assert torch.allclose(Kg, torch.exp(-torch.cdist(phi, phi) ** 2 / (2 * sigma ** 2)), atol=1e-5)
    assert torch.allclose(Kg.diagonal(), torch.ones(6)) and (Kg > 0).all() and (Kg <= 1 + 1e-6).all()
    e = torch.eye(2)                                     # orthogonal unit vectors: distance^2 = 2
    assert kernel_matrix(e, "gaussian", sigma)[0, 1].item() == pytest.approx(math.exp(-1 / sigma ** 2))
    with pytest.raises(BpfreeError, match="unknown kernel"):
        kernel_matrix(phi, "laplace")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", PROXIES)
def test_proxy_is_best_when_classes_coincide_and_are_orthogonal(kind, kernel):
    torch.manual_seed(0)
    labels, ideal = _toy()
    loss = lambda f: proxy_loss(f, labels, kind, kernel=kernel).item()   # noqa: E731
    best = loss(ideal)
    random = [loss(torch.rand(len(labels), 8)) for _ in range(5)]
    merged = loss(torch.ones(len(labels), 8))            # every class on one point
    assert all(best < r - 1e-3 for r in random) and best < merged - 1e-3
    # no small perturbation of the ideal features does better (neo: its shift makes bigger
    # features slightly better, so only its ranking against other configurations is asserted)
    if kind != "neo":
        for _ in range(5):
            assert loss(ideal + 0.05 * torch.rand_like(ideal)) >= best - 1e-6
    # a random batch whose labels are shuffled away from its structure is worse still than ideal
    assert best < loss(ideal[torch.randperm(len(labels))]) - 1e-3


def test_proxy_values_at_the_ideal_kernel():
    labels, ideal = _toy(classes=3, per_class=4)
    for kind in ("alignment", "raw", "mse"):
        assert proxy_loss(ideal, labels, kind).item() == pytest.approx(0, abs=1e-6)
    assert proxy_objective(ideal, labels, "alignment").item() == pytest.approx(1)
    assert proxy_loss(ideal, labels, "neo").item() < 0.05
    # contrastive: -log(sum_same e^k / sum_all e^k) with k = 1 on 18 same pairs, 0 on 48 others
    n_same, n_diff = 3 * 6, 66 - 18
    expected = math.log((n_same * math.e + n_diff) / (n_same * math.e))
    assert proxy_loss(ideal, labels, "contrastive").item() == pytest.approx(expected, rel=1e-5)
    # alignment matches the formula <K, G> / (|K| |G|) on the strict upper triangle
    f = feature_map(torch.rand(12, 8))
    K, G = f @ f.t(), same_class(labels).float()          # the ideal kernel G*: k_max = 1, k_min = 0
    iu = torch.triu_indices(12, 12, 1)
    k, g = K[iu[0], iu[1]], G[iu[0], iu[1]]
    alignment = (k @ g / (k.norm() * g.norm())).item()
    assert proxy_objective(f, labels).item() == pytest.approx(alignment, rel=1e-5)


def test_proxy_edge_cases_are_finite():
    f = torch.rand(4, 5, requires_grad=True)
    for kind in PROXIES:
        for labels in (torch.arange(4), torch.zeros(4, dtype=torch.long)):   # no / only same-class pairs
            loss = proxy_loss(f, labels, kind)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(f.grad).all()
    assert kernel_proxy_loss(torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool)).item() == 0
    with pytest.raises(BpfreeError, match="unknown proxy"):
        proxy_loss(f, torch.arange(4), "hinge")


def test_hidden_modules_learn_from_pairwise_labels_only(digits, monkeypatch):
    rule = build(quick_config(method="kernel", **CNN), digits)
    stage = rule.stages[0]
    x, y = digits.x_train[:32], digits.y_train[:32]
    seen = []
    original = kernel_mod.KernelProxy.loss
    monkeypatch.setattr(kernel_mod.KernelProxy, "loss",
                        lambda self, z, same: seen.append(same) or original(self, z, same))
    torch.manual_seed(0)
    a = stage.local((x,), y).loss
    torch.manual_seed(0)
    b = stage.local((x,), (y * 7 + 3) % 10).loss            # other class names, same pairs
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert all(s.dtype == torch.bool and s.shape == (32, 32) for s in seen)


# --- the rule -------------------------------------------------------------------------------------
def test_modules_group_the_blocks(digits):
    for n, names in [(1, ["hidden1", "output"]), (2, ["hidden1", "hidden2", "output"]),
                     (4, ["hidden1", "hidden2", "hidden3", "hidden4", "output"])]:
        rule = build(quick_config(method="kernel", rule_options={"hidden_modules": n}, **CNN), digits)
        assert [s.name for s in rule.stages] == names
        assert sum(len(s.body) for s in rule.stages[:-1]) == 4
        assert rule.stages[-1].head is rule.net.head
    three = build(quick_config(method="kernel", rule_options={"hidden_modules": 3}, **CNN), digits)
    assert [len(s.body) for s in three.stages[:-1]] == [1, 1, 2]     # the extra block goes last
    with pytest.raises(BpfreeError, match="hidden-modules must be in 1..4"):
        build(quick_config(method="kernel", rule_options={"hidden_modules": 5}, **CNN), digits)
    assert get_rule("kernel").default_schedule == "sequential"


@pytest.mark.parametrize("options, match", [
    ({"proxy": "hinge"}, "unknown --proxy"), ({"kernel": "poly"}, "unknown --kernel"), ({"sigma": 0}, "sigma"),
    ({"hidden_modules": 0}, "hidden-modules"), ({"output_lr_mult": -1}, "output-lr-mult")])
def test_bad_options_are_refused(options, match):
    with pytest.raises(BpfreeError, match=match):
        make_options(get_rule("kernel"), options)


def test_output_module_is_the_head_on_phi_of_frozen_features(digits):
    cfg = quick_config(method="kernel", **CNN)
    rule = build(cfg, digits)
    Trainer(rule, digits, cfg, quiet=True)
    out = rule.stages[-1]
    assert isinstance(out, OutputModule) and out.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * 30)
    x, y = digits.x_train[:16], digits.y_train[:16]
    rule.stages.eval()
    with torch.no_grad():
        z = rule.stages[0](x)[0]
        phi = feature_map(z).view(16, -1, 1, 1)
        assert torch.allclose(rule.predict(x), rule.net.head(phi), atol=1e-5)
    for p in rule.stages.parameters():
        p.grad = None
    z.requires_grad_(True)
    out.step((z,), y)
    assert z.grad is None
    touched = {n for n, p in rule.stages.named_parameters() if p.grad is not None}
    assert touched and all(n.startswith("1.head.") for n in touched)


def test_sequential_schedule_freezes_each_module_in_turn(digits):
    cfg = quick_config(method="kernel", stage_epochs=[1, 1, 1], rule_options={"hidden_modules": 2}, **CNN)
    rule = build(cfg, digits)
    trainer = Trainer(rule, digits, cfg, quiet=True)
    snaps = []
    trainer.on_epoch = lambda row: snaps.append(
        [{k: v.clone() for k, v in s.state_dict().items()} for s in rule.stages])
    trainer.fit()
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)   # noqa: E731  (weights and BN statistics)
    assert same(snaps[0][0], snaps[1][0]) and same(snaps[0][0], snaps[2][0])   # hidden1 frozen after epoch 1
    assert not same(snaps[0][1], snaps[1][1]) and same(snaps[1][1], snaps[2][1])
    assert not same(snaps[1][2], snaps[2][2])                                  # the output trained last
    assert not any(p.requires_grad for s in rule.stages[:2] for p in s.parameters())


def test_no_gradient_leaves_a_hidden_module(digits):
    cfg = quick_config(method="kernel", rule_options={"hidden_modules": 2}, **CNN)
    rule = build(cfg, digits)
    Trainer(rule, digits, cfg, quiet=True)
    x, y = digits.x_train[:32], digits.y_train[:32]
    h1 = rule.stages[0](x)[0].detach().requires_grad_(True)
    for p in rule.stages.parameters():
        p.grad = None
    rule.stages[1].step((h1,), y)
    assert h1.grad is None
    grads = [[p.grad is not None for p in s.parameters()] for s in rule.stages]
    assert not any(grads[0]) and all(grads[1]) and not any(grads[2])


@pytest.mark.parametrize("setup", [MLP, CNN], ids=["mlp", "cnn"])
def test_kernel_learns_digits(setup, digits):
    cfg = quick_config(method="kernel", epochs=3, **setup)
    trainer = Trainer(build(cfg, digits), digits, cfg, quiet=True)
    summary = trainer.fit()
    assert summary["schedule"] == "sequential" and summary["epochs"] == 6
    assert summary["test_accuracy"] > 0.9
    hidden = [row["stages"][0]["loss"] for row in trainer.rows[:3]]   # 1 - alignment, while it trains
    assert hidden[-1] < hidden[0] and hidden[-1] < 0.5


@pytest.mark.parametrize("options", [{"proxy": p} for p in PROXIES if p != "alignment"]
                         + [{"kernel": "gaussian"}, {"hidden_modules": 2}], ids=str)
def test_every_variant_learns(options, digits):
    cfg = quick_config(method="kernel", epochs=3, rule_options=options, **MLP)
    summary = train(cfg, data=digits, quiet=True)
    assert summary["test_accuracy"] > 0.7


def test_simultaneous_schedule(digits):
    cfg = quick_config(method="kernel", schedule="simultaneous", epochs=3, **MLP)
    summary = train(cfg, data=digits, quiet=True)
    assert summary["epochs"] == 3 and summary["test_accuracy"] > 0.7


# --- transferability ------------------------------------------------------------------------------
def test_transferability_ranks_a_trained_module_above_a_random_one(digits):
    trained = build(quick_config(method="kernel", epochs=3, **MLP), digits)
    Trainer(trained, digits, quick_config(method="kernel", epochs=3, **MLP), quiet=True).fit()
    random = build(quick_config(method="kernel", seed=1, **MLP), digits)
    x, y = digits.x_test, digits.y_test
    a = transferability(trained, x, y)
    assert a == transferability(trained, x, y)             # deterministic
    assert 0 <= transferability(random, x, y) < a <= 1
    ranking = rank_sources({"random": random, "trained": trained}, digits)
    assert [name for name, _ in ranking] == ["trained", "random"]
    # a plain module or a list of stages works too, and modes are left as they were
    body = trained.stages[0].body.train()
    assert transferability(body, x, y) == pytest.approx(a)
    assert body.training and transferability([trained.stages[0]], x, y, proxy="raw") > transferability(
        random.stages[0], x, y, proxy="raw")


def test_rules_name_their_feature_extractor_through_the_protocol(digits):
    # transferability asks the rule and its stages, never their types
    cfg = quick_config(method="kernel", rule_options={"hidden_modules": 2, "pool": 2}, **CNN)
    rule = build(cfg, digits)
    hidden, output = list(rule.stages[:-1]), rule.stages[-1]
    assert rule.feature_stages() == hidden and not output.extracts_features()
    assert [s.feature_pool() for s in hidden] == [2, 1] and all(s.extracts_features() for s in hidden)
    assert transferability(list(rule.stages), digits.x_test, digits.y_test) == transferability(
        rule, digits.x_test, digits.y_test)                           # the output module is left out
    other = build(quick_config(method="dgl", **MLP), digits)
    assert other.feature_stages() == list(other.stages[:-1]) and other.stages[0].feature_pool() == 1
    one = build(quick_config(method="backprop", **MLP), digits)
    assert one.feature_stages() == list(one.stages)


def test_transferability_of_conv_modules_and_errors(digits):
    net = create_model("cnn", 10, digits.in_shape, blocks=2, widths=(8, 8))
    score = transferability(nn.ModuleList(net.blocks), digits.x_test, digits.y_test, batch_size=128)
    assert 0 <= score <= 1
    with pytest.raises(BpfreeError, match="unknown proxy"):
        transferability(net.blocks[0], digits.x_test, digits.y_test, proxy="nope")
    with pytest.raises(BpfreeError, match="at least 2"):
        transferability(net.blocks[0], digits.x_test[:1], digits.y_test[:1])


# --- as kerNET does it (michaelshiyu/kerNET) -----------------------------------------------------------
def test_raw_proxy_weighs_its_two_groups_of_pairs_alike_unlike_kernet():
    # kerNET's srs_raw sums over pairs: (sum of same-class k - sum of different-class k) / number of
    # pairs. bpfree's raw takes each group's mean (a named deviation): on an unbalanced batch they differ.
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 3, 4])          # 6 same-class pairs, 22 others
    f = feature_map(torch.rand(8, 5))
    K, same = f @ f.t(), same_class(labels)
    iu = torch.triu_indices(8, 8, 1)
    k, s = K[iu[0], iu[1]], same[iu[0], iu[1]]
    loss = kernel_proxy_loss(K, same, "raw").item()
    assert loss == pytest.approx((1 - k[s].mean() + k[~s].mean()).item(), rel=1e-6)
    kernet = torch.where(s, 1 - k, k).mean().item()          # kerNET's, as a loss (up to a constant)
    assert abs(loss - kernet) > 0.05


def test_kernel_description_says_the_default_trains_the_body_as_one_module():
    assert "whole body as one module" in get_rule("kernel").description


def test_early_hidden_modules_pool_by_four_as_kernet():
    # kerNET's phi for conv maps: ReLU, avg_pool2d(4), flatten, unit norm (the last module's map is
    # pooled globally, as the head does)
    net = create_model("cnn", 10, (1, 32, 32), blocks=4, widths=(8, 8, 8, 8))      # maps 32, 16, 8, 4
    rule = get_rule("kernel")(net, make_options(get_rule("kernel"), {"hidden_modules": 4}))
    assert [s.feature_pool() for s in rule.stages[:-1]] == [8, 4, 2, 1]
    z = torch.randn(3, 8, 32, 32)
    kernet = nn.functional.normalize(nn.functional.avg_pool2d(torch.relu(z), 4).flatten(1), dim=1)
    assert torch.allclose(rule.stages[0].proxy.features(z), kernet, atol=1e-6)
    two = get_rule("kernel")(create_model("cnn", 10, (1, 32, 32), blocks=4, widths=(8, 8, 8, 8)),
                             make_options(get_rule("kernel"), {"hidden_modules": 2, "pool": 3}))
    assert [s.feature_pool() for s in two.stages[:-1]] == [3, 1]                   # --pool P: P x P

"""Transferability estimators (bpfree.estimators) against hand-computed cases and independent code,
and `bpfree transfer-rank --estimator`."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import quick_config
from test_cli import QUICK, run_cli

from bpfree.engine import Trainer
from bpfree.errors import BpfreeError
from bpfree.estimators import ESTIMATORS, estimate, linear_probe
from bpfree.run import build
from bpfree.transfer import features, rank_sources, score_sources, source_probs, transferability


def one_hot(z, classes):
    return torch.nn.functional.one_hot(torch.tensor(z), classes).double()


def separable_and_noise(n_per_class=40, classes=3, dim=6, seed=0):
    """Class means far apart (plus a little noise) vs pure noise, same shapes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    centres = 4 * torch.eye(classes, dim)
    good = centres[y] + 0.3 * torch.randn(len(y), dim, generator=g)
    noise = torch.randn(len(y), dim, generator=g)
    return good, noise, y


# --- LEEP and NCE: a 3 x 3 table by hand -------------------------------------------------------------
# (y, z) pairs: z = 0 holds y = 0, 0, 1; z = 1 holds y = 1; z = 2 holds y = 2, 2; source label 3 never occurs.
Y, Z = [0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 2, 2]
NCE_BY_HAND = (3 / 6) * (2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))     # -H(Y|Z): only z = 0 is uncertain


def test_nce_on_a_table_by_hand():
    probs = one_hot(Z, 4) * 0.9 + 0.025                     # soft, but the argmax is Z
    assert estimate("nce", torch.zeros(6, 1), torch.tensor(Y), probs) == pytest.approx(NCE_BY_HAND)
    # labels are any integers: remapped to 0..C-1 in order
    assert estimate("nce", torch.zeros(6, 1), torch.tensor(Y) * 3 + 5, probs) == pytest.approx(NCE_BY_HAND)


def test_leep_on_tables_by_hand():
    # one-hot source predictions: LEEP = mean_i log P(y_i | z_i) = NCE
    assert estimate("leep", torch.zeros(6, 1), torch.tensor(Y), one_hot(Z, 4)) == pytest.approx(NCE_BY_HAND)
    # soft: theta = (.75, .25) for y = 0 and (.25, .75) for y = 1 -> P(y|z) = [[.75, .25], [.25, .75]],
    # each example's expected empirical prediction .75 * .75 + .25 * .25 = .625
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    assert estimate("leep", torch.zeros(2, 1), torch.tensor([0, 1]), probs) == pytest.approx(math.log(0.625))
    # a source that predicts the target perfectly scores 0 (log 1), the maximum
    assert estimate("leep", torch.zeros(4, 1), torch.tensor([0, 1, 1, 0]), one_hot([1, 0, 0, 1], 2)) == 0


def test_leep_and_nce_need_the_source_classifier():
    with pytest.raises(BpfreeError, match="needs the source's own classifier"):
        estimate("leep", torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))


# --- H-score -------------------------------------------------------------------------------------------
def test_hscore_by_hand_and_against_numpy():
    # 1-D: f = 0, 2, 4, 6, classes (0, 0, 1, 1): var f = 20/3, class means 1, 1, 5, 5 -> var 16/3
    f, y = torch.tensor([[0.0], [2.0], [4.0], [6.0]]), torch.tensor([0, 0, 1, 1])
    assert estimate("hscore", f, y) == pytest.approx(16 / 20)
    good, noise, y = separable_and_noise(classes=2, dim=3)
    for x in (good, noise):
        a = x.double().numpy()
        g = np.stack([a[y.numpy() == c].mean(0) for c in range(2)])[y.numpy()]
        expected = np.trace(np.linalg.inv(np.cov(a.T)) @ np.cov(g.T))
        assert estimate("hscore", x, y) == pytest.approx(expected, rel=1e-9)
    assert estimate("hscore", good, y) > 10 * estimate("hscore", noise, y)


def test_hscore_is_degenerate_with_fewer_examples_than_dimensions_and_logme_is_not():
    # N - 1 <= D: any features fit any labels linearly, and H-score gives every source C - 1
    good, noise, y = separable_and_noise(n_per_class=5, dim=20)
    good = good + torch.randn(good.shape, generator=torch.Generator().manual_seed(1))
    assert estimate("hscore", good, y) == pytest.approx(2) and estimate("hscore", noise, y) == pytest.approx(2)
    assert estimate("logme", good, y) > estimate("logme", noise, y)


# --- LogME --------------------------------------------------------------------------------------------
def logme_by_matrices(f: np.ndarray, y: np.ndarray, iterations=11, tol=1e-3) -> float:
    """The same fixed point written with D x D matrices: A = alpha I + beta F^T F, m = beta A^-1 F^T y."""
    n, d = f.shape
    evidences = []
    for c in range(int(y.max()) + 1):
        t_y = (y == c).astype(float)
        alpha = beta = 1.0
        for _ in range(iterations):
            A = alpha * np.eye(d) + beta * f.T @ f
            m = beta * np.linalg.solve(A, f.T @ t_y)
            gamma = d - alpha * np.trace(np.linalg.inv(A))
            m2, r2 = m @ m, np.sum((t_y - f @ m) ** 2)
            t = alpha / beta
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (r2 + 1e-5)
            if abs(alpha / beta - t) / t <= tol:
                break
        logdet = np.linalg.slogdet(alpha * np.eye(d) + beta * f.T @ f)[1]
        evidences.append((d * np.log(alpha) + n * np.log(beta) - logdet - beta * r2 - alpha * m2
                          - n * np.log(2 * np.pi)) / (2 * n))
    return float(np.mean(evidences))


@pytest.mark.parametrize("n, d", [(60, 5), (8, 12)])      # more examples than dimensions, and fewer
def test_logme_against_a_matrix_implementation(n, d):
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.arange(n) % 3
    f[:, 0] += 2 * y                                          # one informative direction
    assert estimate("logme", f, y) == pytest.approx(logme_by_matrices(f.numpy(), y.numpy()), rel=1e-6)


def test_logme_prefers_separable_features():
    good, noise, y = separable_and_noise()
    assert estimate("logme", good, y) > estimate("logme", noise, y) + 0.3


# --- kernel and probe -------------------------------------------------------------------------------------
def test_kernel_alignment_by_hand():
    y = torch.tensor([0, 0, 1, 1])
    ideal = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])      # the ideal kernel itself: A = 1
    assert estimate("kernel", ideal, y) == pytest.approx(1.0)
    # identical rows: k = 1 on all 6 pairs, g = 1 on the 2 same-class ones: A = 2 / (sqrt 6 sqrt 2)
    assert estimate("kernel", torch.ones(4, 2), y) == pytest.approx(2 / math.sqrt(12))
    with pytest.raises(BpfreeError, match="unknown proxy"):
        estimate("kernel", ideal, y, proxy="nope")


def test_probe_and_linear_probe():
    good, noise, y = separable_and_noise()
    assert estimate("probe", good, y, shots=5) == 1.0
    assert estimate("probe", noise, y, shots=5) < 0.6            # chance is 1/3
    assert linear_probe(good[::2], y[::2], good[1::2], y[1::2]) == 1.0
    with pytest.raises(BpfreeError, match="more than 40 examples of every class"):
        estimate("probe", good, y, shots=40)


def test_every_estimator_is_deterministic_and_ranks_separable_above_noise():
    good, noise, y = separable_and_noise()
    probs_good, probs_noise = torch.softmax(3 * good[:, :3], 1), torch.softmax(noise[:, :3], 1)
    for name in ESTIMATORS:
        a = estimate(name, good, y, probs_good, seed=3)
        assert a == estimate(name, good.clone(), y.clone(), probs_good.clone(), seed=3), name
        assert a > estimate(name, noise, y, probs_noise, seed=3), name


def test_unknown_estimator_names_the_choices():
    with pytest.raises(BpfreeError, match="unknown estimator 'nope'; choose one of: kernel, logme, leep, nce, hscore, probe"):
        estimate("nope", torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(BpfreeError, match="N x D features and N labels"):
        estimate("logme", torch.zeros(4, 2, 2), torch.tensor([0, 1, 0, 1]))


# --- from modules and rules ------------------------------------------------------------------------------
def test_rank_sources_by_any_estimator(digits):
    trained = build(quick_config(method="kernel", epochs=2), digits)
    Trainer(trained, digits, quick_config(method="kernel", epochs=2), quiet=True).fit()
    random = build(quick_config(seed=1), digits)
    for name in ESTIMATORS:
        ranked = rank_sources({"random": random, "trained": trained}, digits, name, seed=2)
        assert [n for n, _ in ranked] == ["trained", "random"], name
    assert rank_sources({"trained": trained}, digits)[0][1] == estimate(
        "logme", features(trained, digits.x_train), digits.y_train)                     # logme by default
    with pytest.raises(BpfreeError, match="the logme estimator takes no option proxy"):
        rank_sources({"trained": trained}, digits, "logme", proxy="raw")


def test_features_are_the_body_for_every_rule(digits):
    # a backprop network's features are its last block's (not its logits); leep applies to a rule only
    rule = build(quick_config(), digits)
    x, y = digits.x_test[:100], digits.y_test[:100]
    f = features(rule, x)
    assert f.shape == (100, 64) and (f >= 0).all()
    assert source_probs(rule, x).sum(1).allclose(torch.ones(100))
    assert source_probs(rule.net.blocks, x) is None
    table = score_sources({"rule": rule, "blocks": rule.net.blocks}, (x, y), ["kernel", "leep"])
    assert table["rule"]["kernel"]["score"] == table["blocks"]["kernel"]["score"] == transferability(rule, x, y)
    assert table["rule"]["leep"]["score"] < 0 and table["blocks"]["leep"]["score"] is None
    assert "not applicable" in table["blocks"]["leep"]["note"]


def test_transfer_rank_with_several_estimators(capsys, tmp_path):
    assert run_cli(capsys, "train", "--method", "kernel", *QUICK, "--epochs", "2", "--out", tmp_path / "k")[0] == 0
    code, out, err = run_cli(capsys, "transfer-rank", "--modules", tmp_path / "k", "--data", "digits",
                             "--estimator", "logme,kernel,leep,nce,hscore,probe", "--json")
    assert code == 0, err
    [row] = json.loads(out)
    assert row["score"] == row["scores"]["logme"]["score"] and set(row["scores"]) == set(ESTIMATORS)
    assert all(r["seconds"] >= 0 and r["score"] is not None for r in row["scores"].values())
    code, out, _ = run_cli(capsys, "transfer-rank", "--modules", tmp_path / "k", "--data", "digits", "--json")
    assert json.loads(out)[0]["scores"].keys() == {"logme"}               # the default
    code, out, _ = run_cli(capsys, "transfer-rank", "--modules", tmp_path / "k", "--data", "digits",
                           "--estimator", "kernel,leep")
    assert code == 0 and "kernel (alignment)" in out and "leep" in out
    code, _, err = run_cli(capsys, "transfer-rank", "--modules", tmp_path / "k", "--data", "digits",
                           "--estimator", "kernel,nope")
    assert code == 2 and "unknown estimator 'nope'" in err

"""Associated Learning (`al`): what the paper's algorithm promises, checked through the stage protocol."""
import pytest
import torch
import torch.nn.functional as F
from conftest import quick_config

from bpfree.engine import Trainer
from bpfree.errors import BpfreeError
from bpfree.rules import get_rule, make_options
from bpfree.run import build, train

MLP = {"model_options": {"widths": (64, 64, 64)}, "blocks": 3}
CNN = {"model": "cnn", "model_options": {"widths": (16, 32, 64, 64)}, "blocks": 4}


def _rule(digits, options=None, **overrides):
    cfg = quick_config(method="al", rule_options=options or {}, **{**MLP, **overrides})
    rule = build(cfg, digits)
    Trainer(rule, digits, cfg, quiet=True)          # configures the stages' optimizers
    return rule


def _manual_scores(rule, x, at):
    """Bridge at component `at` (1-based), decode down through h_at ... h_1, by hand."""
    s = x
    for block in rule.net.blocks[:at]:
        s = block(s)
    t = rule.stages[at - 1].bridge(s)
    for stage in reversed(list(rule.stages)[:at]):
        t = stage.decoder(t)
    return t


def _strip(summary):
    return {k: v for k, v in summary.items() if "time" not in k and "per_s" not in k}


def test_components_hold_the_blocks_and_leave_the_head_out(digits):
    rule = _rule(digits)
    assert [s.name for s in rule.stages] == ["component1", "component2", "component3"]
    assert all(stage.encoder is block for stage, block in zip(rule.stages, rule.net.blocks))
    owned = {id(p) for p in rule.stages.parameters()}
    assert not any(id(p) in owned for p in rule.net.head.parameters())
    # every parameter belongs to exactly one stage (readouts borrow lower decoders without owning them)
    assert sum(1 for _ in rule.stages.parameters()) == sum(1 for s in rule.stages for _ in s.parameters())


def test_each_component_learns_only_from_its_own_loss(digits):
    rule = _rule(digits)
    x, y = digits.x_train[:32], digits.y_train[:32]
    message = (x,)
    for k, stage in enumerate(rule.stages):
        for p in rule.stages.parameters():
            p.grad = None
        message = stage.step(message, y)
        assert len(message) == 2 and all(not t.requires_grad for t in message)   # (s_k, t_k), detached
        assert all(p.grad is not None for p in stage.parameters()), "f, g, b and h all learn"
        assert all(p.grad is None for j, s in enumerate(rule.stages) if j != k for p in s.parameters())


@pytest.mark.parametrize("label_grad", [False, True])
def test_association_target_is_stopped_so_g_learns_only_by_reconstruction(digits, label_grad):
    rule = _rule(digits, {"label_grad": label_grad, "ae_noise": 0.0})
    stage = rule.stages[1]
    s_prev, t_prev = rule.stages[0]((digits.x_train[:32]), torch.eye(10)[digits.y_train[:32]])
    out = stage.local((s_prev.detach(), t_prev.detach()), digits.y_train[:32])
    g_params = list(stage.label_encoder.parameters())
    from_total = torch.autograd.grad(out.loss, g_params)
    ae = F.mse_loss(stage.decoder(stage.label_encoder(t_prev.detach())), t_prev.detach())
    from_ae = torch.autograd.grad(ae, g_params)
    same = all(torch.allclose(a, b) for a, b in zip(from_total, from_ae))
    assert same != label_grad      # the released code's sg(t_i); --label-grad lets it through
    # and the autoencoder loss never reaches the data path
    ae_to_f = torch.autograd.grad(ae, list(stage.encoder.parameters()) + list(stage.bridge.parameters()),
                                  allow_unused=True)
    assert all(g is None for g in ae_to_f)


def test_first_component_builds_the_one_hot_label_path(digits):
    rule = _rule(digits)
    first = rule.stages[0]
    x, y = digits.x_train[:8], digits.y_train[:8]
    out = first.local((x,), y)
    assert torch.allclose(out.message[1], first.label_encoder(F.one_hot(y, 10).float()))
    assert len(first(x)) == 1                       # inference carries the data path only
    with pytest.raises(BpfreeError, match="expects"):
        rule.stages[1].local((x,), y)


def test_ae_noise_perturbs_only_what_the_decoder_sees(digits):
    rule = _rule(digits, {"ae_noise": 0.5})
    stage = rule.stages[1]
    s_prev, t_prev = (m.detach() for m in rule.stages[0](digits.x_train[:32], torch.eye(10)[digits.y_train[:32]]))
    out = stage.local((s_prev, t_prev), digits.y_train[:32])
    t = stage.label_encoder(t_prev)
    assert torch.equal(out.message[1], t)                       # the label path sent up stays clean
    gen = torch.Generator().manual_seed(stage.noise_seed)       # the component's own stream, step 0
    noisy = t + 0.5 * torch.randn(t.shape, generator=gen)       # the decoder reads t_i + noise
    assert torch.allclose(out.ae, F.mse_loss(stage.decoder(noisy), t_prev))
    assert not torch.allclose(out.ae, F.mse_loss(stage.decoder(t), t_prev))
    again = stage.local((s_prev, t_prev), digits.y_train[:32])  # the next step draws new noise
    assert int(stage.noise_steps) == 2 and not torch.allclose(again.ae, out.ae)


def test_autoencoder_loss_falls_and_the_label_path_is_invertible(digits):
    cfg = quick_config(method="al", epochs=4, **MLP)
    rule = build(cfg, digits)
    trainer = Trainer(rule, digits, cfg, quiet=True)
    trainer.fit()
    for k in range(3):
        first, last = trainer.rows[0]["stages"][k], trainer.rows[-1]["stages"][k]
        assert last["ae_loss"] < first["ae_loss"]
        assert last["loss"] == pytest.approx(last["assoc_loss"] + last["ae_loss"], rel=1e-5)
    # the trained label path round-trips every class: h_1(...h_K(g_K(...g_1(y))))
    with torch.no_grad():
        t = torch.eye(10)
        for stage in rule.stages:
            t = stage.label_encoder(t)
        decoded = rule.stages[-1].decode(t)
    assert torch.equal(decoded.argmax(1), torch.arange(10))


def test_predict_bridges_at_the_top_and_decodes_down(digits):
    rule = _rule(digits)
    rule.stages.eval()
    x = digits.x_test[:20]
    with torch.no_grad():
        expected = _manual_scores(rule, x, 3)
        rule.net.head.weight.fill_(float("nan"))        # the network's own head plays no part
        assert torch.allclose(rule.predict(x), expected)
        logits, readouts = rule.outputs(x)
        assert torch.allclose(logits, expected)
        for j in (1, 2, 3):                              # each stage's readout = its shortcut
            assert torch.allclose(readouts[j - 1], _manual_scores(rule, x, j))


def test_shortcut_inference_bridges_lower_and_skips_the_blocks_above(digits):
    rule = _rule(digits, {"inference": "shortcut", "bridge_at": 1})
    rule.stages.eval()
    x = digits.x_test[:20]
    calls = []
    hook = rule.net.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        scores = rule.predict(x)
        assert not calls, "a shortcut at component 1 must not run block 2"
        assert torch.allclose(scores, _manual_scores(rule, x, 1))
    hook.remove()
    with pytest.raises(BpfreeError, match="--bridge-at must be in 1..3"):
        _rule(digits, {"inference": "shortcut", "bridge_at": 4})


def test_shortcut_and_top_accuracies_are_the_stage_readouts(digits):
    cfg = dict(method="al", epochs=3, blocks=2, model_options={"widths": (64, 64)})
    top = train(quick_config(**cfg), data=digits, quiet=True)
    shortcut = {"inference": "shortcut", "bridge_at": 1}
    low = train(quick_config(**cfg, rule_options=shortcut), data=digits, quiet=True)
    assert top["test_accuracy"] == top["stages"][-1]["test_acc"]
    assert low["test_accuracy"] == low["stages"][0]["test_acc"]
    assert low["stages"] == top["stages"]     # same training; only the prediction path differs
    assert low["test_accuracy"] > 0.5


@pytest.mark.parametrize("setting, floor", [
    (dict(epochs=3, blocks=2, model_options={"widths": (64, 64)}), 0.75),
    (dict(epochs=3, **{**CNN, "blocks": 2}), 0.8)])
def test_al_learns_digits_well_above_chance(setting, floor, digits):
    summary = train(quick_config(method="al", **setting), data=digits, quiet=True)
    assert summary["test_accuracy"] > floor
    assert all("test_acc" in s and "assoc_loss" in s for s in summary["stages"])


def test_same_seed_same_metrics(digits):
    cfg = dict(method="al", epochs=1, seed=3, **CNN)
    a = train(quick_config(**cfg), data=digits, quiet=True)
    b = train(quick_config(**cfg), data=digits, quiet=True)
    assert _strip(a) == _strip(b)


@pytest.mark.parametrize("values, message", [
    ({"label_width": 0}, "--label-width must be > 0"),
    ({"bridge_at": 0}, "--bridge-at must be > 0"),
    ({"bridge_width": -1}, "--bridge-width must be >= 0"),
    ({"lr_mult": 0.0}, "--lr-mult must be > 0"),
    ({"inference": "middle"}, "unknown --inference 'middle'"),
    ({"label_act": "gelu"}, "choose one of: sigmoid, tanh, relu")])
def test_bad_options_are_one_line_errors(values, message):
    with pytest.raises(BpfreeError, match=message):
        make_options(get_rule("al"), values)


def test_sequential_schedule_is_refused(digits):
    with pytest.raises(BpfreeError, match="does not support the sequential schedule"):
        train(quick_config(method="al", schedule="sequential"), data=digits, quiet=True)


@pytest.mark.parametrize("options", [{"label_act": "sigmoid", "bridge_act": "sigmoid"}, {"label_loss": "ce"},
                                     {"label_grad": True}, {"bridge_width": 32, "label_width": 16}])
def test_variants_run_on_conv_features(options, digits):
    rule = _rule(digits, options, **CNN)
    x, y = digits.x_train[:16], digits.y_train[:16]
    message = (x,)
    for stage in rule.stages:
        message = stage.step(message, y)
    rule.stages.eval()
    scores = rule.predict(x)
    assert scores.shape == (16, 10) and torch.isfinite(scores).all()

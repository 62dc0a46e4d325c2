"""Block-local rules (bwbpf, dgl, predsim): what each paper's algorithm and released code promise."""
import json

import pytest
import torch
from conftest import quick_config
from torch import nn

from bpfree.engine import Trainer
from bpfree.errors import BpfreeError
from bpfree.models import create_model
from bpfree.rules import get_rule, make_options
from bpfree.rules.heads import AUX_HEADS, make_aux_head
from bpfree.rules.local import CrossEntropy
from bpfree.rules.predsim import PredSim, PredSimRule, similarity_matrix, split_trailing_pool
from bpfree.run import build, train

CNN = {"model": "cnn", "model_options": {"widths": (16, 32, 64, 64)}, "blocks": 4}


# --- auxiliary heads ------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [None, 8])
@pytest.mark.parametrize("kind", AUX_HEADS)
@pytest.mark.parametrize("shape", [(16, 7, 7), (16, 1, 1), (40,)])
def test_aux_heads_map_any_block_output_to_class_scores(kind, shape, width):
    head = make_aux_head(kind, shape, 10, width=width)
    assert head(torch.randn(3, *shape)).shape == (3, 10)


def test_unknown_aux_head_names_choices():
    with pytest.raises(BpfreeError, match="linear, mlp, mlp-sr, cnn, conv"):
        make_aux_head("attention", (4, 2, 2), 10)


def _layers(module: nn.Module) -> list[str]:
    """The layers of a head, in order, with the sizes that define them."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            out.append(f"conv{m.kernel_size[0]}x{m.kernel_size[1]}:{m.in_channels}->{m.out_channels}")
        elif isinstance(m, nn.Linear):
            out.append(f"linear:{m.in_features}->{m.out_features}")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out.append(f"{type(m).__name__[-2:]}bn:{m.num_features}")
        elif isinstance(m, nn.ReLU):
            out.append("relu")
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * 2
            out.append(f"avgpool:{size[0]}x{size[1]}")
    return out


MLP_4C = ["linear:128->128", "1dbn:128", "relu"] * 3 + ["linear:128->10"]   # DGL: 3 hidden layers of 4C
PINNED = {   # a block output of 32 channels on a 16x16 map, 10 classes, default width (eugenium/DGL models.py)
    "linear": ["avgpool:1x1", "linear:32->10"],
    "conv": ["conv3x3:32->32", "2dbn:32", "relu", "avgpool:2x2", "linear:128->10"],
    "mlp": ["avgpool:4x4", "avgpool:2x2"] + MLP_4C,
    "mlp-sr": ["avgpool:4x4"] + ["conv1x1:32->32", "2dbn:32", "relu"] * 3 + ["avgpool:2x2"] + MLP_4C,
    "cnn": ["conv3x3:32->32", "2dbn:32", "relu"] * 2 + ["avgpool:2x2", "2dbn:32", "linear:128->10"],
}


@pytest.mark.parametrize("kind", AUX_HEADS)
def test_aux_head_architectures_are_pinned(kind):
    assert _layers(make_aux_head(kind, (32, 16, 16), 10)) == PINNED[kind]


def test_aux_width_sets_the_heads_channels():
    assert _layers(make_aux_head("conv", (32, 16, 16), 10, width=16)) == [
        "conv3x3:32->16", "2dbn:16", "relu", "avgpool:2x2", "linear:64->10"]
    assert _layers(make_aux_head("mlp-sr", (32, 16, 16), 10, width=16))[1:4] == ["conv1x1:32->16", "2dbn:16", "relu"]
    assert _layers(make_aux_head("mlp", (40,), 10)) == ["avgpool:1x1"] + ["linear:40->40", "1dbn:40", "relu",
                                                        "linear:40->40", "1dbn:40", "relu",
                                                        "linear:40->40", "1dbn:40", "relu", "linear:40->10"]


def test_rules_build_dgls_heads_and_the_conv_head_at_the_blocks_width(digits):
    assert get_rule("dgl").Options().aux_head is None     # DGL's code's mlp-sr on maps, its mlp on vectors
    dgl = build(quick_config(method="dgl", **CNN), digits)
    shapes = dgl.net.block_shapes()
    for stage, shape in zip(dgl.stages[:-1], shapes):
        assert _layers(stage.objective.classifier) == _layers(make_aux_head("mlp-sr", shape, 10))
    vectors = build(quick_config(method="dgl", blocks=2), digits)
    shape = vectors.net.block_shapes()[0]
    assert len(shape) == 1 and _layers(vectors.stages[0].objective.classifier) == _layers(make_aux_head("mlp", shape, 10))
    assert dgl.stages[-1].objective.classifier is dgl.net.head
    conv = build(quick_config(method="bwbpf", rule_options={"aux_head": "conv"}, **CNN), digits)
    first = _layers(conv.stages[0].objective.classifier)
    assert first[0] == "conv3x3:16->16" and first[-1] == "linear:64->10"   # C -> C, then 2x2 x C -> classes


# --- bwbpf ----------------------------------------------------------------------------------------
def _stepped(method, digits, **overrides):
    cfg = quick_config(method=method, **{**CNN, **overrides})
    rule = build(cfg, digits)
    Trainer(rule, digits, cfg, quiet=True)
    return rule


def _touched_by_last_step(rule, x, y):
    """Names of the parameters the last stage's step gives a gradient, fed by the stages below."""
    message = (x,)
    for stage in list(rule.stages)[:-1]:
        message = stage(*message)
    for p in rule.stages.parameters():
        p.grad = None
    rule.stages[-1].step(message, y)
    return {n for n, p in rule.stages.named_parameters() if p.grad is not None}


def test_bwbpf_trains_the_last_block_with_the_output_layer_as_released(digits):
    # Belis0811/BWBPF Main_4out.py: fc1..fc3 are aux heads; layer4 and fc4 share the global loss
    rule = _stepped("bwbpf", digits)
    assert [s.name for s in rule.stages] == ["block1", "block2", "block3", "block4"]
    assert all(isinstance(s.objective, CrossEntropy) for s in rule.stages)
    assert rule.stages[-1].objective.classifier is rule.net.head and rule.stages[-1].block is rule.net.blocks[-1]
    x, y = digits.x_train[:16], digits.y_train[:16]
    touched = _touched_by_last_step(rule, x, y)
    assert touched == {f"3.{n}" for n, _ in rule.stages[-1].named_parameters()}
    assert any(n.startswith("3.block.") for n in touched) and any(n.startswith("3.objective.") for n in touched)
    rule.stages.eval()                  # prediction: blocks then the output layer, never an aux head
    with torch.no_grad():
        assert torch.allclose(rule.predict(x), rule.net(x))


def test_bwbpf_output_only_global_loss_touches_only_the_output_layer(digits):
    rule = _stepped("bwbpf", digits, rule_options={"global_loss": "output-only"})
    assert [s.name for s in rule.stages] == ["block1", "block2", "block3", "block4", "output"]
    x, y = digits.x_train[:16], digits.y_train[:16]
    touched = _touched_by_last_step(rule, x, y)
    head = {f"4.{n}" for n, _ in rule.stages[-1].named_parameters()}
    assert touched == head and all(n.startswith("4.objective.classifier") for n in touched)
    rule.stages.eval()
    with torch.no_grad():
        assert torch.allclose(rule.predict(x), rule.net(x))
    with pytest.raises(BpfreeError, match="global-loss output-only needs --variant bp-free"):
        make_options(get_rule("bwbpf"), {"global_loss": "output-only", "variant": "deep-supervision"})


class _Constant(nn.Module):
    """A classifier whose scores do not depend on its input: its loss sends no gradient anywhere."""

    def forward(self, h):
        return torch.zeros(h.shape[0], 10)


def test_bwbpf_deep_supervision_sends_each_loss_into_block_one(digits):
    x, y = digits.x_train[:16], digits.y_train[:16]
    rule = _stepped("bwbpf", digits, rule_options={"variant": "deep-supervision"})
    assert len(rule.stages) == 1 and len(rule.stages[0].aux_heads) == 3      # the released K-1 aux losses
    stage = rule.stages[0]
    stage.aux_heads = nn.ModuleList([_Constant() for _ in stage.aux_heads])  # the final loss alone
    stage.local((x,), y).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.net.blocks[0].parameters())
    rule = _stepped("bwbpf", digits, rule_options={"variant": "deep-supervision"})
    stage = rule.stages[0]
    stage.net.head = _Constant()                                             # the aux losses alone
    stage.local((x,), y).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.net.blocks[0].parameters())


# --- dgl ------------------------------------------------------------------------------------------
def test_dgl_sequential_freezes_earlier_blocks(digits, tmp_path):
    cfg = quick_config(method="dgl", schedule="sequential", stage_epochs=[1, 1, 1, 1], **CNN)
    rule = build(cfg, digits)
    trainer = Trainer(rule, digits, cfg, quiet=True)
    seen = []
    trainer.on_epoch = lambda row: seen.append([p.clone() for p in rule.stages[0].parameters()])
    trainer.fit()
    assert all(torch.equal(a, b) for later in seen[1:] for a, b in zip(seen[0], later))
    assert not any(p.requires_grad for p in rule.stages[0].parameters())


# --- predsim --------------------------------------------------------------------------------------
def test_similarity_matrix_is_cosine_of_centred_vectors():
    z = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    s = similarity_matrix(z)
    assert torch.allclose(s.diag(), torch.ones(3), atol=1e-5)
    assert s[0, 1] == pytest.approx(1.0, abs=1e-5) and s[0, 2] < 0
    maps = torch.randn(4, 5, 6, 6)
    assert torch.allclose(similarity_matrix(maps), similarity_matrix(maps.flatten(2).std(dim=2)))


def test_similarity_matrix_flattens_1x1_maps_and_few_channels():
    # the reference takes the per-channel std over space only with > 1 position and > 3 channels
    torch.manual_seed(0)
    for shape in [(6, 16, 1, 1), (6, 3, 4, 4)]:
        maps = torch.randn(*shape, requires_grad=True)
        s = similarity_matrix(maps)
        assert torch.isfinite(s).all() and torch.allclose(s, similarity_matrix(maps.detach().flatten(1)))
        s.sum().backward()
        assert torch.isfinite(maps.grad).all()


@pytest.mark.parametrize("model, options, blocks", [("vgg11", {"width_mult": 0.125}, 4),
                                                    ("resnet18", {"width": 8}, 8)])
def test_predsim_trains_nets_whose_late_maps_are_1x1(model, options, blocks, digits):
    # digits are 8x8: vgg11's and resnet18's late blocks see 1x1 maps (they made predsim's loss NaN)
    cfg = quick_config(method="predsim", model=model, model_options=options, blocks=blocks, epochs=1, train_subset=256)
    summary = train(cfg, data=digits, quiet=True)
    assert all(0 <= s["loss"] < 10 for s in summary["stages"])


def test_predsim_gives_every_block_its_loss_before_its_pooling(digits):
    rule = _stepped("predsim", digits)
    assert [s.name for s in rule.stages] == ["block1", "block2", "block3", "block4", "output"]
    assert all(isinstance(s.objective, PredSim) for s in rule.stages[:-1])
    for stage in rule.stages[:-1]:       # the prediction decoder starts at zero, as the reference's
        assert not stage.objective.classifier[-1].weight.any()
    # cnn's blocks 2-4 end in a 2x2 max-pool: each block's loss (and message) is its map before that pool
    x, y = digits.x_train[:16], digits.y_train[:16]
    sides, message = [], (x,)
    for stage in rule.stages[:-1]:
        message = stage(*message)
        sides.append(message[0].shape[-1])
    assert sides == [8, 8, 4, 2] and [s.objective.sim_map.in_channels for s in rule.stages[:-1]] == [16, 32, 64, 64]
    rule.stages.eval()                   # ... and the pooling still happens: the output layer reads the network's
    with torch.no_grad():                # last map, flattened (64 channels x 1 x 1 here) as the reference's
        h, message = x, (x,)
        for block, stage in zip(rule.net.blocks, rule.stages):
            h, message = block(h), stage(*message)
        assert torch.equal(rule.stages[-1].block[0](message[0]), h)
    assert rule.stages[-1].objective.classifier[-1].in_features == 64
    # the output layer alone learns from the global loss, on the detached last features
    touched = _touched_by_last_step(rule, x, y)
    assert touched == {f"4.{n}" for n, _ in rule.stages[-1].objective.classifier.named_parameters(
        prefix="objective.classifier")}
    # --output-head model: the model's own head (GAP + linear), so the prediction is the network's
    # (standardised before the head: the identity at the initial statistics)
    model_head = _stepped("predsim", digits, rule_options={"output_head": "model"})
    model_head.stages.eval()
    with torch.no_grad():
        assert torch.allclose(model_head.predict(x), model_head.net(x), atol=1e-5)


def test_predsim_flatten_head_reads_the_map_pooled_to_pool_dim():
    # Fashion-MNIST-sized maps: the cnn's last map is 64 x 3 x 3 after its pool; pool_dim 100 -> 1x1
    for pool_dim, features in ((2048, 64 * 3 * 3), (100, 64)):
        torch.manual_seed(0)
        net = create_model("cnn", 10, (1, 28, 28), blocks=4, widths=(16, 32, 64, 64))
        rule = PredSimRule(net, make_options(PredSimRule, {"pool_dim": pool_dim}))
        assert rule.stages[-1].objective.classifier[-1].in_features == features
        assert not rule.stages[-1].objective.classifier[-1].weight.any()


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_predsim_output_layer_is_blind_to_the_scale_the_sim_loss_leaves_free(model, digits):
    # the sim loss is scale-invariant, so nothing holds the features' scale (the mlp's blocks, without
    # BatchNorm, shrank it ~100x on digits and the zero-started output layer then barely moved): the
    # output layer's input is standardised per channel, without parameters
    def output_input(rule, scale):
        message = (digits.x_train[:64],)
        for stage in list(rule.stages)[:-1]:
            message = stage(*message)
        rule.stages[-1].train()
        with torch.no_grad():
            return rule.stages[-1].block(scale * message[0])
    overrides = CNN if model == "cnn" else {"model": "mlp"}
    rule = _stepped("predsim", digits, **overrides)
    assert torch.allclose(output_input(rule, 1e4), output_input(rule, 1e3), atol=1e-3)
    assert not any(p.requires_grad for p in rule.stages[-1].block.parameters())
    plain = _stepped("predsim", digits, rule_options={"output_norm": False}, **overrides)
    assert torch.allclose(output_input(plain, 10.0), 10 * output_input(plain, 1.0))


def test_split_trailing_pool_reuses_the_blocks_layers():
    conv, pool = nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2)
    block = nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1)), nn.Sequential(conv, nn.ReLU(), pool))
    body, tail = split_trailing_pool(block)
    assert tail is pool and body[1][0] is conv
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(tail(body(x)), block(x))
    flat = nn.Sequential(nn.Linear(3, 3))
    assert split_trailing_pool(flat)[0] is flat and isinstance(split_trailing_pool(flat)[1], nn.Identity)


def test_predsim_sim_only_trains_without_the_classifier(digits):
    rule = _stepped("predsim", digits, rule_options={"loss": "sim"})
    stage = rule.stages[0]
    for p in stage.parameters():
        p.grad = None
    stage.step((digits.x_train[:32],), digits.y_train[:32])
    assert all(p.grad is None for p in stage.objective.classifier.parameters())
    assert stage.objective.sim_map.weight.grad is not None


# --- every block-local rule -------------------------------------------------------------------------
@pytest.mark.parametrize("method, options", [("bwbpf", {}), ("bwbpf", {"aux_head": "conv"}),
                                             ("bwbpf", {"global_loss": "output-only"}),
                                             ("bwbpf", {"variant": "deep-supervision"}), ("dgl", {}),
                                             ("dgl", {"aux_head": "cnn"}),
                                             ("predsim", {}), ("predsim", {"loss": "pred"}),
                                             ("predsim", {"loss": "sim"})])
def test_local_rules_write_per_stage_metrics_and_learn(method, options, digits, tmp_path):
    cfg = quick_config(method=method, epochs=4, rule_options=options, **CNN)
    summary = train(cfg, tmp_path / "run", data=digits, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for stage in rows[-1]["stages"]:
        assert "loss" in stage and "test_acc" in stage
    assert summary["test_accuracy"] > 0.6


@pytest.fixture(scope="module")
def e2ebp_activation_bytes(digits):
    cfg = quick_config(method="backprop", epochs=1, train_subset=128, **CNN)
    return train(cfg, data=digits, quiet=True)["peak_activation_bytes"]


@pytest.mark.parametrize("method, options", [("bwbpf", {}), ("bwbpf", {"aux_head": "conv"}), ("dgl", {}),
                                             ("predsim", {})])
def test_a_local_rules_largest_stage_keeps_less_activation_memory_than_e2ebp(method, options, digits,
                                                                             e2ebp_activation_bytes):
    # a block-local stage keeps only its own block's (and head's) activations for its backward pass;
    # E2EBP keeps every block's. (bwbpf's deep-supervision variant, one stage with aux heads, keeps more.)
    cfg = quick_config(method=method, epochs=1, train_subset=128, rule_options=options, **CNN)
    summary = train(cfg, data=digits, quiet=True)
    assert 0 < summary["peak_activation_bytes"] < e2ebp_activation_bytes

"""Block-local rules (bwbpf, dgl, predsim): what each paper's algorithm promises."""
import json

import pytest
import torch
from conftest import quick_config

from bpfree.engine import Trainer
from bpfree.errors import BpfreeError
from bpfree.rules.heads import AUX_HEADS, make_aux_head
from bpfree.rules.predsim import similarity_matrix
from bpfree.run import build, train

CNN = {"model": "cnn", "model_options": {"widths": (16, 32, 64, 64)}, "blocks": 4}


@pytest.mark.parametrize("kind", AUX_HEADS)
@pytest.mark.parametrize("shape", [(16, 7, 7), (16, 1, 1), (40,)])
def test_aux_heads_map_any_block_output_to_class_scores(kind, shape):
    head = make_aux_head(kind, shape, 10, width=8)
    assert head(torch.randn(3, *shape)).shape == (3, 10)


def test_unknown_aux_head_names_choices():
    with pytest.raises(BpfreeError, match="linear, mlp, conv"):
        make_aux_head("attention", (4, 2, 2), 10)


def _stepped(method, digits, **overrides):
    cfg = quick_config(method=method, **{**CNN, **overrides})
    rule = build(cfg, digits)
    Trainer(rule, digits, cfg, quiet=True)
    return rule


def test_bwbpf_global_loss_touches_only_the_output_layer(digits):
    rule = _stepped("bwbpf", digits)
    assert [s.name for s in rule.stages] == ["block1", "block2", "block3", "block4", "output"]
    x, y = digits.x_train[:16], digits.y_train[:16]
    message = (x,)
    for stage in list(rule.stages)[:-1]:
        message = stage(*message)
    for p in rule.stages.parameters():
        p.grad = None
    rule.stages[-1].step(message, y)
    touched = {n for n, p in rule.stages.named_parameters() if p.grad is not None}
    head = {f"4.{n}" for n, _ in rule.stages[-1].named_parameters()}
    assert touched == head and all(n.startswith("4.objective.classifier") for n in touched)
    # prediction follows the main path: blocks then the output layer, never an aux head
    rule.stages.eval()
    with torch.no_grad():
        expected = rule.net(x)
    assert torch.allclose(rule.predict(x), expected)


def test_bwbpf_deep_supervision_sends_every_loss_into_block_one(digits):
    rule = _stepped("bwbpf", digits, rule_options={"variant": "deep-supervision"})
    assert len(rule.stages) == 1
    stage = rule.stages[0]
    out = stage.local((digits.x_train[:16],), digits.y_train[:16])
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.net.blocks[0].parameters())


def test_dgl_sequential_freezes_earlier_blocks(digits, tmp_path):
    cfg = quick_config(method="dgl", schedule="sequential", stage_epochs=[1, 1, 1, 1], **CNN)
    rule = build(cfg, digits)
    trainer = Trainer(rule, digits, cfg, quiet=True)
    seen = []
    trainer.on_epoch = lambda row: seen.append([p.clone() for p in rule.stages[0].parameters()])
    trainer.fit()
    assert all(torch.equal(a, b) for later in seen[1:] for a, b in zip(seen[0], later))
    assert not any(p.requires_grad for p in rule.stages[0].parameters())


@pytest.mark.parametrize("method, options", [("bwbpf", {}), ("bwbpf", {"aux_head": "conv"}),
                                             ("bwbpf", {"variant": "deep-supervision"}), ("dgl", {}),
                                             ("predsim", {}), ("predsim", {"loss": "pred"}),
                                             ("predsim", {"loss": "sim"})])
def test_local_rules_write_per_stage_metrics_and_learn(method, options, digits, tmp_path):
    cfg = quick_config(method=method, epochs=4, rule_options=options, **CNN)
    summary = train(cfg, tmp_path / "run", data=digits, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for stage in rows[-1]["stages"]:
        assert "loss" in stage and "test_acc" in stage
    assert summary["test_accuracy"] > 0.6
    # a local rule keeps only one block's activations at a time
    if len(summary["stages"]) > 1:
        assert summary["peak_activation_bytes"] < sum(summary["activation_bytes_per_stage"])


def test_similarity_matrix_is_cosine_of_centred_vectors():
    z = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    s = similarity_matrix(z)
    assert torch.allclose(s.diag(), torch.ones(3), atol=1e-5)
    assert s[0, 1] == pytest.approx(1.0, abs=1e-5) and s[0, 2] < 0
    maps = torch.randn(4, 3, 5, 5)
    assert similarity_matrix(maps).shape == (4, 4)


def test_predsim_sim_only_trains_without_the_classifier(digits):
    rule = _stepped("predsim", digits, rule_options={"loss": "sim"})
    stage = rule.stages[0]
    for p in stage.parameters():
        p.grad = None
    stage.step((digits.x_train[:32],), digits.y_train[:32])
    assert all(p.grad is None for p in stage.objective.classifier.parameters())
    assert stage.objective.sim_map.weight.grad is not None

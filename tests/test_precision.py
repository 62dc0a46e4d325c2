"""--precision: autocast per stage (bf16 works on the CPU), a gradient scaler per stage for fp16."""
import pytest
import torch
from conftest import quick_config

from bpfree.engine import Trainer
from bpfree.errors import BpfreeError
from bpfree.io import load_checkpoint
from bpfree.rules import get_rule
from bpfree.run import build, train

CNN = dict(model="cnn", model_options={"widths": (8, 8, 8, 8)}, batch_size=64)


def strip(summary):
    return {k: v for k, v in summary.items() if "time" not in k and "per_s" not in k}


def test_bf16_autocasts_each_stage_and_still_learns(digits):
    rule = build(quick_config(method="dgl", **CNN), digits)
    rule.stages[0].configure(quick_config().optim, 10, "bf16")
    x, y = digits.x_train[:32].contiguous(memory_format=torch.channels_last), digits.y_train[:32]
    message = rule.stages[0].step((x,), y)
    assert message[0].dtype == torch.bfloat16              # the block ran under autocast
    assert all(p.dtype == torch.float32 for p in rule.stages[0].parameters())   # weights stay fp32
    wider = {**CNN, "model_options": {"widths": (16, 16, 16, 16)}}
    summary = train(quick_config(method="dgl", precision="bf16", epochs=3, **wider), data=digits, quiet=True)
    reference = train(quick_config(method="dgl", epochs=3, **wider), data=digits, quiet=True)
    assert summary["precision"] == "bf16" and summary["config"]["precision"] == "bf16"
    assert summary["test_accuracy"] > 0.6 and summary["test_accuracy"] > reference["test_accuracy"] - 0.05


def test_fp16_has_one_scaler_per_stage_saved_and_resumed_exactly(digits, tmp_path):
    cfg = quick_config(method="bwbpf", precision="fp16", epochs=2, train_subset=600)
    whole = train(cfg, data=digits, quiet=True)
    train(cfg, tmp_path / "run", data=digits, quiet=True, stop_after=1)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    scales = [s["scaler"]["scale"] for s in state["stages"]]
    assert len(scales) == len(whole["stages"]) and all(s > 0 for s in scales)
    assert strip(train(cfg, tmp_path / "run", data=digits, quiet=True, resume=True)) == strip(whole)


def test_precisions_differ_and_are_deterministic(digits):
    runs = {p: train(quick_config(precision=p, **CNN), data=digits, quiet=True) for p in ("fp32", "bf16")}
    assert runs["fp32"]["stages"][0]["loss"] != runs["bf16"]["stages"][0]["loss"]
    again = train(quick_config(precision="bf16", **CNN), data=digits, quiet=True)
    assert strip(again) == strip(runs["bf16"])


def test_a_float32_only_rule_refuses_half_precision(digits):
    assert get_rule("reclra")
    with pytest.raises(BpfreeError, match="reclra trains in fp32 only"):
        train(quick_config(method="reclra", precision="bf16"), data=digits, quiet=True)
    with pytest.raises(BpfreeError, match="--precision"):
        quick_config(precision="fp8").validate()


def test_compiled_stages_learn_what_the_plain_ones_learn(digits):
    # aot_eager traces every stage's forward and local objective through torch.compile without
    # generating code (inductor's C++ build takes minutes on CI); its arithmetic is eager's
    import torch._dynamo
    cfg = quick_config(method="dgl", epochs=1, train_subset=512)
    with_compile = quick_config(method="dgl", epochs=1, train_subset=512, compile="aot_eager")
    rule = build(with_compile, digits)
    torch._dynamo.reset()
    compiled = Trainer(rule, digits, with_compile, quiet=True).fit()
    assert all(s._compiled_call_impl is not None and hasattr(s.local, "_torchdynamo_orig_callable")
               for s in rule.stages)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0     # something was really traced
    assert compiled["test_accuracy"] == train(cfg, data=digits, quiet=True)["test_accuracy"]

"""`backprop --checkpoint blocks`: the same training as plain E2EBP, with less activation memory kept."""
import pytest
import torch
import torch.nn.functional as F
from conftest import quick_config

from bpfree.cli import main
from bpfree.engine import Trainer
from bpfree.memory import SavedTensorMeter, parameter_storages, saved_activation_bytes
from bpfree.run import build, train

CNN = {"model": "cnn", "model_options": {"widths": (16, 32, 64, 64)}, "blocks": 4}


def fitted(digits, checkpoint: str):
    cfg = quick_config(epochs=2, train_subset=256, rule_options={"checkpoint": checkpoint}, **CNN)
    rule = build(cfg, digits)
    summary = Trainer(rule, digits, cfg, quiet=True).fit()
    return rule, summary


def test_checkpointed_training_equals_plain_backprop_weights_and_batchnorm_statistics(digits):
    plain, a = fitted(digits, "off")
    ckpt, b = fitted(digits, "blocks")
    assert a["test_accuracy"] == b["test_accuracy"] and a["stages"] == b["stages"]
    state_a, state_b = plain.stages.state_dict(), ckpt.stages.state_dict()
    assert any("running_mean" in k for k in state_a)
    for key, value in state_a.items():      # weights and BN running statistics alike (not updated twice)
        assert torch.equal(value, state_b[key]), key
    assert b["peak_activation_bytes"] < a["peak_activation_bytes"]


def test_torch_alone_would_update_batchnorm_statistics_twice(digits):
    # what the rule's buffer restore is for: torch's checkpoint reruns BN in training mode
    rule = build(quick_config(**CNN), digits)
    block = rule.net.blocks[0]
    x = torch.randn(8, *digits.in_shape)
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()
    bn = next(m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 2


def test_the_meter_counts_the_recomputed_block_and_stays_below_plain_backprop(digits):
    # Kept between the passes: the block inputs and the head. The backward pass adds one block's
    # recomputed activations at a time, which torch saves through its own hooks: the meter must count
    # the largest of them (at least what that block saves in a plain forward, less its input, which is
    # kept anyway), and the total must stay below what plain E2EBP keeps.
    rule = build(quick_config(**CNN), digits)
    net, stage = rule.net, rule.stages[0]
    x, y = torch.randn(64, *digits.in_shape), torch.randint(0, 10, (64,))

    def step(on: bool):
        stage.checkpoint_blocks = on
        F.cross_entropy(stage.local((x,), y).logits, y).backward()

    _, plain = saved_activation_bytes(net, step, False)
    meter = SavedTensorMeter(exclude=parameter_storages(net))
    with meter.measure():
        step(True)
    largest_block, h = 0, x
    for block in net.blocks:
        _, nbytes = saved_activation_bytes(block, lambda b=block, i=h: b(i).sum().backward())
        largest_block = max(largest_block, nbytes - h.untyped_storage().nbytes())
        h = block(h).detach()
    assert meter.saved < 0.5 * plain
    assert meter.transient >= largest_block > 0
    assert meter.bytes == meter.saved + meter.transient < plain
    step(True)                               # no meter measuring: nothing is counted, nothing breaks
    assert meter.transient >= largest_block


def test_checkpoint_flag_from_the_cli(capsys, tmp_path):
    code = main(["train", "--method", "backprop", "--checkpoint", "blocks", "--model", "mlp", "--data", "digits",
                 "--epochs", "1", "--train-subset", "128", "--out", str(tmp_path / "r")])
    assert code == 0
    assert main(["train", "--method", "backprop", "--checkpoint", "layers", "--data", "digits",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("checkpoint", ["off", "blocks"])
def test_checkpointed_backprop_learns_digits(checkpoint, digits):
    summary = train(quick_config(epochs=3, rule_options={"checkpoint": checkpoint}), data=digits, quiet=True)
    assert summary["test_accuracy"] > 0.8


def test_speed_bench_reports_kept_and_recomputed_memory_apart(digits):
    """bench/speed.py's checkpoint table: the meter's number is kept + the largest recomputation, and the
    table shows both parts once (it used to add a block's bytes to the meter's sum a second time)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("speed", Path(__file__).parents[1] / "bench" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    m = speed.checkpoint_memory(quick_config(**CNN), digits, batch=64)
    assert 0 < m["checkpointed_kept_bytes"] < m["plain_bytes"]
    assert 0 < m["checkpointed_recomputed_bytes"] <= max(m["block_bytes"])
    assert m["checkpointed_peak_bound_bytes"] == m["checkpointed_kept_bytes"] + m["checkpointed_recomputed_bytes"]

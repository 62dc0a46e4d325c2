"""The backprop baselines on W processes (bench/backprop_parallel.py): PyTorch's pipeline schedules and
DDP train the same network as one-process E2EBP, with the same gradients where the engines allow."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import quick_config

from bpfree.errors import BpfreeError
from bpfree.run import build, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import backprop_parallel  # noqa: E402


def mlp(**overrides):
    """No BatchNorm: micro-batches and per-process slices then compute exactly the whole batch's gradient."""
    return quick_config(**{"blocks": 2, "threads": 1, **overrides})


@pytest.mark.parametrize("engine", ["gpipe", "1f1b", "zbv", "dualpipev", "ddp"])
def test_gradients_equal_one_process_backprop_on_the_same_batch(engine, digits):
    cfg = mlp(blocks=4) if engine in backprop_parallel.V_SHAPED else mlp()     # a V holds two pieces per process
    x, y = digits.x_train[:64], digits.y_train[:64]
    grads = backprop_parallel.run(cfg, engine, 2, microbatches=4, data=digits, probe=(x, y))
    net = build(cfg, digits).net
    F.cross_entropy(net(digits.normalize(x)), y).backward()
    expected = dict(net.named_parameters())
    assert sorted(grads) == sorted(expected)             # every parameter, each on the process that holds it
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["gpipe", "ddp"])
def test_two_process_baselines_train_like_one_process_backprop(engine, digits):
    cfg = mlp(epochs=3, train_subset=512)
    summary = backprop_parallel.run(cfg, engine, 2, data=digits)
    one = train(cfg, data=digits, quiet=True)
    losses = summary["epoch_loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert summary["samples_per_s"] > 0 and summary["processes"] == 2
    assert abs(summary["test_accuracy"] - one["test_accuracy"]) <= 0.02    # same updates up to rounding


def test_a_batchnorm_pipeline_evaluates_like_one_process_backprop(digits):
    # BN normalises each micro-batch (so training differs slightly), and its running statistics must
    # not be polluted by torch's shape inference (which runs a stage in training mode on garbage)
    cfg = quick_config(model="cnn", model_options={"widths": (8, 16, 16, 16)}, blocks=2, threads=1, epochs=2)
    summary = backprop_parallel.run(cfg, "1f1b", 2, microbatches=4, data=digits)
    one = train(cfg, data=digits, quiet=True)
    assert summary["test_accuracy"] > 0.4 and abs(summary["test_accuracy"] - one["test_accuracy"]) <= 0.1


def test_pipeline_groups_blocks_as_bpfree_splits_them():
    assert backprop_parallel.block_groups(2, 2) == [[0], [1]]
    assert backprop_parallel.block_groups(5, 2) == [[0, 1], [2, 3, 4]]     # later groups larger, as split_units
    with pytest.raises(BpfreeError, match="at least 3 blocks"):
        backprop_parallel.block_groups(2, 3)


@pytest.mark.parametrize("engine, micro, message", [("pipedream", 4, "unknown engine"),
                                                     ("gpipe", 5, "equal micro-batches")])
def test_bad_settings_are_one_line_errors_before_any_process_starts(engine, micro, message, digits):
    with pytest.raises(BpfreeError, match=message):
        backprop_parallel.run(mlp(), engine, 2, microbatches=micro, data=digits)


def test_v_schedules_need_two_pieces_per_process_and_gpipe_holds_the_most_activations(digits):
    with pytest.raises(BpfreeError, match="zbv runs two pieces of the network per process: it needs --blocks >= 4"):
        backprop_parallel.run(mlp(), "zbv", 2, data=digits)
    cfg = mlp(blocks=4, epochs=1, train_subset=256)
    peaks = {engine: backprop_parallel.run(cfg, engine, 2, microbatches=4, data=digits)
             ["peak_activation_bytes_per_process"] for engine in ("gpipe", "1f1b")}
    # GPipe keeps every micro-batch's activations until its backward passes; 1F1B at most W in flight
    assert all(p > 0 for p in peaks["gpipe"] + peaks["1f1b"]) and peaks["gpipe"][0] > peaks["1f1b"][0]

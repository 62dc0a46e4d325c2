"""Activation-memory accounting counts exactly what autograd keeps for the backward pass."""
import pytest
import torch

from bpfree.memory import SavedTensorMeter, saved_activation_bytes


def test_meter_counts_saved_input_of_a_linear_layer_not_its_weights():
    layer = torch.nn.Linear(100, 10)
    x = torch.randn(32, 100)

    def step():
        layer(x).sum().backward()
    _, nbytes = saved_activation_bytes(layer, step)
    assert nbytes == x.numel() * 4          # the input is saved for dW; the weight is not counted


def test_meter_counts_each_storage_once():
    x = torch.randn(64, 64, requires_grad=True)
    meter = SavedTensorMeter()
    with meter.measure():
        y = x * x          # saves x (twice, same storage)
        z = y.relu()       # saves the relu output
        z.sum().backward()
    assert meter.bytes == 2 * x.numel() * 4


def test_deeper_network_saves_more():
    shallow = torch.nn.Sequential(torch.nn.Linear(50, 50), torch.nn.ReLU())
    deep = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(50, 50), torch.nn.ReLU())])
    x = torch.randn(16, 50)
    _, a = saved_activation_bytes(shallow, lambda: shallow(x).sum().backward())
    _, b = saved_activation_bytes(deep, lambda: deep(x).sum().backward())
    act = x.numel() * 4
    assert a == 2 * act          # input of the linear layer + ReLU output
    assert b == 5 * act          # input + 4 ReLU outputs (each is also the next layer's saved input)


def test_a_gradient_free_stage_is_metered_by_the_tensors_it_holds_until_its_update(digits):
    """rec-LRA keeps each layer's inputs, pre-activations and activities from its step to its update,
    without autograd: the meter reports those (the largest stage's), not autograd's few saved tensors."""
    from bpfree import RunConfig, create_model, create_rule, train
    from bpfree.memory import tensor_bytes

    cfg = RunConfig(method="reclra", model="mlp", blocks=2, epochs=1, batch_size=64, threads=1)
    summary = train(cfg, data=digits, quiet=True)
    rule = create_rule("reclra", create_model("mlp", 10, digits.in_shape, blocks=2)).setup(1)
    held = {}

    def call(k, what, fn, *args):            # what each stage holds when its update comes
        if what == "update":
            held[k] = sum(t.numel() * t.element_size() for t in _unique(rule.stages[k].held_tensors()))
        return fn(*args)
    rule.train_step(digits.x_train[:64], digits.y_train[:64], call=call)
    assert summary["activation_bytes_per_stage"] == [held[0], held[1]] and min(held.values()) > 64 * 4 * 100
    assert tensor_bytes(rule.stages[0].held_tensors()) == 0          # released by the update


def _unique(tree):
    from torch.utils._pytree import tree_leaves
    return list({t.untyped_storage().data_ptr(): t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}.values())


def test_flops_of_a_training_step_are_recorded_per_stage_and_compared(digits, tmp_path):
    """One step's FLOPs per stage (forward, local loss, backward) in metrics.json; E2EBP's equal those
    of one forward and backward pass of the same network, and block-local training needs fewer (no
    input gradient at block boundaries); compare shows the FLOP ratio and time ratio / FLOP ratio."""
    import json

    from torch.utils.flop_counter import FlopCounterMode

    from bpfree import RunConfig, create_model, train
    from bpfree.cli import main

    cfg = dict(model="mlp", blocks=4, epochs=1, batch_size=64, threads=1, model_options={"widths": (64,) * 4})
    bp = train(RunConfig(method="backprop", **cfg), data=digits, quiet=True)
    torch.manual_seed(0)
    net = create_model("mlp", 10, digits.in_shape, blocks=4, widths=(64,) * 4)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(net(digits.x_train[:64]), digits.y_train[:64]).backward()
    assert bp["train_flops_per_step"] == counter.get_total_flops() > 0
    assert bp["train_flops"] == bp["train_flops_per_step"] * (len(digits.y_train) // 64)
    local = train(RunConfig(method="bwbpf", rule_options={"aux_head": "linear"}, **cfg), data=digits, quiet=True)
    assert all(f > 0 for f in local["train_flops_per_step_per_stage"])
    assert local["train_flops_per_step"] < bp["train_flops_per_step"]
    assert main(["compare", "--methods", "backprop,bwbpf[aux_head=linear]", "--model", "mlp", "--data", "digits",
                 "--epochs", "1", "--threads", "1", "--model-opt", "widths=64,64,64,64", "--quiet",
                 "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "summary.json").read_text())["runs"]
    assert rows[1]["flops_ratio"] == pytest.approx(local["train_flops"] / bp["train_flops"])
    assert rows[1]["overhead_factor"] == pytest.approx(rows[1]["time_ratio"] / rows[1]["flops_ratio"])

"""auglocal: the aux nets are fresh copies of a uniform sample of the following units (ChenxiangMA/AugLocal)."""
import json

import pytest
import torch
from conftest import quick_config
from torch import nn

from bpfree.engine import Trainer
from bpfree.errors import BpfreeError
from bpfree.models import create_model
from bpfree.rules import get_rule, make_options
from bpfree.rules.auglocal import pyramid_depths, sample_units, units_of
from bpfree.run import build, train

CNN = {"model": "cnn", "model_options": {"widths": (16, 32, 64, 64)}, "blocks": 4}


# --- the construction rules, pinned to the released code's numbers ---------------------------------
@pytest.mark.parametrize("depth, decay, blocks, depths", [
    (2, 0.5, 14, [2] * 13),               # README: ResNet-32, --local_module_num 16 --aux_net_depth 2 -> 14 modules
    (5, 1.0, 6, [5, 4, 3, 2, 1]),          # τ = 1 falls to depth 1 at block K-1
    (3, 0.5, 4, [3, 2, 2]),                # 2.5 rounds to 2 (Python's round, as released)
    (4, 0.0, 5, [4, 4, 4, 4]),             # no pyramid: every aux net d deep
    (3, 0.5, 2, [3]),                      # K = 2: the one aux net is d deep (no division by K-2)
])
def test_pyramid_depths(depth, decay, blocks, depths):
    assert pyramid_depths(depth, decay, blocks) == depths


@pytest.mark.parametrize("last, n, depth, sampled", [
    (0, 16, 2, [8, 15]),                   # ResNet-32's first layer (16 layers with the stem): 7.5 -> 8
    (0, 16, 3, [5, 10, 15]),
    (2, 15, 2, [8, 14]),
    (13, 16, 2, [14, 15]),                 # fewer units follow than d: all of them
    (14, 16, 3, [15]),
])
def test_uniform_sampling_of_the_following_units_ends_at_the_last(last, n, depth, sampled):
    assert sample_units(last, n, depth) == sampled


# --- the aux nets on bpfree's models -----------------------------------------------------------------
def _layers(module: nn.Module) -> list[str]:
    out = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            out.append(f"conv{m.kernel_size[0]}:{m.in_channels}->{m.out_channels}")
        elif isinstance(m, nn.Linear):
            out.append(f"linear:{m.in_features}->{m.out_features}")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out.append(f"{type(m).__name__[-2:]}bn:{m.num_features}")
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.MaxPool2d)):
            out.append(type(m).__name__)
    return out


def _count(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_cnn_aux_nets_copy_the_sampled_units_with_an_adapter_where_shapes_do_not_chain(digits):
    rule = build(quick_config(method="auglocal", **CNN), digits)
    units = units_of(rule.net)
    assert rule.depths == [2, 2, 2] and rule.sampled == [[2, 3], [2, 3], [3]]
    aux = [s.objective.classifier for s in rule.stages[:-1]]
    unit2, unit3 = ["conv3:32->64", "2dbn:64", "MaxPool2d"], ["conv3:64->64", "2dbn:64", "MaxPool2d"]
    head = ["AdaptiveAvgPool2d", "linear:64->10"]
    # block 1 ends at unit 0 (16 ch, 8x8); unit 2 reads unit 1's output (32 ch, 4x4): pool, then 1x1 conv
    assert _layers(aux[0]) == ["AdaptiveAvgPool2d", "conv1:16->32", "2dbn:32"] + unit2 + unit3 + head
    assert _layers(aux[1]) == unit2 + unit3 + head          # block 2 ends at unit 1: units 2, 3 chain as they are
    assert _layers(aux[2]) == unit3 + head
    linear = 64 * 10 + 10
    assert _count(aux[1:2]) == _count(units[2:4]) + linear
    assert _count(aux[2:3]) == _count(units[3:4]) + linear
    assert _count(aux[0:1]) == 16 * 32 + 2 * 32 + _count(units[2:4]) + linear
    assert rule.stages[-1].objective.classifier is rule.net.head     # block K: the network's own head


def test_resnet32_layer_wise_samples_the_released_layers():
    # K = 16 cuts resnet32 (stem + 15 basic blocks) layer-wise, as the released networks/configs.py does
    torch.manual_seed(0)
    rule = get_rule("auglocal")(create_model("resnet32", 10, (3, 32, 32), blocks=16))
    assert rule.depths == [2] * 15
    assert [s[0] for s in rule.sampled] == [8, 8, 8, 9, 10, 10, 10, 11, 12, 12, 12, 13, 14, 14, 15]
    assert all(s[-1] == 15 for s in rule.sampled)
    units = units_of(rule.net)
    # the stem's (16, 32x32) -> unit 8 expects (32, 16x16); unit 8's (32, 16x16) -> unit 15 expects (64, 8x8)
    first = rule.stages[0].objective.classifier
    adapt = ["AdaptiveAvgPool2d", "conv1:16->32", "2dbn:32"], ["AdaptiveAvgPool2d", "conv1:32->64", "2dbn:64"]
    assert _layers(first) == adapt[0] + _layers(units[8]) + adapt[1] + _layers(units[15]) + [
        "AdaptiveAvgPool2d", "linear:64->10"]
    adapters = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert _count([first]) == adapters + _count([units[8], units[15]]) + 64 * 10 + 10


def test_depth_one_adds_batchnorm_before_the_linear_as_released(digits):
    rule = build(quick_config(method="auglocal", rule_options={"aux_depth": 1, "pyramid": 0.0}, **CNN), digits)
    assert rule.sampled == [[3], [3], [3]]
    assert _layers(rule.stages[1].objective.classifier)[-3:] == ["AdaptiveAvgPool2d", "1dbn:64", "linear:64->10"]


def test_aux_weights_are_fresh_copies_never_the_main_networks(digits):
    rule = build(quick_config(method="auglocal", **CNN), digits)
    main = {p.data_ptr() for p in rule.net.parameters()} | {b.data_ptr() for b in rule.net.buffers()}
    units = units_of(rule.net)
    for stage, sampled in zip(rule.stages[:-1], rule.sampled):
        aux = stage.objective.classifier
        assert not {t.data_ptr() for t in [*aux.parameters(), *aux.buffers()]} & main
        assert not any(m is u for m in aux.modules() for u in units)
        copy, unit = aux[-4], units[sampled[-1]]         # the last copy, before pool, flatten, linear
        assert _layers(copy) == _layers(unit) and not torch.equal(copy[0].weight, unit[0].weight)   # new init


MODELS = [("mlp", {}, 4), ("cnn", {}, 4), ("vgg11", {"width_mult": 0.125}, 4), ("resnet18", {"width": 8}, 4),
          ("resnet18", {"width": 8}, 8), ("resnet32", {}, 4)]


@pytest.mark.parametrize("model, options, blocks", MODELS)
def test_aux_nets_accept_each_blocks_output_on_every_model(model, options, blocks):
    torch.manual_seed(0)
    net = create_model(model, 10, (1, 8, 8), blocks=blocks, **options)
    rule = get_rule("auglocal")(net)
    n = len(units_of(net))
    assert all(sampled[-1] == n - 1 for sampled in rule.sampled)       # every sample ends at the last unit
    message = (torch.randn(4, 1, 8, 8),)
    for stage in rule.stages:
        out = stage.local(message, torch.arange(4))
        assert out.logits.shape == (4, 10) and torch.isfinite(out.loss)
        message = (out.message[0].detach(),)


def test_options_and_schedule_are_checked(digits):
    rule = get_rule("auglocal")
    with pytest.raises(BpfreeError, match="--aux-depth"):
        make_options(rule, {"aux_depth": 0})
    with pytest.raises(BpfreeError, match="--pyramid"):
        make_options(rule, {"pyramid": 1.5})
    with pytest.raises(BpfreeError, match="does not support the sequential schedule"):
        train(quick_config(method="auglocal", schedule="sequential"), data=digits, quiet=True)


# --- training ----------------------------------------------------------------------------------------
def test_a_blocks_step_trains_it_with_its_whole_aux_net_and_nothing_else(digits):
    cfg = quick_config(method="auglocal", **CNN)
    rule = build(cfg, digits)
    Trainer(rule, digits, cfg, quiet=True)
    for p in rule.stages.parameters():
        p.grad = None
    out = rule.stages[0].step((digits.x_train[:32],), digits.y_train[:32])
    assert not out[0].requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rule.stages[0].parameters())
    assert all(p.grad is None for s in rule.stages[1:] for p in s.parameters())


def test_auglocal_learns_digits_and_logs_each_blocks_readout(digits, tmp_path):
    summary = train(quick_config(method="auglocal", epochs=4, **CNN), tmp_path / "run", data=digits, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[-1]["stages"]) == 4 and all("loss" in s and "test_acc" in s for s in rows[-1]["stages"])
    assert summary["test_accuracy"] > 0.6


def test_auglocal_runs_in_parallel_exactly_as_in_one_process():
    cfg = quick_config(method="auglocal", epochs=1, train_subset=256, batch_size=32, threads=1, **CNN)
    one, two = train(cfg), train(cfg, parallel=2)
    assert one["test_accuracy"] == two["test_accuracy"] and one["stages"] == two["stages"]
    assert one["peak_activation_bytes"] == two["peak_activation_bytes"] and two["parallel"]["world_size"] == 2

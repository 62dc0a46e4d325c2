"""Settings declared as dataclass fields: one type-and-metadata check for rule Options, RunConfig and
OptimConfig, and the flag text read into each field's type."""
import dataclasses
from typing import Optional, Union

import pytest

from bpfree.config import RunConfig
from bpfree.errors import BpfreeError
from bpfree.optim import OptimConfig
from bpfree.options import check_fields, check_options, field_types, flag, option, parse_text


@dataclasses.dataclass
class _Settings:
    count: int = option(1, positive=True)
    rate: float = option(0.5, min=0.0, below=1.0)
    name: str = option("a", choices=("a", "b"))
    on: bool = option(False)
    cap: Optional[int] = option(None, max=10)
    sizes: Optional[list[int]] = option(None, min=1)
    split: Union[str, list[int]] = option("even", choices=("even", "balanced"))
    extra: dict = option(default_factory=dict, flag="--extra-opt")


def _field(name):
    return next(f for f in dataclasses.fields(_Settings) if f.name == name)


def test_defaults_and_good_values_pass():
    check_fields(_Settings())
    check_fields(_Settings(count=3, rate=0, name="b", on=True, cap=10, sizes=(1, 2), split=[1, 3],
                           extra={"k": 1}))      # an int is a float; a tuple is a list


@pytest.mark.parametrize("values, message", [
    ({"count": "ten"}, "--count must be an integer, got 'ten'"),
    ({"count": True}, "--count must be an integer, got True"),
    ({"count": 2.0}, "--count must be an integer, got 2.0"),
    ({"count": 0}, "--count must be > 0, got 0"),
    ({"rate": "x"}, "--rate must be a number, got 'x'"),
    ({"rate": 1.0}, r"--rate must be in \[0, 1\), got 1.0"),
    ({"name": "c"}, "unknown --name 'c'; choose one of: a, b"),
    ({"name": 3}, "--name must be one of a, b, got 3"),
    ({"on": "yes"}, "--on must be true or false, got 'yes'"),
    ({"cap": 11}, "--cap must be <= 10, got 11"),
    ({"cap": "3"}, "--cap must be an integer, got '3'"),
    ({"sizes": "1,2"}, "--sizes must be a list of integers, got '1,2'"),
    ({"sizes": [1, "2"]}, "--sizes must be a list of integers"),
    ({"sizes": [1, 0]}, r"--sizes values must be >= 1, got \[1, 0\]"),
    ({"split": "odd"}, "unknown --split 'odd'; choose one of: even, balanced or a list of integers"),
    ({"split": 3}, "--split must be one of even, balanced or a list of integers, got 3"),
    ({"extra": []}, "--extra-opt must be a mapping of names to values, got"),
])
def test_each_wrong_value_is_one_line_naming_the_flag(values, message):
    with pytest.raises(BpfreeError, match=f"^{message}") as e:
        check_fields(_Settings(**values))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, text, value", [
    ("count", "5", 5), ("rate", "1e-3", 1e-3), ("name", "b", "b"), ("on", "Yes", True), ("on", "0", False),
    ("cap", "7", 7), ("sizes", "5,5,2", [5, 5, 2]), ("sizes", "[5,2]", [5, 2]), ("split", "balanced", "balanced"),
    ("split", "1,3", [1, 3]), ("split", "odd", "odd")])     # "odd": refused by the check, not the reader
def test_flag_text_is_read_into_the_field_type(name, text, value):
    assert parse_text(_field(name), field_types(_Settings)[name], text) == value


@pytest.mark.parametrize("name, text, message", [
    ("count", "ten", "--count must be an integer, got 'ten'"), ("on", "maybe", "--on must be true or false"),
    ("sizes", "5,x", "--sizes must be a list of integers, got '5,x'")])
def test_unreadable_flag_text_is_one_line(name, text, message):
    with pytest.raises(BpfreeError, match=message):
        parse_text(_field(name), field_types(_Settings)[name], text)


def test_check_options_runs_the_class_validate_after_the_fields():
    @dataclasses.dataclass
    class Pair:
        low: int = option(0, min=0)
        high: int = 1

        def validate(self):
            if self.low > self.high:
                raise BpfreeError("--low must not exceed --high")

    assert check_options(Pair()).high == 1
    with pytest.raises(BpfreeError, match="--low must be >= 0"):
        check_options(Pair(low=-1))
    with pytest.raises(BpfreeError, match="must not exceed"):
        check_options(Pair(low=2))


# --- RunConfig and OptimConfig use it ---------------------------------------------------------
def test_run_config_defaults_validate():
    RunConfig().validate()
    OptimConfig().validate()


@pytest.mark.parametrize("values, message", [
    ({"epochs": "ten"}, "--epochs must be an integer, got 'ten'"),
    ({"stage_epochs": 3}, "--stage-epochs must be a list of integers, got 3"),
    ({"stage_epochs": [2, 0]}, "--stage-epochs values must be > 0"),
    ({"lr": "fast"}, "--lr must be a number, got 'fast'"),
    ({"optimizer": "rmsprop"}, "unknown --optimizer 'rmsprop'; choose one of: adam, adamw, sgd"),
    ({"schedule": "greedy"}, "unknown --schedule 'greedy'"),
    ({"threads": 0}, "--threads must be > 0"),
    ({"data_dir": 3}, "--data-dir must be a string, got 3"),
    ({"model_options": [1]}, "--model-opt must be a mapping"),
    ({"split": "odd"}, "unknown --split 'odd'"),
])
def test_from_dict_refuses_a_wrong_value_in_one_line(values, message):
    with pytest.raises(BpfreeError, match=f"^{message}"):
        RunConfig.from_dict(values)


def test_from_dict_takes_none_ints_for_floats_and_lists():
    cfg = RunConfig.from_dict({"threads": None, "schedule": None, "lr": 1, "stage_epochs": [2, 2], "split": [1, 3]})
    assert cfg.lr == 1 and cfg.stage_epochs == [2, 2] and cfg.split == [1, 3]


def test_cross_field_checks_stay_in_validate():
    with pytest.raises(BpfreeError, match="unknown device 'tpu'"):
        RunConfig(device="tpu").validate()
    with pytest.raises(BpfreeError, match="--stage-epochs needs"):
        RunConfig(stage_epochs=[]).validate()


def test_an_old_config_with_split_among_model_options_loads():
    cfg = RunConfig.from_dict({"model": "cnn", "model_options": {"widths": [8, 8], "split": [1]}})
    assert cfg.split == [1] and cfg.model_options["widths"] == [8, 8]


def test_run_config_optimizer_settings_are_optim_config_fields():
    optim = {f.name: f for f in dataclasses.fields(OptimConfig)}
    run = {f.name: f for f in dataclasses.fields(RunConfig)}
    for run_name, optim_name in (("optimizer", "name"), ("lr", "lr"), ("momentum", "momentum"),
                                 ("weight_decay", "weight_decay"), ("lr_schedule", "lr_schedule")):
        assert run[run_name].metadata == optim[optim_name].metadata
        assert run[run_name].default == optim[optim_name].default
        assert flag(run[run_name]) == flag(optim[optim_name])


def test_every_run_setting_has_help():
    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help") or f.metadata.get("cli") is False, f.name


# --- make_optimizer: one fused kernel where PyTorch has one ---------------------------------------------
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizer_is_fused_on_cpu_and_batched_elsewhere(name):
    import torch

    from bpfree.optim import make_optimizer
    cfg = OptimConfig(name=name)
    cpu = make_optimizer([{"params": [torch.nn.Parameter(torch.ones(3))]}], cfg)
    assert cpu.defaults["fused"] and not cpu.defaults["foreach"]
    meta = make_optimizer([torch.nn.Parameter(torch.ones(3, device="meta"))], cfg)   # no fused kernel there
    assert meta.defaults["foreach"] and not meta.defaults["fused"]
    # the fused step is the same update as the batched one (to float32 rounding)
    p, q = torch.nn.Parameter(torch.linspace(-1, 1, 50)), torch.nn.Parameter(torch.linspace(-1, 1, 50))
    fused, batched = make_optimizer([p], cfg), make_optimizer([q], cfg)
    batched.param_groups[0].update(fused=None, foreach=True)
    batched = type(batched)(batched.param_groups)
    assert not batched.param_groups[0]["fused"]
    for t in range(3):
        for x, opt in ((p, fused), (q, batched)):
            x.grad = torch.cos(x.detach() * (t + 1))
            opt.step()
    torch.testing.assert_close(p, q)

"""The open core: your own module cut at named points (`BlockNet.from_module`), rules from names
(`create_rule`), the step in your own loop (`setup`, `train_step`), any DataLoader in
(`Data.from_loaders`), and the Trainer and run directories on top of the very same step."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from user_models import Branchy, Residual, SkipOver, TinyResNet

from bpfree import BlockNet, BpfreeError, Data, RunConfig, create_rule, list_rules, load_trained, train
from bpfree.rules import get_rule

RULES = sorted(list_rules())
LRA = ("lra-e", "reclra")            # targets through each layer's own structure: refuse a user's class
READABLE = [r for r in RULES if r not in LRA]


def cut(seed: int = 0, split_at=("layer1", "layer2")):
    torch.manual_seed(seed)
    model = TinyResNet()
    return model, BlockNet.from_module(model, split_at=list(split_at), head="fc", in_shape=(1, 8, 8))


def loaders(digits, batch_size=64, seed=0):
    train_set = TensorDataset(digits.x_train, digits.y_train)
    test_set = TensorDataset(digits.x_test, digits.y_test)
    return (DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(test_set, batch_size=256))


def near_ties_only(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Predictions of two arithmetic paths agree except where a's top two scores are a near-tie."""
    top2 = a.float().topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]) / (1 + a.float().abs().amax(1))
    return bool((margin[a.argmax(1) != b.argmax(1)] < 1e-4).all()) and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


# --- cutting -----------------------------------------------------------------------------------------
def test_from_module_cuts_at_named_points_keeps_forward_and_shares_parameters():
    model, net = cut()
    # blocks end after layer1 and layer2; the last runs to layer3, the last layer with weights; the pooling
    # and flatten of the user's forward go with the head
    assert net.num_blocks == 3 and net.num_classes == 10
    assert net.block_shapes() == [(8, 8, 8), (16, 4, 4), (16, 4, 4)]
    assert net.blocks[1][0] is model.layer2 and net.blocks[2][0] is model.layer3
    assert {id(p) for p in net.parameters()} == {id(p) for p in model.parameters()}
    model.eval()
    net.eval()
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(x), net(x))          # the same ops on the same tensors
    assert net.origin == {"module": "TinyResNet", "split_at": ["layer1", "layer2"], "head": "fc"}


def test_from_module_cuts_inside_a_child_and_from_sequential_is_a_special_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    net = BlockNet.from_module(model, ["1.0"], head="4", in_shape=(1, 8, 8))
    # cut inside child 1; the last block runs to the last layer with weights, the ReLU after it goes to the head
    assert [list(b) for b in net.blocks] == [[model[0], model[1][0]], [model[1][1], model[2]]]
    assert list(net.head) == [model[3], model[4]]
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    head = nn.Linear(32, 10)
    net = BlockNet.from_sequential(seq, [3], head, (1, 8, 8), 10)
    assert [list(b) for b in net.blocks] == [list(seq[:3]), list(seq[3:])] and net.head is head


@pytest.mark.parametrize("build, message", [
    (lambda: BlockNet.from_module(SkipOver(), ["layer1"], "fc", (64,)), "crosses a cut of SkipOver"),
    (lambda: BlockNet.from_module(Branchy(), ["layer1"], "fc", (64,)), "cannot capture Branchy.forward"),
    (lambda: BlockNet.from_module(TinyResNet(), ["layer9"], "fc", (1, 8, 8)), "no submodule 'layer9'; its children: stem"),
    (lambda: BlockNet.from_module(TinyResNet(), ["layer2"], "stem", (1, 8, 8)), "is called before the cut"),
    (lambda: BlockNet.from_module(TinyResNet(), ["layer1.conv1"], "fc", (1, 8, 8)), "the output of 'stem'"),
    (lambda: BlockNet.from_module(TinyResNet(), [1], "fc", (1, 8, 8)), "split_at must be a non-empty list"),
    (lambda: BlockNet.from_module(TinyResNet(), ["layer1"], "fc", (3, 8, 8)), "does not accept input of shape"),
    (lambda: BlockNet.from_module("resnet", ["layer1"], "fc", (3, 8, 8)), "needs an nn.Module, got str"),
])
def test_from_module_refuses_with_one_line(build, message):
    with pytest.raises(BpfreeError, match=message) as e:
        build()
    assert "\n" not in str(e.value)


def test_a_module_called_on_both_sides_of_a_cut_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1, self.layer2, self.fc = Residual(1, 4), Residual(4, 4), nn.Linear(4, 10)

        def forward(self, x):
            x = self.layer2(self.layer1(x))
            return self.fc(self.layer1.bn2(x).mean((2, 3)))
    with pytest.raises(BpfreeError, match="used in block 1 and in block 2"):
        BlockNet.from_module(Shared(), ["layer1"], "fc", (1, 8, 8))


# --- rules by name, the step in your own loop ---------------------------------------------------------
def test_create_rule_checks_its_keywords_as_flags():
    _, net = cut()
    assert create_rule("dgl", net, aux_head="cnn").options.aux_head == "cnn"
    assert create_rule("dgl", net, options=get_rule("dgl").Options(aux_head="mlp")).options.aux_head == "mlp"
    with pytest.raises(BpfreeError, match="no option 'head'; its options: aux_head, aux_width"):
        create_rule("dgl", net, head="cnn")
    with pytest.raises(BpfreeError, match="unknown --aux-head .huge.; choose one of: linear"):
        create_rule("dgl", net, aux_head="huge")
    with pytest.raises(BpfreeError, match="unknown method 'dgll'"):
        create_rule("dgll", net)


def test_setup_checks_its_settings_and_a_step_needs_it():
    _, net = cut()
    rule = create_rule("bwbpf", net)
    with pytest.raises(BpfreeError, match="call rule.setup"):
        rule.train_step(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(BpfreeError, match="no setting 'learning_rate'; the optimizer settings are: lr"):
        rule.setup(total_steps=10, learning_rate=0.1)
    with pytest.raises(BpfreeError, match="unknown --optimizer .lion.; choose one of: adam"):
        rule.setup(total_steps=10, optimizer="lion")
    with pytest.raises(BpfreeError, match="total_steps must be a positive integer"):
        rule.setup(total_steps=0)
    with pytest.raises(BpfreeError, match="train_step\\(x, y\\) takes a batch of tensors, got list and Tensor"):
        rule.setup(total_steps=10).train_step([[0.0] * 64], torch.zeros(1, dtype=torch.long))
    with pytest.raises(BpfreeError, match="labels must be integer classes, got torch.float32"):
        rule.train_step(torch.zeros(2, 1, 8, 8), torch.zeros(2))
    assert set(rule.train_step(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int32))) == {"block1", "block2",
                                                                                              "block3"}
    with pytest.raises(BpfreeError, match="method dgl trains a BlockNet, got TinyResNet: cut your module with"):
        create_rule("dgl", TinyResNet())
    with pytest.raises(BpfreeError, match="reclra trains in fp32 only"):
        create_rule("reclra", BlockNet.from_sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()), [2],
                                                       nn.Linear(16, 10), (1, 8, 8), 10)).setup(10, precision="bf16")


@pytest.mark.parametrize("method", RULES)
def test_every_rule_trains_your_own_module_in_your_own_loop(method, digits):
    model, net = cut(split_at=("stem", "layer1", "layer2"))      # K=4 (InfoPro's released λ at K=3 idle module 2)
    if method in LRA:
        with pytest.raises(BpfreeError, match=r"LRA cannot train block \d: it contains a Residual; supported are stacks of Linear/Conv2d"):
            create_rule(method, net)
        return
    train_loader, _ = loaders(digits)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rule = create_rule(method, net).setup(total_steps=4 * len(train_loader), lr=3e-3)
    for _ in range(4):
        for x, y in train_loader:
            losses = rule.train_step(x, y)
    assert set(losses) == {s.name for s in rule.stages}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    accuracy, per_stage = rule.evaluate(digits.x_test, digits.y_test)
    assert accuracy > 0.5, accuracy                               # chance: 0.1
    # the user's module holds the trained weights (of its head too, if the rule trains it) ...
    trained = model.state_dict()
    unused = ("fc.",) if method in ("al", "predsim") else ()
    assert all(not torch.equal(init[k], trained[k]) for k in init if k.endswith("weight") and not k.startswith(unused))
    # ... and predicts as the rule, unless the rule predicts through something else (then as_module does)
    model.eval()
    predicted = rule.predict(digits.x_test)
    if not get_rule(method).predicts_through:
        assert near_ties_only(predicted, model(digits.x_test))
    assert near_ties_only(predicted, rule.as_module().eval()(rule.inputs(digits.x_test)))


def test_the_readme_loop_with_mixed_precision_and_a_sequential_rule(digits):
    model, net = cut()
    train_loader, _ = loaders(digits)
    rule = create_rule("kernel", net).setup(total_steps=[2 * len(train_loader)] * 2, lr=3e-3, precision="bf16")
    for k in range(2):                                  # strictly modular: module k, then the output layer
        for _ in range(2):
            for x, y in train_loader:
                losses = rule.train_step(x, y, stages=[k])
        assert list(losses) == [rule.stages[k].name]
    assert rule.evaluate(digits.x_test, digits.y_test)[0] > 0.5


# --- the Trainer, run directories, any DataLoader -----------------------------------------------------
def test_the_trainer_runs_your_module_from_your_loaders_and_resumes_exactly(digits, tmp_path):
    cfg = RunConfig(method="dgl", epochs=3, lr=3e-3, threads=2)

    def run(out, **options):
        _, net = cut()
        train_loader, test_loader = loaders(digits, batch_size=100)
        data = Data.from_loaders(train_loader, test_loader, val_loader=test_loader)
        return train(cfg, out, rule=create_rule("dgl", net), data=data, quiet=True, **options)

    whole = run(tmp_path / "whole")
    assert run(tmp_path / "cut", stop_after=1) == {}
    resumed = run(tmp_path / "cut", resume=True)
    strip = ("time", "per_s", "git_commit")
    assert {k: v for k, v in resumed.items() if not any(s in k for s in strip)} == \
           {k: v for k, v in whole.items() if not any(s in k for s in strip)}
    assert whole["test_accuracy"] > 0.5 and whole["val_accuracy"] == whole["test_accuracy"]
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    # the record says what was trained: your module, its cut, the loader's batch size, the data's name
    assert (config["model"], config["model_options"], config["blocks"], config["batch_size"]) == \
           ("module:TinyResNet", {"split_at": ["layer1", "layer2"], "head": "fc"}, 3, 100)
    assert config["data"] == "loaders:TensorDataset" and config["rule_options"]["aux_head"] is None
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["samples_per_s"] * rows[0]["epoch_time_s"] == pytest.approx(len(digits.y_train))
    # a run of your own module loads into your own module
    model, net = cut(seed=1)
    with pytest.raises(BpfreeError, match="trained your own module TinyResNet"):
        load_trained(tmp_path / "whole")
    rule = load_trained(tmp_path / "whole", rule=create_rule("dgl", net), threads=False)
    assert rule.evaluate(digits.x_test, digits.y_test)[0] == whole["test_accuracy"]


def test_loaders_are_checked_and_an_inexact_resume_is_refused(digits, tmp_path):
    batches = [(digits.x_train[i:i + 64], digits.y_train[i:i + 64]) for i in range(0, 640, 64)]
    with pytest.raises(BpfreeError, match="train_loader must be an iterable of"):
        Data.from_loaders(digits.x_train, batches)
    with pytest.raises(BpfreeError, match=r"must yield \(x, y\) pairs of tensors, got dict"):
        Data.from_loaders(batches, [{"x": digits.x_test, "y": digits.y_test}])
    with pytest.raises(BpfreeError, match=r"labels must be one integer class per example \(or per token\), got torch.float32"):
        Data.from_loaders(batches, [(digits.x_test, digits.y_test.float())])
    data = Data.from_loaders(batches, batches)            # plain lists of batches train ...
    assert data.num_classes == 10 and data.in_shape == (1, 8, 8)
    cfg = RunConfig(method="bwbpf", model="mlp", blocks=2, epochs=2, model_options={"widths": (32, 32)})
    assert train(cfg, tmp_path / "run", data=data, quiet=True, stop_after=1) == {}
    with pytest.raises(BpfreeError, match="--resume would not continue exactly: train_loader is a list"):
        train(cfg, tmp_path / "run", data=data, quiet=True, resume=True)          # ... but cannot resume exactly
    with pytest.raises(BpfreeError, match="--augment works on bpfree's stored datasets"):
        train(RunConfig(augment="flip", model="cnn"), data=data, quiet=True)


def test_a_config_that_disagrees_with_its_rule_is_refused(digits):
    _, net = cut()
    with pytest.raises(BpfreeError, match="the config says method 'backprop' but the rule given is 'dgl'"):
        train(RunConfig(method="backprop"), rule=create_rule("dgl", net), data=digits)
    with pytest.raises(BpfreeError, match="train\\(\\) takes a RunConfig first"):
        train("runs/x", RunConfig())


@pytest.mark.parametrize("method", READABLE)
def test_every_rule_on_your_module_resumes_exactly_and_runs_in_parallel_as_in_one_process(method, digits, tmp_path):
    data = digits.__class__(**{**digits.__dict__, "x_train": digits.x_train[:256], "y_train": digits.y_train[:256]})
    cfg = RunConfig(method=method, epochs=2, batch_size=64, lr=3e-3, threads=1)

    def run(out, **options):
        _, net = cut(split_at=("stem", "layer1", "layer2"))
        return train(cfg, tmp_path / out, rule=create_rule(method, net), data=data, quiet=True, **options)

    def learned(summary):
        return {k: v for k, v in summary.items() if not any(s in k for s in ("time", "per_s", "git_commit"))
                and k not in ("execution", "parallel", "threads")}

    whole = run("whole")
    assert run("cut", stop_after=1) == {}
    assert learned(run("cut", resume=True)) == learned(whole)
    if get_rule(method).schedules == ("sequential",) or method in ("backprop", "kernel"):
        with pytest.raises(BpfreeError, match="--parallel"):
            run("parallel", parallel=2)
        return
    parallel = run("parallel", parallel=2)
    assert parallel["test_accuracy"] == whole["test_accuracy"]
    assert [s.get("test_acc") for s in parallel["stages"]] == [s.get("test_acc") for s in whole["stages"]]


def test_the_readme_examples_run_as_written(tmp_path, monkeypatch):
    """README's "Your model, your data, your loop" blocks, run in order in one namespace."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"<!-- example: your loop[^>]*-->\n```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["summary"]["test_accuracy"] > 0.5
    assert (scope["model"](scope["d"].x_test).argmax(1) == scope["d"].y_test).float().mean() > 0.5
    config = json.loads((tmp_path / "runs" / "mine" / "config.json").read_text())
    assert config["model"] == "module:Net" and config["rule_options"]["aux_head"] == "cnn"


def test_bpfree_list_says_what_each_rule_predicts_with(capsys):
    from bpfree.cli import main
    assert main(["list", "rules"]) == 0
    out = capsys.readouterr().out
    assert "predicts with: its own output layer on the last block's pooled" in out          # predsim
    assert out.count("predicts with: the network itself (your module predicts as the rule)") == len(RULES) - 3

"""Models: every registered builder is checked the moment it is registered (parametrized over list_models())."""
import re

import pytest
import torch
from torch import nn

from bpfree.config import RunConfig
from bpfree.data import load_data
from bpfree.errors import BpfreeError
from bpfree.models import (
    BasicBlock,
    BlockNet,
    blocknet,
    create_model,
    list_models,
    max_blocks,
    register_model,
    split_units,
)
from bpfree.rules import list_rules
from bpfree.run import build, train

MODELS = sorted(list_models())
# Small widths keep the big architectures fast; a newly registered model runs with its defaults.
SMALL = {"vgg11": {"width_mult": 0.0625}, "resnet18": {"width": 4}, "mlp": {"widths": (32, 32, 32)},
         "cnn": {"widths": (4, 8, 8, 8)}, "vit": {"dim": 16, "heads": 2, "depth": 3},
         "gpt": {"dim": 16, "heads": 2, "depth": 3}}
VECTOR_MODELS = {"mlp"}         # the only built-in model that accepts (D,) input
SEQUENCE_MODELS = {"gpt"}       # reads (T,) token ids and scores every position: (T, classes)
IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
CASES = [(m, s) for m in MODELS for s in ([(16,), (5,)] if m in SEQUENCE_MODELS else
                                          IMAGE_SHAPES + ([(64,)] if m in VECTOR_MODELS else []))]


def _shape(name, image_shape):
    """The input shape a model reads: a sequence model gets 16 tokens instead of an image."""
    return (16,) if name in SEQUENCE_MODELS and len(image_shape) != 1 else image_shape


def _inputs(name, n, in_shape):
    return torch.randint(0, 10, (n, *in_shape)) if name in SEQUENCE_MODELS else torch.randn(n, *in_shape)


def _small(name, in_shape, blocks, **extra):
    return create_model(name, 10, _shape(name, in_shape), blocks=blocks, **{**SMALL.get(name, {}), **extra})


def _channels(net):
    return [s[0] for s in net.block_shapes()]


# --- every model x input shape x K ------------------------------------------------------------------
@pytest.mark.parametrize("k", ["1", "2", "max"])
@pytest.mark.parametrize("name,in_shape", CASES, ids=[f"{m}-{'x'.join(map(str, s))}" for m, s in CASES])
def test_blocks_compose_to_forward(name, in_shape, k):
    kmax = max_blocks(name, in_shape, **SMALL.get(name, {}))
    k = kmax if k == "max" else min(int(k), kmax)
    torch.manual_seed(0)
    net = _small(name, in_shape, k).eval()
    assert isinstance(net, BlockNet) and len(net.blocks) == net.num_blocks == k
    assert net.in_shape == in_shape and net.num_classes == 10

    x = _inputs(name, 2, in_shape)
    h, shapes = x, []
    with torch.no_grad():
        for block in net.blocks:
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
        composed, out = net.head(h), net(x)
    assert out.shape == ((2, in_shape[0], 10) if name in SEQUENCE_MODELS else (2, 10))
    assert net.block_shapes() == shapes
    assert torch.equal(composed, out)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_learns(name):
    # A unit nobody calls (a stem left out of forward, say) would silently never train.
    net = _small(name, (1, 8, 8), max_blocks(name, _shape(name, (1, 8, 8)), **SMALL.get(name, {})))
    scores = net(_inputs(name, 4, _shape(name, (1, 8, 8))))
    nn.functional.cross_entropy(scores.flatten(0, -2), torch.arange(len(scores.flatten(0, -2))) % 10).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_shape_tracing_leaves_train_mode_and_bn_stats_alone(name):
    net = _small(name, (3, 32, 32), 2)
    assert all(m.training for m in net.modules())
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.num_batches_tracked.item() == 0 and m.running_mean.abs().sum() == 0
    shapes = net.block_shapes()
    shapes.append("junk")                       # a copy: callers cannot corrupt the traced shapes
    assert len(net.block_shapes()) == 2


# --- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_block_count_out_of_range(name):
    n = max_blocks(name, _shape(name, (1, 8, 8)), **SMALL.get(name, {}))
    for k in (0, n + 1, -1):
        with pytest.raises(BpfreeError, match=re.escape(f"model {name} allows 1..{n} blocks, got {k}")):
            _small(name, (1, 8, 8), k)


def test_block_count_message_example():
    with pytest.raises(BpfreeError, match=r"^model cnn allows 1\.\.4 blocks, got 6$"):
        create_model("cnn", 10, (1, 8, 8), blocks=6)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_option_lists_valid_ones(name):
    with pytest.raises(BpfreeError, match=rf"model {name} has no option 'bogus'; its options: .*split"):
        create_model(name, 10, _shape(name, (1, 8, 8)), bogus=3)


def test_unknown_option_names_the_models_options():
    with pytest.raises(BpfreeError, match=r"^model cnn has no option 'depth'; its options: widths, split$"):
        create_model("cnn", 10, (1, 8, 8), depth=3)


def test_unknown_model_lists_choices():
    with pytest.raises(BpfreeError, match="unknown model 'nope'; choose one of: " + ", ".join(MODELS)):
        create_model("nope", 10, (1, 8, 8))
    with pytest.raises(BpfreeError, match="unknown model"):
        max_blocks("nope", (1, 8, 8))


@pytest.mark.parametrize("name", [m for m in MODELS if m not in VECTOR_MODELS | SEQUENCE_MODELS])
def test_image_models_reject_vectors(name):
    with pytest.raises(BpfreeError, match=re.escape(f"model {name} needs image input (C,H,W); data has shape (64,)")):
        create_model(name, 10, (64,))


@pytest.mark.parametrize("name,options", [
    ("mlp", {"widths": (64, -1)}), ("mlp", {"widths": "abc"}), ("mlp", {"widths": ()}), ("cnn", {"widths": 2.5}),
    ("vgg11", {"width_mult": 0}), ("vgg11", {"width_mult": "big"}), ("resnet18", {"width": (8, 8)}),
    ("resnet18", {"width": 0})])
def test_bad_option_values(name, options):
    with pytest.raises(BpfreeError, match=f"model {name} option {next(iter(options))} must be"):
        create_model(name, 10, (1, 8, 8), **options)


@pytest.mark.parametrize("in_shape,num_classes", [((0, 8, 8), 10), ((), 10), ((1, 8, 8), 0), ((1, 8.0, 8), 10)])
def test_bad_shape_or_class_count(in_shape, num_classes):
    with pytest.raises(BpfreeError, match="input shape|num_classes"):
        create_model("cnn", num_classes, in_shape)


# --- splitting --------------------------------------------------------------------------------------
def test_even_split_gives_extra_units_to_later_blocks():
    def sizes(n, k):
        return [len(b) for b in split_units([nn.Identity() for _ in range(n)], k)]
    assert sizes(8, 4) == [2, 2, 2, 2]
    assert sizes(8, 3) == [2, 3, 3]
    assert sizes(7, 4) == [1, 2, 2, 2]
    assert sizes(5, 1) == [5] and sizes(5, 5) == [1] * 5


def test_explicit_split():
    assert _channels(create_model("cnn", 10, (1, 8, 8), blocks=3, split=[1, 3])) == [32, 128, 128]
    assert _channels(create_model("cnn", 10, (1, 8, 8), blocks=2, split=3)) == [128, 128]
    assert _channels(create_model("cnn", 10, (1, 8, 8), blocks=2, split="even")) == [64, 128]
    net = create_model("vgg11", 10, (1, 8, 8), blocks=3, split=(1, 2), width_mult=0.125)
    assert [len(b) for b in net.blocks] == [1, 1, 6]


@pytest.mark.parametrize("blocks,split", [
    (3, [1]), (3, [1, 2, 3]), (3, [2, 1]), (3, [2, 2]), (3, [0, 2]), (3, [1, 4]),
    (2, ["1"]), (2, [1.5]), (2, [True]), (2, "odd"), (2, 2.0)])
def test_bad_split_lists(blocks, split):
    with pytest.raises(BpfreeError, match="split"):
        create_model("cnn", 10, (1, 8, 8), blocks=blocks, split=split)


def test_bad_split_names_the_fix():
    with pytest.raises(BpfreeError, match=r"needs 2 unit indices, got \[1\]"):
        create_model("cnn", 10, (1, 8, 8), blocks=3, split=[1])
    with pytest.raises(BpfreeError, match=r"strictly increasing integers in 1\.\.3, got \[3, 1\]"):
        create_model("cnn", 10, (1, 8, 8), blocks=3, split=[3, 1])


# --- architecture facts -----------------------------------------------------------------------------
def test_resnet18_four_blocks_are_the_four_stages():
    net = create_model("resnet18", 10, (3, 8, 8), blocks=4)         # full width; 8x8 keeps the trace cheap
    assert _channels(net) == [64, 128, 256, 512] and all(len(b) == 2 for b in net.blocks)
    small = create_model("resnet18", 10, (3, 32, 32), blocks=4, width=8)
    assert small.block_shapes() == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]
    # the well-known CIFAR ResNet-18 count (stem conv 3x3, no bias before BN)
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    assert _channels(create_model("resnet18", 10, (1, 8, 8), blocks=2, width=8)) == [16, 64]
    assert create_model("resnet18", 10, (1, 8, 8), width=8).block_shapes()[-1] == (64, 1, 1)  # 8->4->2->1


CIFAR_RESNETS = [("resnet32", 5, 466_906), ("resnet56", 9, 855_770), ("resnet110", 18, 1_730_714)]


@pytest.mark.parametrize("name,n,count", CIFAR_RESNETS)
def test_cifar_resnets_are_he_et_al_6n_plus_2(name, n, count):
    # depth 6n+2: the stem conv, 2 convs in each of 3n basic blocks, the linear layer
    net = create_model(name, 10, (3, 32, 32), blocks=max_blocks(name, (3, 32, 32)))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 6 * n + 2
    assert net.num_blocks == 3 * n + 1 and isinstance(net.blocks[0][0][0], nn.Conv2d)   # the stem, then the blocks
    assert all(isinstance(b[0], BasicBlock) for b in net.blocks[1:])
    assert net.block_shapes() == [(16, 32, 32)] * (n + 1) + [(32, 16, 16)] * n + [(64, 8, 8)] * n
    # He et al.'s Table 6 sizes (0.46M, 0.85M, 1.7M) are option A's (parameter-free shortcuts);
    # ours have option B's two 1x1 conv + BN shortcuts on top
    total = sum(p.numel() for p in net.parameters())
    shortcuts = sum(p.numel() for b in net.blocks[1:] for p in b[0].shortcut.parameters())
    assert total == count and shortcuts == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    published = {"resnet32": "0.46", "resnet56": "0.85", "resnet110": "1.7"}[name]
    assert f"{(total - shortcuts) / 1e6:.{len(published) - 2}f}" == published
    assert [len(b) for b in create_model(name, 10, (1, 28, 28), blocks=4).blocks] == [
        len(x) for x in split_units([nn.Identity() for _ in range(3 * n + 1)], 4)]
    assert create_model(name, 10, (1, 28, 28)).block_shapes()[-1] == (64, 7, 7)


def test_resnet32_even_splits_are_infopros_module_configs():
    # InfoPro-Pytorch networks/configs.py: K modules end after these [stage, block] points (stage 0 = the stem)
    released = {2: [[2, 1]], 4: [[1, 2], [2, 1], [3, 0]],
                8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
                16: [[0, 0]] + [[s, b] for s in (1, 2, 3) for b in range(5)][:-1]}
    for k, ends in released.items():
        sizes = [len(b) for b in create_model("resnet32", 10, (3, 32, 32), blocks=k).blocks]
        last_units = [sum(sizes[:i + 1]) - 1 for i in range(k - 1)]       # unit 0 is the stem
        assert last_units == [0 if s == 0 else 1 + 5 * (s - 1) + b for s, b in ends]


@pytest.mark.parametrize("method", sorted(list_rules()))
def test_every_rule_trains_resnet32_split_at_chosen_blocks(method):
    # the LRA rules read every basic block as a residual node; the stem alone is block 1
    cfg = RunConfig(method=method, model="resnet32", data="digits", blocks=3, split=[1, 6], epochs=1,
                    train_subset=64, batch_size=32, threads=1)
    summary = train(cfg, quiet=True)
    assert summary["blocks"] == 3 and 0 <= summary["test_accuracy"] <= 1
    assert [len(b) for b in build(cfg, load_data("digits")).net.blocks] == [1, 5, 10]


def test_cnn_four_blocks_are_one_conv_unit_each():
    net = create_model("cnn", 10, (3, 32, 32), blocks=4)
    assert net.block_shapes() == [(32, 32, 32), (64, 16, 16), (128, 8, 8), (128, 4, 4)]
    assert sum(p.numel() for p in net.parameters()) == 242_474
    assert create_model("cnn", 10, (1, 8, 8)).block_shapes()[1:] == [(64, 4, 4), (128, 2, 2), (128, 1, 1)]
    assert [s[1] for s in create_model("cnn", 10, (1, 28, 28)).block_shapes()] == [28, 14, 7, 3]
    deep = create_model("cnn", 10, (1, 8, 8), blocks=6, widths=(8,) * 6)     # pools stop at 1x1
    assert [s[1] for s in deep.block_shapes()] == [8, 4, 2, 1, 1, 1]


def test_vgg11_pools_and_size():
    net = create_model("vgg11", 10, (3, 32, 32), blocks=8)
    assert _channels(net) == [64, 128, 256, 256, 512, 512, 512, 512]
    assert net.block_shapes()[-1] == (512, 1, 1)
    assert sum(p.numel() for p in net.parameters()) == 9_228_362      # CIFAR VGG-11-BN, bias-free convs
    pools = {s: sum(isinstance(m, nn.MaxPool2d) for m in
                    create_model("vgg11", 10, (1, s, s), width_mult=0.125).modules()) for s in (8, 28, 32)}
    assert pools == {8: 3, 28: 4, 32: 5}   # pools that would shrink a 1x1 map are skipped


def test_mlp_widths_and_vector_input():
    net = create_model("mlp", 3, (64,), blocks=2, widths=(64, 32))
    assert max_blocks("mlp", (64,), widths=(64, 32)) == 2
    assert net.block_shapes() == [(64,), (32,)]
    assert create_model("mlp", 3, (1, 8, 8), blocks=1, widths=16).block_shapes() == [(16,)]
    assert max_blocks("mlp", (1, 8, 8)) == 4 and max_blocks("cnn", (1, 8, 8), widths=(8, 8)) == 2


def test_register_model_makes_a_model_available(monkeypatch):
    monkeypatch.setattr(blocknet, "_MODELS", blocknet._MODELS.copy())

    @register_model("tiny", "two linear units")
    def tiny(num_classes, in_shape, hidden=8):
        return [nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0], hidden)), nn.ReLU()], nn.Linear(hidden, num_classes)

    assert list_models()["tiny"] == "two linear units"
    assert create_model("tiny", 3, (5,), blocks=2, hidden=4).block_shapes() == [(4,), (4,)]
    with pytest.raises(BpfreeError, match="already registered"):
        register_model("tiny", "again")(tiny)


# --- from_sequential --------------------------------------------------------------------------------
def _seq():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU())


def test_from_sequential_respects_split_points():
    torch.manual_seed(0)
    seq, head = _seq(), nn.Linear(16, 4)
    net = BlockNet.from_sequential(seq, [2, 5], head, (1, 8, 8), 4)
    assert [len(b) for b in net.blocks] == [2, 3, 1]
    assert net.blocks[1][0] is seq[2] and net.head is head      # the user's own modules, not copies
    assert net.block_shapes() == [(32,), (16,), (16,)]
    x = torch.randn(5, 1, 8, 8)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), head(seq(x)))
    assert BlockNet.from_sequential(_seq(), [], nn.Linear(16, 4), (64,), 4).num_blocks == 1


def test_from_sequential_keeps_frozen_submodules_frozen():
    seq = _seq()
    seq[4].eval()               # a user-frozen BN must stay in eval mode after shape tracing
    net = BlockNet.from_sequential(seq, [3], nn.Linear(16, 4), (64,), 4)
    assert net.training and not seq[4].training and seq[4].num_batches_tracked.item() == 0


@pytest.mark.parametrize("points", [[0], [6], [3, 2], [2, 2], [1, 7], ["a"], [2.5], 3])
def test_from_sequential_bad_split_points(points):
    with pytest.raises(BpfreeError, match=r"split points .* in 1\.\.5"):
        BlockNet.from_sequential(_seq(), points, nn.Linear(16, 4), (64,), 4)


def test_from_sequential_bad_pieces():
    with pytest.raises(BpfreeError, match="needs an nn.Sequential"):
        BlockNet.from_sequential(nn.Linear(4, 4), [], nn.Linear(4, 2), (4,), 2)
    with pytest.raises(BpfreeError, match="does not accept input of shape"):
        BlockNet.from_sequential(_seq(), [2], nn.Linear(16, 4), (3, 8, 8), 4)       # 192 features, not 64
    with pytest.raises(BpfreeError, match=r"head outputs shape \(4,\), expected \(10,\)"):
        BlockNet.from_sequential(_seq(), [2], nn.Linear(16, 4), (64,), 10)

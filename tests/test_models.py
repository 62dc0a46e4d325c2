"""Every registered model, at every input size and block count: shapes, splits, errors."""
import pytest
import torch
from torch import nn

from bpfree.errors import BpfreeError
from bpfree.models import BlockNet, create_model, list_models, max_blocks

SMALL = {"mlp": {"widths": (16, 16, 16, 16)}, "cnn": {"widths": (4, 8, 8, 8)}, "vgg11": {"width_mult": 0.0625},
         "resnet18": {"width": 4}}
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def cases():
    for name in list_models():
        for shape in SHAPES + ([(64,)] if name == "mlp" else []):
            for k in sorted({1, 2, max_blocks(name, shape, **SMALL.get(name, {}))}):
                yield name, shape, k


@pytest.mark.parametrize("name, shape, k", list(cases()))
def test_shapes_and_blocks(name, shape, k):
    torch.manual_seed(0)
    net = create_model(name, 7, shape, blocks=k, **SMALL.get(name, {}))
    net.eval()
    x = torch.randn(3, *shape)
    assert net(x).shape == (3, 7) and net.num_blocks == k
    h = x
    for block, expected in zip(net.blocks, net.block_shapes()):
        h = block(h)
        assert tuple(h.shape[1:]) == expected
    assert torch.equal(net.head(h), net(x))


def test_split_points_follow_the_architecture():
    resnet = create_model("resnet18", 10, (3, 32, 32), blocks=4)
    assert [s[0] for s in resnet.block_shapes()] == [64, 128, 256, 512]
    assert 11.1e6 < sum(p.numel() for p in resnet.parameters()) < 11.3e6
    cnn = create_model("cnn", 10, (1, 28, 28))
    assert [s[0] for s in cnn.block_shapes()] == [32, 64, 128, 128]
    assert [s[1] for s in cnn.block_shapes()] == [28, 14, 7, 3]
    assert max_blocks("vgg11", (3, 32, 32)) == 8 and max_blocks("resnet18", (3, 32, 32)) == 8


def test_uneven_split_gives_extra_units_to_later_blocks():
    net = create_model("mlp", 10, (64,), blocks=3, widths=(8, 8, 8, 8, 8))
    assert [len(b) for b in net.blocks] == [1, 2, 2]
    net = create_model("mlp", 10, (64,), blocks=2, widths=(8, 8, 8, 8), split=[1])
    assert [len(b) for b in net.blocks] == [1, 3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(blocks=5), "allows 1..4 blocks, got 5"),
    (dict(blocks=0), "allows 1..4 blocks, got 0"),
    (dict(blocks=2, split=[0]), "strictly increasing"),
    (dict(blocks=3, split=[2, 1]), "strictly increasing"),
    (dict(depth=3), "no option 'depth'.*widths"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(BpfreeError, match=message):
        create_model("cnn", 10, (1, 28, 28), **kwargs)


def test_unknown_model_and_vector_input():
    with pytest.raises(BpfreeError, match="choose one of: cnn, mlp, resnet18, vgg11"):
        create_model("transformer", 10, (1, 28, 28))
    with pytest.raises(BpfreeError, match="needs image input"):
        create_model("resnet18", 10, (64,))


def test_from_sequential():
    seq = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    head = nn.Linear(8, 3)
    net = BlockNet.from_sequential(seq, [3], head, in_shape=(16,), num_classes=3)
    assert [len(b) for b in net.blocks] == [3, 2] and net.block_shapes() == [(8,), (8,)]
    x = torch.randn(2, 16)
    assert torch.equal(net(x), head(seq(x)))
    for bad in ([0], [5], [3, 2], [2, 2]):
        with pytest.raises(BpfreeError, match="split points"):
            BlockNet.from_sequential(seq, bad, head, (16,), 3)
    with pytest.raises(BpfreeError, match="head outputs shape"):
        BlockNet.from_sequential(seq, [3], nn.Linear(8, 4), (16,), 3)


def test_shape_tracing_leaves_batchnorm_statistics_alone():
    net = create_model("cnn", 10, (1, 28, 28))
    bn = net.blocks[0][0][1]
    assert net.training and torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))

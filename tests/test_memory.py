"""Activation-memory accounting counts exactly what autograd keeps for the backward pass."""
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

"""Networks written the way people write them (named children, a forward with flatten, pooling and
residual adds), not bpfree's zoo: the open core's tests cut these with `BlockNet.from_module`."""
import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class TinyResNet(nn.Module):
    """stem, layer1..3, global pool, flatten, fc: a small ResNet as a researcher's own class."""

    def __init__(self, num_classes: int = 10, width: int = 8, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.layer1 = Residual(width, width)
        self.layer2 = Residual(width, 2 * width, stride=2)
        self.layer3 = Residual(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class SkipOver(nn.Module):
    """A long skip connection jumping from before layer1 to after layer2."""

    def __init__(self):
        super().__init__()
        self.layer1, self.layer2, self.fc = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        h = torch.relu(self.layer1(x))
        return self.fc(torch.relu(self.layer2(h)) + x)


class Branchy(nn.Module):
    """Control flow on a tensor's value: not capturable as a graph."""

    def __init__(self):
        super().__init__()
        self.layer1, self.fc = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = self.layer1(x.flatten(1))
        if h.sum() > 0:
            h = h * 2
        return self.fc(h)

"""DenseNet-121 for 32x32 inputs (kuangliu/pytorch-cifar shapes) with an exit after each transition."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from branchy_tee.models.heads import ExitHead
from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.registry import register_model


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        # ReLU in place on BatchNorm's fresh output (never on x, which the concatenation keeps).
        out = self.conv1(F.relu(self.bn1(x), inplace=True))
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        # ceil_mode so that 28x28 inputs (7x7 after two transitions) do not lose a row.
        return F.avg_pool2d(self.conv(F.relu(self.bn(x), inplace=True)), 2, ceil_mode=True)


class FinalClassifier(nn.Module):
    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(F.relu(self.bn(x), inplace=True), 1)
        return self.linear(out.flatten(1))


@register_model
def densenet121(num_classes=10, in_channels=3, growth=32, head_width=128) -> MultiExitNet:
    blocks, reduction = [6, 12, 24, 16], 0.5
    cin = 2 * growth
    stages: list[nn.Module] = []
    exits: list[nn.Module] = []
    for i, n in enumerate(blocks):
        layers: list[nn.Module] = []
        if i == 0:
            layers.append(nn.Conv2d(in_channels, cin, 3, padding=1, bias=False))
        for _ in range(n):
            layers.append(DenseLayer(cin, growth))
            cin += growth
        if i < len(blocks) - 1:
            cout = int(math.floor(cin * reduction))
            layers.append(Transition(cin, cout))
            cin = cout
            exits.append(ExitHead(cin, num_classes, width=head_width))
        else:
            exits.append(FinalClassifier(cin, num_classes))
        stages.append(nn.Sequential(*layers))
    return MultiExitNet(stages, exits)

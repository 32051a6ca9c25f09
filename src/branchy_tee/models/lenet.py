"""LeNet-5 (LeCun et al. 1998) with an exit after each pooling stage."""

from __future__ import annotations

from torch import nn

from branchy_tee.models.heads import ExitHead
from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.registry import register_model


@register_model
def lenet5(num_classes: int = 10, in_channels: int = 3, head_width: int = 32) -> MultiExitNet:
    stages = [
        # C1 + S2: padding 2 keeps 28x28 inputs at the classic 28x28 C1 map.
        nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        # C3 + S4
        nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        # C5 as a 5x5 convolution over the (adaptively pooled) 5x5 map, as in the paper.
        nn.Sequential(nn.AdaptiveAvgPool2d(5), nn.Conv2d(16, 120, 5), nn.ReLU(inplace=True)),
    ]
    exits = [
        ExitHead(6, num_classes, width=head_width),
        ExitHead(16, num_classes, width=head_width),
        nn.Sequential(nn.Flatten(), nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes)),
    ]
    return MultiExitNet(stages, exits)

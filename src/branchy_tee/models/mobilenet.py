"""MobileNet V1 and V2 for 32x32 inputs (kuangliu/pytorch-cifar shapes).

V1: exits after blocks 1, 3, 6 and 9 of its 13 depthwise-separable blocks (as in the original work).
V2: exits where the resolution or width changes: after the 24-, 32-, 64- and 96-channel groups.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Sequence

import torch.nn.functional as F
from torch import nn

from branchy_tee.models.heads import ExitHead, PoolLinearHead
from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.registry import register_model


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        # In place: BatchNorm's backward does not need its output; fewer live feature maps.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)), inplace=True)


_V1_CFG = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024]
_V1_EXITS_AFTER = [1, 3, 6, 9]  # block counts, 1-based, as in the original work


def _split(blocks: Sequence[nn.Module], cuts: list[int]) -> list[list[nn.Module]]:
    bounds = [0, *cuts, len(blocks)]
    return [list(blocks[a:b]) for a, b in pairwise(bounds)]


@register_model
def mobilenetv1(num_classes=10, in_channels=3, head_width=128, width_mult=1.0) -> MultiExitNet:
    """``width_mult`` is MobileNet's width multiplier alpha (1.0 = the standard network)."""

    def ch(c: int) -> int:
        return max(8, int(round(c * width_mult)))

    blocks, widths, cin = [], [], ch(32)
    for item in _V1_CFG:
        cout, stride = item if isinstance(item, tuple) else (item, 1)
        blocks.append(DepthwiseSeparable(cin, ch(cout), stride))
        widths.append(ch(cout))
        cin = ch(cout)
    groups = _split(blocks, _V1_EXITS_AFTER)
    stem = [nn.Conv2d(in_channels, ch(32), 3, padding=1, bias=False), nn.BatchNorm2d(ch(32)), nn.ReLU(inplace=True)]
    stages = [nn.Sequential(*(stem if i == 0 else []), *g) for i, g in enumerate(groups)]
    ends = [widths[c - 1] for c in _V1_EXITS_AFTER]
    exits = [ExitHead(c, num_classes, width=head_width) for c in ends] + [PoolLinearHead(widths[-1], num_classes)]
    return MultiExitNet(stages, exits)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * cin
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # in place: see Block
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.stride == 1:
            out += self.shortcut(x)
        return out


# (expansion, out_planes, num_blocks, stride); stride 1 in the second group for 32x32 inputs.
_V2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
_V2_EXITS_AFTER = [3, 6, 10, 13]  # after the 24-, 32-, 64- and 96-channel groups


@register_model
def mobilenetv2(num_classes=10, in_channels=3, head_width=128) -> MultiExitNet:
    blocks, widths, cin = [], [], 32
    for expansion, cout, n, stride in _V2_CFG:
        for s in [stride] + [1] * (n - 1):
            blocks.append(InvertedResidual(cin, cout, expansion, s))
            widths.append(cout)
            cin = cout
    groups = _split(blocks, _V2_EXITS_AFTER)
    stem = [nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]
    tail = [nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU(inplace=True)]
    stages = []
    for i, g in enumerate(groups):
        layers = (stem if i == 0 else []) + g + (tail if i == len(groups) - 1 else [])
        stages.append(nn.Sequential(*layers))
    ends = [widths[c - 1] for c in _V2_EXITS_AFTER]
    exits = [ExitHead(c, num_classes, width=head_width) for c in ends] + [PoolLinearHead(1280, num_classes)]
    return MultiExitNet(stages, exits)

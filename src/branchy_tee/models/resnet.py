"""ResNet-18/34/50/101/152 for 32x32 inputs (kuangliu/pytorch-cifar shapes).

Exits after layer1, layer2 and layer3; the final exit is the usual pool + linear after layer4.
``width`` scales every channel count (64 = the standard network), for narrow variants.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from branchy_tee.models.heads import ExitHead, PoolLinearHead
from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x):
        # In-place ReLU and residual add: BatchNorm's backward does not need its output, and two
        # fewer live feature maps per block lower peak memory, which matters inside an enclave.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # in place: see BasicBlock
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def _resnet(block, num_blocks, num_classes: int, in_channels: int, width: int, head_width: int) -> MultiExitNet:
    cin = width
    stages, exits = [], []
    for i, n in enumerate(num_blocks):
        planes = width * 2**i
        layers: list[nn.Module] = []
        if i == 0:
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
        for s in [1 if i == 0 else 2] + [1] * (n - 1):
            layers.append(block(cin, planes, s))
            cin = planes * block.expansion
        stages.append(nn.Sequential(*layers))
        last = i == len(num_blocks) - 1
        exits.append(PoolLinearHead(cin, num_classes) if last else ExitHead(cin, num_classes, width=head_width))
    return MultiExitNet(stages, exits)


@register_model
def resnet18(num_classes=10, in_channels=3, width=64, head_width=128) -> MultiExitNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width, head_width)


@register_model
def resnet34(num_classes=10, in_channels=3, width=64, head_width=128) -> MultiExitNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, width, head_width)


@register_model
def resnet50(num_classes=10, in_channels=3, width=64, head_width=128) -> MultiExitNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width, head_width)


@register_model
def resnet101(num_classes=10, in_channels=3, width=64, head_width=128) -> MultiExitNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, in_channels, width, head_width)


@register_model
def resnet152(num_classes=10, in_channels=3, width=64, head_width=128) -> MultiExitNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], num_classes, in_channels, width, head_width)

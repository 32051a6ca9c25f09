"""VGG-16/19 (CIFAR variant, kuangliu/pytorch-cifar) with exits after the first four pooling stages."""

from __future__ import annotations

from torch import nn

from branchy_tee.models.heads import ExitHead, PoolLinearHead
from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.registry import register_model

# Channels per block; each inner list ends with a 2x2 max-pool.
_CFG = {
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _vgg(cfg, num_classes: int, in_channels: int, head_width: int) -> MultiExitNet:
    stages, exits = [], []
    cin = in_channels
    for i, block in enumerate(cfg):
        layers: list[nn.Module] = []
        for cout in block:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        # 28x28 inputs reach 1x1 after four pools; ceil_mode keeps the fifth pool from emptying the map.
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
        stages.append(nn.Sequential(*layers))
        last = i == len(cfg) - 1
        exits.append(PoolLinearHead(cin, num_classes) if last else ExitHead(cin, num_classes, width=head_width))
    return MultiExitNet(stages, exits)


@register_model
def vgg16(num_classes: int = 10, in_channels: int = 3, head_width: int = 128) -> MultiExitNet:
    return _vgg(_CFG["vgg16"], num_classes, in_channels, head_width)


@register_model
def vgg19(num_classes: int = 10, in_channels: int = 3, head_width: int = 128) -> MultiExitNet:
    return _vgg(_CFG["vgg19"], num_classes, in_channels, head_width)

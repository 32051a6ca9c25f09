"""AlexNet for 32x32 inputs with exits after conv2, conv3 and conv4, as in BranchyNet/SecEDIF."""

from __future__ import annotations

from torch import nn

from branchy_tee.models.heads import ExitHead
from branchy_tee.models.multiexit import MultiExitNet
from branchy_tee.models.registry import register_model


def _conv(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=True)]


@register_model
def alexnet(num_classes: int = 10, in_channels: int = 3, head_width: int = 128) -> MultiExitNet:
    stages = [
        nn.Sequential(*_conv(in_channels, 64, 5), nn.MaxPool2d(2), *_conv(64, 192, 5), nn.MaxPool2d(2)),  # conv1-2
        nn.Sequential(*_conv(192, 384)),  # conv3
        nn.Sequential(*_conv(384, 256)),  # conv4
        nn.Sequential(*_conv(256, 256), nn.MaxPool2d(2)),  # conv5
    ]
    exits = [
        ExitHead(192, num_classes, width=head_width),
        ExitHead(384, num_classes, width=head_width),
        ExitHead(256, num_classes, width=head_width),
        nn.Sequential(
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        ),
    ]
    return MultiExitNet(stages, exits)

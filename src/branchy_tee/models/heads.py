"""Exit heads: small classifiers attached to intermediate feature maps.

A head pools adaptively first, so it works for any input size (28x28 or 32x32 images) and its cost
is independent of the feature map's resolution: the backbone stage, not the head, should dominate
the cost of reaching an exit.
"""

from __future__ import annotations

from torch import nn


class ExitHead(nn.Sequential):
    """Pool to ``pool x pool``, mix channels with a 1x1 conv, then one linear layer.

    Pooling to 4x4 (rather than to 1x1) keeps where a feature was seen, which early exits,
    whose features are still local edges and textures, need to classify well.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 128, pool: int = 4):
        super().__init__(
            nn.AdaptiveAvgPool2d(pool),
            nn.Conv2d(in_channels, width, kernel_size=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(width * pool * pool, num_classes),
        )


class PoolLinearHead(nn.Sequential):
    """The usual final classifier of a CIFAR backbone: global average pool, then linear."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))

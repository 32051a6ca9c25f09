"""How raw images become the model's input tensor: one record, written into the model card and the
bundle header when a model is trained and sealed, and read wherever images are turned into inputs
(training and evaluation transforms, ``encrypt-input``, the online client: ``data.transforms``).

A pixel ``p`` (uint8, 0..255) becomes ``(p * scale - mean[c]) / std[c]`` for its channel ``c``;
inputs already on the 0..1 scale skip the first step. Standard library only: the bundle header,
which the enclave parses, holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from branchy_tee.core.strict import Fields

UINT8_SCALE = 1 / 255


@dataclass(frozen=True)
class Preprocessing:
    input_shape: tuple[int, int, int]  # (C, H, W) of one input
    scale: float  # pixel value -> the 0..1 scale (1/255 for uint8 images)
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def divisor(self) -> float:
        """What pixels are divided by to apply ``scale``: 1/scale, which is exactly 255.0 for 1/255.
        Dividing is what training has always done (x / 255); multiplying by the rounded float32 of
        1/255 instead gives a different last bit for about half of the 256 pixel values."""
        return 1 / self.scale

    def to_json(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def parse(cls, f: Fields) -> "Preprocessing":
        shape = f.integers("input_shape", lo=1, count=3)
        scale = f.check(
            "scale",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
            "a number in (0, 1]",
        )
        mean = f.numbers("mean", count=shape[0])
        std = f.check(
            "std",
            lambda v: (
                isinstance(v, list)
                and len(v) == shape[0]
                and all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 and s != float("inf") for s in v
                )
            ),
            f"a list of {shape[0]} positive numbers",
        )
        f.done()
        return cls((shape[0], shape[1], shape[2]), scale, mean, tuple(std))

    @classmethod
    def for_images(
        cls, input_shape: Iterable[int], mean: Iterable[float], std: Iterable[float], scale: float = UINT8_SCALE
    ) -> "Preprocessing":
        """The preprocessing of a uint8 image data set with these per-channel statistics."""
        c, h, w = (int(n) for n in input_shape)
        return cls((c, h, w), scale, tuple(float(m) for m in mean), tuple(float(s) for s in std))

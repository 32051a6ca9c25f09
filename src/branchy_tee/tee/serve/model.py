"""The model a server answers with: the verified bundle, its stage store and exit rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from branchy_tee.tee.sealed.bundle import SealedBundle
    from branchy_tee.tee.startup import Log


class LoadedModel:
    """The verified bundle, its stage store and exit rule: ``answer(x)`` for the batcher's thread."""

    def __init__(
        self, bundle: SealedBundle, memory_budget: float | None, batch_size: int, full_model: bool, log: Log
    ) -> None:
        from branchy_tee.tee.serve.api import ModelInfo
        from branchy_tee.tee.stages import StageStore

        h = bundle.header
        self.bundle, self.batch_size = bundle, batch_size
        self.store = StageStore(bundle, memory_budget, batch_size, log)
        self.criterion = h.criterion
        self.thresholds = h.exit_thresholds(full_model)
        self.classes = h.classes
        self.input_shape = h.preprocessing.input_shape
        self.identity = h.model_ref.to_json()  # what every answer names
        self.info = ModelInfo.of(h).to_json()  # GET /v1/model
        self.exit_counts = [0] * bundle.num_stages

    def answer(self, x: np.ndarray) -> list[dict[str, Any]]:
        from branchy_tee.tee.engine import early_exit

        a = early_exit(self.store.get, self.bundle.num_stages, x, self.criterion, self.thresholds, self.batch_size)
        out = []
        for label, conf, ex in zip(a.labels.tolist(), a.confidences.tolist(), a.exits.tolist(), strict=True):
            self.exit_counts[ex] += 1
            out.append({"label": label, "class_name": self.classes[label], "confidence": round(conf, 6), "exit": ex})
        return out

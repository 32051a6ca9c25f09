"""On-demand stage store: decrypt and load a stage the first time a sample needs it.

Convolution weights arrive channels-last (see ``seal.bundle``), so activations flow channels-last
through the stages, the fast layout for oneDNN on CPU.

The model is built once on the ``meta`` device (shapes only, no memory); a stage's real tensors are
assigned into it when the stage is loaded and dropped again (back to ``meta``) when it is evicted.
Stage 0 is loaded eagerly and never evicted. With a memory budget, least-recently-used later stages
are evicted so that resident weights plus one batch's activations stay within the budget: SGX
protected memory is small and paging it is expensive.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from ..errors import BranchyError, IntegrityError
from ..models import create_model
from ..seal.bundle import SealedBundle
from .budget import activation_bytes_per_sample

MIB = 1 << 20


class StageStore:
    def __init__(self, bundle: SealedBundle, memory_budget_mib: float | None = None, batch_size: int = 1, log=None):
        h = bundle.header
        self.bundle = bundle
        self.log = log or (lambda msg: None)
        with torch.device("meta"):
            self.skeleton = create_model(h["arch"], **h["config"]).eval()
        self.num_stages = self.skeleton.num_exits
        if self.num_stages != bundle.num_stages:
            raise IntegrityError(f"bundle has {bundle.num_stages} stage files but {h['arch']} has {self.num_stages} stages")
        self.weight_bytes = [int(s["weight_bytes"]) for s in h["stages"]]
        self.activation_bytes = batch_size * activation_bytes_per_sample(h)
        self.budget = None
        if memory_budget_mib is not None:
            self.budget = int(memory_budget_mib * MIB) - self.activation_bytes
            need = self.weight_bytes[0] + max(self.weight_bytes[1:]) + self.activation_bytes
            if need > memory_budget_mib * MIB:
                raise BranchyError(
                    f"memory budget {memory_budget_mib:g} MiB is too small: stage 0 ({self.weight_bytes[0] / MIB:.1f} MiB) + the "
                    f"largest later stage ({max(self.weight_bytes[1:]) / MIB:.1f} MiB) + activations of a batch of {batch_size} "
                    f"({self.activation_bytes / MIB:.1f} MiB) need {need / MIB:.1f} MiB; raise --memory-budget or lower --batch-size"
                )
        self.resident: OrderedDict[int, None] = OrderedDict()
        self.loaded_ever: list[int] = []
        self.loads = 0
        self.evictions = 0
        self.resident_peak = 0
        self.load_seconds = 0.0
        self.get(0)

    @property
    def resident_bytes(self) -> int:
        return sum(self.weight_bytes[k] for k in self.resident)

    def get(self, k: int):
        """(stage module, exit head) for stage k, loading it if needed."""
        if k in self.resident:
            self.resident.move_to_end(k)
        else:
            self._make_room(k)
            self._load(k)
        return self.skeleton.stages[k], self.skeleton.exits[k]

    def _make_room(self, k: int) -> None:
        if self.budget is None:
            return
        while self.resident_bytes + self.weight_bytes[k] > self.budget:
            victim = next((j for j in self.resident if j != 0), None)
            if victim is None:  # cannot happen after the feasibility check in __init__
                raise BranchyError(f"stage {k} does not fit in the memory budget")
            self._evict(victim)

    def _load(self, k: int) -> None:
        t = time.perf_counter()
        state = self.bundle.read_stage(k)
        stage_sd = {n[len("stage."):]: v for n, v in state.items() if n.startswith("stage.")}
        exit_sd = {n[len("exit."):]: v for n, v in state.items() if n.startswith("exit.")}
        if len(stage_sd) + len(exit_sd) != len(state):
            raise IntegrityError(f"stage {k}: unexpected tensor names in the sealed payload")
        try:
            self.skeleton.stages[k].load_state_dict(stage_sd, strict=True, assign=True)
            self.skeleton.exits[k].load_state_dict(exit_sd, strict=True, assign=True)
        except RuntimeError as e:
            raise IntegrityError(f"stage {k}: weights do not fit {self.bundle.header['arch']} ({str(e).splitlines()[0]})") from None
        self.skeleton.stages[k].eval()
        self.skeleton.exits[k].eval()
        self.resident[k] = None
        self.loads += 1
        if k not in self.loaded_ever:
            self.loaded_ever.append(k)
        self.resident_peak = max(self.resident_peak, self.resident_bytes)
        dt = time.perf_counter() - t
        self.load_seconds += dt
        self.log(f"loaded stage {k} ({self.weight_bytes[k] / MIB:.2f} MiB) in {1000 * dt:.1f} ms")

    def _evict(self, k: int) -> None:
        self.skeleton.stages[k].to_empty(device="meta")
        self.skeleton.exits[k].to_empty(device="meta")
        del self.resident[k]
        self.evictions += 1
        self.log(f"evicted stage {k}")

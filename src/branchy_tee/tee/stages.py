"""On-demand stage store: decrypt a stage's graph and start its session the first time a sample needs it.

Stage 0 is loaded eagerly and never evicted. With a memory budget, least-recently-used later stages
are evicted (their sessions dropped) so that resident stages plus the activations the engine may
hold stay within the budget: SGX protected memory is small and paging it is expensive. A stage's
size for the budget is the ``weight_bytes`` the bundle header records for it: the bytes of its
graph's weights, which its session uses where they were decrypted (the decrypted payload lives as
long as the session).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from branchy_tee.core.errors import BranchyError, IntegrityError
from branchy_tee.tee.budget import activation_bytes_per_sample, run_size
from branchy_tee.tee.graphs import StageGraph, load_session
from branchy_tee.tee.sealed.bundle import SealedBundle

MIB = 1 << 20


class StageStore:
    def __init__(
        self,
        bundle: SealedBundle,
        memory_budget_mib: float | None = None,
        batch_size: int = 1,
        log: Callable[[str], None] | None = None,
    ):
        self.bundle = bundle
        self.log = log or (lambda msg: None)
        self.num_stages = bundle.num_stages
        self.weight_bytes = [s.weight_bytes for s in bundle.header.stages]
        self.activation_bytes = batch_size * activation_bytes_per_sample(bundle.header)
        self.budget = None
        if memory_budget_mib is not None:
            self.budget = int(memory_budget_mib * MIB) - self.activation_bytes
            need = self.weight_bytes[0] + max(self.weight_bytes[1:]) + self.activation_bytes
            if need > memory_budget_mib * MIB:
                raise BranchyError(
                    f"memory budget {memory_budget_mib:g} MiB is too small: "
                    f"stage 0 ({self.weight_bytes[0] / MIB:.1f} MiB) + the "
                    f"largest later stage ({max(self.weight_bytes[1:]) / MIB:.1f} MiB) + "
                    f"activations of a batch of {batch_size} "
                    f"({self.activation_bytes / MIB:.1f} MiB) need {need / MIB:.1f} MiB; "
                    "raise --memory-budget or lower --batch-size"
                )
        self.resident: OrderedDict[int, StageGraph] = OrderedDict()
        self.loaded_ever: list[int] = []
        self.loads = 0
        self.evictions = 0
        self.resident_peak = 0
        self.load_seconds = 0.0
        self._lock = threading.Lock()  # the engine's workers share the store
        self.get(0)

    @property
    def resident_bytes(self) -> int:
        return sum(self.weight_bytes[k] for k in self.resident)

    def get(self, k: int) -> StageGraph:
        """Stage k's graph, loading it if needed."""
        with self._lock:
            stage = self.resident.get(k)
            if stage is not None:
                self.resident.move_to_end(k)
                return stage
            self._make_room(k)
            return self._load(k)

    def _make_room(self, k: int) -> None:
        if self.budget is None:
            return
        while self.resident_bytes + self.weight_bytes[k] > self.budget:
            victim = next((j for j in self.resident if j != 0), None)
            if victim is None:  # cannot happen after the feasibility check in __init__
                raise BranchyError(f"stage {k} does not fit in the memory budget")
            del self.resident[victim]
            self.evictions += 1
            self.log(f"evicted stage {victim}")

    def _load(self, k: int) -> StageGraph:
        t = time.perf_counter()
        what = self.bundle.stage_name(k)
        # Decrypted into fresh page-aligned memory, which the session then keeps: the weights are
        # used where they were decrypted (tee.graphs.unpack).
        elems = self.bundle.header.stages[k].activation_elems
        stage = StageGraph(load_session(self.bundle.decrypt_stage(k), what), what, run_size(elems))
        if stage.last != (k == self.num_stages - 1):
            raise IntegrityError(
                f"{what}: stage {k} graph {'lacks' if k < self.num_stages - 1 else 'has'} a features output"
            )
        self.resident[k] = stage
        self.loads += 1
        if k not in self.loaded_ever:
            self.loaded_ever.append(k)
        self.resident_peak = max(self.resident_peak, self.resident_bytes)
        dt = time.perf_counter() - t
        self.load_seconds += dt
        self.log(f"loaded stage {k} ({self.weight_bytes[k] / MIB:.2f} MiB) in {1000 * dt:.1f} ms")
        return stage

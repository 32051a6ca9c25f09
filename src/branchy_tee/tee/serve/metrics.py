"""serve's counters and latency summaries, as Prometheus text for the model owner (``/v1/metrics``)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterable

LATENCY_WINDOW = 4096  # recent requests the latency percentiles are computed over


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = {"ok": 0, "refused": 0, "busy": 0, "error": 0}
        self.samples = 0
        self.latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.compute: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.compute_total = 0.0
        self.connections = 0
        self.tls_failures = 0
        self.refused_connections = 0  # over --max-connections, or over the unauthenticated cap
        self.deadline_closes = 0

    def observe(
        self, outcome: str, samples: int = 0, seconds: float | None = None, compute: float | None = None
    ) -> None:
        with self.lock:
            self.requests[outcome] += 1
            self.samples += samples
            if seconds is not None:
                self.latency.append(seconds)
            if compute is not None:
                self.compute.append(compute)
                self.compute_total += compute

    @staticmethod
    def _quantiles(values: Iterable[float]) -> dict[str, float]:
        v = sorted(values)
        if not v:
            return {}
        return {q: v[min(len(v) - 1, int(float(q) * len(v)))] for q in ("0.5", "0.9", "0.99")}

    def prometheus(self, exit_counts: list[int], queue: int, batches: int) -> str:
        with self.lock:
            lines = ["# TYPE branchy_tee_requests_total counter"]
            lines += [f'branchy_tee_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()]
            lines += [
                "# TYPE branchy_tee_samples_total counter",
                f"branchy_tee_samples_total {self.samples}",
                "# TYPE branchy_tee_exit_samples_total counter",
            ]
            lines += [f'branchy_tee_exit_samples_total{{exit="{k}"}} {n}' for k, n in enumerate(exit_counts)]
            for name, values in (("request", self.latency), ("compute", self.compute)):
                lines.append(f"# TYPE branchy_tee_{name}_seconds summary")
                lines += [
                    f'branchy_tee_{name}_seconds{{quantile="{q}"}} {v:.6f}' for q, v in self._quantiles(values).items()
                ]
                lines.append(f"branchy_tee_{name}_seconds_count {len(values)}")
            lines += [
                "# TYPE branchy_tee_compute_seconds_total counter",
                f"branchy_tee_compute_seconds_total {self.compute_total:.6f}",
                "# TYPE branchy_tee_batches_total counter",
                f"branchy_tee_batches_total {batches}",
                "# TYPE branchy_tee_queue_requests gauge",
                f"branchy_tee_queue_requests {queue}",
                "# TYPE branchy_tee_connections_total counter",
                f"branchy_tee_connections_total {self.connections}",
                "# TYPE branchy_tee_tls_failures_total counter",
                f"branchy_tee_tls_failures_total {self.tls_failures}",
                "# TYPE branchy_tee_refused_connections_total counter",
                f"branchy_tee_refused_connections_total {self.refused_connections}",
                "# TYPE branchy_tee_deadline_closes_total counter",
                f"branchy_tee_deadline_closes_total {self.deadline_closes}",
            ]
        return "\n".join(lines) + "\n"

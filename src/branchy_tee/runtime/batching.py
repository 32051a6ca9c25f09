"""Dynamic batching across requests: concurrent requests (from any data owners) are gathered into
one batch for the early-exit engine, and each request gets back exactly its own answers.

One worker thread owns the engine. It takes the oldest waiting request, then keeps gathering until
``max_batch`` samples are together or ``max_wait`` has passed since it started, runs the batch,
and hands every request its slice. The queue of waiting requests is bounded: when it is full a
request is refused at once (the server answers 503 with Retry-After) instead of waiting forever.
Answers do not depend on the batch they were computed in (BatchNorm in eval mode: every operation
is per sample), so batching changes latency and throughput, never a label.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class Busy(Exception):
    """The queue is full: come back later."""


class Stopped(Exception):
    """The batcher no longer takes work (draining or stopped)."""


@dataclass
class Job:
    x: np.ndarray
    enqueued: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    compute_seconds: float = 0.0  # of the batch this job ran in
    batch_samples: int = 0

    def wait(self, timeout: float | None) -> Any:
        if not self.done.wait(timeout):
            raise TimeoutError("no answer in time")
        if self.error is not None:
            raise self.error
        return self.result


class Batcher:
    """``answer(x) -> per-sample results`` (a list or array of len(x)) run on gathered batches."""

    def __init__(self, answer: Callable[[np.ndarray], Any], max_batch: int = 64, max_wait: float = 0.002,
                 max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be positive, max_wait not negative")
        self.answer, self.max_batch, self.max_wait = answer, max_batch, max_wait
        self._queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()
        self.batches = 0

    def submit(self, x: np.ndarray) -> Job:
        if not self._accepting:
            raise Stopped("the server is shutting down")
        job = Job(x)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy("too many requests are waiting") from None
        return job

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 60.0) -> None:
        """Take no new work, finish what was accepted, then end the worker."""
        self._accepting = False
        self._queue.put(None)  # after every accepted job (FIFO)
        self._thread.join(timeout)

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        jobs, n = [first], len(first.x)
        deadline = time.perf_counter() + self.max_wait
        while n < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            n += len(job.x)
        return jobs, False

    def _run(self) -> None:
        end = False
        while not end:
            first = self._queue.get()
            if first is None:
                break
            jobs, end = self._gather(first)
            x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
            t0 = time.perf_counter()
            try:
                results = self.answer(x)
                error = None
            except BaseException as e:  # noqa: BLE001 -- handed to every waiting request
                results, error = None, e
            seconds = time.perf_counter() - t0
            self.batches += 1
            lo = 0
            for job in jobs:
                hi = lo + len(job.x)
                job.result = None if results is None else results[lo:hi]
                job.error, job.compute_seconds, job.batch_samples = error, seconds, len(x)
                job.done.set()
                lo = hi

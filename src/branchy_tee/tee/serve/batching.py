"""Dynamic batching across requests: concurrent requests (from any data owners) are gathered into
one batch for the early-exit engine, and each request gets back exactly its own answers.

No thread of its own: the request threads take turns at the engine (leader/follower). A thread
that submitted a request and finds the engine free takes the oldest waiting requests, up to
``max_batch`` samples (holding the batch open up to ``max_wait`` for more when it is not full),
runs them and hands every request its slice; the others wait for their answer, or for the engine to
become free if their request is still waiting. A lone request therefore runs on its own thread with
no hand-over at all, and under load every batch is as full as the queue allows. Wake-ups are
addressed: a finished batch wakes the threads whose requests it answered and, if requests are still
waiting, the one thread whose request is oldest (the next leader), never every waiting thread (with
64 clients that was ~60 needless wake-ups per request, each taking the lock and the GIL). The queue of
waiting requests is bounded: when it is full a request is refused at once (the server answers 503
with Retry-After) instead of waiting forever. Answers do not depend on the batch they were computed
in (BatchNorm in eval mode: every operation is per sample), so batching changes latency and
throughput, never a label.
"""

from __future__ import annotations

import threading
import time
from collections import deque
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
    batcher: Batcher
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    compute_seconds: float = 0.0  # of the batch this job ran in
    batch_samples: int = 0
    # Its own thread waits here (on the batcher's lock) for its answer or for its turn to lead.
    wake: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.wake = threading.Condition(self.batcher._lock)

    def wait(self, timeout: float | None) -> Any:
        """The job's answers; this thread runs batches itself while the engine is free."""
        self.batcher._serve_until_done(self, timeout)
        if self.error is not None:
            raise self.error
        return self.result


class Batcher:
    """``answer(x) -> per-sample results`` (a list or array of len(x)) run on gathered batches."""

    def __init__(
        self, answer: Callable[[np.ndarray], Any], max_batch: int = 64, max_wait: float = 0.002, max_queue: int = 256
    ):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be positive, max_wait not negative")
        self.answer, self.max_batch, self.max_wait, self.max_queue = answer, max_batch, max_wait, max_queue
        self._lock = threading.Lock()
        # Only a leader holding its batch open and stop() wait here; request threads wait on their job's.
        self._cv = threading.Condition(self._lock)
        self._pending: deque[Job] = deque()
        self._running = False
        self._accepting = True
        self.batches = 0

    def submit(self, x: np.ndarray) -> Job:
        job = Job(x, self)
        with self._lock:
            if not self._accepting:
                raise Stopped("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise Busy("too many requests are waiting")
            self._pending.append(job)
            self._cv.notify()  # a leader holding its batch open may take this one too
        return job

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def stop(self, timeout: float = 60.0) -> None:
        """Take no new work and wait until what was accepted has been answered (by its own threads)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._accepting = False
            self._cv.notify_all()  # a leader holding its batch open runs it now
            while (self._pending or self._running) and self._cv.wait(max(0.0, deadline - time.monotonic())):
                pass

    def _serve_until_done(self, job: Job, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not job.done:
                if not self._running and self._pending:
                    self._lead()
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._give_up(job)
                    raise TimeoutError("no answer in time")
                job.wake.wait(left)

    def _lead(self) -> None:
        """Take a batch, run it without the lock, answer its jobs; called holding the lock."""
        self._running = True
        jobs = self._take_batch()
        self._lock.release()
        try:
            self._run(jobs)
        finally:
            self._lock.acquire()
            self._running = False
            for job in jobs:
                job.done = True
                job.wake.notify()
            self._engine_free()

    def _engine_free(self) -> None:
        """Holding the lock, with no batch running: the thread of the oldest waiting job leads next;
        with none waiting, stop() may return."""
        if self._pending:
            self._pending[0].wake.notify()
        else:
            self._cv.notify_all()

    def _give_up(self, job: Job) -> None:
        """A job whose thread stops waiting leaves the queue, and does not leave it without a leader."""
        try:
            self._pending.remove(job)
        except ValueError:
            pass  # it is in the batch being run; nobody will read its answer
        if not self._running:
            self._engine_free()

    def _take_batch(self) -> list[Job]:
        """The oldest waiting jobs up to max_batch samples (at least one); called holding the lock."""
        deadline = time.monotonic() + self.max_wait
        jobs: list[Job] = []
        n = 0
        while True:
            while self._pending and (not jobs or n + len(self._pending[0].x) <= self.max_batch):
                job = self._pending.popleft()
                jobs.append(job)
                n += len(job.x)
            left = deadline - time.monotonic()
            if n >= self.max_batch or left <= 0 or not self._accepting:
                return jobs
            self._cv.wait(left)

    def _run(self, jobs: list[Job]) -> None:
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
        t0 = time.perf_counter()
        try:
            results, error = self.answer(x), None
        except BaseException as e:  # noqa: BLE001 -- handed to every waiting request
            results, error = None, e
        seconds = time.perf_counter() - t0
        self.batches += 1
        lo = 0
        for job in jobs:
            hi = lo + len(job.x)
            job.result = None if results is None else results[lo:hi]
            job.error, job.compute_seconds, job.batch_samples = error, seconds, len(x)
            lo = hi

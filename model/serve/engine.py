"""One thread runs the model; requests take turns on it, one step each.

Generation is CPU-bound (or holds one GPU), so running every request's forward passes at once
would only make them fight over the same cores. Instead every request hands the engine an
iterator (a `generate` loop, or a one-shot computation) and awaits its items; a single worker
thread calls `next()` on each active iterator in turn, so 32 streams advance together, one
token each per round, and the event loop never waits on the model. A request that goes away
(a client that disconnects mid-stream) marks its job cancelled and the worker drops it before
its next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()  # the iterator is exhausted


class EngineStopped(RuntimeError):
    """The server is shutting down: a request still waiting for the model ends with this."""


@dataclass
class _Failure:
    error: BaseException


@dataclass
class _Job:
    start: Callable[[], Iterator[Any]]  # called on the worker thread: model work starts there
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    iterator: Iterator[Any] | None = None
    cancelled: bool = False


class Engine:
    """The worker thread and its round-robin of jobs. Start it before use, stop it at shutdown."""

    def __init__(self) -> None:
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running: _Job | None = None  # the job the worker is stepping now
        self.steps = 0  # items produced, for tests and monitoring

    @property
    def active(self) -> int:
        """Jobs in progress: waiting for their next step or being stepped."""
        with self._wake:
            return len(self._jobs) + (self._running is not None)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="smallgpt-engine",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Cancel every job and end the worker (after the step it is running)."""
        with self._wake:
            self._stopping = True
            for job in self._jobs:
                job.cancelled = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    async def stream(self, start: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """The items of `start()`, computed on the worker thread. Errors raised there are raised
        here; leaving the loop early (or being cancelled) stops the iterator."""
        job = _Job(start, asyncio.get_running_loop())
        with self._wake:
            if self._stopping or self._thread is None:
                raise EngineStopped("the engine is not running (the server is shutting down)")
            self._jobs.append(job)
            self._wake.notify()
        try:
            while True:
                item = await job.queue.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            job.cancelled = True  # the worker closes the iterator when it next meets the job

    async def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the worker thread, between other jobs' steps."""
        async for item in self.stream(lambda: iter((fn(),))):
            return item
        raise RuntimeError("unreachable: a one-item iterator yielded nothing")

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    jobs, self._jobs = list(self._jobs), deque()
                    break
                job = self._running = self._jobs.popleft()
            more = self._step(job)
            with self._wake:
                self._running = None
                if more:
                    self._jobs.append(job)  # to the back: every other job steps first
        for job in jobs:  # requests still waiting end with an error instead of hanging
            self._close(job)
            self._deliver(job, _Failure(EngineStopped("the server is shutting down")))

    def _step(self, job: _Job) -> bool:
        """Advance `job` by one item; whether it has more to give."""
        if job.cancelled:
            self._close(job)
            return False
        try:
            if job.iterator is None:
                job.iterator = job.start()
            item = next(job.iterator)
        except StopIteration:
            self._deliver(job, _END)
            return False
        except Exception as exc:  # handed to the request, which turns it into an HTTP error
            self._deliver(job, _Failure(exc))
            return False
        self.steps += 1
        self._deliver(job, item)
        return True

    def _close(self, job: _Job) -> None:
        close = getattr(job.iterator, "close", None)
        if close is not None:
            close()  # runs the generator's cleanup (generate puts the model's mode back)

    @staticmethod
    def _deliver(job: _Job, item: Any) -> None:
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            job.cancelled = True

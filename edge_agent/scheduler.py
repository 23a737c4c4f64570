"""The bounded queue and the loop that turns it into micro-batches for the runner.

One batch runs at a time (one GPU). While it runs, new requests queue up, so the next batch is as
full as the load allows. The loop sleeps until something arrives or the oldest request's batching
window ends; ``pause``/``resume`` hold new batches back during a drain or a model swap (queued requests
wait, they do not fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.batching import Pending, collate
from edge_agent.jobs import JobOutput, Work
from edge_agent.metrics import Metrics
from edge_agent.runner import ModelRunner
from edge_agent.settings import QueueSettings
from zimage_edge.errors import GenerationCancelled
from zimage_edge.request import GenerationRequest

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class QueueFull(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__("the queue is full")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    work: Work
    future: asyncio.Future[JobOutput]
    enqueued_at: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started_at: float | None = None
    stopped: str | None = None  # why the node stopped it (drain): its client gets an answer, not a cut

    def stop(self, error: GenerationCancelled) -> None:
        """End the job on the node's or its caller's behalf: its client is told why, its work stops."""
        self.stopped = error.reason
        self.work.cancel.set()
        if not self.future.done():
            self.future.set_exception(error)

    @property
    def request(self) -> GenerationRequest:
        return self.work.request


class Scheduler:
    def __init__(
        self, runner: ModelRunner, settings: QueueSettings, metrics: Metrics, clock: Clock = time.monotonic
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.pending: list[Job] = []
        self.running: list[Job] = []
        self._wake = asyncio.Event()
        self._paused = False
        self._changed = asyncio.Condition()  # notified whenever the queue or the running batch changes
        self._notifications: set[asyncio.Task[None]] = set()
        self._batch_seconds = 1.0  # moving average, for Retry-After
        self._lock = asyncio.Lock()  # held while a batch runs: swaps take it to act between batches
        metrics.pending.set_function(lambda: len(self.pending))

    # --- submitting ------------------------------------------------------------------------------

    def submit(self, work: Work) -> Job:
        if len(self.pending) >= self.settings.max_pending:
            # Rough time until a slot frees: the batches ahead of a new request, at the recent pace.
            batches_ahead = len(self.pending) / max(1, self.settings.max_batch) + 1
            raise QueueFull(retry_after=max(1.0, batches_ahead * self._batch_seconds))
        job = Job(work=work, future=asyncio.get_running_loop().create_future(), enqueued_at=self.clock())
        self.pending.append(job)
        self._wake.set()
        self._notify()
        return job

    def withdraw(self, job: Job) -> None:
        """Forget a job that has not started (its client left); a running one is cancelled instead."""
        job.work.cancel.set()
        if job in self.pending:
            self.pending.remove(job)
            job.future.cancel()
            self._notify()

    def stop_all(self, reason: str) -> int:
        """Stop every queued and running job (end of a drain's grace period, shutdown); their clients
        get a 503 saying ``reason``. Returns how many."""
        jobs = [*self.pending, *self.running]
        for job in jobs:
            job.stop(GenerationCancelled(job.work.step, job.request.steps, reason))
        self.pending.clear()
        self._notify()
        return len(jobs)

    def stop(self, job: Job, error: GenerationCancelled) -> None:
        """Stop one job (queued: it leaves the queue; running: it stops at the next step)."""
        job.stop(error)
        if job in self.pending:
            self.pending.remove(job)
            self._notify()

    def jobs_of(self, owner: str) -> list[Job]:
        """The jobs ``owner`` has in flight, running ones first."""
        return [job for job in (*self.running, *self.pending) if job.work.owner == owner and not job.future.done()]

    # --- control ---------------------------------------------------------------------------------

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    @property
    def lock(self) -> asyncio.Lock:
        return self._lock

    async def wait_idle(self) -> None:
        await self.wait_until(lambda: not self.pending and not self.running)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is re-checked whenever the queue changes."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify(), name="zimage-queue-changed")
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    # --- the loop --------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        while True:
            timeout = None
            if not self._paused and self.pending:
                decision = collate(
                    [Pending(j.request.batch_key(), j.request.num_images, j.enqueued_at) for j in self.pending],
                    now=self.clock(),
                    max_images=self.settings.max_batch,
                    window=self.settings.batch_window_ms / 1000,
                )
                if decision.take:
                    batch = [self.pending[i] for i in decision.take]
                    for job in batch:
                        self.pending.remove(job)
                    await self._run_batch(batch)
                    continue
                timeout = None if decision.wake_at is None else max(0.0, decision.wake_at - self.clock())
            self._wake.clear()
            # A timeout means the oldest request's batching window ended: decide again. asyncio.timeout,
            # not wait_for: on 3.11 a cancel landing as wait_for times out comes out as TimeoutError,
            # which this loop would swallow, and the app's shutdown would wait for it for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _run_batch(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.future.done() and not job.work.cancel.is_set()]
        if not live:
            self._notify()
            return
        now = self.clock()
        for job in live:
            job.started_at = now
            self.metrics.queue_wait.observe(now - job.enqueued_at)
        self.metrics.batch_size.observe(sum(j.request.num_images for j in live))
        self.running = live
        self._notify()
        started = self.clock()
        try:
            async with self._lock:
                outputs = await self.runner.run([job.work for job in live])
        except Exception as exc:  # a bug or a device failure: every job of the batch learns of it
            log.exception("batch_failed", extra={"event": "batch_failed", "jobs": [j.id for j in live]})
            outputs = [exc for _ in live]
        finally:
            self.running = []
        elapsed = self.clock() - started
        self.metrics.generation_seconds.observe(elapsed)
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        for job, output in zip(live, outputs, strict=True):
            if job.future.done():
                continue  # stopped by the node, or its client left: already answered
            if job.work.cancel.is_set():
                job.future.cancel()  # its client is gone: nobody will read an answer
            elif isinstance(output, BaseException):
                job.future.set_exception(output)
            else:
                job.future.set_result(output)
        self._notify()

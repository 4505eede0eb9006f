"""The request queue and the single worker thread that owns the ``Session``.

Requests run one at a time (the runtime's Session is single-request). ``Worker.submit`` admits a ``Job`` or refuses
it: 503 while shutting down, 429 with ``Retry-After`` when ``max_queue`` jobs are already waiting (the running one
not counted). The worker thread posts ``("delta", text)``, ``("done", Result)`` or ``("error", ServeError)`` events to
the job's asyncio queue on the event loop that submitted it. A job is stopped early when its ``cancel`` flag is set
(the client disconnected) or its deadline passes: the flag is checked in the runtime's stream callback (each text
delta) and before the job starts, and the generation is abandoned by raising from the callback, which closes the
runtime's request generator and frees the Session.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from typing import Any

from edgevlm.errors import EdgeVLMError, ImageError, PromptError
from edgevlm.serve.errors import ServeError

log = logging.getLogger(__name__)

__all__ = ["Job", "Worker"]


class _Stop(Exception):
    """Raised from the stream callback to abandon a generation."""


class Job:
    """One admitted request: what to run (``kwargs`` for ``Session.generate``) and where its events go."""

    def __init__(self, image: Any, prompt: str, params: dict[str, Any], *, timeout: float) -> None:
        # ``image``: one image or the request's list of images (in order, one per <image> of the prompt); it goes
        # to ``Session.generate`` as is
        self.image, self.prompt, self.params = image, prompt, params
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.cancel_reason: str | None = None
        self.admitted = time.monotonic()
        self.deadline = self.admitted + timeout
        self.started: float | None = None
        self.finished = False

    @property
    def queue_s(self) -> float:
        return (self.started or time.monotonic()) - self.admitted

    def stop(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancel.set()

    def post(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:            # the event loop is closed: nobody is listening any more
            pass

    async def next_event(self) -> tuple[str, Any]:
        """The next event; a timeout error (and the job stopped) when the deadline passes first."""
        remaining = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.events.get(), timeout=max(0.0, remaining) + 0.5)
        except asyncio.TimeoutError:
            self.stop("timeout")
            return "error", _timeout_error()


def _timeout_error() -> ServeError:
    return ServeError(504, "the request did not finish within --request-timeout; raise it or lower max_tokens",
                      code="request_timeout")


class Worker:
    """A thread owning ``session``; ``submit`` enqueues jobs (bounded), ``close`` drains and stops."""

    def __init__(self, session: Any, max_queue: int, metrics: Any = None) -> None:
        self.session, self.max_queue, self.metrics = session, int(max_queue), metrics
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.accepting = True
        self.completed = 0
        self._durations: deque[float] = deque(maxlen=16)
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="edgevlm-serve-worker", daemon=True)
        self._thread.start()

    # ---- admission (event-loop side) ---------------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean recent request time x the jobs ahead (>= 1)."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean * (self.waiting + self.running)))

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self.accepting:
                raise ServeError(503, "the server is shutting down; retry on another instance or after restart",
                                 code="shutting_down")
            if self.waiting >= self.max_queue:
                raise ServeError(429, f"the queue is full ({self.waiting} requests waiting, --max-queue "
                                      f"{self.max_queue}); retry later", code="queue_full",
                                 headers={"Retry-After": str(self.retry_after())})
            self.waiting += 1
            self._gauges()
            self._q.put(job)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.waiting)
            self.metrics.running.set(self.running)

    # ---- the worker thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                break
            with self._lock:
                self.waiting -= 1
                self.running = 1
                self._current = job
                self._gauges()
            t0 = time.monotonic()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.running = 0
                    self._current = None
                    self.completed += 1
                    self._durations.append(time.monotonic() - t0)
                    self._gauges()

    def _cancelled(self, job: Job, reason: str | None) -> None:
        reason = reason or "cancelled"
        if self.metrics is not None:
            self.metrics.cancelled.labels(reason=reason).inc()
        if reason == "timeout":
            job.post("error", _timeout_error())
        else:
            job.post("error", ServeError(499 if reason == "disconnect" else 503, f"request {reason}",
                                         code=reason))

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        if job.cancel.is_set():
            return self._cancelled(job, job.cancel_reason)
        if job.started > job.deadline:
            job.stop("timeout")
            return self._cancelled(job, "timeout")

        def on_delta(delta: str) -> None:
            if not job.cancel.is_set() and time.monotonic() > job.deadline:
                job.stop("timeout")
            if job.cancel.is_set():
                raise _Stop(job.cancel_reason)
            job.post("delta", delta)

        try:
            result = self.session.generate(job.image, job.prompt, raw_prompt=True, stream=on_delta, **job.params)
        except _Stop:
            return self._cancelled(job, job.cancel_reason)
        except PromptError as exc:
            job.post("error", ServeError(400, str(exc), param="messages", code="context_length_exceeded"))
        except ImageError as exc:
            job.post("error", ServeError(400, str(exc), param="image_url", code="invalid_image"))
        except EdgeVLMError as exc:
            log.warning("request failed: %s", exc)
            job.post("error", ServeError(500, f"{type(exc).__name__}: {exc}", code="runtime_error"))
        except Exception as exc:  # noqa: BLE001 - a worker must survive any request
            log.exception("request crashed")
            job.post("error", ServeError(500, f"internal error ({type(exc).__name__}: {exc})", code="internal_error"))
        else:
            if self.metrics is not None:
                self.metrics.observe_result(result, job.queue_s)
            job.post("done", result)

    # ---- shutdown ----------------------------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        with self._lock:
            self.accepting = False

    def close(self, timeout: float = 30.0, cancel_running: bool = False) -> None:
        """Refuse new jobs, let the queued and running ones finish (or stop them), stop the thread."""
        self.stop_accepting()
        if cancel_running:
            with self._lock:
                if self._current is not None:
                    self._current.stop("shutdown")
        self._q.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the worker did not stop within %.0f s", timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

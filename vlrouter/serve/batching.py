"""The async batcher: a bounded queue whose requests are gathered into one ``engine.act_batch`` per batch.

Requests arriving within ``max_wait_ms`` of the oldest waiting one are gathered, up to
``max_batch_size``, and run in ONE worker thread (the engine serialises model passes
anyway), so the event loop stays free to accept, parse and answer. Within a batch, rows
with the same generation settings go into one ``act_batch`` (mixed adapters in one
``generate``); rows with other settings, and every seeded sampling request, run in their
own call, so a row never samples with another row's temperature or seed. Greedy results
equal unbatched ones (the engine's ``act_batch`` guarantee).

Each request waits on its own future. :meth:`Batcher.submit` refuses with
:class:`QueueFull` when the queue holds ``max_queue`` requests; a future cancelled while
queued (the client disconnected, or timed out) leaves the queue at once, freeing its slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from vlrouter.core.errors import RouterError
from vlrouter.plugins.manager import parse_action

log = logging.getLogger("vlrouter.serve")


@dataclass(frozen=True)
class GenSettings:
    """Generation settings of one request; equal settings may share a ``generate`` call."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int | None = None  # sampling only
    stop: tuple[str, ...] = ()

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self, tokenizer=None) -> dict[str, Any]:
        """Keyword arguments for transformers' ``generate`` (through ``engine.act_batch``)."""
        kw: dict[str, Any] = {}
        if self.sampling:
            kw.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                kw["top_p"] = self.top_p
        if self.stop and tokenizer is not None:  # stop early; the text is cut at the stop string afterwards
            kw.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        return kw


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string, as OpenAI's ``stop`` does."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


class QueueFull(Exception):
    """The queue holds ``capacity`` requests already."""

    def __init__(self, depth: int, capacity: int) -> None:
        super().__init__(f"the request queue is full ({depth} of {capacity} waiting)")
        self.depth, self.capacity = depth, capacity


@dataclass(eq=False)
class Job:
    """One queued request: route or act on (image, prompt), optionally with a forced adapter."""

    kind: str  # "act" | "route"
    image: Any  # an opened PIL image
    prompt: str
    adapter: str | None = None  # forced adapter (or "base"); None routes
    gen: GenSettings = GenSettings()
    future: asyncio.Future | None = field(default=None, repr=False)
    enqueued: float = 0.0

    def group_key(self) -> tuple:
        if self.kind == "route":
            return ("route",)
        if self.gen.sampling and self.gen.seed is not None:
            return ("act", self.gen, id(self))  # a seeded sample runs alone: its draws must not depend on others
        return ("act", self.gen)


class Batcher:
    """Gathers :class:`Job` s into batches and runs them on ``engine`` in one worker thread."""

    def __init__(self, engine, *, max_batch_size: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None, on_cancel: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda n: None)
        self._on_cancel = on_cancel or (lambda: None)
        self._queue: deque[Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vlrouter-batch")
        self.running = 0  # jobs in the batch the worker runs now

    @property
    def depth(self) -> int:
        """Requests waiting for the model (not counting the batch running now)."""
        return len(self._queue)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="vlrouter-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            job = self._queue.popleft()
            if job.future is not None and not job.future.done():
                job.future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, jobs: Sequence[Job]) -> list[asyncio.Future]:
        """Queue ``jobs`` (all or none) and return their futures; :class:`QueueFull` when they do not fit."""
        if self._wakeup is None:
            raise RuntimeError("Batcher.submit before start()")
        if len(self._queue) + len(jobs) > self.max_queue:
            raise QueueFull(len(self._queue), self.max_queue)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for job in jobs:
            job.future = loop.create_future()
            job.enqueued = now
            job.future.add_done_callback(lambda fut, job=job: self._forget(job, fut))
            self._queue.append(job)
        self._wakeup.set()
        return [job.future for job in jobs]

    def _forget(self, job: Job, fut: asyncio.Future) -> None:
        """A job cancelled while still queued frees its slot at once."""
        if fut.cancelled():
            try:
                self._queue.remove(job)
            except ValueError:
                pass  # already taken into a batch: its result is dropped
            self._on_cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._queue[0].enqueued + self.max_wait
            while 0 < len(self._queue) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[Job] = []
            while self._queue and len(batch) < self.max_batch_size:
                job = self._queue.popleft()
                if job.future is not None and not job.future.done():
                    batch.append(job)
            if not batch:
                continue
            self.running = len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self._execute, batch)
            except Exception as e:  # the executor shut down under us (stopping), or a bug: fail this batch only
                if not isinstance(e, RuntimeError):
                    log.exception("batch of %d failed", len(batch))
                results = [e] * len(batch)
            finally:
                self.running = 0
            for job, result in zip(batch, results):
                if job.future is None or job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    # ---- the worker thread --------------------------------------------------------------------

    def _execute(self, batch: list[Job]) -> list[Any]:
        """Run a batch, one engine call per group of equal settings; a row's error stays that row's."""
        results: list[Any] = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(batch):
            groups.setdefault(job.group_key(), []).append(i)
        for idx in groups.values():
            jobs = [batch[i] for i in idx]
            try:
                outs = self._run(jobs)
            except RouterError as e:
                # one bad row (e.g. below min_confidence with fallback: error): isolate it
                outs = [e] if len(jobs) == 1 else [self._run_one(job) for job in jobs]
            except Exception as e:  # a bug: every row of the group gets it (answered as a 500, logged)
                log.exception("batch of %d failed", len(jobs))
                outs = [e] * len(jobs)
            for i, out in zip(idx, outs):
                results[i] = out
        return results

    def _run_one(self, job: Job) -> Any:
        try:
            return self._run([job])[0]
        except RouterError as e:
            return e
        except Exception as e:
            log.exception("request failed")
            return e

    def _run(self, jobs: list[Job]) -> list[Any]:
        engine = self.engine
        items = [(job.image, job.prompt) for job in jobs]
        self._on_batch(len(jobs))
        if jobs[0].kind == "route":
            return engine.route_batch(items)
        gen = jobs[0].gen
        kwargs = gen.generate_kwargs(engine.processor.tokenizer if gen.stop else None)
        seeded = gen.sampling and gen.seed is not None
        with engine.lock if seeded else nullcontext():
            if seeded:
                import torch

                torch.manual_seed(gen.seed)
            actions = engine.act_batch(items, max_new_tokens=gen.max_new_tokens,
                                       adapters=[job.adapter for job in jobs], **kwargs)
        if gen.stop:
            actions = [self._cut(a, gen.stop) for a in actions]
        return actions

    def _cut(self, action, stops: Sequence[str]):
        text = cut_at_stop(action.text, stops)
        if text == action.text:
            return action
        return dataclasses.replace(action, text=text, action=parse_action(self.engine.plugin_manager, action.adapter,
                                                                           text))

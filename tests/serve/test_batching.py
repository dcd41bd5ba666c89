"""The batcher on its own (a recording stand-in for the engine): gathering, grouping by settings, isolation, slots."""

from __future__ import annotations

import asyncio
import threading

import pytest

from vlrouter.core.errors import LowConfidenceError
from vlrouter.core.results import Action, Route
from vlrouter.plugins.manager import get_plugin_manager
from vlrouter.serve.batching import Batcher, GenSettings, Job, QueueFull, cut_at_stop


class RecordingEngine:
    """Answers act_batch with the prompt as the text, and records every call's rows and settings."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict]] = []
        self.lock = threading.RLock()
        self.plugin_manager = get_plugin_manager(entry_points=False)
        self.processor = type("P", (), {"tokenizer": None})()

    def act_batch(self, items, max_new_tokens=64, *, adapters=None, **kw):
        prompts = [p for _, p in items]
        self.calls.append((prompts, {"max_new_tokens": max_new_tokens, "adapters": adapters, **kw}))
        if any(p == "too unsure" for p in prompts):
            raise LowConfidenceError("item 0: router confidence 0.2 is below router.min_confidence")
        return [Action(a or "calendar", 0.9, p, None, {}, routed="calendar") for p, a in zip(prompts, adapters)]

    def route_batch(self, items):
        self.calls.append(([p for _, p in items], {"route": True}))
        return [Route("calendar", 0.9, {"calendar": 0.9}) for _ in items]


def _run(engine, jobs, **kw):
    async def main():
        b = Batcher(engine, **kw)
        await b.start()
        try:
            futures = b.submit(jobs)
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await b.stop()

    return asyncio.run(main())


def test_requests_arriving_together_share_one_call_up_to_the_batch_size():
    engine = RecordingEngine()
    out = _run(engine, [Job("act", None, f"p{i}") for i in range(5)], max_batch_size=2, max_wait_ms=50)
    assert [a.text for a in out] == [f"p{i}" for i in range(5)]
    assert [len(prompts) for prompts, _ in engine.calls] == [2, 2, 1]


def test_rows_with_other_settings_never_share_a_generate_call_and_a_seeded_sample_runs_alone():
    engine = RecordingEngine()
    greedy, short, hot = GenSettings(), GenSettings(max_new_tokens=2), GenSettings(temperature=0.7)
    seeded = GenSettings(temperature=0.7, seed=5)
    jobs = [Job("act", None, "a", gen=greedy), Job("act", None, "b", gen=short), Job("act", None, "c", gen=greedy),
            Job("act", None, "d", gen=hot), Job("act", None, "e", gen=seeded), Job("act", None, "f", gen=seeded),
            Job("act", None, "g", gen=hot), Job("route", None, "h")]
    _run(engine, jobs, max_batch_size=8, max_wait_ms=50)
    calls = {tuple(prompts): kw for prompts, kw in engine.calls}
    assert set(calls) == {("a", "c"), ("b",), ("d", "g"), ("e",), ("f",), ("h",)}
    assert calls[("b",)]["max_new_tokens"] == 2 and calls[("a", "c")].get("do_sample") is None
    assert calls[("d", "g")]["do_sample"] is True and calls[("d", "g")]["temperature"] == 0.7


def test_one_failing_row_fails_alone_and_its_batch_mates_are_answered():
    engine = RecordingEngine()
    out = _run(engine, [Job("act", None, "fine"), Job("act", None, "too unsure"), Job("act", None, "also fine")],
               max_batch_size=8, max_wait_ms=50)
    assert out[0].text == "fine" and out[2].text == "also fine"
    assert isinstance(out[1], LowConfidenceError)


def test_forced_adapters_reach_the_engine_per_row_and_stop_cuts_the_text():
    engine = RecordingEngine()
    jobs = [Job("act", None, "click here STOP now", adapter="base", gen=GenSettings(stop=("STOP",))),
            Job("act", None, "no stop in it", gen=GenSettings(stop=("STOP",)))]
    out = _run(engine, jobs, max_batch_size=8, max_wait_ms=50)
    assert engine.calls[0][1]["adapters"] == ["base", None]
    assert [a.text for a in out] == ["click here ", "no stop in it"]
    assert cut_at_stop("a-b-c", ["c", "-"]) == "a" and cut_at_stop("abc", []) == "abc"


def test_a_full_queue_refuses_and_a_cancelled_request_frees_its_slot():
    engine = RecordingEngine()

    async def main():
        b = Batcher(engine, max_batch_size=1, max_wait_ms=0, max_queue=2)
        await b.start()
        try:
            with engine.lock:  # hold the worker on its first row; the others wait in the queue
                engine_busy = threading.Event()
                real = engine.act_batch

                def slow(*a, **k):
                    engine_busy.set()
                    with engine.lock:
                        return real(*a, **k)

                engine.act_batch = slow
                first = b.submit([Job("act", None, "first")])[0]
                await asyncio.get_running_loop().run_in_executor(None, engine_busy.wait, 5)
                waiting = b.submit([Job("act", None, "w1"), Job("act", None, "w2")])
                with pytest.raises(QueueFull, match=r"full \(2 of 2 waiting\)"):
                    b.submit([Job("act", None, "one too many")])
                waiting[0].cancel()
                await asyncio.sleep(0)
                assert b.depth == 1
                b.submit([Job("act", None, "w3")])  # the freed slot is usable
            return await asyncio.gather(first, waiting[1])
        finally:
            await b.stop()

    first, w2 = asyncio.run(main())
    assert (first.text, w2.text) == ("first", "w2")
    assert ["w1"] not in [prompts for prompts, _ in engine.calls]

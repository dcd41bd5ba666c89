"""Many threads on one engine: 8 threads x 50 `act` calls equal the sequential results, and memory stays flat.

The engine serialises model passes under one lock (see core/engine.py, "Thread
safety"); this checks the promise under load: no exception, every result identical
to the sequential one for the same input (adapter, routed, text, parsed action,
probabilities), and resident memory after the run within 10 % of before -- measured
after a warm-up run that already used 8 threads (glibc gives each new thread its own
malloc arena; warm-up makes those part of the baseline), after ``gc.collect()``.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

from tests import engine_helpers as H

THREADS = 8
CALLS = 50
MAX_NEW = 4


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _key(action) -> tuple:
    return (action.adapter, action.routed, action.text, str(action.action), action.confidence,
            tuple(sorted(action.probs.items())))


def _hammer(engine, items, calls: int) -> tuple[dict[int, list[tuple]], list[BaseException]]:
    """``THREADS`` threads, each making ``calls`` acts over ``items`` from its own offset, all started at once."""
    results: dict[int, list[tuple]] = {i: [] for i in range(len(items))}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(k: int) -> None:
        try:
            start.wait()
            for j in range(calls):
                idx = (j + k) % len(items)
                key = _key(engine.act(*items[idx], max_new_tokens=MAX_NEW))
                with lock:
                    results[idx].append(key)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    return results, errors


def test_eight_threads_of_fifty_acts_equal_sequential_and_memory_stays_flat(engine):
    items = [(img, prompt) for img, prompt, _ in H.samples()]
    sequential = [_key(engine.act(img, prompt, max_new_tokens=MAX_NEW)) for img, prompt in items]
    assert {k[0] for k in sequential} == set(H.NAMES)  # every adapter is exercised

    _, errors = _hammer(engine, items, calls=4)  # warm-up, threads included
    assert not errors
    gc.collect()
    before = _rss_kb()

    results, errors = _hammer(engine, items, calls=CALLS)
    assert not errors, errors[:3]
    assert sum(len(v) for v in results.values()) == THREADS * CALLS
    for idx, keys in results.items():
        assert keys and all(k == sequential[idx] for k in keys), (idx, set(keys) - {sequential[idx]})

    gc.collect()
    after = _rss_kb()
    assert after <= before * 1.10, f"RSS grew from {before / 1024:.0f} MB to {after / 1024:.0f} MB"

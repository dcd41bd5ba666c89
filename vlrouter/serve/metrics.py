"""Server metrics in Prometheus' text exposition format (counters, gauges, histograms; no dependency).

Updated from the event loop and the batch worker thread (one lock); ``render()`` is what
``GET /metrics`` returns (``text/plain; version=0.0.4``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Family:
    def __init__(self, name: str, help: str, kind: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.kind, self.labels = name, help, kind, tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, "counter", labels)
        self.values: dict[tuple, float] = {} if labels else {(): 0.0}

    def inc(self, *label_values: str, by: float = 1.0) -> None:
        key = tuple(str(v) for v in label_values)
        self.values[key] = self.values.get(key, 0.0) + by

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.labels, k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Family):
    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        super().__init__(name, help, "gauge")
        self.read = read

    def lines(self) -> list[str]:
        return [f"{self.name} {_num(self.read())}"]


class Histogram(_Family):
    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, "histogram", labels)
        self.buckets = tuple(buckets) + (math.inf,)
        self.series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, *label_values: str) -> None:
        key = tuple(str(v) for v in label_values)
        s = self.series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
        for i, b in enumerate(self.buckets):
            if value <= b:
                s[i] += 1
        s[-2] += value
        s[-1] += 1

    def lines(self) -> list[str]:
        out = []
        for key, s in sorted(self.series.items()):
            for i, b in enumerate(self.buckets):
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labels, key, le)} {s[i]}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {s[-1]}")
        return out


class Metrics:
    """Everything ``/metrics`` shows. ``queue_depth`` and ``running`` are read when rendered."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0, running: Callable[[], float] = lambda: 0) -> None:
        self._lock = threading.Lock()
        self.requests = Counter("vlrouter_requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.latency = Histogram("vlrouter_request_duration_seconds", "HTTP request latency by endpoint.",
                                 LATENCY_BUCKETS, ("endpoint",))
        self.routes = Counter("vlrouter_routes_total", "Routing decisions by the adapter the router chose.",
                              ("adapter",))
        self.generations = Counter("vlrouter_generations_total", "Generations by the adapter that generated "
                                   "('base' for the base model).", ("adapter",))
        self.forced = Counter("vlrouter_forced_total", "Generations whose adapter the request chose (model != auto).")
        self.fallbacks = Counter("vlrouter_fallbacks_total", "Acts where router.fallback replaced the routed adapter "
                                 "(confidence below router.min_confidence).")
        self.unknown = Counter("vlrouter_unknown_total", "Routing decisions flagged out-of-distribution (known=false).")
        self.batch_size = Histogram("vlrouter_batch_size", "Rows per engine call (one act_batch or route_batch).",
                                    BATCH_BUCKETS)
        self.rejected = Counter("vlrouter_queue_rejections_total", "Requests refused with 503 because the queue was "
                                "full.")
        self.cancelled = Counter("vlrouter_cancelled_total", "Queued requests dropped because the client went away "
                                 "or timed out.")
        self.reloads = Counter("vlrouter_reloads_total", "Router reloads by result (ok, error).", ("result",))
        self.queue_depth = Gauge("vlrouter_queue_depth", "Requests waiting for the model.", queue_depth)
        self.running = Gauge("vlrouter_batch_running", "Rows in the batch the model runs now.", running)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests.inc(endpoint, str(status))
            self.latency.observe(seconds, endpoint)

    def decision(self, *, routed: str | None, adapter: str | None, fallback: bool, known: bool | None,
                 forced: bool) -> None:
        with self._lock:
            if routed is not None and not forced:
                self.routes.inc(routed)
            if adapter is not None:
                self.generations.inc(adapter)
            if forced:
                self.forced.inc()
            if fallback:
                self.fallbacks.inc()
            if known is False:
                self.unknown.inc()

    def batch(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe(size)

    def inc(self, counter: Counter, *labels: str) -> None:
        with self._lock:
            counter.inc(*labels)

    def render(self) -> str:
        families = [self.requests, self.latency, self.routes, self.generations, self.forced, self.fallbacks,
                    self.unknown, self.batch_size, self.rejected, self.cancelled, self.reloads, self.queue_depth,
                    self.running]
        out: list[str] = []
        with self._lock:
            for fam in families:
                out += fam.header() + fam.lines()
        return "\n".join(out) + "\n"

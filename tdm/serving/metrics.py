"""Prometheus metrics in the text exposition format (version 0.0.4), written here: counters and
histograms with labels, thread-safe, no dependency."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {self.label_names}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return self.header() + [
            f"{self.name}{_labels(self.label_names, key)} {_number(v)}" for key, v in items
        ]


class Gauge(Counter):
    """A value that goes up and down (``set``)."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, help_: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help_, labels)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        slot = bisect.bisect_left(self.bounds, value)  # bucket "le" includes its bound
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.bounds) + 1))
            counts[slot] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(self._key(labels), []))

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(c), self._sums[k]) for k, c in self._counts.items())
        lines = self.header()
        for key, counts, total in items:
            running = 0
            for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
                running += n
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return lines


class Metrics:
    """The service's metrics."""

    def __init__(self) -> None:
        self.requests = Counter(
            "tdm_http_requests_total", "HTTP requests by route, method and status.",
            ("route", "method", "status"),
        )  # fmt: skip
        self.latency = Histogram(
            "tdm_http_request_duration_seconds", "Time to answer a request, by route.",
            LATENCY_BUCKETS, ("route",),
        )  # fmt: skip
        self.batch_size = Histogram(
            "tdm_batch_size", "Recommendation requests answered by one batched beam search.",
            BATCH_BUCKETS,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "tdm_batch_duration_seconds", "Time of one batch (features, beam search, answers).",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.events = Counter("tdm_events_total", "Behaviour events stored.")
        self.cold_start = Counter(
            "tdm_cold_start_total", "Recommendations answered by the most-popular list."
        )
        self.unknown_items = Counter(
            "tdm_unknown_items_total", "History items the model does not know (ignored)."
        )
        self.reloads = Counter("tdm_model_reloads_total", "Model reloads by result.", ("result",))
        self.model = Gauge("tdm_model_info", "The model being served (value 1).", ("version",))
        self.items = Gauge("tdm_model_items", "Items in the served model's corpus.")

    def render(self) -> str:
        metrics = (
            self.requests, self.latency, self.batch_size, self.batch_seconds, self.events,
            self.cold_start, self.unknown_items, self.reloads, self.model, self.items,
        )  # fmt: skip
        return "\n".join(line for m in metrics for line in m.render()) + "\n"

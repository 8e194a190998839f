"""Fixtures for the observability tests: a recording stand-in for Ray's metrics, Prometheus text parsing."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import defaultdict

import pytest

from raymoe.observability import metrics
from tests.helpers import isolated_ray_env


class Recorder:
    """Replaces metrics.inc/observe/set_gauge: counters summed, gauges last value, histograms as lists."""

    def __init__(self) -> None:
        self.counters: dict[tuple, float] = defaultdict(float)
        self.gauges: dict[tuple, float] = {}
        self.observed: dict[tuple, list[float]] = defaultdict(list)

    @staticmethod
    def key(name: str, tags: dict) -> tuple:
        return (name, *sorted((k, str(v)) for k, v in tags.items()))

    def inc(self, name: str, value: float = 1.0, **tags) -> None:
        if value:
            self.counters[self.key(name, tags)] += value

    def set_gauge(self, name: str, value: float, **tags) -> None:
        self.gauges[self.key(name, tags)] = value

    def observe(self, name: str, value: float, **tags) -> None:
        self.observed[self.key(name, tags)].append(value)

    def counter(self, name: str, **tags) -> float:
        return self.counters.get(self.key(name, tags), 0.0)

    def gauge(self, name: str, **tags) -> float | None:
        return self.gauges.get(self.key(name, tags))

    def names(self) -> set[str]:
        return {k[0] for k in (*self.counters, *self.gauges, *self.observed)}


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    for fn in ("inc", "set_gauge", "observe"):
        monkeypatch.setattr(metrics, fn, getattr(rec, fn))
    return rec


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ([-+0-9.eEinfNa]+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and not line.startswith("#"):
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def base_name(name: str) -> str:
    """ray_raymoe_x_seconds_bucket -> ray_raymoe_x_seconds (histogram series share the metric's name)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def totals(text: str, name: str, *by: str) -> dict[tuple[str, ...], float]:
    """Sum of `name`'s samples grouped by the labels `by` (over processes, nodes, ...)."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for n, labels, value in parse_samples(text):
        if n == name:
            out[tuple(labels.get(k, "") for k in by)] += value
    return dict(out)


@contextlib.contextmanager
def local_ray(num_cpus: int):
    """A fresh local Ray (own short temp dir, token auth off, metrics exported every second), then gone.

    Ray exports metrics every 10 s by default; 1 s keeps the polling in these tests short.
    """
    import ray

    with isolated_ray_env("rmo") as tmp:
        try:
            yield ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
                           _system_config={"metrics_report_interval_ms": 1000})
        finally:
            ray.shutdown()


class MaxScraper:
    """Polls `fetch()` (Prometheus text) in a thread; keeps each series' largest value and the last text.

    Gauges such as in-flight requests are non-zero only while load runs, so the tests look at the
    maximum over the run; histograms are judged by their `_count`.
    """

    def __init__(self, fetch, period_s: float = 0.25) -> None:
        self.fetch = fetch
        self.period_s = period_s
        self.max: dict[str, float] = {}  # base metric name -> largest sample value seen
        self.text = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def scrape_once(self) -> str:
        text = self.fetch()
        for name, _labels, value in parse_samples(text):
            if name.endswith(("_bucket", "_sum")):
                continue
            base = base_name(name)
            self.max[base] = max(self.max.get(base, float("-inf")), value)
        self.text = text
        return text

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scrape_once()
            except OSError:  # the server is restarting a replica: try again
                pass
            self._stop.wait(self.period_s)

    def start(self) -> MaxScraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def missing(self, names, timeout_s: float) -> list[str]:
        """Names (as Ray exports them) not yet seen with a value > 0, waiting up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            absent = sorted(n for n in names if self.max.get(n, 0.0) <= 0)
            if not absent or time.monotonic() > deadline:
                return absent
            time.sleep(0.25)

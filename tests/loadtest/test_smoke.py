"""Load-test smoke: a short locust run against a `raymoe serve` started here, plus the summary arithmetic.

The run goes through `raymoe loadtest` (raymoe/loadtest.py), which starts the server and locust as child
processes: locust monkey-patches ssl and must never share a process with Ray. The server gets a free
port, this test's RAYMOE_CACHE and a private Ray temp dir. Cleanup does not rely on the code under
test: every child inherits a marker variable, and whatever still carries it at the end is killed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import uuid
from pathlib import Path

import pytest

from raymoe import loadtest

summary = loadtest.summary_module()
TEST_MARKER = "RAYMOE_LOADTEST_SMOKE"


def _marked_pids(token: str) -> list[int]:
    needle = f"{TEST_MARKER}={token}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != os.getpid() and needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.fixture
def marked_children(monkeypatch: pytest.MonkeyPatch):
    """Every process started during the test carries TEST_MARKER=<token>; leftovers are killed, then reported."""
    token = uuid.uuid4().hex
    monkeypatch.setenv(TEST_MARKER, token)
    yield token
    leftovers = _marked_pids(token)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftovers, f"processes left running after the load test: {leftovers}"


@pytest.mark.ray
@pytest.mark.timeout(360)
@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")
def test_locust_run_against_raymoe_serve_has_no_failures_and_output_tokens(tmp_path, monkeypatch, marked_children):
    monkeypatch.setenv("RAYMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = loadtest.loadtest_main(["-u", "8", "-t", "20s", "--prompt-tokens", "32", "--output-tokens", "16",
                                   "--stop-timeout", "15", "--ready-timeout", "240", "--out", str(out)])
    results = json.loads((out / "summary.json").read_text())
    assert len(results) == 1
    result = results[0]
    assert result["failed"] == 0, result["failures"]
    assert code == 0
    assert result["completed"] > 0
    assert result["output_throughput"] > 0
    assert result["ttft_ms"]["p50"] > 0 and result["tpot_ms"]["p50"] > 0
    assert result["server"]["engine_generated_tokens"] > 0  # /metrics was scraped before and after
    assert (out / "u8_stats.csv").exists()


def _rec(ttft: float | None, tpot: float | None, e2el: float, out: int = 11, ok: bool = True, **kw) -> dict:
    return {"kind": "chat", "stream": ttft is not None, "ok": ok, "t_start": 0.0, "t_end": 10.0, "ttft": ttft,
            "tpot": tpot, "e2el": e2el, "output_tokens": out, "prompt_tokens": 5, "itl": [tpot] * 2 if tpot else [],
            **kw}


def test_percentile_interpolates_between_closest_ranks():
    assert summary.percentile([4, 1, 3, 2], 50) == 2.5
    assert summary.percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)
    assert math.isnan(summary.percentile([], 99))


def test_goodput_counts_requests_meeting_every_slo_and_nonstreaming_gets_the_streaming_deadline():
    records = [
        _rec(0.5, 0.02, 0.7),  # meets both
        _rec(3.0, 0.02, 3.2),  # TTFT too slow
        _rec(0.5, 0.09, 1.4),  # TPOT too slow
        _rec(None, None, 2.4),  # non-streaming, 11 tokens: deadline 2 s + 10 * 50 ms = 2.5 s -> meets
        _rec(None, None, 2.6),  # misses the deadline
        _rec(None, None, 0.1, ok=False, error="HTTP 503: busy"),
    ]
    s = summary.summarize(records, [{"event": "start", "t": 0.0}])
    assert s["completed"] == 5 and s["failed"] == 1 and s["failures"] == {"HTTP 503": 1}
    assert s["goodput"]["requests_per_s"] == pytest.approx(2 / 10)
    assert s["goodput"]["fraction"] == pytest.approx(2 / 6)
    assert s["output_throughput"] == pytest.approx(55 / 10)
    assert s["ttft_ms"]["p50"] == pytest.approx(500)
    assert "TTFT" in summary.format_summary(s)


def test_server_breakdown_reads_metric_deltas_and_names_what_is_missing():
    before = summary.parse_prometheus('raymoe_engine_num_steps_total{replica="a"} 10\n'
                                      'raymoe_engine_num_generated_tokens_total{replica="a"} 40\n'
                                      'ray_raymoe_time_to_first_token_seconds_sum{SessionName="s"} 1.0\n'
                                      'ray_raymoe_time_to_first_token_seconds_count{SessionName="s"} 10\n')
    after = summary.parse_prometheus('raymoe_engine_num_steps_total{replica="a"} 110\n'
                                     'raymoe_engine_num_generated_tokens_total{replica="a"} 840\n'
                                     "raymoe_engine_replicas 1\n"
                                     'ray_raymoe_time_to_first_token_seconds_sum{SessionName="s"} 3.0\n'
                                     'ray_raymoe_time_to_first_token_seconds_count{SessionName="s"} 20\n'
                                     "ray_raymoe_e2e_request_latency_seconds_sum 8.0\n"
                                     "ray_raymoe_e2e_request_latency_seconds_count 20\n"
                                     "raymoe_dispatch_seconds_sum 0.5\nraymoe_dispatch_seconds_count 100\n")
    b = summary.server_breakdown(before, after, duration_s=2.0)
    assert b["tokens_per_step"] == 8 and b["wall_ms_per_step"] == 20
    assert b["server_ttft_mean_ms"] == pytest.approx(200)  # Ray's ray_ prefix is read through
    assert b["server_e2el_mean_ms"] == pytest.approx(400)
    assert b["other_timings_mean_ms"] == {"raymoe_dispatch_seconds": pytest.approx(5)}
    assert "dispatch" not in b["not_exposed"] and "tokenization" in b["not_exposed"]


def test_duration_parsing_and_bad_scenario_keys_are_errors(tmp_path):
    assert loadtest.parse_duration("1m30s") == 90 and loadtest.parse_duration("45") == 45
    with pytest.raises(ValueError, match="bad duration"):
        loadtest.parse_duration("soon")
    bad = tmp_path / "bad.yaml"
    bad.write_text("users: 4\nuser: 8\n")
    assert loadtest.loadtest_main(["--scenario", str(bad), "--out", str(tmp_path / "o")]) == 2

"""Locust run -> summary: p50/p90/p99 of TTFT, TPOT, ITL and E2EL, token throughput, goodput under an SLO.

    <prefix>_requests.jsonl (locustfile.py, one record per request) + <prefix>_stats.csv (locust)
        [+ /metrics before/after] -> summarize() -> dict -> format_summary() / format_table()

Definitions follow `vllm bench serve`: TTFT = first generated chunk; TPOT = (E2EL - TTFT) / (output
tokens - 1); ITL = gaps between chunks; goodput (DistServe) = requests per second that meet every SLO.
A non-streaming request shows nothing before its last byte, so it meets the SLO when it ends by the
deadline of a streaming one: E2EL <= TTFT_SLO + TPOT_SLO * (output tokens - 1).
Standard library only: `raymoe loadtest` and the tests import it; `python loadtest/summary.py PREFIX`.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import re
import sys
from collections import Counter
from typing import Any

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); `values` need not be sorted."""
    if not values:
        return math.nan
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def stats_ms(values: list[float]) -> dict[str, float]:
    out = {"mean": sum(values) / len(values) * 1000 if values else math.nan}
    out.update({f"p{q}": percentile(values, q) * 1000 for q in PERCENTILES})
    return out


def read_records(prefix: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(request records, start/stop events) from `<prefix>_requests.jsonl` (and per-worker `.<pid>` files)."""
    records, marks = [], []
    paths = sorted(glob.glob(glob.escape(f"{prefix}_requests.jsonl")) + glob.glob(
        glob.escape(f"{prefix}_requests.jsonl") + ".*"))
    if not paths:
        raise FileNotFoundError(f"no request log {prefix}_requests.jsonl (did locust run with this --csv prefix?)")
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    (marks if "event" in row else records).append(row)
    return records, marks


def read_locust_totals(prefix: str) -> dict[str, int] | None:
    """Request and failure counts of locust's aggregated row (a cross-check of the records)."""
    try:
        with open(f"{prefix}_stats.csv", newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("Type") == "POST"]
    except FileNotFoundError:
        return None
    return {"requests": sum(int(r["Request Count"]) for r in rows),
            "failures": sum(int(r["Failure Count"]) for r in rows)}


def error_name(error: str) -> str:
    """'HTTP 503: overloaded' -> 'HTTP 503'; 'HeavyUnsupported: HTTP 400: ...' -> 'HeavyUnsupported'."""
    return error.split(":", 1)[0]


def meets_slo(rec: dict[str, Any], ttft_s: float, tpot_s: float, e2el_s: float | None) -> bool:
    if e2el_s is not None and rec["e2el"] > e2el_s:
        return False
    if rec.get("ttft") is None:  # non-streaming: the streaming deadline for the same output length
        return rec["e2el"] <= ttft_s + tpot_s * max(0, rec["output_tokens"] - 1)
    return rec["ttft"] <= ttft_s and (rec.get("tpot") is None or rec["tpot"] <= tpot_s)


def summarize(records: list[dict[str, Any]], marks: list[dict[str, Any]] | None = None, *,
              slo_ttft_ms: float = 2000, slo_tpot_ms: float = 50, slo_e2el_ms: float | None = None) -> dict[str, Any]:
    """The run's numbers; the window runs from the test start (or first request) to the last request's end."""
    ok = [r for r in records if r.get("ok")]
    failed = [r for r in records if not r.get("ok")]
    starts = [m["t"] for m in marks or () if m.get("event") == "start"] or [r["t_start"] for r in records]
    begin = min(starts) if starts else 0.0
    end = max([r["t_end"] for r in records] or [begin])
    duration = max(end - begin, 1e-9)
    out_tokens = sum(r["output_tokens"] for r in ok)
    prompt_tokens = sum(r.get("prompt_tokens") or 0 for r in ok)
    slo_s = (slo_ttft_ms / 1000, slo_tpot_ms / 1000, None if slo_e2el_ms is None else slo_e2el_ms / 1000)
    good = [r for r in ok if meets_slo(r, *slo_s)]
    values = {"ttft": [r["ttft"] for r in ok if r.get("ttft") is not None],
              "tpot": [r["tpot"] for r in ok if r.get("tpot") is not None],
              "itl": [g for r in ok for g in r.get("itl", ())],
              "e2el": [r["e2el"] for r in ok]}
    return {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(failed),
        "aborted_at_stop": sum(m.get("num_aborted", 0) for m in marks or ()),
        "failures": dict(Counter(error_name(r.get("error", "?")) for r in failed)),
        "kinds": dict(Counter(f"{r['kind']}{' stream' if r.get('stream') else ''}" for r in records)),
        "finish_reasons": dict(Counter(str(r.get("finish_reason")) for r in ok)),
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration,
        "mean_prompt_tokens": prompt_tokens / len(ok) if ok else math.nan,
        "mean_output_tokens": out_tokens / len(ok) if ok else math.nan,
        **{f"{m}_ms": stats_ms(values[m]) for m in METRICS},
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms, "e2el_ms": slo_e2el_ms},
        "goodput": {"requests_per_s": len(good) / duration,
                    "fraction": len(good) / len(records) if records else math.nan,
                    "output_tokens_per_s": sum(r["output_tokens"] for r in good) / duration},
    }


def summarize_prefix(prefix: str, **slo: Any) -> dict[str, Any]:
    records, marks = read_records(prefix)
    summary = summarize(records, marks, **slo)
    summary["locust"] = read_locust_totals(prefix)
    return summary


# -- server side: /metrics deltas -----------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line (labels kept verbatim, `_created` samples dropped).

    Ray's metrics agent exports raymoe's series as `ray_raymoe_*`; the prefix is dropped here so both
    that and the ingress's own `raymoe_engine_*` lines read under one name.
    """
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not m.group(1).endswith("_created"):
            name = m.group(1).removeprefix("ray_") if m.group(1).startswith("ray_raymoe_") else m.group(1)
            try:
                out[name + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                continue
    return out


def _total(samples: dict[str, float], name: str, label: str = "") -> float:
    """Sum of a metric over its label sets (replicas), optionally only those containing `label`."""
    return sum(v for k, v in samples.items() if k.split("{", 1)[0] == name and label in k)


def server_breakdown(before: dict[str, float], after: dict[str, float], duration_s: float,
                     client: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the time goes, from the deltas of the server's /metrics over the run."""
    def delta(name: str, label: str = "") -> float:
        return _total(after, name, label) - _total(before, name, label)

    def mean_s(base: str, label: str = "") -> float | None:
        n = delta(f"{base}_count", label)
        return delta(f"{base}_sum", label) / n if n > 0 else None

    out: dict[str, Any] = {}
    steps = delta("raymoe_engine_num_steps_total")
    replicas = max(1.0, _total(after, "raymoe_engine_replicas"))
    if steps > 0:
        tokens = delta("raymoe_engine_num_generated_tokens_total")
        out.update(engine_steps=steps, engine_generated_tokens=tokens,
                   engine_prompt_tokens=delta("raymoe_engine_num_prompt_tokens_total"),
                   tokens_per_step=tokens / steps, steps_per_s=steps / duration_s,
                   wall_ms_per_step=duration_s * replicas / steps * 1000)
    queried = delta("raymoe_engine_prefix_cache_queried_tokens_total")
    if queried > 0:
        out["prefix_cache_hit_rate"] = delta("raymoe_engine_prefix_cache_hit_tokens_total") / queried
    ttft = mean_s("raymoe_time_to_first_token_seconds")
    http = mean_s("raymoe_e2e_request_latency_seconds")
    if ttft is not None:
        out["server_ttft_mean_ms"] = ttft * 1000
    if http is not None:
        out["server_e2el_mean_ms"] = http * 1000
    if client and ttft is not None and not math.isnan(client["ttft_ms"]["mean"]):
        out["outside_ingress_ttft_ms"] = client["ttft_ms"]["mean"] - ttft * 1000
    known = {"raymoe_time_to_first_token_seconds", "raymoe_e2e_request_latency_seconds"}
    others = {}
    for key in after:
        base = key.split("{", 1)[0]
        if base.endswith("_seconds_count") and base[:-6] not in known:
            m = mean_s(base[:-6])
            if m is not None:
                others[base[:-6]] = m * 1000
    out["other_timings_mean_ms"] = others
    names = " ".join({k.split("{", 1)[0] for k in after})  # metric names only: labels such as route= mislead
    wanted = {"tokenization": r"tokeni[sz]", "serve_routing": r"rout|queue|proxy", "engine_step": r"step_(time|dur|sec)",
              "dispatch": r"dispatch|combine|a2a"}
    out["not_exposed"] = [k for k, pat in wanted.items() if not re.search(pat, names)]
    return out


# -- formatting -----------------------------------------------------------------------------------
def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def format_summary(s: dict[str, Any], title: str = "") -> str:
    slo = s["slo"]
    lines = [f"== {title or 'load test'}: {_f(s['duration_s'])} s, {s['completed']} ok, {s['failed']} failed "
             f"({', '.join(f'{k} {v}' for k, v in s['kinds'].items())}) =="]
    lines.append(f"throughput : {_f(s['request_throughput'], 2)} req/s, {_f(s['output_throughput'])} output tok/s, "
                 f"{_f(s['total_token_throughput'])} total tok/s (per request: {_f(s['mean_prompt_tokens'], 0)} "
                 f"prompt, {_f(s['mean_output_tokens'], 0)} output tokens)")
    lines.append(f"{'latency ms':<11}" + "".join(f"{h:>10}" for h in ("mean", "p50", "p90", "p99")))
    for m in METRICS:
        st = s[f"{m}_ms"]
        lines.append(f"  {m.upper():<9}" + "".join(f"{_f(st[k], 1):>10}" for k in ("mean", "p50", "p90", "p99")))
    cond = f"TTFT<={_f(slo['ttft_ms'], 0)} ms, TPOT<={_f(slo['tpot_ms'], 0)} ms" + (
        f", E2EL<={_f(slo['e2el_ms'], 0)} ms" if slo.get("e2el_ms") is not None else "")
    g = s["goodput"]
    lines.append(f"goodput ({cond}): {_f(g['requests_per_s'], 2)} req/s ({_f(g['fraction'] * 100)} % of requests), "
                 f"{_f(g['output_tokens_per_s'])} output tok/s")
    if set(s.get("finish_reasons", {})) - {"length"}:  # output length was not forced for some requests
        lines.append("finish     : " + ", ".join(f"{k} x{v}" for k, v in s["finish_reasons"].items()))
    if s.get("aborted_at_stop"):
        lines.append(f"unfinished : {s['aborted_at_stop']} requests still running when the run stopped (not counted)")
    if s["failures"]:
        lines.append("failures   : " + ", ".join(f"{k} x{v}" for k, v in s["failures"].items()))
    if s.get("locust"):
        lines.append(f"locust csv : {s['locust']['requests']} requests, {s['locust']['failures']} failures "
                     "(its last periodic flush)")
    srv = s.get("server")
    if srv:
        lines.append(format_server(srv))
    return "\n".join(lines)


def format_server(srv: dict[str, Any]) -> str:
    lines = ["server /metrics over the run:"]
    if "engine_steps" in srv:
        lines.append(f"  engine     : {srv['engine_steps']:.0f} steps, {_f(srv['steps_per_s'])} steps/s, "
                     f"{_f(srv['tokens_per_step'], 2)} tokens/step (mean decode batch), "
                     f"<= {_f(srv['wall_ms_per_step'], 2)} ms wall per step (run time / steps, idle included)")
    if "server_ttft_mean_ms" in srv:
        lines.append(f"  ingress    : TTFT mean {_f(srv['server_ttft_mean_ms'], 1)} ms (arrival at the ingress -> "
                     f"first token); request mean {_f(srv.get('server_e2el_mean_ms'), 1)} ms")
    if "outside_ingress_ttft_ms" in srv:
        lines.append(f"  outside    : {_f(srv['outside_ingress_ttft_ms'], 1)} ms of the client's mean TTFT is spent "
                     "outside the ingress (Serve HTTP proxy both ways, loopback, the load generator itself)")
    if "prefix_cache_hit_rate" in srv:
        lines.append(f"  prefix hit : {_f(srv['prefix_cache_hit_rate'] * 100)} % of prompt tokens")
    for name, ms in srv.get("other_timings_mean_ms", {}).items():
        lines.append(f"  {name}: mean {_f(ms, 2)} ms")
    if srv.get("not_exposed"):
        lines.append(f"  not in /metrics: {', '.join(srv['not_exposed'])}")
    return "\n".join(lines)


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per run (a user-count sweep, or raymoe vs a peer)."""
    head = (f"{'run':<14}{'req/s':>7}{'out tok/s':>10}{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}{'p99':>7}"
            f"{'ITL p50':>9}{'p99':>7}{'E2EL p50':>10}{'p99':>8}{'goodput':>9}{'good %':>8}{'fail':>6}")
    out = [head + "   (latencies in ms)"]
    for label, s in rows:
        t, p, i, e = (s[f"{m}_ms"] for m in METRICS)
        out.append(f"{label:<14}{_f(s['request_throughput'], 2):>7}{_f(s['output_throughput']):>10}"
                   f"{_f(t['p50']):>10}{_f(t['p99'], 0):>8}{_f(p['p50']):>10}{_f(p['p99']):>7}{_f(i['p50']):>9}"
                   f"{_f(i['p99']):>7}{_f(e['p50'], 0):>10}{_f(e['p99'], 0):>8}"
                   f"{_f(s['goodput']['requests_per_s'], 2):>9}{_f(s['goodput']['fraction'] * 100):>8}{s['failed']:>6}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="the --csv prefix of the locust run")
    p.add_argument("--slo-ttft-ms", type=float, default=2000)
    p.add_argument("--slo-tpot-ms", type=float, default=50)
    p.add_argument("--slo-e2el-ms", type=float, default=None)
    p.add_argument("--json", help="also write the summary here")
    a = p.parse_args(argv)
    s = summarize_prefix(a.prefix, slo_ttft_ms=a.slo_ttft_ms, slo_tpot_ms=a.slo_tpot_ms, slo_e2el_ms=a.slo_e2el_ms)
    print(format_summary(s, a.prefix))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(s, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`raymoe bench …`: benchmarks that print ratios measured side by side in one run (never asserted)."""

from __future__ import annotations

import argparse


def run_bench(ns: argparse.Namespace) -> int:
    if ns.what == "engine":
        from raymoe.bench.engine import bench_engine

        return bench_engine(model=ns.model, quick=ns.quick, repeats=ns.repeats)
    if ns.what == "dispatch":
        from raymoe.dispatch.bench import bench_dispatch

        return bench_dispatch(quick=ns.quick)
    if ns.what == "int4":
        from raymoe.quant.bench import bench_int4

        bench_int4()
        return 0
    raise ValueError(f"unknown benchmark {ns.what!r}")

"""The Grafana dashboard: generated file in sync, every query on a raymoe metric of the right kind."""

from __future__ import annotations

import json
import re

from raymoe.observability.dashboard import CHART_FILE, dashboard, expressions, render
from raymoe.observability.metrics import SPECS


def test_chart_file_is_the_generated_dashboard():
    assert CHART_FILE.read_text() == render(), "run python -m raymoe.observability.dashboard"


def test_every_raymoe_metric_has_a_panel_and_histograms_are_read_through_buckets():
    used: dict[str, set[str]] = {}
    for expr in expressions(dashboard()):
        for name in re.findall(r"\bray_(raymoe_[a-z0-9_]+)", expr):
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and name[: -len(suffix)] in SPECS:
                    used.setdefault(name[: -len(suffix)], set()).add(suffix)
                    break
            else:
                used.setdefault(name, set()).add("")
    assert set(used) == set(SPECS)
    for name, suffixes in used.items():
        assert suffixes == ({"_bucket"} if SPECS[name][0] == "histogram" else {""}), (name, suffixes)


def test_panels_have_unique_ids_and_every_selector_filters_on_the_cluster():
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for expr in expressions(board):
        if not expr.startswith("label_values"):
            assert expr.count("ray_io_cluster=~\"$cluster\"") == len(re.findall(r"\bray_(?:raymoe|serve)_\w+\{", expr))
    json.dumps(board)  # serialisable

"""`raymoe status` without a cluster: the report layout, and a clear error when nothing answers."""

from __future__ import annotations

import socket

from raymoe.cli import main
from raymoe.serve.status import ClusterStatus, ShardStatus, format_status


def _node(ip: str, node_id: str) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}


def test_report_lists_apps_replicas_and_shards_with_nodes_load_and_imbalance():
    report = ClusterStatus("10.0.0.1:6379", [_node("10.0.0.1", "a" * 56), _node("10.0.0.2", "b" * 56)], True, {
        "raymoe": {"status": "RUNNING", "message": "", "deployments": {
            "AttentionTier": {"status": "HEALTHY", "replica_states": {"RUNNING": 2}, "message": "",
                              "replicas": [("r1", "10.0.0.1 (aaaaaaaa)"), ("r2", "10.0.0.2 (bbbbbbbb)")]}}}},
        [ShardStatus("raymoe-expert-default-0", "ns", "default", 0, "10.0.0.1 (aaaaaaaa)", 300, 450, 10, 0.5),
         ShardStatus("raymoe-expert-default-1", "ns", "default", 1, "10.0.0.2 (bbbbbbbb)", 100, 150, 10, 0.2)],
        {"r1": 1.25})
    out = format_status(report)
    assert "2 node(s), 8 CPU, 2 GPU" in out
    assert "AttentionTier: HEALTHY, replicas: RUNNING 2" in out
    assert "replica r2 on 10.0.0.2 (bbbbbbbb)" in out
    assert "raymoe-expert-default-1  10.0.0.2 (bbbbbbbb)        100" in out
    assert "imbalance since shard start (max/mean tokens): 1.50" in out  # 300 / mean(300, 100)
    assert "engine r1: 1.25" in out


def test_a_shard_that_does_not_answer_is_shown_not_waited_for():
    report = ClusterStatus("x:1", [], False, shards=[
        ShardStatus("raymoe-expert-g-0", "ns", "g", 0, "?", error="no answer within 5s")])
    out = format_status(report)
    assert "Serve is not running" in out
    assert "raymoe-expert-g-0  ?     no answer within 5s" in out  # columns keep their width
    assert "imbalance" not in out


def test_no_cluster_at_the_address_is_a_clear_error(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    assert main(["status", "--address", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"no Ray cluster reachable at '127.0.0.1:{port}'" in err and "--address" in err

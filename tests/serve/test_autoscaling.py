"""Serve's autoscaler moves the AttentionTier between 1 and 2 replicas with the load (short delays here)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.serve.conftest import tiny_config

pytestmark = pytest.mark.ray

AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
               "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def auto_app(cluster):
    url = cluster.deploy("auto", "/auto", tiny_config(attention={"autoscaling": AUTOSCALING},
                                                      limits={"max_tokens": 128}))
    yield url
    cluster.delete("auto")


def running_replicas() -> int:
    from ray import serve

    tier = serve.status().applications["auto"].deployments["AttentionTier"]
    return tier.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_tier_scales_up_under_load_and_back_down_when_idle(auto_app):
    assert running_replicas() == 1
    stop = threading.Event()
    errors: list[int] = []

    def user() -> None:  # 8 closed-loop users: 4x the per-replica target of 2 ongoing requests
        body = {"messages": [{"role": "user", "content": "load"}], "max_tokens": 128, "ignore_eos": True}
        with httpx.Client(base_url=auto_app, timeout=120) as client:
            while not stop.is_set():
                r = client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(r.status_code)

    users = [threading.Thread(target=user, daemon=True) for _ in range(8)]
    for u in users:
        u.start()
    try:
        assert wait_for(lambda: running_replicas() == 2, 90), "no scale-up to 2 replicas under load"
    finally:
        stop.set()
        for u in users:
            u.join(timeout=120)
    assert errors == []
    assert wait_for(lambda: running_replicas() == 1, 90), "no scale-down to 1 replica when idle"

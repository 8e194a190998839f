"""`raymoe serve`: config file and flags -> a running Serve application, until Ctrl-C or SIGTERM.

    [CONFIG.yaml] + flags -> RayMoEConfig -> (tiny checkpoint, created once) -> Ray (local or --address)
        -> serve.start(host, port) -> build_app -> wait for RUNNING (progress) -> banner -> wait for signal
        -> serve.delete / serve.shutdown -> ray.shutdown

With no arguments it serves a `tiny` K2-architecture checkpoint from the cache folder on
127.0.0.1:8000 in a fresh local Ray. On a signal it removes what it started: its application (and
Serve itself when it started Serve), then the local Ray with every actor in it (expert shards are
owned by the tier replicas and go with them). Joining a cluster (`--address`) leaves the cluster up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from raymoe.config import RayMoEConfig

_READY_TIMEOUT_S = 1800.0  # a real checkpoint takes minutes to load; the tiny one seconds


def config_from_args(ns: argparse.Namespace) -> RayMoEConfig:
    """The config file (if any) with the command-line flags on top; validated once."""
    from raymoe.serve.builders import validate_config

    tree: dict[str, Any] = {}
    if getattr(ns, "config", None):
        tree = RayMoEConfig.from_yaml(ns.config).model_dump(exclude_unset=True)
    model = tree.setdefault("model", {})
    if ns.model:
        model.update(path=ns.model, preset=None)
    elif ns.preset:
        model.update(preset=ns.preset, path=None)
    elif not model.get("path") and not model.get("preset"):
        model["preset"] = "tiny"
    serve_tree = tree.setdefault("serve", {})
    for flag, key in (("host", "host"), ("port", "port")):
        if getattr(ns, flag, None) is not None:
            serve_tree[key] = getattr(ns, flag)
    parallel = tree.setdefault("parallel", {})
    if getattr(ns, "num_expert_shards", None) is not None:
        parallel["num_expert_shards"] = ns.num_expert_shards
        if ns.num_expert_shards > 0 and not getattr(ns, "transport", None) and parallel.get("transport") in (
                None, "local"):
            parallel["transport"] = "ray"
    if getattr(ns, "transport", None):
        parallel["transport"] = ns.transport
    if getattr(ns, "address", None):
        parallel["address"] = ns.address
    return validate_config(tree)


def _say(message: str) -> None:
    print(message, flush=True)


def _with_checkpoint(config: RayMoEConfig) -> RayMoEConfig:
    """Create the preset's checkpoint here, once, so replicas only read it (no creation race)."""
    if config.model.path:
        return config
    from raymoe.model.tiny import cached_tiny

    preset = config.model.preset or "tiny"
    start = time.monotonic()
    _say(f"raymoe: preparing the {preset!r} checkpoint (created once in the cache folder)...")
    path = cached_tiny(preset, seed=config.model.seed)
    _say(f"raymoe: checkpoint {path} ({time.monotonic() - start:.1f}s)")
    model = config.model.model_copy(update={"path": str(path), "preset": None})
    return config.model_copy(update={"model": model})


def _wait_running(app_name: str, stop: threading.Event) -> bool:
    """Poll Serve until the app runs; print each change of its deployments' states."""
    from ray import serve

    start, last = time.monotonic(), ""
    while not stop.is_set():
        app = serve.status().applications.get(app_name)
        status = str(app.status.value if app else "NOT_STARTED")
        if app is not None and status == "RUNNING":
            return True
        if app is not None and status == "DEPLOY_FAILED":
            _say(f"raymoe: deployment failed: {app.message}")
            return False
        parts = [status] + [f"{name}: {d.status.value} {dict(d.replica_states)}"
                            for name, d in (app.deployments.items() if app else [])]
        line = " | ".join(parts)
        if line != last:
            _say(f"raymoe: [{time.monotonic() - start:5.1f}s] loading... {line}")
            last = line
        if time.monotonic() - start > _READY_TIMEOUT_S:
            _say(f"raymoe: not ready after {_READY_TIMEOUT_S:.0f}s")
            return False
        stop.wait(0.5)
    return False


def _banner(config: RayMoEConfig, model_name: str, dashboard: str | None) -> None:
    s = config.serve
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    base = f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"
    auth = ' -H "Authorization: Bearer $RAYMOE_API_KEY"' if s.api_keys or os.environ.get(s.api_keys_env) else ""
    body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    _say(f"\nraymoe: serving {model_name!r}")
    _say(f"  OpenAI endpoint : {base}/v1")
    _say(f"  Ray dashboard   : {dashboard or 'not running'}"
         + ("  (token auth: see `ray get-auth-token`)" if dashboard else ""))
    _say(f"  metrics         : {base}/metrics")
    _say(f"  try             : curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
         f"-d '{body}'")
    _say("  stop            : Ctrl-C\n")


def serve_main(ns: argparse.Namespace) -> int:
    """Run `raymoe serve`; returns the process exit code (0 after a clean stop)."""
    import ray
    from ray import serve

    from raymoe.serve.builders import build_app

    config = _with_checkpoint(config_from_args(ns))
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        _say(f"\nraymoe: {signal.Signals(signum).name}, stopping...")
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    address = config.parallel.address or os.environ.get("RAY_ADDRESS")
    joined = bool(address)
    started_serve = False
    try:
        _say(f"raymoe: {'connecting to Ray at ' + address if joined else 'starting a local Ray'}...")
        context = ray.init(address=address, ignore_reinit_error=True, logging_level="WARNING",
                           log_to_driver=False)
        for sig in signals:  # ray.init installs its own SIGTERM handler (kill and exit 1): ours stops cleanly
            signal.signal(sig, on_signal)
        dashboard = getattr(context, "dashboard_url", None)
        if dashboard and not dashboard.startswith("http"):
            dashboard = f"http://{dashboard}"
        started_serve = not _serve_running()
        serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
        s = config.serve
        serve.run_many([serve.RunTarget(target=build_app(config), name=s.app_name, route_prefix=s.route_prefix)],
                       wait_for_applications_running=False)
        if not _wait_running(s.app_name, stop):
            return 0 if stop.is_set() else 1
        model_name = config.model.served_model_name or os.path.basename(str(config.model.path).rstrip("/"))
        _banner(config, model_name, dashboard)
        while not stop.wait(1.0):
            pass
        return 0
    finally:
        _shutdown(config.serve.app_name, started_serve)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _say("raymoe: stopped.")


def _serve_running() -> bool:
    """Whether a Serve controller already runs in this cluster (then we must not shut it down)."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def _shutdown(app_name: str, started_serve: bool) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if started_serve:
            serve.shutdown()
        else:
            serve.delete(app_name)
    except Exception as e:  # stopping must go on to ray.shutdown whatever Serve says
        print(f"raymoe: stopping Serve: {type(e).__name__}: {e}", file=sys.stderr)
    ray.shutdown()  # a local Ray stops with all its processes; a joined cluster stays up

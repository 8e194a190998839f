"""`raymoe loadtest`: serve the tiny model (or target `--host`), run locust headless, print the summary.

    [--host URL | `raymoe serve` on a free port, own Ray temp dir] -> GET /health -> per user count:
        /metrics -> locust process (loadtest/locustfile.py) -> /metrics -> loadtest/summary.py -> print
    -> stop what it started: SIGINT (clean Serve + Ray shutdown), then SIGTERM/SIGKILL of its process
       group, then a sweep of leftover processes carrying this run's marker variable (Ray workers run
       in sessions of their own, so a process-group kill alone misses them)

This module never imports locust nor Ray: locust monkey-patches ssl, which breaks in a process that
imported Ray, so it always runs as a child process. `loadtest/run.sh` and `loadtest/peer.py` use it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

LOADTEST_DIR = Path(os.environ.get("RAYMOE_LOADTEST_DIR") or Path(__file__).resolve().parents[1] / "loadtest")
MARKER = "RAYMOE_LOADTEST_RUN"  # env var inherited by every process a run starts, Ray workers included
# Workload options forwarded to the locustfile verbatim (name -> type); scenario files use the same names.
WORKLOAD = {"prompt_tokens": int, "output_tokens": int, "dist": str, "dist_spread": float, "prompts_file": str,
            "tokenizer": str, "api_flavor": str, "temperature": float, "qps": float, "qps_dist": str, "model": str,
            "heavy_trajectories": int, "heavy_aggregate": str, "heavy_via": str, "request_timeout": float}
DEFAULTS = {"users": "8", "spawn_rate": None, "duration": "30s", "user_classes": ["ChatStreamUser"],
            "slo_ttft_ms": 2000.0, "slo_tpot_ms": 50.0, "slo_e2el_ms": None, "stop_timeout": 60,
            "preset": "tiny", "ready_timeout": 300.0}


def summary_module() -> ModuleType:
    """`loadtest/summary.py`, loaded by path (the loadtest folder is not a package)."""
    path = LOADTEST_DIR / "summary.py"
    if not path.exists():
        raise ValueError(f"{path} not found: run from a raymoe checkout or set RAYMOE_LOADTEST_DIR")
    spec = importlib.util.spec_from_file_location("raymoe_loadtest_summary", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_duration(text: str) -> float:
    """'30s', '2m', '1h30m', '45' -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text).replace(" ", ""):
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 2m, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (OSError, ValueError):
        return 0, ""


class ManagedServer:
    """A server process this run started: its own session, a marker variable, a log file; `stop()` is idempotent.

    Args:
        name: label for messages.
        cmd: argv of the server.
        port: where it listens on 127.0.0.1.
        log_path: stdout and stderr go here.
        env: extra environment variables (None removes one).
        ready_timeout: seconds to wait for GET /health -> 200.
        scratch_dirs: folders removed by `stop()` (a private Ray temp dir).
    """

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, env: dict[str, str | None] | None = None,
                 ready_timeout: float = 300.0, scratch_dirs: list[str] | None = None):
        self.scratch_dirs = list(scratch_dirs or [])
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.token = uuid.uuid4().hex
        merged = {**os.environ, **(env or {}), MARKER: self.token}
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ManagedServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        print(f"loadtest: started {self.name} (pid {self.proc.pid}) on {self.url}, log {self.log_path}", flush=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                   + self.log_tail())
            if http_get(f"{self.url}/health", timeout=2)[0] == 200:
                print(f"loadtest: {self.name} ready after {self.ready_timeout - deadline + time.monotonic():.1f}s",
                      flush=True)
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {self.ready_timeout:.0f}s:\n" + self.log_tail())

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGINT (the server's clean path), then SIGTERM, then SIGKILL its group; then sweep the marker."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 10)):
                try:
                    os.kill(proc.pid, sig)
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # helpers left in its group (Ray's gcs, raylet, dashboard)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            print(f"loadtest: stopped {self.name} (exit {proc.returncode})", flush=True)
        kill_marked(self.token)
        for path in self.scratch_dirs:
            shutil.rmtree(path, ignore_errors=True)


def kill_marked(token: str, grace_s: float = 5.0) -> list[int]:
    """SIGKILL every process whose environment carries MARKER=token (Linux /proc); returns their pids."""
    needle = f"{MARKER}={token}".encode()
    deadline, killed = time.monotonic() + grace_s, []
    while True:
        pids = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if int(entry.name) != os.getpid() and needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except (OSError, ValueError):
                continue
        if not pids or time.monotonic() > deadline:  # Ray workers exit by themselves once their raylet is gone
            break
        time.sleep(0.5)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def raymoe_server(out_dir: Path, *, port: int = 0, preset: str = "tiny", serve_args: list[str] | None = None,
                  ready_timeout: float = 300.0) -> ManagedServer:
    """`raymoe serve` in a fresh local Ray under a short private temp dir (Unix socket paths must stay short)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "raymoe.cli", "serve", "--port", str(port), *(serve_args or [])]
    if not any(a.startswith(("--model", "--preset")) for a in serve_args or []):
        cmd += ["--preset", preset]
    ray_tmp = tempfile.mkdtemp(prefix="rmlt", dir="/tmp")
    return ManagedServer("raymoe serve", cmd, port, out_dir / "serve.log", ready_timeout=ready_timeout,
                         env={"RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": None}, scratch_dirs=[ray_tmp])


def checkpoint_of(server: ManagedServer) -> str | None:
    """The checkpoint folder `raymoe serve` reports ('raymoe: checkpoint PATH (...)'), for exact prompt lengths."""
    m = re.search(r"raymoe: checkpoint (\S+) \(", server.log_tail(200))
    return m.group(1) if m else None


def locust_cmd(url: str, prefix: Path, *, users: int, spawn_rate: float | None, duration: str, user_classes: list[str],
               stop_timeout: int, workload: dict[str, Any], extra: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOADTEST_DIR / "locustfile.py"), "--headless", "-H", url,
           "-u", str(users), "-r", str(spawn_rate or users), "-t", duration, "--stop-timeout", str(stop_timeout),
           "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", "--skip-log-setup"]
    for key, value in workload.items():
        if value is not None and value != "":
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd + list(extra or []) + list(user_classes)


def run_point(url: str, prefix: Path, *, users: int, duration: str, opts: dict[str, Any],
              workload: dict[str, Any]) -> dict[str, Any]:
    """One locust run at a fixed user count; returns the summary (with server /metrics deltas when exposed)."""
    summary = summary_module()
    code, text = http_get(f"{url}/metrics")
    before = summary.parse_prometheus(text) if code == 200 else None
    cmd = locust_cmd(url, prefix, users=users, spawn_rate=opts.get("spawn_rate"), duration=duration,
                     user_classes=opts["user_classes"], stop_timeout=int(opts["stop_timeout"]), workload=workload,
                     extra=opts.get("locust_args"))
    limit = parse_duration(duration) + int(opts["stop_timeout"]) + 120
    log_path = Path(f"{prefix}_locust.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            print(f"loadtest: locust still running after {limit:.0f}s, killing it", flush=True)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    slo = {k: opts[f"slo_{k}_ms"] for k in ("ttft", "tpot", "e2el")}
    try:
        result = summary.summarize_prefix(str(prefix), **{f"slo_{k}_ms": v for k, v in slo.items()})
    except FileNotFoundError as e:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"locust exited with {proc.returncode} and wrote no records:\n{tail}") from e
    result["users"] = users
    code, text = http_get(f"{url}/metrics")
    if before is not None and code == 200:
        result["server"] = summary.server_breakdown(before, summary.parse_prometheus(text), result["duration_s"],
                                                    result)
    with open(f"{prefix}_summary.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raymoe loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", help="target a running server (http://HOST:PORT); default: start `raymoe serve`")
    p.add_argument("--scenario", help="YAML file of these options (loadtest/scenarios/*.yaml); flags override it")
    p.add_argument("-u", "--users", help="concurrent users, or a sweep: 1,8,32,64 (default 8)")
    p.add_argument("-r", "--spawn-rate", type=float, help="users started per second (default: all at once)")
    p.add_argument("-t", "--duration", help="run time per user count, e.g. 30s, 2m (default 30s)")
    p.add_argument("--user-class", dest="user_classes", action="append",
                   help="ChatStreamUser | ChatUser | HeavyUser (repeatable; default ChatStreamUser)")
    for key, typ in WORKLOAD.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=typ, help="forwarded to the locustfile")
    for key in ("ttft", "tpot", "e2el"):
        p.add_argument(f"--slo-{key}-ms", type=float, help=f"goodput SLO on {key.upper()} (ms)")
    p.add_argument("--stop-timeout", type=int, help="seconds in-flight requests get to finish at the end (60)")
    p.add_argument("--preset", help="preset `raymoe serve` creates and serves (default tiny)")
    p.add_argument("--port", type=int, default=0, help="port for the started server (default: a free one)")
    p.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                   help="extra `raymoe serve` argument (repeatable), e.g. --serve-arg=--num-expert-shards=2")
    p.add_argument("--ready-timeout", type=float, help="seconds to wait for /health (300)")
    p.add_argument("--locust-arg", dest="locust_args", action="append", default=[], help="passed to locust")
    p.add_argument("--out", help="results folder (default loadtest-results/<time>)")
    p.add_argument("--json", help="write all summaries here")
    return p


def resolve_options(ns: argparse.Namespace) -> dict[str, Any]:
    """Flags over the scenario file over DEFAULTS."""
    scenario: dict[str, Any] = {}
    if ns.scenario:
        import yaml

        with open(ns.scenario, encoding="utf-8") as f:
            scenario = yaml.safe_load(f) or {}
        known = set(DEFAULTS) | set(WORKLOAD) | {"description", "success", "serve_args", "locust_args"}
        unknown = sorted(set(scenario) - known)
        if unknown:
            raise ValueError(f"{ns.scenario}: unknown keys {unknown}; known: {sorted(known)}")
    opts: dict[str, Any] = {}
    for key in set(DEFAULTS) | set(WORKLOAD) | {"serve_args", "locust_args"}:
        flag = getattr(ns, key, None)
        opts[key] = flag if flag not in (None, []) else scenario.get(key, DEFAULTS.get(key, flag))
    opts["users"] = [int(u) for u in str(opts["users"]).replace(" ", "").strip("[]").split(",")]
    opts["serve_args"] = [str(a) for a in opts["serve_args"] or []]
    opts["locust_args"] = [str(a) for a in opts["locust_args"] or []]
    parse_duration(opts["duration"])
    return opts


def run_sweep(url: str, out_dir: Path, opts: dict[str, Any], label: str = "") -> list[dict[str, Any]]:
    """One locust run per user count against `url`; prints each summary as it lands."""
    summary = summary_module()
    workload = {k: opts[k] for k in WORKLOAD}
    results = []
    for users in opts["users"]:
        prefix = out_dir / f"{label + '-' if label else ''}u{users}"
        print(f"loadtest: {label or 'run'}: {users} users for {opts['duration']} against {url}", flush=True)
        result = run_point(url, prefix, users=users, duration=opts["duration"], opts=opts, workload=workload)
        print(summary.format_summary(result, f"{label + ': ' if label else ''}{users} users"), flush=True)
        results.append(result)
    return results


def loadtest_main(argv: list[str]) -> int:
    """Run `raymoe loadtest`; 0 when every request succeeded, 1 when some failed, 2 on a usage error."""
    ns = build_parser().parse_args(argv)
    try:
        opts = resolve_options(ns)
    except ValueError as e:
        print(f"raymoe loadtest: error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(ns.out or Path("loadtest-results") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    server: ManagedServer | None = None
    previous = None
    if hasattr(signal, "SIGTERM") and _is_main_thread():  # a SIGTERM to us still stops what we started
        previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        url = (ns.host or "").rstrip("/")
        if not url:
            server = raymoe_server(out_dir, port=ns.port, preset=opts["preset"], serve_args=opts["serve_args"],
                                   ready_timeout=float(opts["ready_timeout"]))
            server.start()
            url = server.url
            if not opts["tokenizer"] and not opts["prompts_file"]:
                opts["tokenizer"] = checkpoint_of(server)
        results = run_sweep(url, out_dir, opts)
    except RuntimeError as e:
        print(f"raymoe loadtest: {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    summary = summary_module()
    if len(results) > 1:
        print(summary.format_table([(f"{r['users']} users", r) for r in results]))
    with open(ns.json or out_dir / "summary.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"loadtest: results in {out_dir}")
    return 0 if all(r["failed"] == 0 for r in results) else 1


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(loadtest_main(sys.argv[1:]))

"""`raymoe serve`: flags over a config file, and the no-argument run in a subprocess, stopped by SIGTERM."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from raymoe.serve.run import config_from_args
from tests.helpers import read_lines, wait_for_banner
from tests.serve.conftest import REPO, free_port


def _ns(**kw):
    base = dict(config=None, model=None, preset=None, host=None, port=None, num_expert_shards=None,
                transport=None, address=None)
    return argparse.Namespace(**{**base, **kw})


def test_no_arguments_means_the_tiny_preset_on_localhost_8000():
    cfg = config_from_args(_ns())
    assert (cfg.model.preset, cfg.serve.host, cfg.serve.port) == ("tiny", "127.0.0.1", 8000)


def test_cli_flags_overlay_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("serve:\n  port: 9000\n  api_keys: [k]\nmodel:\n  preset: tiny\n")
    cfg = config_from_args(_ns(config=str(path), port=9100, num_expert_shards=2))
    assert (cfg.serve.port, cfg.serve.api_keys, cfg.parallel.transport) == (9100, ["k"], "ray")
    assert config_from_args(_ns(config=str(path), model="/ckpt")).model.path == "/ckpt"


def test_bad_flags_name_the_value():
    with pytest.raises(ValueError, match=r"serve\.port = 70000"):
        config_from_args(_ns(port=70000))


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:  # the process ended while we looked
                continue
    return pids


@pytest.mark.ray
def test_serve_without_arguments_starts_answers_and_stops_cleanly_on_sigterm():
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rmcli", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1",
           "RAYMOE_CACHE": os.environ.get("RAYMOE_CACHE", str(Path(tempfile.gettempdir()) / "raymoe-test-cache"))}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "raymoe.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = read_lines(proc)
    output: list[str] = []
    try:
        wait_for_banner(proc, lines, output, timeout_s=240)
        text = "".join(output)
        assert "loading..." in text and f"OpenAI endpoint : http://127.0.0.1:{port}/v1" in text
        assert re.search(r"Ray dashboard   : \S+", text)
        curl = re.search(r"try             : (curl .*)", text).group(1)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert models["data"][0]["id"] in curl
        if shutil.which("curl"):  # the banner's command works as printed
            answer = subprocess.run(["bash", "-c", curl + " -sf"], capture_output=True, text=True, timeout=60)
            assert '"object":"chat.completion"' in answer.stdout, answer
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:  # failed: stop the driver and the Ray processes it started (found by our tmp dir)
            proc.kill()
            proc.wait()
            for pid in _processes_mentioning(ray_tmp):
                os.kill(pid, signal.SIGKILL)
    while not lines.empty():
        output.append(lines.get())
    assert "raymoe: stopped." in "".join(output)
    deadline = time.monotonic() + 15  # Ray's processes exit right after the driver
    while _processes_mentioning(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(ray_tmp) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)

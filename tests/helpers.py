"""Helpers shared by test packages: an isolated Ray environment, and waiting for `raymoe serve` to be ready."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

_RAY_ENV = ("RAY_AUTH_MODE", "RAY_TMPDIR", "RAY_ADDRESS")
READY_LINE = "stop            :"  # the last line of `raymoe serve`'s banner


@contextlib.contextmanager
def isolated_ray_env(prefix: str) -> Iterator[str]:
    """A short private RAY_TMPDIR (Ray's socket paths have a length limit), token auth off, RAY_ADDRESS unset.

    Yields the temp dir; on exit the variables are restored and the dir removed. Shut Ray down inside.
    """
    saved = {k: os.environ.get(k) for k in _RAY_ENV}
    tmp = tempfile.mkdtemp(prefix=prefix, dir=os.path.realpath("/tmp"))
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=tmp)
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield tmp
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def read_lines(proc: subprocess.Popen) -> queue.Queue:
    """The process's stdout lines, read by a daemon thread into a queue."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return lines


def wait_for_banner(proc: subprocess.Popen, lines: queue.Queue, output: list[str], timeout_s: float) -> None:
    """Collect lines into `output` until the serve banner is complete; fails if the process exits or times out."""
    deadline = time.monotonic() + timeout_s
    while not any(READY_LINE in line for line in output):
        assert proc.poll() is None, "".join(output)
        assert time.monotonic() < deadline, "raymoe serve not ready in time:\n" + "".join(output)
        try:
            output.append(lines.get(timeout=1))
        except queue.Empty:
            continue

"""CPU kernels in C, compiled on first use with the machine's C compiler and called through ctypes.

  csrc/mla_decode_cpu.c   mla_decode_cpu: absorbed MLA decode reading the paged latent cache in place

Why C and not more torch ops: at decode sizes on CPU the torch path's cost is per-op and per-matrix
overhead (a context gather, two batched GEMMs of 4-16 rows per sequence, a softmax), not arithmetic.
Why compile at first use rather than at `pip install`: the package stays a pure-Python wheel (no torch
build dependency), the code is built with `-march=native` for the CPU it runs on, and a machine
without a compiler still works (the torch references are used, `is_available()` is False).

The shared object is cached under `$RAYMOE_CACHE` (default `~/.cache/raymoe`) in `kernels/`, keyed
by a hash of the source, the flags, the compiler's version and this machine; concurrent builds (Ray
workers starting together) write to temporary names and rename atomically. `RAYMOE_CPU_KERNELS=0`
turns the kernels off; `CC` picks the compiler (default `cc`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}


def _cpu_id() -> bytes:
    """What `-march=native` depends on: the CPU model and feature flags (a shared cache dir may serve other CPUs)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith((b"model name", b"flags", b"Features"))]
        return b"\n".join(dict.fromkeys(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


def _cache_dir() -> Path:
    """`$RAYMOE_CACHE/kernels` (default `~/.cache/raymoe/kernels`), or a folder under the temp dir when that
    cannot be written (e.g. a read-only root filesystem in a pod)."""
    root = os.environ.get("RAYMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raymoe")
    path = Path(root) / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"raymoe-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"


# Tried in order: a compiler without -march=native (some clang targets) or without OpenMP (Apple clang)
# still builds the kernel, single-threaded in the last case (the pragmas are then ignored).
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"),
    ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"),
    ("-O3", "-fPIC", "-shared", "-std=gnu11"),
)


def _build(name: str) -> ctypes.CDLL | None:
    if os.environ.get("RAYMOE_CPU_KERNELS", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        logger.info("no C compiler (%s): CPU kernels off, torch references used", os.environ.get("CC", "cc"))
        return None
    src = _CSRC / f"{name}.c"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("C compiler %s does not run (%s): CPU kernels off", cc, e)
        return None
    errors = []
    cache = _cache_dir()
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([src.read_bytes(), " ".join(flags).encode(), version, _cpu_id()]))
        out = cache / f"{name}-{key.hexdigest()[:16]}.so"
        if not out.exists():
            error = _compile(cc, flags, src, out)
            if error:
                errors.append(f"{' '.join(flags)}: {error}")
                continue
        try:
            return ctypes.CDLL(str(out))
        except OSError as e:
            errors.append(f"loading {out}: {e}")
    logger.warning("building the CPU kernel %s failed, torch references used:\n%s", name, "\n".join(errors)[-4000:])
    return None


def _compile(cc: str, flags: tuple[str, ...], src: Path, out: Path) -> str | None:
    """Compile `src` into `out` (atomically: a temporary name, then a rename); the error text, or None."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        return f"cannot write {out.parent}: {e}"
    try:
        proc = subprocess.run([cc, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return proc.stderr.strip()[-1000:] or f"exit status {proc.returncode}"
        os.replace(tmp, out)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# per source: (exported function, its C argument types); the functions return an int status
_SIGNATURES = {
    "mla_decode_cpu": ("raymoe_mla_decode", [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, ctypes.c_int, _I64, _I64, _PTR,
                                             _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int]),
}


def _kernel(name: str) -> Callable[..., int] | None:
    """The typed C function of `csrc/{name}.c`, built and loaded once per process (None: unavailable)."""
    with _lock:
        if name not in _libs:
            lib = _build(name)
            if lib is not None:
                symbol, argtypes = _SIGNATURES[name]
                fn = getattr(lib, symbol)
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
            _libs[name] = lib
        lib = _libs[name]
        return None if lib is None else getattr(lib, _SIGNATURES[name][0])


def is_available() -> bool:
    """Whether the CPU kernels are built (or can be) and loaded in this process."""
    return _kernel("mla_decode_cpu") is not None


def mla_decode_cpu(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, softmax_scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode on CPU; the same contract as `mla_decode` / `mla_decode_ref`.

    q_lat [B, H, C], q_pe [B, H, R] fp32 (any strides with a unit last dim); kv_cache [num_blocks, block_size,
    C + R] fp32 or bf16, contiguous; block_tables [B, max_blocks] int32; seq_lens [B] int32, each in
    [0, max_blocks * block_size] (0: a row of zeros, as the reference). Returns fp32 [B, H, C] (`out` when
    given: fp32, contiguous, that shape).
    """
    fn = _kernel("mla_decode_cpu")
    if fn is None:
        raise RuntimeError("the CPU kernels are not available (no C compiler, or RAYMOE_CPU_KERNELS=0)")
    B, H, C = q_lat.shape
    R = q_pe.shape[-1]
    if q_pe.shape[:2] != (B, H) or kv_cache.dim() != 3 or kv_cache.shape[-1] != C + R:
        raise ValueError(f"shapes do not match: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"kv_cache {tuple(kv_cache.shape)} (last dim must be C + R = {C + R})")
    if q_lat.dtype != torch.float32 or q_pe.dtype != torch.float32:
        raise ValueError(f"queries must be float32, got {q_lat.dtype} / {q_pe.dtype}")
    if kv_cache.dtype not in (torch.float32, torch.bfloat16) or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be a contiguous float32 or bfloat16 tensor, got {kv_cache.dtype}")
    if q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1:
        raise ValueError("q_lat and q_pe need a unit stride in their last dim")
    if any(t.device.type != "cpu" for t in (q_lat, q_pe, kv_cache, block_tables, seq_lens)):
        raise ValueError("mla_decode_cpu takes CPU tensors")
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    if tables.dim() != 2 or tables.shape[0] != B or lens.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} "
                         f"do not match a batch of {B}")
    if out is None:
        out = torch.empty(B, H, C, dtype=torch.float32)
    elif out.shape != (B, H, C) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [{B}, {H}, {C}] tensor")
    if B == 0:
        return out
    rc = fn(q_lat.data_ptr(), q_lat.stride(0), q_lat.stride(1), q_pe.data_ptr(), q_pe.stride(0),
                               q_pe.stride(1), kv_cache.data_ptr(), int(kv_cache.dtype == torch.bfloat16),
                               kv_cache.shape[0], kv_cache.shape[1], tables.data_ptr(), tables.shape[1],
                               lens.data_ptr(), out.data_ptr(), B, H, C, R, float(softmax_scale),
                               torch.get_num_threads())
    if rc == -1:
        raise ValueError(f"seq_lens must be in [0, {tables.shape[1] * kv_cache.shape[1]}] and block ids in "
                         f"[0, {kv_cache.shape[0]}): got lengths {lens.tolist()[:8]}...")
    if rc != 0:
        raise MemoryError("mla_decode_cpu could not allocate its scratch memory")
    return out

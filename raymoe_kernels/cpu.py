"""CPU kernels in C, compiled on first use with the machine's C compiler and called through ctypes.

  csrc/mla_decode_cpu.c   mla_decode_cpu: absorbed MLA decode reading the paged latent cache in place
                          mla_decode_step_cpu: a whole decode-only MLA layer step (cache write, absorb, that
                          attention, unabsorb) in one call
  csrc/moe_cpu.c          moe_route_cpu: the noaux_tc router after its GEMM and sigmoid (group-limited top-k)
                          moe_experts_cpu: the routed SwiGLU experts over their stacked fp32 weights
  csrc/layers_cpu.c       rms_norm_cpu: RMSNorm of fp32 rows (strided rows read in place)
                          argmax_cpu: greedy sampling, the first index of each row's maximum
                          rope_cpu: the queries' and key's rotary embedding, in place

Why C and not more torch ops: at decode sizes on CPU the torch path's cost is per-op and per-matrix
overhead (a context gather, two batched GEMMs of 4-16 rows per sequence, a softmax; a router of a dozen
small ops; experts' GEMMs of a few rows each; five kernels per RMSNorm), not arithmetic.
Why compile at first use rather than at `pip install`: the package stays a pure-Python wheel (no torch
build dependency), the code is built with `-march=native` for the CPU it runs on, and a machine
without a compiler still works (the torch references are used, `is_available()` is False).

Each source's shared object is cached under `$RAYMOE_CACHE` (default `~/.cache/raymoe`) in `kernels/`,
keyed by a hash of the source and the headers it includes (`csrc/vec8.h`), the flags, the compiler's
version and this machine; concurrent builds (Ray workers starting together) write to temporary names
and rename atomically. `RAYMOE_CPU_KERNELS=0` turns the kernels off; `CC` picks the compiler (default
`cc`).
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
_libs: dict[str, ctypes.CDLL | None] = {}  # per source
_fns: dict[str, Callable[..., int]] = {}  # per kernel, once loaded


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
    headers = b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))  # included by the sources: part of the key
    errors = []
    cache = _cache_dir()
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([src.read_bytes(), headers, " ".join(flags).encode(), version, _cpu_id()]))
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


_I64, _PTR, _INT, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# per kernel: (source in csrc/, exported function, its C argument types); the functions return an int status
_SIGNATURES = {
    "mla_decode_cpu": ("mla_decode_cpu", "raymoe_mla_decode",
                       [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _INT, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64,
                        _I64, _I64, _F32, _INT]),
    "mla_decode_step_cpu": ("mla_decode_cpu", "raymoe_mla_decode_step",
                            [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _INT, _I64,
                             _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _INT]),
    "moe_route_cpu": ("moe_cpu", "raymoe_moe_route",
                      [_PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _INT, _F32, _PTR, _PTR]),
    "moe_experts_cpu": ("moe_cpu", "raymoe_moe_experts",
                        [_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _PTR, _INT]),
    "rms_norm_cpu": ("layers_cpu", "raymoe_rms_norm", [_PTR, _I64, _I64, _I64, _PTR, _F32, _PTR, _I64]),
    "argmax_cpu": ("layers_cpu", "raymoe_argmax", [_PTR, _I64, _I64, _I64, _PTR]),
    "rope_cpu": ("layers_cpu", "raymoe_rope", [_PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR,
                                               _PTR]),
}


def _kernel(name: str) -> Callable[..., int] | None:
    """The typed C function `name` (a key of _SIGNATURES), its source built and loaded once per process
    (None: unavailable)."""
    fn = _fns.get(name)
    if fn is not None:  # the hot path: no lock (a dict read is atomic)
        return fn
    source, symbol, _ = _SIGNATURES[name]
    with _lock:
        if source not in _libs:
            lib = _build(source)
            if lib is not None:  # type every function of the source (ctypes keeps the function objects)
                for src, sym, argtypes in _SIGNATURES.values():
                    if src == source:
                        fn = getattr(lib, sym)
                        fn.argtypes, fn.restype = argtypes, ctypes.c_int
            _libs[source] = lib
        lib = _libs[source]
        if lib is None:
            return None
        fn = _fns[name] = getattr(lib, symbol)
        return fn


def _require(name: str) -> Callable[..., int]:
    """`_kernel(name)`, or RuntimeError when the kernels cannot be built here."""
    fn = _kernel(name)
    if fn is None:
        raise RuntimeError("the CPU kernels are not available (no C compiler, or RAYMOE_CPU_KERNELS=0)")
    return fn


def _raise(rc: int, name: str, bad_input: str) -> None:
    """A kernel's non-zero status as an exception: -1 bad input (`bad_input` says what), else no scratch memory."""
    if rc == -1:
        raise ValueError(bad_input)
    raise MemoryError(f"{name} could not allocate its scratch memory")


def is_available() -> bool:
    """Whether the CPU kernels are built (or can be) and loaded in this process."""
    return all(_kernel(name) is not None for name in _SIGNATURES)


def mla_decode_cpu(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, softmax_scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode on CPU; the same contract as `mla_decode` / `mla_decode_ref`.

    q_lat [B, H, C], q_pe [B, H, R] fp32 (any strides with a unit last dim); kv_cache [num_blocks, block_size,
    C + R] fp32 or bf16, contiguous; block_tables [B, max_blocks] int32; seq_lens [B] int32, each in
    [0, max_blocks * block_size] (0: a row of zeros, as the reference). Returns fp32 [B, H, C] (`out` when
    given: fp32, contiguous, that shape).
    """
    fn = _require("mla_decode_cpu")
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
    rc = fn(q_lat.data_ptr(), q_lat.stride(0), q_lat.stride(1), q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1),
            kv_cache.data_ptr(), int(kv_cache.dtype == torch.bfloat16), kv_cache.shape[0], kv_cache.shape[1],
            tables.data_ptr(), tables.shape[1], lens.data_ptr(), out.data_ptr(), B, H, C, R, float(softmax_scale),
            torch.get_num_threads())
    if rc:
        _raise(rc, "mla_decode_cpu", f"seq_lens must be in [0, {tables.shape[1] * kv_cache.shape[1]}] and block "
               f"ids in [0, {kv_cache.shape[0]}): got lengths {lens.tolist()[:8]}...")
    return out


def mla_decode_step_cpu(q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        slot_mapping: torch.Tensor, kv_b_weight: torch.Tensor, kv_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """A decode-only MLA layer step on CPU, one new token per sequence; returns o_proj's input, fp32 [B, H, Dv].

    Writes each new latent `c_kv[b] | k_pe[b]` into the cache at `slot_mapping[b]` (block * block_size + offset),
    absorbs W_uk into the queries, attends as `mla_decode_cpu` (the sequence lengths include the new token) and
    applies W_uv: what PagedMLAAttention's decode does with torch ops around `mla_decode_cpu`, in one call.
    q_nope [B, H, Dn], q_pe [B, H, R], c_kv [B, C], k_pe [B, R]: fp32, unit stride in the last dim;
    kv_b_weight: kv_b_proj's weight [H * (Dn + Dv), C], fp32, contiguous; kv_cache [num_blocks, block_size, C + R]
    fp32 or bf16, contiguous (written in place); block_tables [B, max_blocks] / seq_lens [B] int32.
    """
    fn = _require("mla_decode_step_cpu")
    B, H, Dn = q_nope.shape
    C, R = c_kv.shape[-1], k_pe.shape[-1]
    if (q_pe.shape != (B, H, R) or c_kv.shape != (B, C) or k_pe.shape != (B, R) or kv_cache.dim() != 3
            or kv_cache.shape[2] != C + R or kv_b_weight.dim() != 2 or kv_b_weight.shape[1] != C
            or kv_b_weight.shape[0] % H or kv_b_weight.shape[0] // H <= Dn):
        raise ValueError(f"shapes do not match: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, c_kv "
                         f"{tuple(c_kv.shape)}, k_pe {tuple(k_pe.shape)}, kv_b_weight {tuple(kv_b_weight.shape)}, "
                         f"kv_cache {tuple(kv_cache.shape)}")
    Dv = kv_b_weight.shape[0] // H - Dn
    if any(t.dtype is not torch.float32 for t in (q_nope, q_pe, c_kv, k_pe, kv_b_weight)):
        raise ValueError("q_nope, q_pe, c_kv, k_pe and kv_b_weight must be float32")
    if kv_cache.dtype not in (torch.float32, torch.bfloat16) or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be a contiguous float32 or bfloat16 tensor, got {kv_cache.dtype}")
    if any(t.stride(-1) != 1 for t in (q_nope, q_pe, c_kv, k_pe)) or not kv_b_weight.is_contiguous():
        raise ValueError("q_nope, q_pe, c_kv and k_pe need a unit stride in their last dim, kv_b_weight contiguous")
    if not all(t.is_cpu for t in (q_nope, q_pe, c_kv, k_pe, kv_b_weight, kv_cache, slot_mapping, block_tables,
                                  seq_lens)):
        raise ValueError("mla_decode_step_cpu takes CPU tensors")
    if (block_tables.dtype is not torch.int32 or seq_lens.dtype is not torch.int32 or slot_mapping.dtype is not torch.long
            or block_tables.dim() != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,)
            or slot_mapping.shape != (B,) or not block_tables.is_contiguous() or not seq_lens.is_contiguous()
            or not slot_mapping.is_contiguous()):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens {tuple(seq_lens.shape)} (int32) and "
                         f"slot_mapping {tuple(slot_mapping.shape)} (int64) must be contiguous and match a batch of {B}")
    out = torch.empty(B, H, Dv, dtype=torch.float32)
    if B == 0:
        return out
    rc = fn(q_nope.data_ptr(), q_nope.stride(0), q_nope.stride(1), q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1),
            c_kv.data_ptr(), c_kv.stride(0), k_pe.data_ptr(), k_pe.stride(0), slot_mapping.data_ptr(),
            kv_b_weight.data_ptr(), kv_cache.data_ptr(), int(kv_cache.dtype is torch.bfloat16), kv_cache.shape[0],
            kv_cache.shape[1], block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(), out.data_ptr(),
            B, H, C, R, Dn, Dv, softmax_scale, torch.get_num_threads())
    if rc:
        _raise(rc, "mla_decode_step_cpu", f"slots must be in [0, {kv_cache.shape[0] * kv_cache.shape[1]}), "
               f"seq_lens in [0, {block_tables.shape[1] * kv_cache.shape[1]}] and block ids in [0, {kv_cache.shape[0]})")
    return out


def moe_route_cpu(scores: torch.Tensor, bias: torch.Tensor, *, n_group: int, topk_group: int, top_k: int,
                  norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The noaux_tc router after its GEMM and sigmoid, as raymoe.model.moe.Gate: scores [T, E] fp32 (sigmoid of
    the logits), bias [E] fp32 (chooses only) -> (topk_ids [T, top_k] int64, in descending order of
    score + bias; topk_weights [T, top_k] fp32). Ties choose the lower expert id."""
    fn = _require("moe_route_cpu")
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.device.type != "cpu":
        raise ValueError(f"scores must be a float32 [T, E] CPU tensor, got {scores.dtype} {tuple(scores.shape)}")
    T, E = scores.shape
    if bias.shape != (E,) or bias.dtype != torch.float32 or bias.device.type != "cpu":
        raise ValueError(f"bias must be a float32 [{E}] CPU tensor, got {bias.dtype} {tuple(bias.shape)}")
    scores, bias = scores.contiguous(), bias.contiguous()
    ids = torch.empty(T, top_k, dtype=torch.long)
    weights = torch.empty(T, top_k, dtype=torch.float32)
    rc = fn(scores.data_ptr(), T, E, bias.data_ptr(), n_group, topk_group, top_k, int(norm_topk_prob),
            float(routed_scaling_factor), ids.data_ptr(), weights.data_ptr())
    if rc:
        _raise(rc, "moe_route_cpu",
               f"bad routing shape: {E} experts, n_group={n_group}, topk_group={topk_group}, top_k={top_k}")
    return ids, weights


def moe_experts_cpu(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, local: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts: out[t] = sum over k of topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), fp32 [T, D].

    x [T, D] fp32; topk_ids [T, K] int64 global ids (-1, or a non-hosted one: skipped); topk_weights [T, K];
    local [n_routed + 1] int64: global id -> index in the stacks, E for experts hosted elsewhere (the last
    entry, for id -1, too); w13 [E, D, 2I] (gate | up rows of each expert, input-dim-major), w2 [E, I, D] fp32.
    """
    fn = _require("moe_experts_cpu")
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, topk_ids {tuple(topk_ids.shape)}, "
                         f"topk_weights {tuple(topk_weights.shape)}")
    T, D = x.shape
    E, I2 = w13.shape[0], w13.shape[-1]
    if w13.shape != (E, D, I2) or I2 % 2 or w2.shape != (E, I2 // 2, D):
        raise ValueError(f"expert stacks do not match x {tuple(x.shape)}: w13 {tuple(w13.shape)} (want [E, D, 2I]), "
                         f"w2 {tuple(w2.shape)} (want [E, I, D])")
    if any(t.dtype != torch.float32 for t in (x, w13, w2)):
        raise ValueError(f"x, w13 and w2 must be float32, got {x.dtype} / {w13.dtype} / {w2.dtype}")
    if any(t.device.type != "cpu" for t in (x, topk_ids, topk_weights, local, w13, w2)):
        raise ValueError("moe_experts_cpu takes CPU tensors")
    if local.dim() != 1 or local.dtype != torch.long:
        raise ValueError(f"local must be an int64 vector, got {local.dtype} {tuple(local.shape)}")
    x, w13, w2, local = x.contiguous(), w13.contiguous(), w2.contiguous(), local.contiguous()
    ids = topk_ids.to(torch.long).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    out = torch.empty(T, D, dtype=torch.float32)
    rc = fn(x.data_ptr(), T, D, ids.data_ptr(), weights.data_ptr(), ids.shape[1], local.data_ptr(), local.shape[0] - 1,
            w13.data_ptr(), w2.data_ptr(), E, I2 // 2, out.data_ptr(), torch.get_num_threads())
    if rc:
        _raise(rc, "moe_experts_cpu",
               f"topk_ids must be in [-1, {local.shape[0] - 1}], got min {int(ids.min())} max {int(ids.max())}")
    return out


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of fp32 rows, as raymoe.model.layers.RMSNorm: x [T, D] (rows may be strided: a slice of a wider
    tensor is read in place), weight [D] contiguous -> a new contiguous fp32 [T, D]. (Checks kept to a few
    attribute reads: the decode hot path calls this 4 times per layer.)"""
    fn = _require("rms_norm_cpu")
    if x.dtype is not torch.float32 or not x.is_cpu or x.dim() != 2 or (x.stride(1) != 1 and x.shape[1] > 1):
        raise ValueError(f"x must be a float32 [T, D] CPU tensor with unit stride in D, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")
    T, D = x.shape
    if weight.dtype is not torch.float32 or not weight.is_cpu or weight.shape != (D,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous float32 [{D}] CPU tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    out = torch.empty(T, D, dtype=torch.float32)
    fn(x.data_ptr(), T, D, x.stride(0), weight.data_ptr(), eps, out.data_ptr(), D)
    return out


def argmax_cpu(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] fp32 (unit stride in V) -> int64 [B]: the first index of each row's maximum, NaN counting as
    the maximum, as `x.max(dim=-1).indices` (greedy sampling)."""
    fn = _require("argmax_cpu")
    if x.dtype is not torch.float32 or not x.is_cpu or x.dim() != 2 or x.shape[1] == 0 or \
            (x.stride(1) != 1 and x.shape[1] > 1):
        raise ValueError(f"x must be a non-empty float32 [B, V] CPU tensor with unit stride in V, got {x.dtype} "
                         f"{tuple(x.shape)}")
    out = torch.empty(x.shape[0], dtype=torch.long)
    fn(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out


def rope_cpu(q: torch.Tensor, k: torch.Tensor | None, positions: torch.Tensor, cos2: torch.Tensor,
             sin2: torch.Tensor) -> None:
    """Rotate q [T, H, R] and k [T, R] (fp32, any strides with a unit last one) in place by the rows of `positions`
    in the tables cos2 = [cos|cos], sin2 = [-sin|sin] ([P, R] fp32, contiguous: RotaryEmbedding.prepare's), as
    RotaryEmbedding.rotate computes them, bit for bit. R even, at most 512."""
    fn = _require("rope_cpu")
    T, H, R = q.shape
    if (q.dtype is not torch.float32 or not q.is_cpu or q.stride(2) != 1 or cos2.shape != sin2.shape
            or cos2.dim() != 2 or cos2.shape[1] != R or cos2.dtype is not torch.float32
            or sin2.dtype is not torch.float32 or not cos2.is_contiguous() or not sin2.is_contiguous()
            or positions.dtype is not torch.long or positions.shape != (T,) or not positions.is_contiguous()):
        raise ValueError(f"rope_cpu wants q [T, H, R] fp32 (unit last stride), positions [T] int64 and [P, R] fp32 "
                         f"tables: got q {q.dtype} {tuple(q.shape)}, positions {positions.dtype} "
                         f"{tuple(positions.shape)}, tables {tuple(cos2.shape)} {tuple(sin2.shape)}")
    if k is not None and (k.shape != (T, R) or k.dtype is not torch.float32 or not k.is_cpu or k.stride(1) != 1):
        raise ValueError(f"k must be a float32 [{T}, {R}] CPU tensor with a unit last stride, got {k.dtype} "
                         f"{tuple(k.shape)}")
    rc = fn(q.data_ptr(), T, H, q.stride(0), q.stride(1), 0 if k is None else k.data_ptr(),
            0 if k is None else k.stride(0), R, positions.data_ptr(), cos2.shape[0], cos2.data_ptr(), sin2.data_ptr())
    if rc != 0:
        raise ValueError(f"positions must be in [0, {cos2.shape[0]}) and R ({R}) even and at most 512")

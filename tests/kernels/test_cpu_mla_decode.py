"""raymoe_kernels.cpu: the C decode-attention kernel (built here with the machine's C compiler) against the
torch reference, its input checks, its build switches, and the engine using it on CPU.

CI images carry a C compiler (gcc); where none is found the kernel tests are skipped with that reason and
the engine runs the torch reference (which the last test checks)."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from raymoe_kernels.cpu import _SIGNATURES, is_available, mla_decode_cpu
from raymoe_kernels.mla_decode import mla_decode_ref

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler on this machine")


def _case(seq_lens, block_size, num_heads, lat, rope, dtype, gen):
    blocks = max(math.ceil(n / block_size) for n in seq_lens)
    num_blocks = len(seq_lens) * blocks + 5
    kv_cache = torch.randn(num_blocks, block_size, lat + rope, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: len(seq_lens) * blocks].view(len(seq_lens), blocks).int()
    q = torch.randn(num_heads, len(seq_lens), lat + rope, generator=gen).transpose(0, 1)  # strided, as the model's
    return q[..., :lat], q[..., lat:], kv_cache, tables, torch.tensor(seq_lens, dtype=torch.int32)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,lat,rope,block_size", [
    (4, 32, 8, 16),  # the tiny preset
    (16, 512, 64, 16),  # K2's latent sizes
    (5, 30, 6, 4),  # odd heads (the 2- and 4-head tiles' remainders), C not a multiple of 8
    (3, 17, 3, 5),  # every remainder at once, odd block size
    (1, 8, 0, 1),  # one head, no rope part, one token per block
])
def test_matches_the_torch_reference(dtype, heads, lat, rope, block_size):
    gen = torch.Generator().manual_seed(heads * 1000 + lat)
    seq_lens = [1, block_size, 3 * block_size + 1, 0, 7, 4 * block_size, 2]  # 0: a row of zeros
    q_lat, q_pe, kv_cache, tables, lens = _case(seq_lens, block_size, heads, lat, rope, dtype, gen)
    out = mla_decode_cpu(q_lat, q_pe, kv_cache, tables, lens, 0.3)
    assert out.dtype == torch.float32 and out.shape == (len(seq_lens), heads, lat)
    torch.testing.assert_close(out, mla_decode_ref(q_lat, q_pe, kv_cache, tables, lens, 0.3), atol=2e-5, rtol=1e-5)


@needs_cc
def test_reads_only_its_own_pages():
    """Pages outside a sequence's table (and rows past its length in its last page) do not change its output,
    even when they hold NaN."""
    gen = torch.Generator().manual_seed(1)
    q_lat, q_pe, kv_cache, tables, lens = _case([5, 9], 4, 4, 32, 8, torch.float32, gen)
    want = mla_decode_cpu(q_lat, q_pe, kv_cache, tables, lens, 0.2).clone()
    poisoned = torch.full_like(kv_cache, float("nan"))
    for b, n in enumerate(lens.tolist()):
        for j in range(math.ceil(n / 4)):
            rows = min(4, n - 4 * j)
            poisoned[tables[b, j], :rows] = kv_cache[tables[b, j], :rows]
    assert torch.equal(mla_decode_cpu(q_lat, q_pe, poisoned, tables, lens, 0.2), want)


@needs_cc
def test_bad_inputs_raise_value_errors():
    gen = torch.Generator().manual_seed(2)
    q_lat, q_pe, kv_cache, tables, lens = _case([5, 9], 4, 4, 32, 8, torch.float32, gen)
    bad_table = tables.clone()
    bad_table[1, 1] = kv_cache.shape[0]
    with pytest.raises(ValueError, match="block ids"):
        mla_decode_cpu(q_lat, q_pe, kv_cache, bad_table, lens, 0.2)
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode_cpu(q_lat, q_pe, kv_cache, tables, torch.tensor([-1, 9], dtype=torch.int32), 0.2)
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode_cpu(q_lat, q_pe, kv_cache, tables, torch.tensor([5, 4 * tables.shape[1] + 1], dtype=torch.int32), 0.2)
    with pytest.raises(ValueError, match="float32"):
        mla_decode_cpu(q_lat.double(), q_pe, kv_cache, tables, lens, 0.2)
    with pytest.raises(ValueError, match="C \\+ R"):
        mla_decode_cpu(q_lat, q_pe[..., :4], kv_cache, tables, lens, 0.2)
    with pytest.raises(ValueError, match="contiguous"):
        mla_decode_cpu(q_lat, q_pe, kv_cache.transpose(0, 1), tables, lens, 0.2)


def _probe(env: dict[str, str]) -> str:
    code = "from raymoe_kernels.cpu import is_available; print(is_available())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_switched_off_or_without_a_compiler_the_kernel_is_unavailable(tmp_path):
    assert _probe({"RAYMOE_CPU_KERNELS": "0", "RAYMOE_CACHE": str(tmp_path)}) == "False"
    assert _probe({"CC": str(tmp_path / "no-such-compiler"), "RAYMOE_CACHE": str(tmp_path)}) == "False"


@needs_cc
def test_the_built_library_is_cached_per_source_and_machine(tmp_path):
    assert _probe({"RAYMOE_CACHE": str(tmp_path)}) == "True"
    built = sorted((tmp_path / "kernels").glob("*"))
    sources = sorted({source for source, _, _ in _SIGNATURES.values()})
    assert [p.name.rsplit("-", 1)[0] for p in built] == sources  # one library per source
    mtimes = [p.stat().st_mtime_ns for p in built]
    assert _probe({"RAYMOE_CACHE": str(tmp_path)}) == "True"  # loaded, not rebuilt
    assert sorted((tmp_path / "kernels").glob("*")) == built and [p.stat().st_mtime_ns for p in built] == mtimes


@needs_cc
def test_an_unwritable_cache_folder_falls_back_to_the_temp_dir(tmp_path):
    """A read-only home (a pod's root filesystem): RAYMOE_CACHE that cannot be created still builds the kernel,
    under the temp dir."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert _probe({"RAYMOE_CACHE": str(blocker), "TMPDIR": str(tmp_path)}) == "True"
    assert list(tmp_path.glob("raymoe-kernels-*/mla_decode_cpu-*.so"))


def test_the_engine_decodes_through_the_kernel_on_cpu_and_matches_the_torch_backend(tiny_ckpt):
    """`kernels.backend: auto` on CPU takes the C kernel when it builds (`torch` keeps the reference); both
    give the same greedy tokens for a batch of mixed lengths with chunked prefill."""
    from raymoe import LLM, SamplingParams

    prompts = [[(7 * i + 3 * j) % 1500 + 1 for j in range(n)] for i, n in enumerate([1, 5, 17, 40, 33, 64])]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = {}
    for backend in ("auto", "torch"):
        llm = LLM(model=str(tiny_ckpt), dtype="float32", kernels_backend=backend, max_num_batched_tokens=32,
                  kv_cache_memory=8 << 20)
        assert llm.engine.runner.attn.use_cpu_kernel == (backend == "auto" and is_available())
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
        llm.shutdown()
    assert outs["auto"] == outs["torch"]


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,lat,rope,nope,v_dim,block_size", [
    (4, 32, 8, 16, 16, 16),  # the tiny preset
    (3, 20, 6, 12, 10, 5),  # remainders everywhere (C, Dv not multiples of 8 or 16)
    (16, 512, 64, 128, 128, 16),  # K2's latent and head sizes, fewer heads
])
def test_the_fused_decode_step_equals_cache_write_absorb_attention_unabsorb(dtype, heads, lat, rope, nope, v_dim,
                                                                           block_size):
    """mla_decode_step_cpu against the torch ops it replaces: the new latents land in their slots (bf16: rounded as
    torch rounds), and the output is W_uv · attention(q_nope · W_uk | q_pe) per head."""
    from raymoe_kernels.cpu import mla_decode_step_cpu

    gen = torch.Generator().manual_seed(heads + lat)
    seq_lens = [1, block_size + 2, 3 * block_size, 7]
    q_lat_unused, q_pe, kv_cache, tables, lens = _case(seq_lens, block_size, heads, lat, rope, dtype, gen)
    B = len(seq_lens)
    q = torch.randn(B, heads, nope + rope, generator=gen)
    q_nope = q[..., :nope]  # strided, as MLA.project's views
    latent = torch.randn(B, lat + rope + 3, generator=gen)
    c_kv, k_pe = latent[:, :lat], latent[:, lat + 3:]
    wkv = torch.randn(heads * (nope + v_dim), lat, generator=gen) / lat ** 0.5
    # the new token of each sequence is its last one: its slot through the block table
    slots = torch.tensor([int(tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for b, n in enumerate(seq_lens)], dtype=torch.long)
    want_cache = kv_cache.clone()
    want_cache.view(-1, lat + rope).index_copy_(0, slots, torch.cat([c_kv, k_pe], dim=-1).to(dtype))
    w = wkv.view(heads, nope + v_dim, lat)
    q_lat = torch.einsum("bhd,hdc->bhc", q_nope, w[:, :nope])
    o_lat = mla_decode_ref(q_lat, q_pe, want_cache, tables, lens, 0.4)
    want = torch.einsum("bhc,hvc->bhv", o_lat, w[:, nope:])
    out = mla_decode_step_cpu(q_nope, q_pe, c_kv, k_pe, slots, wkv, kv_cache, tables, lens, 0.4)
    assert torch.equal(kv_cache, want_cache)
    assert out.shape == (B, heads, v_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=5e-5, rtol=1e-4)


@needs_cc
def test_the_fused_decode_step_rejects_bad_input():
    from raymoe_kernels.cpu import mla_decode_step_cpu

    gen = torch.Generator().manual_seed(3)
    _, q_pe, kv_cache, tables, lens = _case([5, 9], 4, 4, 32, 8, torch.float32, gen)
    q_nope, c_kv, k_pe = torch.randn(2, 4, 16), torch.randn(2, 32), torch.randn(2, 8)
    wkv = torch.randn(4 * 32, 32)
    slots = torch.tensor([0, 1])
    before = kv_cache.clone()
    with pytest.raises(ValueError, match="slots must be in"):
        mla_decode_step_cpu(q_nope, q_pe, c_kv, k_pe, torch.tensor([0, kv_cache.shape[0] * 4]), wkv, kv_cache, tables,
                            lens, 0.1)
    assert torch.equal(kv_cache, before)  # nothing written
    with pytest.raises(ValueError, match="shapes do not match"):
        mla_decode_step_cpu(q_nope, q_pe, c_kv[:, :30], k_pe, slots, wkv, kv_cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="float32"):
        mla_decode_step_cpu(q_nope.double(), q_pe, c_kv, k_pe, slots, wkv, kv_cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="int32"):
        mla_decode_step_cpu(q_nope, q_pe, c_kv, k_pe, slots, wkv, kv_cache, tables.long(), lens, 0.1)


@needs_cc
def test_a_changed_header_rebuilds_the_sources_that_include_it(tmp_path, monkeypatch):
    """The cache key covers csrc/*.h: editing vec8.h must not load a library built from the old header."""
    import raymoe_kernels.cpu as cpu

    src = tmp_path / "csrc"
    shutil.copytree(cpu._CSRC, src)
    monkeypatch.setattr(cpu, "_CSRC", src)
    monkeypatch.setenv("RAYMOE_CACHE", str(tmp_path / "cache"))
    assert cpu._build("layers_cpu") is not None
    header = src / "vec8.h"
    header.write_text(header.read_text() + "\n/* changed */\n")
    assert cpu._build("layers_cpu") is not None
    assert len(list((tmp_path / "cache" / "kernels").glob("layers_cpu-*.so"))) == 2

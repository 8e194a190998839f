"""Model runner: turns a `SchedulerOutput` into one forward pass over the paged latent cache and
samples the next token of every sequence that finished its (chunk of) prompt or is decoding.

Owns the KV-cache tensor (sized from `EngineConfig.kv_cache_memory`), the paged attention backend,
the sampler and one `torch.Generator` per seeded request. No scheduling decisions are made here.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from raymoe.attention.backend import PagedMLAAttention, build_metadata, decode_metadata
from raymoe.config import EngineConfig
from raymoe.engine.sampler import Sampler, TokenLogprobs, greedy, make_generator
from raymoe.engine.scheduler import SchedulerOutput
from raymoe.model.args import ModelArgs


@dataclass(frozen=True)
class KVCacheSpec:
    """Runtime facts about the cache (never written back into the config)."""

    num_blocks: int
    block_size: int
    bytes_per_token: int  # (kv_lora_rank + qk_rope_head_dim) × layers × dtype bytes

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def kv_cache_spec(args: ModelArgs, cfg: EngineConfig, dtype: torch.dtype) -> KVCacheSpec:
    per_token = args.kv_cache_size * args.num_hidden_layers * torch.empty((), dtype=dtype).element_size()
    num_blocks = cfg.kv_cache_memory // (per_token * cfg.block_size)
    if num_blocks < 2:
        raise ValueError(f"kv_cache_memory ({cfg.kv_cache_memory} B) holds fewer than 2 blocks of "
                         f"{cfg.block_size} tokens at {per_token} B/token")
    return KVCacheSpec(num_blocks=num_blocks, block_size=cfg.block_size, bytes_per_token=per_token)


def resolve_kernels_backend(backend: str, device: torch.device) -> str:
    """`auto`: Triton kernels on CUDA when Triton is installed; on a CPU device raymoe_kernels' C kernels
    ("cpu": the decode-attention layer step, RMSNorm, rotary embedding, the MoE router and routed experts,
    greedy argmax) when they build here (a C compiler is present and RAYMOE_CPU_KERNELS is not 0); torch
    references otherwise.

    `triton` on a CPU device runs the kernels through Triton's interpreter (TRITON_INTERPRET=1), which
    is how the CPU test suite checks the engine's kernel path end to end.
    """
    if backend == "torch":
        return "torch"
    from raymoe_kernels import is_available

    available = is_available()
    if backend == "triton":
        if not available:
            raise ValueError("kernels.backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1)")
        return "triton"
    if device.type == "cuda":
        return "triton" if available else "torch"
    if device.type == "cpu":
        from raymoe_kernels.cpu import is_available as cpu_kernels_available

        return "cpu" if cpu_kernels_available() else "torch"
    return "torch"


def _ban_stops_before_min_tokens(logits: torch.Tensor, requests: list) -> None:
    """As vLLM: below `min_tokens` outputs, EOS (unless ignored) and stop token ids cannot be sampled."""
    for i, r in enumerate(requests):
        p = r.params
        if len(r.output_token_ids) < p.min_tokens:
            banned = list(p.stop_token_ids)
            if r.eos_token_id is not None and not p.ignore_eos:
                banned.append(r.eos_token_id)
            if banned:
                logits[i, banned] = float("-inf")


class ModelRunner:
    def __init__(self, model: torch.nn.Module, args: ModelArgs, spec: KVCacheSpec,
                 device: torch.device | str = "cpu", *, kernels_backend: str = "auto"):
        self.model = model
        self.args = args
        self.spec = spec
        self.device = torch.device(device)
        dtype = next(model.parameters()).dtype
        self.kv_cache = torch.zeros(args.num_hidden_layers, spec.num_blocks, spec.block_size, args.kv_cache_size,
                                    dtype=dtype, device=self.device)
        kernels = resolve_kernels_backend(kernels_backend, self.device)
        self._greedy = greedy
        if kernels == "cpu":
            from raymoe_kernels.cpu import argmax_cpu

            self._greedy = argmax_cpu  # the same first maximal index; torch's max-with-index is scalar on CPU
        self.attn = PagedMLAAttention(self.kv_cache, args.kv_lora_rank, use_triton=kernels == "triton",
                                      use_cpu_kernel=kernels == "cpu")
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = self._generators[request_id] = make_generator(seed, self.device)
        return gen

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, tuple[int, TokenLogprobs | None]]:
        """Run one step; returns {request_id: (token, logprobs)} for the sequences that sample."""
        self.release(out.finished_ids)
        if out.is_empty:
            return {}
        if all(seq.num_new_tokens == 1 for seq in out.scheduled):  # decode-only: one token each, at its start
            return self._execute_decode(out)
        ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_seqs = []
        for seq in out.scheduled:
            req, start, n = seq.request, seq.start_position, seq.num_new_tokens
            ids += req.token_ids_slice(start, start + n)
            positions += range(start, start + n)
            query_lens.append(n)
            context_lens.append(start)
            tables.append(req.block_ids)
            if seq.needs_sample:
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(req)
        self.attn.metadata = build_metadata(query_lens, context_lens, tables, self.spec.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, attn=self.attn)
        self.attn.metadata = None
        if not sample_rows:
            return {}
        if len(sample_rows) < len(ids):
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        return self._sample(hidden, sample_seqs)

    def _execute_decode(self, out: SchedulerOutput) -> dict[str, tuple[int, TokenLogprobs | None]]:
        """A decode-only step (one token per sequence at its start position): inputs and attention metadata
        from one pass over the sequences, int arrays viewed by the tensors (the common step under load)."""
        ids = array("q")
        context_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_seqs = []
        for i, seq in enumerate(out.scheduled):
            req, start = seq.request, seq.start_position
            prompt = req.prompt_token_ids
            ids.append(prompt[start] if start < len(prompt) else req.output_token_ids[start - len(prompt)])
            context_lens.append(start)
            tables.append(req.block_ids)
            if seq.needs_sample:
                sample_rows.append(i)
                sample_seqs.append(req)
        self.attn.metadata = decode_metadata(context_lens, tables, self.spec.block_size, self.device)
        input_ids = torch.frombuffer(ids, dtype=torch.long).to(self.device)
        pos = torch.frombuffer(array("q", context_lens), dtype=torch.long).to(self.device)
        hidden = self.model(input_ids, pos, attn=self.attn)
        self.attn.metadata = None
        if not sample_rows:
            return {}
        if len(sample_rows) < len(ids):  # else every row samples, in order
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        return self._sample(hidden, sample_seqs)

    def _sample(self, hidden: torch.Tensor, sample_seqs: list) -> dict[str, tuple[int, TokenLogprobs | None]]:
        """Logits of the sampling rows' hidden states [S, D] -> {request_id: (token, logprobs)}."""
        logits = self.model.compute_logits(hidden)
        params = [r.params for r in sample_seqs]
        if any(p.min_tokens for p in params):
            _ban_stops_before_min_tokens(logits, sample_seqs)
        if all(p.plain_greedy for p in params):  # nothing but argmax: no histories, generators or logprobs
            tokens = self._greedy(logits).tolist()
            return {r.request_id: (tokens[i], None) for i, r in enumerate(sample_seqs)}
        histories = [(r.prompt_token_ids, r.output_token_ids) for r in sample_seqs]
        gens = [self._generator(r.request_id, r.params.seed) for r in sample_seqs]
        result = self.sampler.sample(logits, params, histories, gens)
        tokens = result.token_ids.tolist()
        return {r.request_id: (tokens[i], result.logprobs[i]) for i, r in enumerate(sample_seqs)}

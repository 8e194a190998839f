"""Paged KV-cache bookkeeping: which block ids each request owns, and the prefix cache.

Pure Python, no tensors: the model runner owns the latent cache tensor `[num_blocks, block_size, C+R]`
per layer and reads `Request.block_ids` as the block table. Here we only count and share ids.

- `BlockPool` holds ref-counted blocks and a free queue in LRU-eviction order. A freed block keeps
  its prefix hash, so it can be revived by a later hit until it is reallocated (evicted).
- `KVCacheManager` maps requests to blocks, publishes FULL blocks whose KV has been computed into
  the prefix cache, and finds the longest cached prefix of a new request.

Block 0 is reserved as the null block: it is never handed out, so the runner can pad block tables
and point padding tokens' slots at it (e.g. for CUDA-graph batch sizes) without corrupting a request.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from raymoe.engine.request import Request

NULL_BLOCK_ID = 0


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is in the prefix cache


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chain hash of one full block: H(parent_hash ‖ token ids).

    Why blake2b and not Python's `hash((parent, tuple(tokens)))`: the int-tuple hash is unseeded and
    cheap to collide on purpose, and a collision would serve one user's KV to another's prompt (the
    cache-poisoning issue vLLM fixed by moving to sha256). 128-bit blake2b costs ~1 µs per block.
    """
    data = array("q", token_ids).tobytes()
    return hashlib.blake2b((parent_hash or b"") + data, digest_size=16).digest()


class BlockPool:
    """Ref-counted blocks, a free queue ordered for eviction, and the hash → block prefix map."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block {NULL_BLOCK_ID} is reserved), got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK_ID].ref_count = 1  # pinned forever
        # Front = evicted first. Ordered dict: O(1) pop-front, append and removal from the middle.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[bytes, int] = {}

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner, including cached ones that can be evicted."""
        return len(self._free)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        block_id = self._cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take `num_blocks` from the front of the free queue, evicting their cached prefix."""
        assert num_blocks <= len(self._free), f"allocate({num_blocks}) with {len(self._free)} free"
        out = []
        for _ in range(num_blocks):
            block = self.blocks[self._free.popitem(last=False)[0]]
            assert block.ref_count == 0, f"free block {block.block_id} has ref_count {block.ref_count}"
            if block.block_hash is not None:  # evict
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add an owner to each block (a prefix hit), reviving it from the free queue if unowned."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop an owner; unowned blocks join the free queue's back in the given order."""
        for block in blocks:
            assert block.ref_count > 0 and block.block_id != NULL_BLOCK_ID, f"double free of {block}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = None

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full block under `block_hash`; the first publisher of a hash keeps it."""
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block.block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after loading new weights)."""
        for block_id in self._cached.values():
            self.blocks[block_id].block_hash = None
        self._cached.clear()


class KVCacheManager:
    """Allocates block ids to requests and shares full blocks between equal prefixes.

    Args:
        num_blocks: blocks in the cache tensor, including the reserved null block 0.
        block_size: tokens per block.
        enable_prefix_caching: reuse full blocks whose token prefix was computed before.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        self._num_published: dict[str, int] = {}  # leading blocks of a request already in the cache
        self.num_queried_tokens = 0  # prefix-cache stats, in tokens, counted at each admission
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks owned by some request (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_usable_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached run of full blocks at the start of a not-yet-admitted request.

        At most `num_tokens - 1` tokens are reported so the last token is always recomputed: the
        model needs to run at least one position to produce the logits of the next token.

        Returns:
            (blocks, num_cached_tokens); pass the blocks to `allocate_slots` to take them.
        """
        assert request.request_id not in self._req_blocks, f"{request.request_id} already holds blocks"
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        hits = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[KVBlock] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the request's computed ones.

        On admission pass the `computed_blocks` from `get_computed_blocks`; they are taken before
        any new block and count as computed. All-or-nothing: on False nothing changed.
        """
        assert num_new_tokens >= 1, f"num_new_tokens={num_new_tokens}"
        is_new = request.request_id not in self._req_blocks
        assert is_new or not computed_blocks, "computed_blocks are only taken on admission"
        blocks = self._req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_needed = self.num_blocks_for(num_computed + num_new_tokens) - len(blocks) - len(computed_blocks)
        # Taking a cached-but-free block removes it from the free queue too.
        num_revived = sum(1 for b in computed_blocks if b.ref_count == 0)
        if num_needed > self.pool.num_free_blocks - num_revived:
            return False
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(max(num_needed, 0))
        if is_new:
            self._req_blocks[request.request_id] = blocks
            self._num_published[request.request_id] = len(computed_blocks)
            request.block_ids = []
            if self.enable_prefix_caching:
                self.num_queried_tokens += request.num_tokens
                self.num_hit_tokens += len(computed_blocks) * self.block_size
        for block in (*computed_blocks, *new_blocks):
            blocks.append(block)
            request.block_ids.append(block.block_id)
        return True

    def cache_blocks(self, request: Request) -> None:
        """Publish the request's full blocks whose KV is now computed (prompt or decode output).

        Call after a step advanced `num_computed_tokens`: only blocks whose KV the model actually
        wrote are published, so a hit never reads a block still being filled in the same step.
        """
        if not self.enable_prefix_caching:
            return
        blocks = self._req_blocks[request.request_id]
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        start = self._num_published[request.request_id]
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.cache(blocks[i], hashes[i])
        self._num_published[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release all of the request's blocks (finish, abort or preemption)."""
        blocks = self._req_blocks.pop(request.request_id, [])
        self._num_published.pop(request.request_id, None)
        # Tail first into the free queue: a prompt's last blocks are the least likely to be shared,
        # so they are evicted before its first blocks.
        self.pool.release(reversed(blocks))
        request.block_ids = []

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The request's chain hashes for its first `num_blocks` full blocks (memoised on it)."""
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, request.token_ids_slice(i * bs, (i + 1) * bs)))
        return hashes

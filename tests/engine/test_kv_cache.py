"""KVCacheManager: ref counts, no leaks, prefix-cache reuse and invalidation, LRU eviction."""

import pytest

from raymoe.engine.kv_cache import NULL_BLOCK_ID, BlockPool, KVCacheManager
from raymoe.engine.request import Request

BS = 4


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens))


def admit(kv: KVCacheManager, req: Request) -> int:
    """Admit `req` whole (prefill in one step) and mark its KV computed, as scheduler + runner would."""
    blocks, num_cached = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_cached, blocks)
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)
    return num_cached


def test_pool_reserves_null_block_and_rejects_tiny_pool():
    kv = KVCacheManager(num_blocks=5, block_size=BS)
    assert kv.num_free_blocks == 4 and kv.num_usable_blocks == 4 and kv.usage == 0.0
    req = make_request("a", range(16))
    admit(kv, req)
    assert NULL_BLOCK_ID not in req.block_ids and sorted(req.block_ids) == [1, 2, 3, 4]
    assert kv.usage == 1.0
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        BlockPool(1)


def test_allocate_and_free_keep_ref_counts_and_leak_nothing():
    kv = KVCacheManager(num_blocks=9, block_size=BS, enable_prefix_caching=False)
    reqs = [make_request(f"r{i}", range(i * 10, i * 10 + 6)) for i in range(3)]
    for req in reqs:
        admit(kv, req)
        assert len(req.block_ids) == 2
    assert kv.num_free_blocks == 2
    assert all(kv.pool.blocks[b].ref_count == 1 for r in reqs for b in r.block_ids)
    # decode: tokens 7 and 8 fit the second block; token 9 needs a new one
    req = reqs[0]
    for token, expect_blocks in [(100, 2), (101, 2), (102, 3)]:
        req.output_token_ids.append(token)
        assert kv.allocate_slots(req, 1)
        req.num_computed_tokens += 1
        assert len(req.block_ids) == expect_blocks
    for req in reqs:
        kv.free(req)
        assert req.block_ids == []
    assert kv.num_free_blocks == 8 and kv.usage == 0.0
    assert all(b.ref_count == 0 for b in kv.pool.blocks[1:])


def test_allocate_slots_fails_atomically_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(8))
    admit(kv, a)
    b = make_request("b", range(100, 110))  # needs 3 blocks, 1 free
    blocks, _ = kv.get_computed_blocks(b)
    assert not kv.allocate_slots(b, 10, blocks)
    assert b.block_ids == [] and kv.num_free_blocks == 1
    kv.free(a)
    assert kv.allocate_slots(b, 10) and kv.num_free_blocks == 0


def test_repeated_prompt_reuses_identical_block_ids_and_shares_them():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = make_request("a", prompt)
    assert admit(kv, a) == 0
    b = make_request("b", prompt)
    assert admit(kv, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [kv.pool.blocks[i].ref_count for i in a.block_ids[:2]] == [2, 2]
    assert kv.num_queried_tokens == 20 and kv.num_hit_tokens == 8 and kv.hit_rate == 0.4
    shared = a.block_ids[:2]
    kv.free(a)
    kv.free(b)
    # freed blocks stay cached: a third request still hits, reviving them from the free queue
    c = make_request("c", prompt)
    assert admit(kv, c) == 8 and c.block_ids[:2] == shared


def test_whole_prompt_hit_still_recomputes_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", range(8))  # exactly 2 full blocks
    admit(kv, a)
    b = make_request("b", range(8))
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 4 and len(blocks) == 1


def test_prefix_hit_is_invalidated_by_a_differing_token_and_by_chain_position():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, make_request("a", list(range(12)) + [99]))
    changed = list(range(12)) + [99]
    changed[5] = 77  # second block differs → only the first block hits, the third must not
    assert admit(kv, make_request("b", changed)) == 4
    # the same third-block tokens after a different prefix are a different chain: no hit
    shifted = [50, 51, 52, 53] + list(range(4, 12)) + [99]
    assert admit(kv, make_request("c", shifted)) == 0


def test_only_computed_full_blocks_are_published():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", range(10))
    blocks, _ = kv.get_computed_blocks(a)
    assert kv.allocate_slots(a, 10, blocks)
    assert kv.get_computed_blocks(make_request("x", range(10)))[1] == 0  # nothing computed yet
    a.num_computed_tokens = 6  # a first chunk of 6: only block 0 is full and computed
    kv.cache_blocks(a)
    assert kv.get_computed_blocks(make_request("y", range(10)))[1] == 4


def test_decode_produced_blocks_are_cached():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", range(3))
    admit(kv, a)
    for token in (7, 8, 9):  # the 4th token (7) completes block 0 once its KV is computed
        a.output_token_ids.append(token)
        assert kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        kv.cache_blocks(a)
    # block 0 = [0, 1, 2, 7] and block 1 = [8, 9] (partial)
    b = make_request("b", [0, 1, 2, 7, 8, 9])
    assert admit(kv, b) == 4 and b.block_ids[0] == a.block_ids[0]


def test_lru_eviction_reuses_least_recently_freed_cached_blocks_first():
    kv = KVCacheManager(num_blocks=5, block_size=BS)  # 4 usable
    old = make_request("old", list(range(8)) + [0])  # 3 blocks, 2 full cached
    admit(kv, old)
    kv.free(old)
    new = make_request("new", list(range(100, 104)) + [0])  # 2 blocks, 1 full cached
    admit(kv, new)
    kv.free(new)
    assert kv.num_free_blocks == 4  # cached blocks still count as free
    # 3 fresh blocks: the free queue holds old's blocks (freed first, tail first) then new's tail then
    # new's cached head, so old's cached blocks are evicted and new's cached head survives
    big = make_request("big", range(200, 212))
    admit(kv, big)
    kv.free(big)
    assert admit(kv, make_request("new2", list(range(100, 104)) + [0])) == 4
    assert kv.get_computed_blocks(make_request("old2", list(range(8)) + [0]))[1] == 0


def test_eviction_never_takes_a_block_in_use():
    kv = KVCacheManager(num_blocks=5, block_size=BS)
    a = make_request("a", list(range(8)) + [0])
    admit(kv, a)
    b = make_request("b", range(50, 54))
    assert not kv.allocate_slots(b, 5)  # needs 2, only 1 free
    assert kv.allocate_slots(b, 4)
    assert set(a.block_ids).isdisjoint(b.block_ids)

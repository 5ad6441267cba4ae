"""DramPool: LRU order, reference counts, budget, zero-copy hits."""

from __future__ import annotations

import threading

import torch

from ember.store.dram_pool import DramPool


def _t(n: int = 4) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(n, dtype=torch.float32)}


def test_hit_returns_the_same_tensors_without_copying() -> None:
    pool = DramPool(100)
    tensors = _t()
    pool.insert("a", tensors, 10).release()
    with pool.acquire("a") as lease:  # type: ignore[union-attr]
        assert lease.tensors["w"] is tensors["w"]
        assert lease.tensors["w"].data_ptr() == tensors["w"].data_ptr()
    assert pool.acquire("missing") is None


def test_lru_order_decides_eviction() -> None:
    evicted: list[str] = []
    pool = DramPool(30, on_evict=evicted.append)
    for key in "abc":
        pool.insert(key, _t(), 10).release()
    pool.acquire("a").release()  # type: ignore[union-attr]  # a is now most recently used
    pool.insert("d", _t(), 10).release()
    assert evicted == ["b"]
    assert list(pool.keys()) == ["c", "a", "d"]
    pool.insert("e", _t(), 20).release()
    assert evicted == ["b", "c", "a"]
    assert pool.keys() == {"d": 10, "e": 20}
    assert pool.used_bytes == 30


def test_leased_entry_is_never_evicted() -> None:
    pool = DramPool(20)
    held = pool.insert("a", _t(), 10)
    pool.insert("b", _t(), 10).release()
    pool.insert("c", _t(), 10).release()  # must evict b, not the leased (and older) a
    assert set(pool.keys()) == {"a", "c"}
    assert not pool.evict("a")
    assert held.tensors["w"].sum().item() == 6
    held.release()
    assert pool.evict("a")
    assert "a" not in pool


def test_entry_over_budget_lives_only_while_leased() -> None:
    pool = DramPool(10)
    pool.insert("small", _t(), 5).release()
    big = pool.insert("big", _t(), 50)
    second = pool.acquire("big")
    assert second is not None and "big" in pool and "small" not in pool
    big.release()
    big.release()  # idempotent: one release drops one reference
    assert pool.refs("big") == 1 and "big" in pool
    second.release()
    assert pool.keys() == {}


def test_leases_beyond_budget_shrink_back_when_released() -> None:
    pool = DramPool(20)
    a = pool.insert("a", _t(), 15)
    b = pool.insert("b", _t(), 15)  # over budget while both are leased
    assert pool.used_bytes == 30
    a.release()  # a is least recently used and unleased: it goes
    assert pool.keys() == {"b": 15}
    b.release()
    assert pool.keys() == {"b": 15}


def test_insert_of_a_present_key_keeps_the_first_copy() -> None:
    pool = DramPool(100)
    first = _t()
    pool.insert("a", first, 10).release()
    with pool.insert("a", _t(), 10) as lease:
        assert lease.tensors["w"] is first["w"]
    assert pool.used_bytes == 10


def test_concurrent_acquire_and_release_keep_counts_right() -> None:
    pool = DramPool(10)
    pool.insert("a", _t(), 10).release()

    def worker() -> None:
        for _ in range(500):
            lease = pool.acquire("a")
            assert lease is not None
            lease.release()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.refs("a") == 0 and pool.keys() == {"a": 10}

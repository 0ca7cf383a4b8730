"""The key ledger: a key is written once per build; partitions split the keys so no process holds them all."""

from __future__ import annotations

import pytest

from data_schemas.config import RayConfig
from pipeline.key_ledger import (
    KeyLedger,
    PartitionedKeyLedger,
    RemoteKeyLedger,
    partition_of,
    partitions_for,
    split_keys,
)
from pipeline.shards import FinishedKeys, ShardWriter, taken_keys

KEYS = [f"img_{i:04d}" for i in range(2000)]


def test_partition_of_is_stable_and_spreads_keys():
    assert partition_of("cat", 7) == 5  # blake2b: the same in every process (hash() is salted per process)
    sizes = [len(part) for part in split_keys(KEYS, 4).values()]
    assert sum(sizes) == len(KEYS) and min(sizes) > 400  # about 500 each
    assert partitions_for(10) == 2 and partitions_for(3_500_000) == 4 and partitions_for(10, configured=5) == 5


@pytest.mark.parametrize("make", [lambda: KeyLedger(), lambda: PartitionedKeyLedger([KeyLedger() for _ in range(3)])],
                         ids=["one", "partitioned"])
def test_claims_first_shard_wins_retry_keeps_its_keys_finished_keys_are_taken(make):
    ledger = make()
    ledger.add_finished(["done_a", "done_b"])
    assert ledger.claim("00001", ["x", "y", "done_a"]) == {"done_a"}
    assert ledger.claim("00002", ["y", "z"]) == {"y"}
    assert ledger.claim("00001", ["x", "y"]) == set()  # a retried shard gets its own claims back


def test_partitions_hold_a_share_of_the_keys():
    ledger = PartitionedKeyLedger([KeyLedger() for _ in range(4)])
    ledger.load([KEYS[:1000], KEYS[1000:1500]])  # per-shard lists, as FinishedKeys yields them
    ledger.claim("00009", KEYS[1500:])
    sizes = ledger.sizes()
    assert sum(sizes) == len(KEYS) and max(sizes) < len(KEYS) / 2


def test_finished_keys_are_read_shard_by_shard(tmp_path, record_factory):
    for name, keys in (("00000", ["a", "b"]), ("00001", ["c"])):
        with ShardWriter(tmp_path, name) as writer:
            for key in keys:
                writer.write(*record_factory(key))
            writer.write_error(f"bad{name}", "bad.jpg", "truncated: cut")
            writer.commit()
    assert list(FinishedKeys(tmp_path, ("00000", "00001"))) == [["a", "b"], ["c"]]
    assert taken_keys(tmp_path) == {"a", "b", "c"}


def test_remote_ledger_claims_from_ray_tasks_across_partitions():
    import ray

    from pipeline.ray_pool import start_ray

    owned = start_ray(RayConfig(num_cpus=2))
    try:
        ledger = RemoteKeyLedger([["old_1", "old_2"]], partitions=3)
        claim = ray.remote(num_cpus=0)(lambda led, shard, keys: led.claim(shard, keys))  # the ledger is pickled
        assert ray.get(claim.remote(ledger, "00001", ["old_1", "k1", "k2", "k3"])) == {"old_1"}
        assert ray.get(claim.remote(ledger, "00002", ["k2", "k9"])) == {"k2"}
        sizes = ledger.sizes()
        assert sum(sizes) == 6 and len(sizes) == 3
    finally:
        if owned:
            ray.shutdown()

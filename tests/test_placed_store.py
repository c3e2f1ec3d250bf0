"""The placed store: its ``--store`` values, reads that move past failing
members, replicated writes, and verify and repair of lost or moved copies.

Most tests run against in-memory member stores that fail on purpose. The
rest use three moto servers on 127.0.0.1 as the members: one is stopped
during a load through a real mount, wiped, and repaired.
"""

import collections
import contextlib
import gc
import hashlib
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import boto3
import pytest
import safetensors.torch
import torch
import trio

from conftest import Mount, free_port, needs_fuse, run_shardfs
from shardfs import codec
from shardfs.cli import build_parser
from shardfs.commands import store_config
from shardfs.config import MountConfig, RetryConfig, StoreConfig
from shardfs.errors import (
    ChunkCorrupt,
    ObjectInvalid,
    ObjectNotFound,
    StoreNotFound,
    StoreUnavailable,
    UsageError,
)
from shardfs.manifest import ChunkRef, parse_manifest
from shardfs.mount.chunk_source import ChunkSource
from shardfs.mount.listing import fetch_manifests
from shardfs.mount.memory_cache import MemoryCache
from shardfs.stores import open_store
from shardfs.stores.base import ObjectInfo, chunk_object_key, manifest_object_key
from shardfs.stores.local import LocalStore
from shardfs.stores.placed import MemberConfig, PlacedStore, PlacedStoreConfig

MIB = 1024 * 1024


# In-memory members.


class MemoryStore:
    """A member store in memory whose calls fail while `down` and block while `gate` is clear."""

    def __init__(self, url: str):
        self.url = url
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.down = False
        self.gate = threading.Event()
        self.gate.set()
        self.calls: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def _enter(self, call: str) -> None:
        with self._lock:
            self.calls[call] += 1
        self.gate.wait()
        if self.down:
            raise StoreUnavailable(self.url, "stopped by the test")

    def check(self) -> None:
        self._enter("check")

    def get(self, key: str) -> bytes:
        self._enter("get")
        if key not in self.objects:
            raise ObjectNotFound(key)
        return self.objects[key][0]

    def get_range(self, key: str, start: int, end: int) -> bytes:
        self._enter("get_range")
        if key not in self.objects:
            raise ObjectNotFound(key)
        return self.objects[key][0][start:end]

    def head(self, key: str) -> int | None:
        self._enter("head")
        item = self.objects.get(key)
        return None if item is None else len(item[0])

    def stat(self, key: str) -> ObjectInfo | None:
        self._enter("stat")
        item = self.objects.get(key)
        return None if item is None else ObjectInfo(key, len(item[0]), item[1])

    def put(self, key: str, data: bytes) -> None:
        self._enter("put")
        self.objects[key] = (data, time.time())

    def touch(self, key: str) -> None:
        self._enter("touch")
        if key not in self.objects:
            raise ObjectNotFound(key)
        self.objects[key] = (self.objects[key][0], time.time())

    def delete(self, key: str) -> None:
        self._enter("delete")
        self.objects.pop(key, None)

    def list(self, prefix: str):
        self._enter("list")
        return iter([key for key in self.objects if key.startswith(prefix)])

    def remove_partial_writes(self, cutoff: float, dry_run: bool = False) -> tuple[int, int]:
        self._enter("remove_partial_writes")
        return 0, 0

    def list_info(self, prefix: str):
        self._enter("list_info")
        items = [
            ObjectInfo(key, len(data), modified)
            for key, (data, modified) in self.objects.items()
            if key.startswith(prefix)
        ]
        return iter(items)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def memory_placed(count: int = 3, replicas: int = 2, clock=time.monotonic, **settings):
    stores = [MemoryStore(f"memory://member-{index}") for index in range(count)]
    members = tuple(MemberConfig(StoreConfig(url=store.url)) for store in stores)
    config = PlacedStoreConfig(members, replicas, **settings)
    return PlacedStore(config, stores, clock=clock), stores


def encoded_chunk(seed: int) -> codec.EncodedChunk:
    return codec.encode(hashlib.sha256(str(seed).encode()).digest() * 4096)


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# Command-line values.


def parse_store_arguments(*argv: str):
    args = build_parser().parse_args(argv)
    return store_config(args), args


def test_store_values_build_members():
    config, _ = parse_store_arguments(
        "ls",
        "--endpoint-url",
        "http://127.0.0.1:9000",
        "--store",
        "s3://alpha/root",
        "--store",
        "s3://beta,endpoint=http://127.0.0.1:9001,weight=2.5",
        "--store",
        "/srv/gamma,weight=0,id=gamma",
        "--replicas",
        "2",
    )
    assert isinstance(config, PlacedStoreConfig)
    assert config.replicas == 2
    alpha, beta, gamma = config.members
    assert alpha.store == StoreConfig("s3://alpha/root", "http://127.0.0.1:9000")
    assert alpha.weight == 1.0
    assert beta.store == StoreConfig("s3://beta", "http://127.0.0.1:9001")
    assert beta.weight == 2.5
    assert gamma.store == StoreConfig("/srv/gamma", None)
    assert gamma.weight == 0.0
    assert gamma.id == "gamma"


def test_store_values_default_replicas():
    config, _ = parse_store_arguments("gc", "--store", "/srv/a", "--store", "/srv/b")
    assert config.replicas == 2


def test_single_store_value_is_plain_store():
    config, _ = parse_store_arguments(
        "push", "--store", "s3://alpha,endpoint=http://127.0.0.1:9001", "source", "org/m"
    )
    assert config == StoreConfig("s3://alpha", "http://127.0.0.1:9001")


@pytest.mark.parametrize(
    "argv",
    [("ls",), ("gc",), ("verify", "org/a"), ("rm", "org/a"), ("repair",),
     ("push", "source", "org/a")],
    ids=lambda argv: argv[0],
)
def test_single_store_value_every_command(argv):
    command, *rest = argv
    config, _ = parse_store_arguments(command, "--store", "/srv/a,weight=2", *rest)
    assert config == StoreConfig("/srv/a")


def test_verify_names_after_store_values():
    config, args = parse_store_arguments(
        "verify", "--store", "/srv/a", "--store", "/srv/b", "org/a", "org/b"
    )
    assert isinstance(config, PlacedStoreConfig)
    assert args.names == ["org/a", "org/b"]


def test_rm_name_after_store_values():
    config, args = parse_store_arguments("rm", "--store", "/srv/a", "--store", "/srv/b", "org/a")
    assert isinstance(config, PlacedStoreConfig)
    assert args.name == "org/a"


@pytest.mark.parametrize(
    "argv, message",
    [
        (("ls",), "missing store"),
        (("ls", "/srv/x", "--store", "/srv/a"), "store given twice, as STORE '/srv/x'"),
        (("ls", "--store", "/srv/a", "--store", ",weight=1"), "',weight=1': the URL is empty"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b,weight"), "'/srv/b,weight': option 'weight' is not NAME=VALUE"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b,weight=heavy"), "weight 'heavy' is not a number"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b,weight=-1"), "weight '-1' is not a number >= 0"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b,weight=inf"), "weight 'inf' is not a number"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b,size=2"), "unknown option 'size'"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b,weight=1,weight=2"), "option 'weight' is given twice"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b,endpoint=http://h"), "endpoint= applies only to s3://"),
        (("ls", "--store", "s3://a", "--store", "s3://b,endpoint=h:9"), "endpoint 'h:9' is not an http://"),
        (("ls", "--store", "/srv/a", "--store", "file:///srv/a"), "'/srv/a' and 'file:///srv/a' are the same store listed twice"),
        (("ls", "--store", "/srv/a,id=x", "--store", "/srv/a/,id=y"), "are the same store listed twice"),
        (("ls", "--store", "s3://a/p", "--store", "s3://a/p/"), "are the same store listed twice"),
        (("ls", "--store", "s3://a/", "--store", "s3://a,endpoint=http://h"), "different stores with the same placement id 's3://a'; give them distinct ids"),
        (("ls", "--store", "/srv/a,id=x", "--store", "/srv/b,id=x"), "different stores with the same placement id 'x'"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b", "--replicas", "3"), "invalid --replicas 3: expected 1 to 2, because there are 2 --store values with a positive weight"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b", "--replicas", "0"), "invalid --replicas 0: expected at least 1"),
        (("ls", "--store", "/srv/a", "--store", "/srv/b,weight=0"), "the default of 2 replicas needs at least 2 members with a positive weight, but there is 1 --store value"),
        (("ls", "--store", "/srv/a,weight=0", "--store", "/srv/b,weight=0", "--replicas", "1"), "no --store value has a positive weight"),
        (("ls", "--store", "/srv/a", "--replicas", "2"), "a single store keeps one copy"),
        (("ls", "/srv/a", "--replicas", "2"), "a single store keeps one copy"),
    ],
)
def test_invalid_store_values_rejected(argv, message):
    with pytest.raises(UsageError) as raised:
        parse_store_arguments(*argv)
    assert message in str(raised.value)


def test_invalid_store_value_exit_status(tmp_path):
    result = run_shardfs("ls", "--store", str(tmp_path), "--store", f"{tmp_path}/b,weight=x")
    assert result.returncode == 2
    assert result.stderr.startswith(f"shardfs: error: invalid --store value '{tmp_path}/b,weight=x'")
    assert "URL[,endpoint=http://HOST:PORT][,weight=N][,id=NAME]" in result.stderr


# Reads.


def test_chunk_read_from_first_of_placement():
    store, members = memory_placed()
    chunk = encoded_chunk(1)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    first = store.placement(chunk.key)[0]
    assert store.get(key) == chunk.data
    assert members[first.index].calls["get"] == 1
    assert sum(member.calls["get"] for member in members) == 1


def test_read_moves_past_failed_member():
    store, members = memory_placed(failure_threshold=3)
    chunk = encoded_chunk(2)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    first, second = store.placement(chunk.key)
    members[first.index].down = True
    for _ in range(3):
        assert store.get(key) == chunk.data
    assert members[first.index].calls["get"] == 3
    assert members[second.index].calls["get"] == 3

    # Three failures in a row: the member is tried last from now on.
    assert store.get(key) == chunk.data
    assert members[first.index].calls["get"] == 3
    assert members[second.index].calls["get"] == 4


def test_unhealthy_member_probed_before_use():
    clock = FakeClock()
    store, members = memory_placed(clock=clock, failure_threshold=1, unhealthy_s=30.0)
    chunk = encoded_chunk(3)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    first = store.placement(chunk.key)[0]
    failing = members[first.index]
    failing.down = True
    store.get(key)
    failing.down = False

    clock.now += 29
    store.get(key)
    assert failing.calls["get"] == 1
    assert failing.calls["check"] == 0

    clock.now += 2
    store.get(key)
    assert wait_for(lambda: failing.calls["check"] == 1)
    assert failing.calls["get"] == 1
    # Once the probe passed, the member is first again.
    assert wait_for(lambda: store.get(key) and failing.calls["get"] == 2)


def test_failed_probe_keeps_member_last():
    clock = FakeClock()
    store, members = memory_placed(clock=clock, failure_threshold=1, unhealthy_s=30.0)
    chunk = encoded_chunk(4)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    failing = members[store.placement(chunk.key)[0].index]
    failing.down = True
    store.get(key)

    clock.now += 31
    store.get(key)
    assert wait_for(lambda: failing.calls["check"] == 1)
    time.sleep(0.05)
    failing.down = False
    clock.now += 10
    store.get(key)
    assert failing.calls["check"] == 1
    assert failing.calls["get"] == 1


def chunks_first_on(store: PlacedStore, index: int, count: int) -> list[codec.EncodedChunk]:
    """Return *count* chunks whose placement starts with member *index*, put into *store*."""
    chunks = []
    seed = 100
    while len(chunks) < count:
        chunk = encoded_chunk(seed)
        seed += 1
        if store.placement(chunk.key)[0].index == index:
            store.put(chunk_object_key(chunk.key), chunk.data)
            chunks.append(chunk)
    return chunks


def test_moved_member_directory_marked_unhealthy(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="shardfs.stores.placed")
    clock = FakeClock()
    stores = [LocalStore(str(tmp_path / name)) for name in ("a", "b")]
    members = tuple(
        MemberConfig(StoreConfig(url=store.url), id=name) for store, name in zip(stores, "ab")
    )
    config = PlacedStoreConfig(members, 2, failure_threshold=3, unhealthy_s=30.0)
    store = PlacedStore(config, stores, clock=clock)
    chunks = chunks_first_on(store, 0, 4)
    os.rename(tmp_path / "a", tmp_path / "a.moved")

    for chunk in chunks:
        assert store.get(chunk_object_key(chunk.key)) == chunk.data
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"store member {stores[0].url} (id a) failed 3 times in a row" in warnings[0]
    assert "no such directory" in warnings[0]
    assert store.failovers == 4
    assert store.unhealthy_members() == 1

    # Once back, the member passes its probe and is read first again.
    os.rename(tmp_path / "a.moved", tmp_path / "a")
    clock.now += 31
    store.get(chunk_object_key(chunks[0].key))
    assert wait_for(lambda: store.unhealthy_members() == 0)

    # The probe thread logs its line just after it marks the member healthy.
    def recovered_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "passed its probe" in r.getMessage()]

    assert wait_for(lambda: recovered_lines())
    recovered = recovered_lines()
    assert len(recovered) == 1, recovered
    assert recovered[0].startswith(f"store member {stores[0].url} (id a)")
    assert store.get(chunk_object_key(chunks[1].key)) == chunks[1].data
    assert store.failovers == 5


def test_failover_counts_reads_elsewhere():
    store, members = memory_placed(failure_threshold=100)
    chunks = chunks_first_on(store, 0, 3)
    assert store.get(chunk_object_key(chunks[0].key)) == chunks[0].data
    assert store.failovers == 0
    members[0].down = True
    for chunk in chunks:
        assert store.get(chunk_object_key(chunk.key)) == chunk.data
    assert store.failovers == 3


def test_unhealthy_warning_is_rate_limited(caplog):
    caplog.set_level(logging.INFO, logger="shardfs.stores.placed")
    clock = FakeClock()
    store, members = memory_placed(clock=clock, failure_threshold=1, unhealthy_s=10.0)
    (chunk,) = chunks_first_on(store, 0, 1)
    key = chunk_object_key(chunk.key)
    members[0].down = True
    store.get(key)
    # The member recovers, passes its probe, and fails again soon after.
    members[0].down = False
    clock.now += 11
    store.get(key)
    assert wait_for(lambda: store.unhealthy_members() == 0)
    members[0].down = True
    store.get(key)
    assert store.unhealthy_members() == 1

    marked = [r for r in caplog.records if "times in a row" in r.getMessage()]
    assert [r.levelno for r in marked] == [logging.WARNING, logging.INFO]
    clock.now += 60
    members[0].down = False
    store.get(key)
    assert wait_for(lambda: store.unhealthy_members() == 0)
    members[0].down = True
    store.get(key)
    marked = [r for r in caplog.records if "times in a row" in r.getMessage()]
    assert [r.levelno for r in marked] == [logging.WARNING, logging.INFO, logging.WARNING]


def test_slow_member_is_hedged():
    store, members = memory_placed(hedge_after_s=0.05)
    chunk = encoded_chunk(5)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    first, second = store.placement(chunk.key)
    members[first.index].gate.clear()
    try:
        started = time.monotonic()
        assert store.get(key) == chunk.data
        elapsed = time.monotonic() - started
    finally:
        members[first.index].gate.set()
    assert members[second.index].calls["get"] == 1
    assert elapsed < 5


def test_missing_everywhere_raises_not_found():
    store, members = memory_placed()
    with pytest.raises(ObjectNotFound):
        store.get(chunk_object_key("ab" * 16))
    assert all(member.calls["get"] == 1 for member in members)


def test_missing_and_down_raises_unavailable():
    store, members = memory_placed()
    members[1].down = True
    with pytest.raises(StoreUnavailable, match="memory://member-1"):
        store.get(chunk_object_key("ab" * 16))


def test_every_member_down_raises_unavailable():
    store, members = memory_placed()
    for member in members:
        member.down = True
    with pytest.raises(StoreUnavailable):
        store.get(chunk_object_key("ab" * 16))


def test_chunk_missing_in_placement_read_elsewhere():
    store, members = memory_placed()
    chunk = encoded_chunk(6)
    key = chunk_object_key(chunk.key)
    outside = store.rank(chunk.key)[2]
    members[outside.index].put(key, chunk.data)
    assert store.get(key) == chunk.data


def test_bad_copy_report_skips_member():
    store, members = memory_placed()
    chunk = encoded_chunk(7)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    first, second = store.placement(chunk.key)
    damaged = bytearray(chunk.data)
    damaged[-1] ^= 0xFF
    members[first.index].objects[key] = (bytes(damaged), time.time())

    assert store.get(key) == bytes(damaged)
    assert store.report_bad_copy(key) is True
    assert store.get(key) == chunk.data
    assert members[second.index].calls["get"] == 1
    # The member stays last for that key only.
    assert store.get(key) == chunk.data
    assert members[first.index].calls["get"] == 1


def _chunk_with_fifo_first_copy(tmp_path, seed: int):
    """Put a chunk on two local members and replace its first copy with a FIFO.

    Returns the store, the chunk, its object key and its placement.
    """
    stores = [LocalStore(str(tmp_path / name)) for name in ("a", "b")]
    members = tuple(MemberConfig(StoreConfig(url=store.url)) for store in stores)
    store = PlacedStore(PlacedStoreConfig(members, 2, failure_threshold=1), stores)
    chunk = encoded_chunk(seed)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    placement = store.placement(chunk.key)
    path = os.path.join(placement[0].store.root, key)
    os.unlink(path)
    os.mkfifo(path)
    return store, chunk, key, placement


def test_fifo_copy_read_from_other_member(tmp_path):
    store, chunk, key, (first, _) = _chunk_with_fifo_first_copy(tmp_path, 21)

    assert store.get(key) == chunk.data
    # A damaged object is no outage of its member.
    assert first.health.healthy(first.store.check)


def test_fifo_copy_and_missing_copy_fail_at_once(tmp_path):
    store, _, key, (_, second) = _chunk_with_fifo_first_copy(tmp_path, 22)
    os.unlink(os.path.join(second.store.root, key))

    # Both members responded, so this is damage to report, not an outage
    # to wait out.
    with pytest.raises(ObjectInvalid):
        store.get(key)


def test_bad_copy_report_unknown_key():
    store, _ = memory_placed()
    assert store.report_bad_copy(chunk_object_key("cd" * 16)) is False


def test_every_copy_reported_still_read():
    store, members = memory_placed(count=2)
    chunk = encoded_chunk(8)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    for _ in range(2):
        store.get(key)
        assert store.report_bad_copy(key)
    assert store.get(key) == chunk.data


# Writes, listings and checks.


def test_put_writes_chunk_to_placement():
    store, members = memory_placed(count=4)
    chunk = encoded_chunk(9)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    holders = {index for index, member in enumerate(members) if key in member.objects}
    assert holders == {member.index for member in store.placement(chunk.key)}


def test_put_skips_member_with_copy():
    store, members = memory_placed()
    chunk = encoded_chunk(10)
    key = chunk_object_key(chunk.key)
    first, second = store.placement(chunk.key)
    members[first.index].put(key, chunk.data)
    members[first.index].calls.clear()

    store.put(key, chunk.data)
    assert members[first.index].calls["put"] == 0
    assert members[first.index].calls["touch"] == 1
    assert members[second.index].calls["put"] == 1


def test_put_replaces_copy_of_other_size():
    store, members = memory_placed()
    chunk = encoded_chunk(11)
    key = chunk_object_key(chunk.key)
    first = store.placement(chunk.key)[0]
    members[first.index].put(key, chunk.data[:-1])
    store.put(key, chunk.data)
    assert members[first.index].objects[key][0] == chunk.data


def test_head_needs_every_copy():
    store, members = memory_placed()
    chunk = encoded_chunk(12)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    assert store.head(key) == len(chunk.data)
    second = store.placement(chunk.key)[1]
    members[second.index].delete(key)
    assert store.head(key) is None


def test_touch_reports_missing_copy():
    store, members = memory_placed()
    chunk = encoded_chunk(13)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    second = store.placement(chunk.key)[1]
    members[second.index].delete(key)
    with pytest.raises(ObjectNotFound):
        store.touch(key)


def test_manifest_written_everywhere_read_first():
    store, members = memory_placed()
    key = manifest_object_key("org/m")
    store.put(key, b"{}")
    assert all(key in member.objects for member in members)
    assert store.get(key) == b"{}"
    assert members[0].calls["get"] == 1
    members[0].down = True
    assert store.get(key) == b"{}"
    assert members[1].calls["get"] == 1


def test_manifest_missing_on_first_member_read_next():
    store, members = memory_placed()
    key = manifest_object_key("org/m")
    members[1].put(key, b"{}")
    assert store.get(key) == b"{}"
    assert store.head(key) == 2
    assert store.stat(key).size == 2


def test_listing_skips_invalid_member_manifest(tmp_path):
    values = local_members(tmp_path, 3)
    push_new_model(values, tmp_path, 1)
    store = placed_from_values(values)
    key = manifest_object_key("org/m")
    good = store.members[1].store.get(key)
    with open(os.path.join(values[0], key), "r+b") as file:
        file.truncate(100)

    manifests, unavailable = fetch_manifests(store)
    assert manifests == {"org/m": good}
    assert unavailable == set()


def test_ls_and_verify_use_valid_member_manifest(tmp_path):
    values = local_members(tmp_path, 3)
    push_new_model(values, tmp_path, 1)
    with open(os.path.join(values[0], manifest_object_key("org/m")), "r+b") as file:
        file.write(b"{{")

    listed = run_shardfs("ls", *store_arguments(values))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert listed.stdout.startswith("org/m\t1 file\t")
    verified = run_shardfs("verify", *store_arguments(values))
    assert verified.returncode == 1
    lines = verified.stdout.splitlines()
    assert f"an invalid one on {values[0]} (not valid JSON" in lines[0]
    assert lines[-1].endswith(": 1 model with different manifests on members")


def test_write_tries_every_member_then_raises():
    store, members = memory_placed()
    members[0].down = True
    key = manifest_object_key("org/m")
    with pytest.raises(StoreUnavailable, match="memory://member-0"):
        store.put(key, b"{}")
    assert key in members[1].objects
    assert key in members[2].objects


def test_chunk_listing_covers_every_member():
    store, members = memory_placed()
    members[0].objects["chunks/aa/a1"] = (b"x", 100.0)
    members[1].objects["chunks/aa/a1"] = (b"x", 200.0)
    members[2].objects["chunks/bb/b1"] = (b"yy", 50.0)
    members[2].objects["models/org/m/manifest.json"] = (b"{}", 10.0)
    infos = {info.key: info for info in store.list_info("chunks/")}
    assert set(infos) == {"chunks/aa/a1", "chunks/bb/b1"}
    assert infos["chunks/aa/a1"].modified == 200.0
    assert sorted(store.list("")) == ["chunks/aa/a1", "chunks/bb/b1", "models/org/m/manifest.json"]
    assert store.stat("chunks/aa/a1").modified == 200.0


def test_manifest_listing_merges_members():
    store, members = memory_placed()
    members[0].objects["models/org/a/manifest.json"] = (b"{}", 1.0)
    members[1].objects["models/org/b/manifest.json"] = (b"{}", 1.0)
    assert sorted(store.list("models/")) == [
        "models/org/a/manifest.json",
        "models/org/b/manifest.json",
    ]
    members[0].down = True
    assert list(store.list("models/")) == ["models/org/b/manifest.json"]
    for member in members:
        member.down = True
    with pytest.raises(StoreUnavailable):
        list(store.list("models/"))


def test_manifest_listing_skips_hung_member():
    store, members = memory_placed(hedge_after_s=0.05)
    members[1].objects["models/org/b/manifest.json"] = (b"{}", 1.0)
    members[0].gate.clear()
    try:
        assert list(store.list("models/")) == ["models/org/b/manifest.json"]
    finally:
        members[0].gate.set()


def test_delete_removes_misplaced_copies():
    store, members = memory_placed()
    for member in members:
        member.objects["chunks/aa/a1"] = (b"x", 1.0)
    store.delete("chunks/aa/a1")
    assert all("chunks/aa/a1" not in member.objects for member in members)


def test_check_passes_with_one_member():
    store, members = memory_placed()
    members[0].down = True
    members[1].down = True
    store.check()
    members[2].down = True
    with pytest.raises(StoreUnavailable):
        store.check()


def test_check_raises_member_error_when_alike():
    failing = [MemoryStore("memory://a"), MemoryStore("memory://b")]

    def missing_bucket():
        raise StoreNotFound("memory://a", "no bucket")

    for member in failing:
        member.check = missing_bucket
    members = tuple(MemberConfig(StoreConfig(url=member.url)) for member in failing)
    store = PlacedStore(PlacedStoreConfig(members, 1), failing)
    with pytest.raises(StoreNotFound):
        store.check()


# Local directories as members, through the command line.


def write_model(path, seed: int, elements: int = 300_000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "embed": torch.randn(elements, generator=generator),
        "head": torch.randn(elements // 3, generator=generator).to(torch.bfloat16),
    }
    safetensors.torch.save_file(tensors, str(path))
    return tensors


def damage_file(path: str) -> None:
    """Flip the bits of the middle byte of the file at *path*, keeping its size."""
    with open(path, "r+b") as file:
        data = bytearray(file.read())
        data[len(data) // 2] ^= 0xFF
        file.seek(0)
        file.write(data)


def local_members(tmp_path, count: int) -> list[str]:
    paths = []
    for index in range(count):
        path = tmp_path / f"member-{index}"
        path.mkdir()
        paths.append(str(path))
    return paths


def store_arguments(values: list[str]) -> list[str]:
    arguments = []
    for value in values:
        arguments += ["--store", value]
    return arguments


def push_new_model(
    values: list[str], tmp_path, seed: int, elements: int = 300_000, chunk_size: str = "64KiB"
) -> str:
    """Write a model file, push it as org/m to the members *values*, return its path."""
    source = str(tmp_path / "model.safetensors")
    write_model(source, seed, elements)
    arguments = [*store_arguments(values), "--chunk-size", chunk_size, source, "org/m"]
    result = run_shardfs("push", *arguments)
    assert result.returncode == 0, result.stderr
    return source


def placed_from_values(values: list[str], replicas: int = 2) -> PlacedStore:
    config, _ = parse_store_arguments("ls", *store_arguments(values), "--replicas", str(replicas))
    return open_store(config)


def named_chunks(store, name: str) -> dict[str, int]:
    manifest = parse_manifest(name, store.get(manifest_object_key(name)))
    return {chunk.key: chunk.length for entry in manifest.files for chunk in entry.chunks}


def holders_of(store: PlacedStore, key: str) -> set[int]:
    object_key = chunk_object_key(key)
    return {member.index for member in store.members if member.store.head(object_key) is not None}


def placement_of(store: PlacedStore, key: str) -> set[int]:
    return {member.index for member in store.placement(key)}


@pytest.mark.parametrize("command", ["push", "gc", "verify", "mount"])
def test_nested_members_rejected(tmp_path, command):
    outer = tmp_path / "outer"
    inner = outer / "retired"
    inner.mkdir(parents=True)
    arguments = store_arguments([str(outer), str(inner)])
    if command == "push":
        source = tmp_path / "w.bin"
        source.write_bytes(b"weights")
        arguments += [str(source), "org/m"]
    elif command == "mount":
        (tmp_path / "mnt").mkdir()
        arguments += ["--cache-dir", str(tmp_path / "cache"), str(tmp_path / "mnt")]
    result = run_shardfs(command, *arguments, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"shardfs: error: store members {outer} and {inner} overlap; give each member a "
        "directory of its own"
    )
    assert os.listdir(inner) == []


def test_push_and_gc_local_members(tmp_path):
    values = local_members(tmp_path, 3)
    push_new_model(values, tmp_path, 1)
    arguments = store_arguments(values)
    store = placed_from_values(values)
    chunks = named_chunks(store, "org/m")
    assert len(chunks) > 10
    for key in chunks:
        assert holders_of(store, key) == placement_of(store, key)
    for member in store.members:
        assert member.store.head(manifest_object_key("org/m")) is not None

    listed = run_shardfs("ls", *arguments)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("org/m\t1 file\t")

    # A put killed midway on one member left its temporary file.
    partial = os.path.join(store.members[1].store.root, "chunks", "00", ".tmp-killed")
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    with open(partial, "wb") as file:
        file.write(b"half")

    removed = run_shardfs("rm", *arguments, "org/m")
    assert removed.returncode == 0, removed.stderr
    collected = run_shardfs("gc", *arguments, "--grace", "0")
    assert collected.returncode == 0, collected.stderr
    assert "and 1 partial write of interrupted pushes (4 B)" in collected.stdout
    assert not os.path.exists(partial)
    for member in store.members:
        assert list(member.store.list("chunks/")) == []
        assert list(member.store.list("models/")) == []


def diverged_members(tmp_path) -> tuple[list[str], PlacedStore, dict, dict]:
    """Push two versions of org/m to three members, and leave the last
    member with the first version's manifest, as two pushes that ran at
    once can. Returns the members, the store and each version's chunks."""
    values = local_members(tmp_path, 3)
    push_new_model(values, tmp_path, 1)
    store = placed_from_values(values)
    old_chunks = named_chunks(store, "org/m")
    lagging = os.path.join(values[2], manifest_object_key("org/m"))
    with open(lagging, "rb") as file:
        old_manifest = file.read()
    push_new_model(values, tmp_path, 2)
    new_chunks = named_chunks(store, "org/m")
    with open(lagging, "wb") as file:
        file.write(old_manifest)
    return values, store, old_chunks, new_chunks


def test_gc_keeps_chunks_of_every_member_manifest(tmp_path):
    # A reader given the lagging member first is served the old version.
    values, store, old_chunks, _ = diverged_members(tmp_path)

    collected = run_shardfs("gc", *store_arguments(values), "--grace", "0")
    assert collected.returncode == 0, collected.stderr
    for key in old_chunks:
        assert holders_of(store, key) == placement_of(store, key), key
    lagging_first = [values[2], values[0], values[1]]
    verified = run_shardfs("verify", *store_arguments(lagging_first), "org/m")
    assert "missing" not in verified.stdout
    # verify names the members that differ and checks both versions.
    assert verified.returncode == 1
    lines = verified.stdout.splitlines()
    assert lines[0].startswith("org/m: store members hold different manifests: one created ")
    assert f"on {values[0]}, {values[1]}" in lines[0]
    assert f"on {values[2]}" in lines[0]
    assert "shardfs repair copies the newest" in lines[0]
    assert lines[-1].endswith(": 1 model with different manifests on members")

    repaired = run_shardfs("repair", *store_arguments(values))
    assert repaired.returncode == 0, repaired.stdout
    agreed = run_shardfs("verify", *store_arguments(values), "org/m")
    assert agreed.returncode == 0, agreed.stdout


def _age_objects(values: list[str], seconds: float) -> None:
    for value in values:
        for directory, _, names in os.walk(value):
            for name in names:
                path = os.path.join(directory, name)
                info = os.stat(path)
                os.utime(path, (info.st_atime - seconds, info.st_mtime - seconds))


@pytest.mark.parametrize("replace", ["rm", "repair"])
def test_replacing_diverged_manifests_retires_each(tmp_path, replace):
    values, store, old_chunks, new_chunks = diverged_members(tmp_path)
    # Everything is old, so only the retired copies that rm or repair
    # write now keep chunks from gc.
    _age_objects(values, 7200)

    if replace == "rm":
        replaced = run_shardfs("rm", *store_arguments(values), "org/m")
    else:
        replaced = run_shardfs("repair", *store_arguments(values))
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    collected = run_shardfs("gc", *store_arguments(values), "--grace", "1h")
    assert collected.returncode == 0, collected.stderr

    for key in {**old_chunks, **new_chunks}:
        assert holders_of(store, key) == placement_of(store, key), key


@pytest.mark.parametrize("damage", ["flip", "fifo"])
def test_push_check_existing_replaces_every_bad_copy(tmp_path, damage):
    values = local_members(tmp_path, 2)
    source = push_new_model(values, tmp_path, 1)
    store = placed_from_values(values)
    key = sorted(named_chunks(store, "org/m"))[0]
    object_key = chunk_object_key(key)
    for member in store.members:
        path = os.path.join(member.store.root, object_key)
        if damage == "flip":
            with open(path, "rb") as file:
                data = bytearray(file.read())
            data[-1] ^= 0xFF
            with open(path, "wb") as file:
                file.write(data)
        else:
            os.unlink(path)
            os.mkfifo(path)

    broken = run_shardfs("verify", *store_arguments(values), timeout=60)
    assert broken.returncode == 1
    assert "0 of 2 copies good" in broken.stdout
    assert "push the model again from its original files with --check-existing" in broken.stdout

    arguments = [*store_arguments(values), "--chunk-size", "64KiB", "--check-existing"]
    pushed = run_shardfs("push", *arguments, source, "org/m")
    assert pushed.returncode == 0, pushed.stderr
    repaired = run_shardfs("verify", *store_arguments(values))
    assert repaired.returncode == 0, repaired.stdout


@pytest.mark.parametrize("copies", [1, 2], ids=["one-copy", "every-copy"])
def test_plain_push_replaces_damaged_headers(tmp_path, copies):
    values = local_members(tmp_path, 2)
    source = push_new_model(values, tmp_path, 1)
    store = placed_from_values(values)
    key = sorted(named_chunks(store, "org/m"))[0]
    object_key = chunk_object_key(key)
    # A flipped magic byte keeps the size, so only the header shows it.
    for member in store.placement(key)[:copies]:
        path = os.path.join(member.store.root, object_key)
        with open(path, "r+b") as file:
            file.write(b"X")

    pushed = run_shardfs("push", *store_arguments(values), "--chunk-size", "64KiB", source, "org/m")
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stderr.count("replacing the copy of chunk") == copies
    repaired = run_shardfs("verify", *store_arguments(values))
    assert repaired.returncode == 0, repaired.stdout


def test_repair_moves_chunks_to_added_member(tmp_path):
    values = local_members(tmp_path, 4)
    push_new_model(values[:3], tmp_path, 2)

    grown = placed_from_values(values)
    chunks = named_chunks(grown, "org/m")
    dry = run_shardfs("repair", *store_arguments(values), "--dry-run")
    assert dry.returncode == 0, dry.stdout
    assert all(holders_of(grown, key) != {3} for key in chunks)

    repaired = run_shardfs("repair", *store_arguments(values))
    assert repaired.returncode == 0, repaired.stdout
    moved = sum(3 in placement_of(grown, key) for key in chunks)
    # Each chunk whose placement gained the new member moved one copy.
    assert f"copied {moved} copies" in repaired.stdout
    assert f"deleted {moved} misplaced" in repaired.stdout
    assert "copied 1 manifest;" in repaired.stdout
    for key in chunks:
        assert holders_of(grown, key) == placement_of(grown, key)
    # The new member takes about a quarter of the copies.
    assert 0.1 < moved / len(chunks) / 2 < 0.45

    verified = run_shardfs("verify", *store_arguments(values))
    assert verified.returncode == 0, verified.stdout
    assert verified.stdout.strip().endswith("all good")


def test_repair_leaves_other_retired_objects(tmp_path):
    values = local_members(tmp_path, 2)
    push_new_model(values, tmp_path, 5)
    store = placed_from_values(values)
    notes = os.path.join(store.members[0].store.root, "retired", "notes.txt")
    os.makedirs(os.path.dirname(notes), exist_ok=True)
    with open(notes, "w") as file:
        file.write("not a manifest\n")

    repaired = run_shardfs("repair", *store_arguments(values))
    assert repaired.returncode == 0, repaired.stdout
    assert "notes.txt" not in repaired.stdout
    assert os.path.isfile(notes)
    other_member = os.path.join(store.members[1].store.root, "retired", "notes.txt")
    assert not os.path.exists(other_member)


def test_repair_drains_zero_weight_member(tmp_path):
    values = local_members(tmp_path, 3)
    push_new_model(values, tmp_path, 3)
    drained = values[:2] + [values[2] + ",weight=0"]
    repaired = run_shardfs("repair", *store_arguments(drained))
    assert repaired.returncode == 0, repaired.stdout
    assert list(placed_from_values(values).members[2].store.list("chunks/")) == []


def test_repair_single_store_rejected(tmp_path):
    result = run_shardfs("repair", str(tmp_path))
    assert result.returncode == 2
    assert "repair needs several --store values" in result.stderr


def test_verify_and_repair_corrupt_copy(tmp_path):
    values = local_members(tmp_path, 3)
    push_new_model(values, tmp_path, 4)
    store = placed_from_values(values)
    key, length = next(iter(named_chunks(store, "org/m").items()))
    object_key = chunk_object_key(key)
    first = store.placement(key)[0]
    damage_file(os.path.join(values[first.index], object_key))

    verified = run_shardfs("verify", *store_arguments(values))
    assert verified.returncode == 1
    problems = [line for line in verified.stdout.splitlines() if key in line]
    assert len(problems) == 1
    assert f"is corrupt on {values[first.index]}:" in problems[0]
    assert "1 of 2 copies good" in problems[0]
    assert problems[0].endswith("; shardfs repair --check-content restores it")

    # A reader that finds the copy corrupt reports it and reads the other.
    copy = store.get(object_key)
    with pytest.raises(ChunkCorrupt):
        codec.decode(key, length, copy)
    assert store.report_bad_copy(object_key)
    codec.decode(key, length, store.get(object_key))

    # A listed copy of the right size is trusted unless content is checked.
    quick = run_shardfs("repair", *store_arguments(values))
    assert quick.returncode == 0, quick.stdout
    assert "copied 0 copies" in quick.stdout
    deep = run_shardfs("repair", *store_arguments(values), "--check-content")
    assert deep.returncode == 0, deep.stdout
    assert "copied 1 copy " in deep.stdout
    again = run_shardfs("verify", *store_arguments(values))
    assert again.returncode == 0, again.stdout


def test_verify_hint_for_missing_copy(tmp_path):
    values = local_members(tmp_path, 3)
    push_new_model(values, tmp_path, 8)
    store = placed_from_values(values)
    key = next(iter(named_chunks(store, "org/m")))
    first = store.placement(key)[0]
    os.unlink(os.path.join(values[first.index], chunk_object_key(key)))

    verified = run_shardfs("verify", *store_arguments(values))
    assert verified.returncode == 1
    problems = [line for line in verified.stdout.splitlines() if key in line]
    assert len(problems) == 1
    assert f"is missing on {values[first.index]}:" in problems[0]
    assert problems[0].endswith("; shardfs repair restores it")


def test_repair_help_states_exit_status():
    result = run_shardfs("repair", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Exit status 0 means that every chunk a manifest names now has a copy" in text
    assert "a corrupt copy of the right size can remain at exit status 0" in text
    assert "repair --check-content to check content" in text
    assert "Exit status 1 means" in text


def test_repair_reports_lost_chunk(tmp_path):
    values = local_members(tmp_path, 3)
    push_new_model(values, tmp_path, 5)
    store = placed_from_values(values)
    key = next(iter(named_chunks(store, "org/m")))
    store.delete(chunk_object_key(key))

    repaired = run_shardfs("repair", *store_arguments(values))
    assert repaired.returncode == 1
    expected = f"org/m/model.safetensors: chunk {key} has no good copy on any member"
    assert expected in repaired.stdout
    assert "1 chunk lost" in repaired.stdout


def missing_bucket_member(moto_endpoint: str) -> str:
    return f"s3://missing-{uuid.uuid4().hex[:12]}/x,endpoint={moto_endpoint},id=s3"


@pytest.mark.parametrize("pushed", [False, True], ids=["empty", "with-model"])
def test_verify_fails_on_unlisted_member(tmp_path, moto_endpoint, pushed):
    values = [f"{path},id=local-{index}" for index, path in enumerate(local_members(tmp_path, 2))]
    if pushed:
        push_new_model(values, tmp_path, 6)
    values.append(missing_bucket_member(moto_endpoint))

    verified = run_shardfs("verify", *store_arguments(values))
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert verified.stdout == ""
    lines = verified.stderr.splitlines()
    assert len(lines) == 1, verified.stderr
    assert lines[0].startswith("shardfs: error: cannot verify: store member s3://missing-")
    assert "id s3" in lines[0]
    assert "does not exist" in lines[0]


def test_ls_reports_unlisted_member(tmp_path, moto_endpoint):
    values = local_members(tmp_path, 2)
    push_new_model(values, tmp_path, 7)
    values.append(missing_bucket_member(moto_endpoint))

    listed = run_shardfs("ls", *store_arguments(values))
    assert listed.returncode == 1, listed.stdout + listed.stderr
    assert listed.stdout.startswith("org/m\t1 file\t")
    errors = [line for line in listed.stderr.splitlines() if line.startswith("shardfs: error:")]
    assert len(errors) == 1, listed.stderr
    assert "store member s3://missing-" in errors[0]
    assert "id s3" in errors[0]
    assert "WARNING" not in listed.stderr


# Three moto servers as members.


class MotoServer:
    """A moto S3 server on a fixed loopback port that the test can stop and start."""

    def __init__(self, log_path: str):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        client = self.client()
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"moto server exited: {open(self.log_path).read()}")
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server on port {self.port} did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint)


@pytest.fixture(scope="module")
def moto_servers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moto-members")
    servers = [MotoServer(str(directory / f"server-{index}.log")) for index in range(3)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def s3_members(moto_servers):
    """A fresh bucket on each moto server, as ``--store`` values."""
    for server in moto_servers:
        if not server.running():
            server.start()
    values = []
    for index, server in enumerate(moto_servers):
        bucket = f"member-{index}-{uuid.uuid4().hex[:10]}"
        server.client().create_bucket(Bucket=bucket)
        values.append(f"s3://{bucket}/root,endpoint={server.endpoint}")
    return values


def placed_config_from_values(values: list[str], **settings) -> PlacedStoreConfig:
    config, _ = parse_store_arguments("ls", *store_arguments(values))
    return PlacedStoreConfig(config.members, config.replicas, config.max_connections, **settings)


def test_push_places_chunks_on_s3_members(s3_members, tmp_path):
    push_new_model(s3_members, tmp_path, 6, 1_000_000, chunk_size="1MiB")
    store = open_store(placed_config_from_values(s3_members))
    chunks = named_chunks(store, "org/m")
    assert len(chunks) >= 4
    for key in chunks:
        assert holders_of(store, key) == placement_of(store, key)
    for member in store.members:
        assert member.store.head(manifest_object_key("org/m")) is not None

    source = str(tmp_path / "model.safetensors")
    again = run_shardfs("push", *store_arguments(s3_members), "--chunk-size", "1MiB", source, "org/m")
    assert again.returncode == 0, again.stderr
    assert "0 B uploaded" in again.stderr
    assert f"({len(chunks)} already present)" in again.stderr


def test_hung_member_is_hedged(s3_members, moto_servers, tmp_path):
    push_new_model(s3_members, tmp_path, 7, 600_000, chunk_size="1MiB")
    store = open_store(placed_config_from_values(s3_members, hedge_after_s=0.3))
    chunks = named_chunks(store, "org/m")
    key = next(iter(chunks))

    # A stopped process accepts connections but never responds on them.
    server = moto_servers[store.placement(key)[0].index]
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        data = store.get(chunk_object_key(key))
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert codec.chunk_key(codec.decode(key, chunks[key], data)) == key


PLACED_MOUNT_LAUNCHER = """
import logging, pickle, sys
from shardfs.mount.daemon import serve
logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
for name in ("botocore", "boto3", "urllib3"):
    logging.getLogger(name).setLevel(logging.WARNING)
store_config, mount_config = pickle.loads(bytes.fromhex(sys.argv[1]))
serve(store_config, mount_config)
"""


@contextlib.contextmanager
def placed_mount(config: PlacedStoreConfig, mountpoint: str):
    """Mount a placed store in a foreground daemon; unmount on exit.

    The mount command takes one STORE, so this starts the daemon's `serve`
    directly with the placed store's config.
    """
    os.makedirs(mountpoint, exist_ok=True)
    log_path = f"{mountpoint}.log"
    mount_config = MountConfig(mountpoint=mountpoint, cache_dir=f"{mountpoint}.cache")
    argument = pickle.dumps((config, mount_config)).hex()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", PLACED_MOUNT_LAUNCHER, argument],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    mount = Mount(process, mountpoint, log_path)
    deadline = time.monotonic() + 60
    while not os.path.ismount(mountpoint) or "is ready" not in mount.log_text():
        if process.poll() is not None or time.monotonic() > deadline:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
            process.kill()
            pytest.fail(f"placed mount did not start:\n{mount.log_text()}")
        time.sleep(0.05)
    try:
        yield mount
    finally:
        unmount = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
        if unmount.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
        try:
            status = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
    assert unmount.returncode == 0, unmount.stderr
    assert status == 0, f"daemon exited with {status}:\n{mount.log_text()}"
    unexpected = mount.unexpected_log_lines()
    assert not unexpected, f"unexpected daemon log lines: {unexpected}"


def sha256_of(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@needs_fuse
def test_mount_load_survives_stopped_member(s3_members, moto_servers, minilm_dir, tmp_path):
    source = os.path.join(minilm_dir, "model.safetensors")
    arguments = [*store_arguments(s3_members), "--chunk-size", "1MiB", source, "minilm"]
    pushed = run_shardfs("push", *arguments)
    assert pushed.returncode == 0, pushed.stderr
    config = placed_config_from_values(s3_members, hedge_after_s=0.5)
    size = os.path.getsize(source)
    mountpoint = str(tmp_path / "mnt")
    with placed_mount(config, mountpoint) as mount:
        mount.expect_log(r"store member s3://member-0-\S+ .* failed \d+ times in a row")
        mount.expect_log(r"without store member s3://member-0-")
        path = os.path.join(mountpoint, "minilm", "model.safetensors")
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            digest.update(file.read(size // 4))
            moto_servers[0].stop()
            while block := file.read(MIB):
                digest.update(block)
        assert digest.hexdigest() == sha256_of(source)
        loaded = safetensors.torch.load_file(path)
        original = safetensors.torch.load_file(source)
        assert loaded.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(loaded[name], tensor), name
        # safetensors maps the file; the mapping keeps the mount busy.
        del loaded
        gc.collect()
        # Reads went to the stopped member until it counted as failing.
        assert re.search(r"store member s3://member-0-\S+ .* failed \d+ times", mount.log_text())
    moto_servers[0].start()


def test_verify_and_repair_wiped_member(s3_members, moto_servers, tmp_path):
    push_new_model(s3_members, tmp_path, 8, 1_500_000, chunk_size="1MiB")
    store = open_store(placed_config_from_values(s3_members))
    chunks = named_chunks(store, "org/m")
    on_wiped = [key for key in chunks if 0 in placement_of(store, key)]
    assert on_wiped

    # The member comes back empty, as after a disk loss: same bucket, no objects.
    moto_servers[0].stop()
    moto_servers[0].start()
    bucket = s3_members[0].split("/")[2]
    moto_servers[0].client().create_bucket(Bucket=bucket)

    verified = run_shardfs("verify", *store_arguments(s3_members))
    assert verified.returncode == 1
    lines = verified.stdout.splitlines()
    missing = [line for line in lines if " is missing on s3://member-0-" in line]
    assert len(missing) == len(on_wiped)
    assert all("1 of 2 copies good" in line for line in missing)
    # The wiped member lost the manifest too.
    assert lines[0].startswith("org/m: store members hold different manifests: none on s3://member-0-")
    assert verified.stdout.strip().endswith(
        f"{len(on_wiped)} missing, 1 model with different manifests on members"
    )

    repaired = run_shardfs("repair", *store_arguments(s3_members))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"copied {len(on_wiped)} copies" in repaired.stdout
    assert "copied 1 manifest;" in repaired.stdout
    again = run_shardfs("verify", *store_arguments(s3_members))
    assert again.returncode == 0, again.stdout
    for key in chunks:
        assert holders_of(store, key) == placement_of(store, key)


async def test_chunk_source_reads_through_stopped_member(s3_members, moto_servers, tmp_path):
    push_new_model(s3_members, tmp_path, 9, 1_500_000, chunk_size="1MiB")
    store = open_store(placed_config_from_values(s3_members, hedge_after_s=0.3))
    manifest = parse_manifest("org/m", store.get(manifest_object_key("org/m")))
    (entry,) = manifest.files
    retry = RetryConfig(deadline_s=20.0)
    source = ChunkSource(store, MemoryCache(256 * MIB), None, 4, 2, retry)
    parts = []
    async with trio.open_nursery() as nursery:
        source.start(nursery)
        for index, chunk in enumerate(entry.chunks):
            if index == len(entry.chunks) // 2:
                await trio.to_thread.run_sync(moto_servers[1].stop)
            parts.append(await source.read(chunk, 0, chunk.length))
    assert hashlib.sha256(b"".join(parts)).hexdigest() == entry.sha256
    assert source.stats.failed_chunks == 0


async def test_chunk_source_skips_corrupt_copy():
    store, members = memory_placed()
    chunk = encoded_chunk(20)
    key = chunk_object_key(chunk.key)
    store.put(key, chunk.data)
    first = store.placement(chunk.key)[0]
    damaged = bytearray(chunk.data)
    damaged[-1] ^= 0xFF
    members[first.index].objects[key] = (bytes(damaged), time.time())
    ref = ChunkRef(0, chunk.length, chunk.key, len(chunk.data))
    retry = RetryConfig(deadline_s=5.0, base_delay_s=0.001, max_delay_s=0.01)
    source = ChunkSource(store, MemoryCache(64 * MIB), None, 4, 2, retry)
    data = await source.get(ref)
    assert codec.chunk_key(data) == chunk.key
    assert source.stats.corrupt_chunks == 1
    assert members[first.index].calls["get"] == 1


@needs_fuse
def test_mount_skips_corrupt_copy(tmp_path):
    values = local_members(tmp_path, 3)
    source = push_new_model(values, tmp_path, 10)
    store = placed_from_values(values)
    damaged = 0
    for key in named_chunks(store, "org/m"):
        first = store.placement(key)[0]
        if first.index != 0:
            continue
        damage_file(os.path.join(values[0], chunk_object_key(key)))
        damaged += 1
    assert damaged

    config = placed_config_from_values(values)
    mountpoint = str(tmp_path / "mnt")
    with placed_mount(config, mountpoint) as mount:
        mount.expect_log(rf"store member {values[0]} returned a corrupt copy")
        mount.expect_log(r"retrying chunk")
        path = os.path.join(mountpoint, "org", "m", "model.safetensors")
        assert sha256_of(path) == sha256_of(source)
        log_text = mount.log_text()
    assert log_text.count("returned a corrupt copy") == damaged

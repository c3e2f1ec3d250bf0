"""The chunk source against in-memory stores that fail on purpose."""

import logging
import threading

import pytest
import trio

from shardfs import codec
from shardfs.config import RetryConfig
from shardfs.errors import (
    ChunkCorrupt,
    ChunkUnavailable,
    ObjectNotFound,
    StoreAccessDenied,
    StoreUnavailable,
)
from shardfs.manifest import ChunkRef
from shardfs.mount.chunk_source import ABANDONED_WARNING_S, ChunkSource
from shardfs.mount.disk_cache import DiskCache
from shardfs.mount.memory_cache import MemoryCache
from shardfs.stores.base import chunk_object_key

FAST_RETRY = RetryConfig(deadline_s=2.0, base_delay_s=0.001, max_delay_s=0.01, failure_ttl_s=60)
DATA = bytes(range(256)) * 4096


class ScriptedStore:
    """A store whose gets fail as the test scripts them, counting every get."""

    url = "memory://test"

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.gets = 0
        self.failures: list = []  # exceptions or callables applied in order
        self.release = threading.Event()
        self.release.set()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        self.release.wait()
        with self._lock:
            self.gets += 1
            failure = self.failures.pop(0) if self.failures else None
        if isinstance(failure, BaseException):
            raise failure
        if key not in self.objects:
            raise ObjectNotFound(key)
        data = self.objects[key]
        return failure(data) if failure else data


def _setup(tmp_path=None, retry=FAST_RETRY):
    encoded = codec.encode(DATA)
    store = ScriptedStore({chunk_object_key(encoded.key): encoded.data})
    disk = None
    if tmp_path is not None:
        disk = DiskCache(str(tmp_path / "cache"), 1 << 30)
        disk.open()
    source = ChunkSource(store, MemoryCache(1 << 26), disk, 4, 2, retry)
    chunk = ChunkRef(0, len(DATA), encoded.key, len(encoded.data))
    return store, source, chunk


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize(
    "failures",
    [
        [StoreUnavailable("memory://test", "HTTP 503 SlowDown")],
        [StoreUnavailable("memory://test", "reset")] * 3,
        [_flip_last_byte],
        [lambda data: data[: len(data) // 2]],
    ],
    ids=["throttled", "three-resets", "flipped-byte", "truncated"],
)
async def test_transient_failures_are_retried(failures):
    store, source, chunk = _setup()
    store.failures = list(failures)
    assert await source.get(chunk) == DATA
    assert store.gets == len(failures) + 1
    assert source.stats.retries == len(failures)


async def test_waiters_share_one_fetch():
    store, source, chunk = _setup()
    store.release.clear()
    results = []

    async def reader():
        results.append(await source.read(chunk, 10, 20))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(reader)
        await trio.sleep(0.05)
        store.release.set()
    assert results == [DATA[10:20]] * 10
    assert store.gets == 1


async def test_waiters_share_the_retries():
    store, source, chunk = _setup()
    store.failures = [StoreUnavailable("memory://test", "reset")] * 2
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(source.get, chunk)
    assert store.gets == 3


async def test_persistent_failure_ends_at_deadline():
    retry = RetryConfig(deadline_s=0.3, base_delay_s=0.01, max_delay_s=0.05)
    store, source, chunk = _setup(retry=retry)
    store.failures = [StoreUnavailable("memory://test", "HTTP 500")] * 1000
    started = trio.current_time()
    with pytest.raises(ChunkUnavailable, match="HTTP 500"):
        await source.get(chunk)
    assert trio.current_time() - started < 1.0
    assert store.gets > 2


async def test_hung_request_ends_at_deadline():
    retry = RetryConfig(deadline_s=0.3)
    store, source, chunk = _setup(retry=retry)
    store.release.clear()
    started = trio.current_time()
    with pytest.raises(ChunkUnavailable):
        await source.get(chunk)
    assert trio.current_time() - started < 1.0
    store.release.set()


@pytest.mark.parametrize(
    "error",
    [ObjectNotFound("chunks/x"), StoreAccessDenied("memory://test", "AccessDenied")],
    ids=["missing", "denied"],
)
async def test_permanent_failure_is_not_retried(error):
    store, source, chunk = _setup()
    store.failures = [error]
    with pytest.raises(type(error)):
        await source.get(chunk)
    assert store.gets == 1


async def test_recent_failure_fails_fast():
    store, source, chunk = _setup()
    store.failures = [ObjectNotFound("chunks/x")]
    with pytest.raises(ObjectNotFound):
        await source.get(chunk)
    with pytest.raises(ObjectNotFound):
        await source.get(chunk)
    assert store.gets == 1


async def test_always_corrupt_chunk_is_never_returned():
    store, source, chunk = _setup(retry=RetryConfig(deadline_s=0.2, base_delay_s=0.01))
    store.failures = [_flip_last_byte] * 1000
    with pytest.raises(ChunkUnavailable) as info:
        await source.get(chunk)
    assert isinstance(info.value.cause, ChunkCorrupt)


async def test_disk_cache_serves_after_memory(tmp_path):
    store, source, chunk = _setup(tmp_path)
    async with trio.open_nursery() as nursery:
        source.start(nursery)
        assert await source.get(chunk) == DATA
    restarted = ChunkSource(store, MemoryCache(1 << 26), source.disk, 4, 2, FAST_RETRY)
    assert await restarted.read(chunk, 0, 100) == DATA[:100]
    assert store.gets == 1
    assert restarted.stats.disk_hits == 1


async def test_disk_only_chunk_is_advised_once(tmp_path, monkeypatch):
    store, source, chunk = _setup(tmp_path)
    async with trio.open_nursery() as nursery:
        source.start(nursery)
        await source.get(chunk)
    advised = []
    monkeypatch.setattr(DiskCache, "advise", lambda cache, key: advised.append(key))
    restarted = ChunkSource(store, MemoryCache(1 << 26), source.disk, 4, 2, FAST_RETRY)
    async with trio.open_nursery() as nursery:
        restarted.start(nursery)
        restarted.advise(chunk)
        restarted.advise(chunk)
    assert advised == [chunk.key]
    assert restarted.stats.disk_read_ahead == 1

    # A chunk already in memory needs no hint.
    async with trio.open_nursery() as nursery:
        source.start(nursery)
        source.advise(chunk)
    assert advised == [chunk.key]


def test_advise_ignores_missing_file(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), 1 << 30)
    cache.open()
    key = codec.chunk_key(DATA)
    cache.write(key, DATA)
    cache.advise(key)
    cache.advise("0" * 32)  # a missing file is ignored
    assert cache.read(key, len(DATA)) == DATA


async def test_verified_chunk_small_read_skips_memory(tmp_path):
    store, source, chunk = _setup(tmp_path)
    async with trio.open_nursery() as nursery:
        source.start(nursery)
        await source.get(chunk)
    restarted = ChunkSource(store, MemoryCache(1 << 26), source.disk, 4, 2, FAST_RETRY)
    # The first read verifies the cache file, which loads the whole chunk.
    assert await restarted.read(chunk, 0, 100) == DATA[:100]
    restarted.memory = MemoryCache(1 << 26)

    assert await restarted.read(chunk, 5000, 5100) == DATA[5000:5100]
    assert chunk.key not in restarted.memory
    large_end = len(DATA) // 2
    assert await restarted.read(chunk, 0, large_end) == DATA[:large_end]
    assert chunk.key in restarted.memory
    assert store.gets == 1


class HangingStore:
    """A store whose gets of the keys in *hung* block until their event is set."""

    url = "memory://hanging"

    def __init__(self, objects: dict[str, bytes], hung: set[str]):
        self.objects = objects
        self.hung = {key: threading.Event() for key in hung}

    def get(self, key: str) -> bytes:
        event = self.hung.get(key)
        if event is not None:
            event.wait()
        return self.objects[key]

    def release_all(self) -> None:
        for event in self.hung.values():
            event.set()


def _hanging_setup(count: int, hung: range, connections: int, max_abandoned=None):
    chunks, objects, contents = [], {}, []
    for index in range(count):
        data = bytes([index]) * 65536
        encoded = codec.encode(data)
        objects[chunk_object_key(encoded.key)] = encoded.data
        chunks.append(ChunkRef(0, len(data), encoded.key, len(encoded.data)))
        contents.append(data)
    store = HangingStore(objects, {chunk_object_key(chunks[index].key) for index in hung})
    retry = RetryConfig(deadline_s=0.3, failure_ttl_s=0)
    options = {} if max_abandoned is None else {"max_abandoned": max_abandoned}
    source = ChunkSource(store, MemoryCache(1 << 26), None, connections, 2, retry, **options)
    return store, source, chunks, contents


async def _wait_for(condition, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_abandoned_request_frees_its_slot(caplog):
    caplog.set_level(logging.INFO, logger="shardfs.mount.chunk_source")
    store, source, chunks, contents = _hanging_setup(2, range(1), connections=1)
    async with trio.open_nursery() as nursery:
        source.start(nursery)
        try:
            with pytest.raises(ChunkUnavailable, match="no response"):
                await source.get(chunks[0])
            assert await source.get(chunks[1]) == contents[1]
            assert source.abandoned_in_flight == 1
            assert source.connections.in_use == 0
            assert source.stats.abandoned_fetches == 1
            # Logged once the request has run for ABANDONED_WARNING_S.
            await _wait_for(lambda: _warnings(caplog))
        finally:
            store.release_all()
        await _wait_for(lambda: source.abandoned_in_flight == 0)
    assert source.connections.in_use == 0
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert chunks[0].key in warnings[0]
    assert store.url in warnings[0]
    assert "it runs on without a connection slot" in warnings[0]
    ended = [r.getMessage() for r in caplog.records if "ended after" in r.getMessage()]
    assert len(ended) == 1, ended
    assert chunks[0].key in ended[0]


async def test_abandoned_requests_are_capped(caplog):
    store, source, chunks, contents = _hanging_setup(3, range(2), connections=1, max_abandoned=1)
    async with trio.open_nursery() as nursery:
        source.start(nursery)
        try:
            for chunk in chunks[:2]:
                with pytest.raises(ChunkUnavailable):
                    await source.get(chunk)
            # The second abandoned request is past the cap, so it keeps the
            # only slot and the third chunk cannot be fetched.
            assert source.abandoned_in_flight == 1
            assert source.connections.in_use == 1
            with pytest.raises(ChunkUnavailable):
                await source.get(chunks[2])
            await _wait_for(lambda: len(_warnings(caplog)) == 2)
            store.hung[chunk_object_key(chunks[1].key)].set()
            await _wait_for(lambda: source.connections.in_use == 0)
            assert await source.get(chunks[2]) == contents[2]
        finally:
            store.release_all()
        await _wait_for(lambda: source.abandoned_in_flight == 0)
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings
    assert chunks[1].key in warnings[1]
    assert "keeps its connection slot" in warnings[1]


async def test_briefly_abandoned_request_not_warned(caplog):
    store, source, chunks, _ = _hanging_setup(1, range(1), connections=1)
    async with trio.open_nursery() as nursery:
        source.start(nursery)
        try:
            with pytest.raises(ChunkUnavailable):
                await source.get(chunks[0])
            store.release_all()
            await _wait_for(lambda: source.abandoned_in_flight == 0)
            await trio.sleep(ABANDONED_WARNING_S)
        finally:
            store.release_all()
    assert _warnings(caplog) == []
    assert source.stats.abandoned_fetches == 1


async def test_cancelled_reader_releases_slot(caplog):
    store, source, chunks, contents = _hanging_setup(1, range(1), connections=1)
    try:
        with trio.move_on_after(0.1):
            await source.get(chunks[0])
        # Abandoned before its deadline, so without a warning, but off its slot.
        assert source.abandoned_in_flight == 1
        assert source.connections.in_use == 0
    finally:
        store.release_all()
    await _wait_for(lambda: source.abandoned_in_flight == 0)
    assert source.connections.in_use == 0
    assert _warnings(caplog) == []

"""Component tests of the memory cache, disk cache, priority queue,
read-ahead decisions, warm-up and format parsers, without a mount."""

import errno
import io
import json
import logging
import os
import threading
import time
import types
import zipfile

import pytest
import torch
import trio
import trio.testing
from safetensors.torch import save

from shardfs import codec, formats
from shardfs.config import PrefetchConfig
from shardfs.commands import warm_cmd
from shardfs.errors import ObjectNotFound, ShardfsError, UsageError
from shardfs.manifest import ChunkRef
from shardfs.mount.control import ControlServer
from shardfs.mount.disk_cache import WRITE_RETRY_AFTER_S, DiskCache
from shardfs.mount.memory_cache import MemoryCache
from shardfs.mount.prefetch import ReadAhead
from shardfs.mount.priority import DEMAND, PREFETCH, PriorityLimiter, Ticket

MiB = 1024 * 1024


def test_memory_cache_evicts_least_recent():
    cache = MemoryCache(30)
    cache.put("a", b"x" * 10)
    cache.put("b", b"x" * 10)
    cache.put("c", b"x" * 10)
    assert cache.get("a") is not None
    cache.put("d", b"x" * 10)
    assert "b" not in cache
    assert "a" in cache
    assert cache.size_bytes == 30


def test_memory_cache_prefetch_keeps_reader_chunks():
    cache = MemoryCache(40, protected_share=0.5)
    cache.put("used-1", b"x" * 10)
    cache.put("used-2", b"x" * 10)
    for index in range(5):
        cache.put(f"ahead-{index}", b"x" * 10, prefetched=True)
    assert "used-1" in cache
    assert "used-2" in cache
    assert cache.size_bytes <= 40


def test_memory_cache_protected_share_leaves_room():
    cache = MemoryCache(40, protected_share=0.5)
    for index in range(4):
        cache.put(f"used-{index}", b"x" * 10)
    assert cache.probation_room == 20
    assert cache.put("ahead", b"x" * 10, prefetched=True)
    assert "used-3" in cache


def test_memory_cache_prefetch_evicts_older_prefetch():
    cache = MemoryCache(20)
    cache.put("used", b"x" * 10)
    cache.put("ahead-1", b"x" * 10, prefetched=True)
    assert cache.put("ahead-2", b"x" * 10, prefetched=True)
    assert "ahead-1" not in cache
    assert "used" in cache


def test_memory_cache_evicts_read_chunks_before_unread_prefetch():
    cache = MemoryCache(20, protected_share=0.5)
    cache.put("used", b"x" * 10)
    cache.put("ahead", b"x" * 10, prefetched=True)
    cache.put("new", b"x" * 10)
    assert "used" not in cache
    assert "ahead" in cache
    assert "new" in cache
    assert cache.get("ahead") is not None
    assert cache.unread_prefetched_bytes == 0


def _chunk(seed: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes([seed % 256]) * size
    return codec.chunk_key(data), data


def test_disk_cache_keeps_cap(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), 3500)
    cache.open()
    for seed in range(10):
        cache.write(*_chunk(seed))
    files = list((tmp_path / "cache" / "chunks").rglob("*"))
    on_disk = sum(path.stat().st_size for path in files if path.is_file())
    assert cache.size_bytes <= 3500
    assert on_disk <= 3500


def test_disk_cache_range_needs_true_length(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), 10_000)
    cache.open()
    key, data = _chunk(7)
    cache.write(key, data)
    assert cache.verified_length(key) == 1000
    assert cache.read_range(key, 1000, 10, 20) == data[10:20]
    # A manifest that gives the key another length reads nothing, and the
    # file stays.
    assert cache.read_range(key, 2000, 10, 20) is None
    assert cache.read_range(key, 500, 10, 20) is None
    assert cache.read(key, 1000) == data


class _HeldWrites:
    """Stands in for DiskCache._write_file: each write waits for *release*,
    then succeeds or raises *error*."""

    def __init__(self, cache: DiskCache, error: OSError | None = None):
        self.started = threading.Semaphore(0)
        self.release = threading.Event()
        self._write_file = cache._write_file
        self._error = error
        cache._write_file = self

    def __call__(self, key: str, data: bytes) -> None:
        self.started.release()
        self.release.wait(timeout=10)
        if self._error is not None:
            raise self._error
        self._write_file(key, data)


def _write_in_threads(cache: DiskCache, chunks, held: _HeldWrites, expected_writes: int):
    threads = [threading.Thread(target=cache.write, args=chunk) for chunk in chunks]
    for thread in threads:
        thread.start()
    for _ in range(expected_writes):
        assert held.started.acquire(timeout=10)
    return threads


def test_disk_cache_concurrent_writes_keep_cap(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), 2000)
    cache.open()
    held = _HeldWrites(cache)
    chunks = [_chunk(seed) for seed in range(4)]
    # Two writes fill the cap while in progress; the other two must not
    # reserve space on top of them.
    threads = _write_in_threads(cache, chunks, held, expected_writes=2)
    for thread in threads[2:]:
        thread.join(timeout=10)
    assert cache.size_bytes <= 2000
    held.release.set()
    for thread in threads:
        thread.join(timeout=10)
    files = [path for path in (tmp_path / "cache" / "chunks").rglob("*") if path.is_file()]
    assert cache.size_bytes == sum(path.stat().st_size for path in files) == 2000


class _SlowHandler(logging.Handler):
    """Keeps each warning in flight long enough for other threads to fail too."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        time.sleep(0.05)
        self.messages.append(record.getMessage())


def test_disk_cache_concurrent_failures_warn_once(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), 10_000)
    cache.open()
    held = _HeldWrites(cache, OSError(errno.ENOSPC, "No space left on device"))
    handler = _SlowHandler()
    logger = logging.getLogger("shardfs.mount.disk_cache")
    logger.addHandler(handler)
    try:
        threads = _write_in_threads(cache, [_chunk(seed) for seed in range(4)], held, 4)
        held.release.set()
        for thread in threads:
            thread.join(timeout=10)
    finally:
        logger.removeHandler(handler)
    warnings = [message for message in handler.messages if "disk cache write failed" in message]
    assert len(warnings) == 1
    assert cache.size_bytes == 0
    assert not cache.can_hold(1000)


def test_disk_cache_retries_writes_later(tmp_path, caplog):
    now = [1000.0]
    cache = DiskCache(str(tmp_path / "cache"), 10_000, clock=lambda: now[0])
    cache.open()
    write_file = cache._write_file
    failures = []

    def full_disk(key: str, data: bytes) -> None:
        failures.append(key)
        raise OSError(errno.ENOSPC, "No space left on device")

    cache._write_file = full_disk
    caplog.set_level(logging.INFO, logger="shardfs.mount.disk_cache")
    first, second, third = (_chunk(seed) for seed in range(3))
    cache.write(*first)
    assert cache.write_failed
    assert not cache.can_hold(1000)

    # Within the retry interval nothing is tried.
    now[0] += WRITE_RETRY_AFTER_S - 1
    cache.write(*second)
    assert len(failures) == 1

    # After it, a write is tried again; this one works.
    now[0] += 2
    cache._write_file = write_file
    assert cache.can_hold(1000)
    cache.write(*third)
    assert not cache.write_failed
    assert cache.read(third[0], len(third[1])) == third[1]
    messages = [record.getMessage() for record in caplog.records]
    assert sum("disk cache write failed" in message for message in messages) == 1
    assert "disk cache writes work again" in messages


def test_disk_cache_evicts_least_recent(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), 3000)
    cache.open()
    chunks = [_chunk(seed) for seed in range(3)]
    for key, data in chunks:
        cache.write(key, data)
    assert cache.read(chunks[0][0], 1000) == chunks[0][1]
    cache.write(*_chunk(99))
    assert chunks[0][0] in cache
    assert chunks[1][0] not in cache


def test_disk_cache_survives_restart(tmp_path):
    key, data = _chunk(7)
    first = DiskCache(str(tmp_path / "cache"), 10_000)
    first.open()
    first.write(key, data)
    first.close()
    second = DiskCache(str(tmp_path / "cache"), 10_000)
    second.open()
    assert key in second
    assert not second.is_verified(key)
    assert second.read(key, len(data)) == data
    assert second.is_verified(key)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "longer"])
def test_disk_cache_drops_damaged_file(tmp_path, damage):
    key, data = _chunk(3)
    cache = DiskCache(str(tmp_path / "cache"), 10_000)
    cache.open()
    path = tmp_path / "cache" / "chunks" / key[:2] / key
    path.parent.mkdir(parents=True, exist_ok=True)
    damaged = {
        "truncated": data[:-1],
        "flipped": bytes([data[0] ^ 1]) + data[1:],
        "longer": data + b"!",
    }[damage]
    path.write_bytes(damaged)
    cache.close()
    restarted = DiskCache(str(tmp_path / "cache"), 10_000)
    restarted.open()
    assert restarted.read(key, len(data)) is None
    assert not path.exists()
    assert key not in restarted


def test_disk_cache_clears_temporary_files(tmp_path):
    tmp_dir = tmp_path / "cache" / "tmp"
    tmp_dir.mkdir(parents=True)
    (tmp_dir / "partial").write_bytes(b"half a chunk")
    cache = DiskCache(str(tmp_path / "cache"), 10_000)
    cache.open()
    assert list(tmp_dir.iterdir()) == []
    assert cache.size_bytes == 0


def test_disk_cache_rejects_second_daemon(tmp_path):
    first = DiskCache(str(tmp_path / "cache"), 10_000)
    first.open()
    second = DiskCache(str(tmp_path / "cache"), 10_000)
    with pytest.raises(UsageError, match="in use by another mount"):
        second.open()
    first.close()
    second.open()


def test_disk_cache_directory_mode(tmp_path):
    cache = DiskCache(str(tmp_path / "cache"), 10_000)
    cache.open()
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700


async def test_priority_limiter_serves_demand_first():
    limiter = PriorityLimiter(1)
    order = []
    first = Ticket(DEMAND)
    await limiter.acquire(first)

    async def request(name, priority):
        ticket = Ticket(priority)
        await limiter.acquire(ticket)
        order.append(name)
        limiter.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "prefetch-1", PREFETCH)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "prefetch-2", PREFETCH)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "demand", DEMAND)
        await trio.testing.wait_all_tasks_blocked()
        limiter.release()
    assert order == ["demand", "prefetch-1", "prefetch-2"]


async def test_priority_limiter_raises_waiting_prefetch():
    limiter = PriorityLimiter(1)
    await limiter.acquire(Ticket(DEMAND))
    order = []
    tickets = {"prefetch-1": Ticket(PREFETCH), "prefetch-2": Ticket(PREFETCH)}

    async def request(name):
        await limiter.acquire(tickets[name])
        order.append(name)
        limiter.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "prefetch-1")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "prefetch-2")
        await trio.testing.wait_all_tasks_blocked()
        limiter.raise_priority(tickets["prefetch-2"])
        limiter.release()
    assert order == ["prefetch-2", "prefetch-1"]


async def test_priority_limiter_cancelled_waiter_leaves_queue():
    limiter = PriorityLimiter(1)
    await limiter.acquire(Ticket(DEMAND))
    with trio.move_on_after(0.01):
        await limiter.acquire(Ticket(PREFETCH))
    assert limiter.waiting(PREFETCH) == 0
    limiter.release()
    assert limiter.in_use == 0


def _read_ahead(chunk_count: int, chunk_size: int = MiB, spans=None, **config) -> ReadAhead:
    starts = [index * chunk_size for index in range(chunk_count)]
    state = ReadAhead(starts, chunk_count * chunk_size, PrefetchConfig(**config))
    if spans is not None:
        state.set_spans(spans)
    return state


class WarmSource:
    """The chunk source calls of a warm-up: chunks fail, vanish or land on disk as set."""

    def __init__(self, failing: dict, unkept: set[str], delay_s: float):
        # Writes fail, which only the unkept chunks notice.
        self.disk = types.SimpleNamespace(
            can_hold=lambda length: False, limit_bytes=64 * MiB, write_failed=True
        )
        self.on_disk: set[str] = set()
        self.failing = failing
        self.unkept = unkept
        self.delay_s = delay_s

    def disk_holds(self, key: str) -> bool:
        return key in self.on_disk

    async def ensure_on_disk(self, chunk: ChunkRef, priority: int) -> None:
        if chunk.key in self.failing:
            raise self.failing[chunk.key]
        # Longer than the progress interval, so a warm-up that stopped at
        # its first failure would leave these chunks unfetched.
        await trio.sleep(self.delay_s)
        if chunk.key not in self.unkept:
            self.on_disk.add(chunk.key)


class ReplyStream:
    def __init__(self):
        self.replies: list[dict] = []

    async def send_all(self, data: bytes) -> None:
        self.replies.append(json.loads(data))


async def test_warm_tries_every_chunk():
    chunks = [ChunkRef(index * MiB, MiB, f"{index:032x}", MiB) for index in range(8)]
    missing, unkept = chunks[0].key, chunks[1].key
    source = WarmSource({missing: ObjectNotFound(f"chunks/{missing}")}, {unkept}, 0.5)
    source.on_disk.add(chunks[7].key)
    entry = types.SimpleNamespace(path="org/m/weights.bin", chunks=chunks)
    server = ControlServer("/mnt", None, source, None, max_connections=2)
    server._resolve = lambda paths: ([entry], [])
    stream = ReplyStream()

    await server._warm(stream, ["org/m"])

    final = stream.replies[-1]
    assert final["done"] is True
    assert source.on_disk == {chunk.key for chunk in chunks[2:]}
    assert final["total"] == 8 * MiB
    assert final["cached_before"] == MiB
    assert final["resident_bytes"] == 6 * MiB
    assert final["resident"] is False
    assert final["failed_chunks"] == 1
    assert final["failed_bytes"] == MiB
    assert len(final["failed"]) == 1
    assert final["failed"][0].startswith("org/m/weights.bin: ")
    assert missing in final["failed"][0]
    assert final["not_kept_chunks"] == 1
    assert final["not_kept_bytes"] == MiB
    assert final["disk_cache_limit_bytes"] == 64 * MiB
    assert final["disk_write_failed"] is True


def _warm_reply(**fields) -> dict:
    """Return the last reply of a warm-up of 8 MiB, of which *fields* change some."""
    reply = {
        "total": 8 * MiB,
        "cached_before": 0,
        "resident_bytes": 8 * MiB,
        "failed_chunks": 0,
        "failed": [],
        "not_kept_chunks": 0,
        "not_kept_bytes": 0,
        "disk_cache_limit_bytes": 64 * MiB,
        "disk_write_failed": False,
    }
    reply.update(fields)
    return reply


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"disk_cache_limit_bytes": 0},
            "3 chunks (3.0 MiB) were fetched but not kept, because the disk cache is off "
            "(--cache-size 0); 3.0 MiB is not cached; mount again with a --cache-size "
            "that can hold what you warm",
        ),
        (
            {"disk_cache_limit_bytes": 512 * 1024},
            "3 chunks (3.0 MiB) were fetched but not kept, because each is larger than "
            "the disk cache cap of 512.0 KiB; 3.0 MiB is not cached; mount again with a "
            "larger --cache-size",
        ),
        (
            {"disk_write_failed": True},
            "3 chunks (3.0 MiB) were fetched but not kept, because a write to the disk "
            "cache failed, and the daemon writes no more to it until it is mounted again; "
            "3.0 MiB is not cached; see the daemon log for the error",
        ),
    ],
)
def test_warm_report_not_kept_chunks(fields, message, capsys):
    reply = _warm_reply(resident_bytes=5 * MiB, not_kept_chunks=3, not_kept_bytes=3 * MiB, **fields)
    with pytest.raises(ShardfsError) as raised:
        warm_cmd._report("/mnt", reply)
    assert str(raised.value) == message
    assert capsys.readouterr().out == "warmed 5.0 MiB of 8.0 MiB: 0 B was already cached\n"


def test_warm_report_failed_fetches(capsys):
    reply = _warm_reply(resident_bytes=6 * MiB, failed_chunks=2, failed=["a: x", "b: y"])
    with pytest.raises(ShardfsError) as raised:
        warm_cmd._report("/mnt", reply)
    assert str(raised.value) == "2 chunks could not be fetched; 2.0 MiB is not cached"
    assert capsys.readouterr().err == "failed: a: x\nfailed: b: y\n"


def test_warm_report_failed_and_not_kept(capsys):
    reply = _warm_reply(
        resident_bytes=3 * MiB,
        failed_chunks=2,
        failed=["a: x", "b: y"],
        not_kept_chunks=3,
        not_kept_bytes=3 * MiB,
        disk_cache_limit_bytes=0,
    )
    with pytest.raises(ShardfsError) as raised:
        warm_cmd._report("/mnt", reply)
    assert str(raised.value) == (
        "2 chunks could not be fetched and 3 chunks (3.0 MiB) were fetched but not kept, "
        "because the disk cache is off (--cache-size 0); 5.0 MiB is not cached; "
        "mount again with a --cache-size that can hold what you warm"
    )
    assert capsys.readouterr().err == "failed: a: x\nfailed: b: y\n"


def test_warm_report_all_resident(capsys):
    assert warm_cmd._report("/mnt", _warm_reply()) == 0
    assert capsys.readouterr().out == "warmed 8.0 MiB of 8.0 MiB: 0 B was already cached\n"


def test_read_ahead_waits_for_a_forward_step():
    state = _read_ahead(100, spans=[])
    assert list(state.on_read(0, 128 * 1024)) == []
    assert list(state.on_read(128 * 1024, 256 * 1024)) == []


def test_read_ahead_window_doubles_on_sequential_reads():
    state = _read_ahead(100, spans=[], initial_chunks=2, max_chunks=8)
    state.on_read(0, MiB)
    assert list(state.on_read(MiB, 2 * MiB)) == [2, 3]
    assert list(state.on_read(2 * MiB, 3 * MiB)) == [3, 4, 5, 6]
    assert list(state.on_read(3 * MiB, 4 * MiB)) == list(range(4, 12))
    assert list(state.on_read(4 * MiB, 5 * MiB)) == list(range(5, 13))


def test_read_ahead_ignores_random_reads():
    state = _read_ahead(100, spans=[])
    fetched = set()
    for chunk in (50, 10, 77, 3, 91, 42, 60, 18):
        fetched.update(state.on_read(chunk * MiB + 4096, chunk * MiB + 8192))
    assert fetched == set()


def test_read_ahead_fetches_rest_of_tensor_only():
    # Header in chunk 0, then tensors of 4 chunks each.
    spans = [(0, 100)] + [(100 + i * 4 * MiB, 100 + (i + 1) * 4 * MiB) for i in range(10)]
    state = _read_ahead(41, spans=spans)
    tensor = spans[5]
    wanted = state.on_read(tensor[0], tensor[0] + 4096)
    last_chunk = (tensor[1] - 1) // MiB
    assert list(wanted) == list(range(tensor[0] // MiB + 1, last_chunk + 1))


def test_read_ahead_fault_before_tensor_stays_in_it():
    # As traced from safe_open on a mount: the first read of a faulting
    # reader ends at its page, 312 bytes before the tensor, and the next
    # reads walk the tensor and 1 MiB of kernel read-ahead past it.
    tensor_start = 8 * MiB + 312
    spans = [(0, 100), (100, tensor_start), (tensor_start, tensor_start + 8 * MiB)]
    spans.append((spans[-1][1], 40 * MiB))
    state = _read_ahead(40, spans=spans, crossing_margin=8 * MiB)
    wanted = set()
    for offset in range(7 * MiB, 18 * MiB, MiB):
        wanted.update(state.on_read(offset, offset + MiB))
    assert max(wanted) == (tensor_start + 8 * MiB - 1) // MiB


def test_read_ahead_fault_on_tensor_end_page():
    # As traced from safe_open on a mount on an AMD EPYC host (Linux 6.18):
    # the copy of a tensor touches its last page first. The kernel's 128 KiB
    # read-around is centered on that page, so it reaches 64 KiB into the
    # next tensor. Then the copy reads the tensor from its start.
    kib = 1024
    spans = [(0, 512)] + [(512 + i * 4 * MiB, 512 + (i + 1) * 4 * MiB) for i in range(6)]
    state = _read_ahead(25, spans=spans)
    tensor_start, tensor_end = spans[4]
    end_page = tensor_end - tensor_end % 4096
    assert list(state.on_read(end_page - 64 * kib, end_page + 64 * kib)) == []

    wanted = set()
    start_page = tensor_start - tensor_start % 4096
    for offset in range(start_page - 64 * kib, end_page, 128 * kib):
        wanted.update(state.on_read(offset, offset + 128 * kib))
    assert max(wanted) == (tensor_end - 1) // MiB
    assert min(wanted) == tensor_start // MiB + 1


def test_read_ahead_nearby_reader_is_new_stream():
    # One reader reads tensor A and 1 MiB past it. Later another starts on
    # tensor C, past the small tensor B: a new stream, not A's stream
    # crossing into a second tensor.
    spans = [(0, 100), (100, 8 * MiB), (8 * MiB, 12 * MiB), (12 * MiB, 20 * MiB), (20 * MiB, 40 * MiB)]
    state = _read_ahead(40, spans=spans, crossing_margin=4 * MiB)
    for offset in range(0, 9 * MiB, MiB):
        state.on_read(offset, offset + MiB)
    wanted = set()
    for offset in range(11 * MiB, 21 * MiB, MiB):
        wanted.update(state.on_read(offset, offset + MiB))
    assert max(wanted) == 19


def test_read_ahead_whole_file_load_crosses_tensors():
    spans = [(0, 100)] + [(100 + i * 2 * MiB, 100 + (i + 1) * 2 * MiB) for i in range(20)]
    state = _read_ahead(41, spans=spans, crossing_margin=2 * MiB, max_chunks=8)
    wanted = set()
    for offset in range(0, 8 * MiB, MiB):
        wanted.update(state.on_read(offset, offset + MiB))
    assert max(wanted) >= 12


def test_safetensors_spans_match_header():
    tensors = {"b": torch.zeros(10), "a": torch.ones(3, dtype=torch.float16)}
    data = save(tensors)
    spans = formats.safetensors_spans(data, len(data))
    assert spans[0][0] == 0
    assert spans[-1][1] == len(data)
    assert len(spans) == 3
    assert sum(end - start for start, end in spans[1:]) == 10 * 4 + 3 * 2


@pytest.mark.parametrize("data", [b"", b"\xff" * 16, b"\x05\x00\x00\x00\x00\x00\x00\x00{nope"])
def test_safetensors_spans_rejects_other_data(data):
    assert formats.safetensors_spans(data, len(data)) is None


def test_zip_spans_cover_torch_records():
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(1000), "b": torch.randn(10)}, buffer)
    data = buffer.getvalue()
    tail_offset = len(data) // 2
    spans = formats.zip_spans(data[tail_offset:], tail_offset, len(data))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        offsets = sorted(info.header_offset for info in archive.infolist())
    assert [start for start, _ in spans[:-1]] == offsets
    assert spans[-1][1] == len(data)


def test_zip_spans_need_the_central_directory():
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(100_000)}, buffer)
    data = buffer.getvalue()
    assert formats.zip_spans(data[-30:], len(data) - 30, len(data)) is None
    assert formats.zip_spans(os.urandom(1000), 0, 1000) is None

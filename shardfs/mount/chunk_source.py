"""Decoded chunks for readers: memory LRU, SSD cache, single-flight fetch.

`read` serves one slice of a chunk to a reader; `prefetch` asks for a whole
chunk ahead of need. A chunk is looked up in memory, then in the disk cache,
then fetched from the store and decoded; concurrent requests for one chunk,
from any number of readers and the prefetcher, share one flight. Store
requests wait on a `PriorityLimiter`, so a reader's request goes ahead of
queued prefetch requests. Blocking work (store calls, decoding, cache file
I/O) runs in worker threads. All methods run in the daemon's trio thread.

A store request that is still running when its reader stops waiting (at
the read deadline) is abandoned: its thread runs on, but the request gives
its connection slot back, so one hung request cannot block every other
read. At most `ChunkSource.max_abandoned` abandoned requests run at once
off a slot. Past that an abandoned request keeps its slot until it ends,
so a store that never answers cannot make the mount start threads without
bound.
"""

import collections
import dataclasses
import logging
import random

import outcome
import trio

from shardfs import codec
from shardfs.config import RetryConfig
from shardfs.errors import ChunkCorrupt, ChunkLengthWrong, ChunkUnavailable, StoreUnavailable
from shardfs.manifest import ChunkRef
from shardfs.mount.disk_cache import DiskCache
from shardfs.mount.memory_cache import MemoryCache
from shardfs.mount.metrics import Histogram
from shardfs.mount.priority import DEMAND, PREFETCH, PriorityLimiter, Ticket
from shardfs.stores.base import Store, chunk_object_key

log = logging.getLogger(__name__)

# Failures that a later attempt may not repeat: throttling, server errors,
# dropped connections and timeouts (all StoreUnavailable), and bytes damaged
# in transit, which fail verification.
TRANSIENT_ERRORS = (StoreUnavailable, ChunkCorrupt)
# Damage that survives a second fetch is in the stored object itself, and
# waiting out the deadline would not repair it.
MAX_CORRUPT_ATTEMPTS = 2
# Reads shorter than this share of their chunk are served from the disk
# cache by range, without loading the chunk into memory.
SMALL_READ_DIVISOR = 8
# Chunks remembered as already hinted into the page cache: far more than
# one read-ahead window, so the chunks of a window are hinted once.
_ADVISED_KEYS = 1024
# An abandoned store request is logged as a WARNING once it has run this
# long, so an attempt that started just before its read's deadline and
# ends soon after it is not reported as hung.
ABANDONED_WARNING_S = 1.0


@dataclasses.dataclass
class ChunkSourceStats:
    chunks_fetched: int = 0
    bytes_fetched: int = 0  # stored (encoded) bytes received from the store
    bytes_decoded: int = 0
    prefetch_fetches: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    disk_read_ahead: int = 0  # cache files hinted into the page cache
    corrupt_chunks: int = 0
    retries: int = 0
    failed_chunks: int = 0
    # Store requests still running when their reader stopped waiting.
    abandoned_fetches: int = 0


class _Flight:
    """One lookup-or-fetch of a chunk in progress; waiters share its outcome."""

    def __init__(self, priority: int, length: int) -> None:
        self.ticket = Ticket(priority)
        # The chunk's length in the manifest of the read that started it.
        self.length = length
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


@dataclasses.dataclass(eq=False)
class _StoreRequest:
    """One store get running in a worker thread; its fields change in the trio thread only."""

    chunk_key: str
    started: float
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    result: outcome.Outcome | None = None
    holds_slot: bool = True
    # Logged as a WARNING for running past its read's deadline, so its end is logged too.
    warned: bool = False


class ChunkSource:
    def __init__(
        self,
        store: Store,
        memory: MemoryCache,
        disk: DiskCache | None,
        connections: int,
        decoders: int,
        retry: RetryConfig = RetryConfig(),
        max_abandoned: int | None = None,
    ):
        """*max_abandoned* caps the abandoned store requests that run off a
        connection slot; None means as many as *connections*."""
        self._store = store
        self.memory = memory
        self.disk = disk
        self._flights: dict[str, _Flight] = {}
        self._retry = retry
        # Chunks that failed for good: key -> (time the entry expires, error).
        self._failures: dict[str, tuple[float, BaseException, int]] = {}
        self.connections = PriorityLimiter(connections)
        self.max_abandoned = connections if max_abandoned is None else max_abandoned
        # Abandoned requests that gave their slot back and still run.
        self._abandoned: set[_StoreRequest] = set()
        self._decoders = trio.CapacityLimiter(decoders)
        # Cache file reads and writes; page-cache speed, so a few suffice.
        self._disk_io = trio.CapacityLimiter(8)
        # Read-ahead hints for cache files, apart from reads and writes so
        # that a burst of hints never delays a reader.
        self._disk_hints = trio.CapacityLimiter(4)
        self._advised: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._nursery: trio.Nursery | None = None
        self.prefetches_outstanding = 0
        self._prefetch_bytes = 0
        # Chunks fetched but not yet written to the disk cache: still served
        # from here, so a chunk just evicted from memory is not fetched twice.
        # Key -> (data, event set once the write is done).
        self._pending_writes: dict[str, tuple[bytes, trio.Event]] = {}
        self.stats = ChunkSourceStats()
        self.fetch_latency = Histogram()

    @property
    def store(self) -> Store:
        return self._store

    @property
    def abandoned_in_flight(self) -> int:
        """Abandoned store requests still running off a connection slot."""
        return len(self._abandoned)

    def start(self, nursery: trio.Nursery) -> None:
        """Run background work (cache writes, prefetch) in *nursery*."""
        self._nursery = nursery

    def is_present(self, key: str) -> bool:
        """Whether *key* is in memory, in the disk cache or on its way."""
        if key in self.memory or key in self._flights or key in self._pending_writes:
            return True
        return self.disk is not None and key in self.disk

    def _pending_data(self, key: str) -> bytes | None:
        pending = self._pending_writes.get(key)
        return None if pending is None else pending[0]

    def is_cached(self, key: str) -> bool:
        """Whether *key* is in memory or in the disk cache."""
        return key in self.memory or self.disk_holds(key)

    def disk_holds(self, key: str) -> bool:
        return self.disk is not None and key in self.disk

    async def ensure_on_disk(self, chunk: ChunkRef, priority: int = PREFETCH) -> None:
        """Fetch *chunk* if needed and return once it is in the disk cache."""
        if self.disk_holds(chunk.key):
            return
        data = await self.get(chunk, priority)
        pending = self._pending_writes.get(chunk.key)
        if pending is not None:
            await pending[1].wait()
        if not self.disk_holds(chunk.key):
            async with self._disk_io:
                await trio.to_thread.run_sync(self.disk.write, chunk.key, data)

    def advise(self, chunk: ChunkRef) -> None:
        """Start reading *chunk* from the disk cache into the page cache.

        Only a chunk that is on disk and nowhere nearer is read, and each
        at most once until `_ADVISED_KEYS` others have been. The hint costs
        no daemon memory, because the kernel keeps the pages.
        """
        key = chunk.key
        if self._nursery is None or key in self._advised or not self.disk_holds(key):
            return
        if key in self.memory or key in self._flights or key in self._pending_writes:
            return
        self._advised[key] = None
        self.stats.disk_read_ahead += 1
        if len(self._advised) > _ADVISED_KEYS:
            self._advised.popitem(last=False)
        self._nursery.start_soon(self._advise_task, key)

    async def _advise_task(self, key: str) -> None:
        async with self._disk_hints:
            await trio.to_thread.run_sync(self.disk.advise, key)

    def can_prefetch(self, length: int) -> bool:
        """Whether a prefetch of *length* bytes fits the memory it may use.

        With a working disk cache, prefetched chunks spill to disk; without
        one they must wait in memory, and those in flight plus those not
        read yet must fit the room readers' chunks leave, or new prefetches
        would evict older ones before they are read.
        """
        if self.disk is not None and self.disk.can_hold(length):
            return True
        waiting = self._prefetch_bytes + self.memory.unread_prefetched_bytes
        return waiting + length <= self.memory.probation_room

    async def read(self, chunk: ChunkRef, start: int, end: int) -> bytes | memoryview:
        """Return bytes ``[start, end)`` of the decoded *chunk*, verified.

        A chunk in memory is served as a view of it, without a copy: pyfuse3
        replies from any buffer. Raises `ChunkCorrupt` or a `StoreError`
        when no good copy was found.
        """
        data = self.memory.get(chunk.key)
        if data is None:
            data = self._pending_data(chunk.key)
        if data is not None:
            self.stats.memory_hits += 1
            return memoryview(_check_length(chunk, data))[start:end]
        # A small read of a chunk verified on disk reads just its range. A
        # larger one, such as the kernel's 1 MiB read-ahead, is most often
        # one of a run that reads the whole chunk, so the chunk is loaded
        # into memory once instead of once per read.
        small = end - start < chunk.length // SMALL_READ_DIVISOR
        if small and self.disk is not None and self.disk.is_verified(chunk.key):
            async with self._disk_io:
                part = await trio.to_thread.run_sync(
                    self.disk.read_range, chunk.key, chunk.length, start, end
                )
            if part is not None:
                self.stats.disk_hits += 1
                return part
        data = await self.get(chunk, DEMAND)
        return memoryview(data)[start:end]

    async def get(self, chunk: ChunkRef, priority: int = DEMAND) -> bytes:
        """Return the whole decoded *chunk*, verified against its key."""
        while True:
            data = self.memory.get(chunk.key)
            if data is None:
                data = self._pending_data(chunk.key)
            if data is not None:
                self.stats.memory_hits += 1
                return _check_length(chunk, data)

            flight = self._flights.get(chunk.key)
            if flight is None:
                self._raise_recent_failure(chunk)
                return await self._lead_flight(chunk, priority)

            if priority == DEMAND:
                self.connections.raise_priority(flight.ticket)
            await flight.done.wait()
            # A cancelled leader tells nothing about the chunk, so
            # its waiters start a new flight instead of sharing the cancel.
            if isinstance(flight.error, trio.Cancelled):
                continue
            # A flight for another length in the manifest may have failed on
            # that length alone, so this read starts its own flight.
            if flight.error is not None and flight.length != chunk.length:
                continue
            if flight.error is not None:
                raise flight.error
            return _check_length(chunk, flight.data)

    def prefetch(self, chunk: ChunkRef) -> bool:
        """Start fetching *chunk* in the background unless it is present.

        Returns whether a fetch was started. Errors are left to the demand
        read that needs the chunk, which fetches it again.
        """
        if self._nursery is None or self.is_present(chunk.key):
            return False
        self.prefetches_outstanding += 1
        self._prefetch_bytes += chunk.length
        self._nursery.start_soon(self._prefetch_task, chunk)
        return True

    async def _prefetch_task(self, chunk: ChunkRef) -> None:
        try:
            await self.get(chunk, PREFETCH)
        except Exception as exc:
            log.debug("prefetch of chunk %s failed: %s", chunk.key, exc)
        finally:
            self.prefetches_outstanding -= 1
            self._prefetch_bytes -= chunk.length

    async def _lead_flight(self, chunk: ChunkRef, priority: int) -> bytes:
        flight = _Flight(priority, chunk.length)
        self._flights[chunk.key] = flight
        try:
            flight.data = await self._load(chunk, flight)
            self.memory.put(chunk.key, flight.data, prefetched=flight.ticket.priority == PREFETCH)
            return flight.data
        except BaseException as exc:
            flight.error = exc
            if isinstance(exc, Exception):
                self.stats.failed_chunks += 1
                expires = trio.current_time() + self._retry.failure_ttl_s
                self._failures[chunk.key] = (expires, exc, chunk.length)
            raise
        finally:
            del self._flights[chunk.key]
            flight.done.set()

    def _raise_recent_failure(self, chunk: ChunkRef) -> None:
        failure = self._failures.get(chunk.key)
        if failure is None:
            return
        expires, error, length = failure
        if trio.current_time() >= expires:
            del self._failures[chunk.key]
        elif length == chunk.length:
            raise error

    async def _load(self, chunk: ChunkRef, flight: _Flight) -> bytes:
        if self.disk is not None and chunk.key in self.disk:
            # A cache file verified since start has the key's true length,
            # so a manifest that gives another is wrong, not the file.
            verified = self.disk.verified_length(chunk.key)
            if verified is not None and verified != chunk.length:
                raise _wrong_length(chunk, verified)
            async with self._disk_io:
                data = await trio.to_thread.run_sync(self.disk.read, chunk.key, chunk.length)
            if data is not None:
                self.stats.disk_hits += 1
                return data

        data = await self._fetch(chunk, flight.ticket)
        if self.disk is not None and self.disk.can_hold(chunk.length) and self._nursery:
            self._pending_writes[chunk.key] = (data, trio.Event())
            self._nursery.start_soon(self._write_to_disk, chunk.key, data)
        return data

    async def _write_to_disk(self, key: str, data: bytes) -> None:
        try:
            async with self._disk_io:
                await trio.to_thread.run_sync(self.disk.write, key, data)
        finally:
            self._pending_writes.pop(key)[1].set()

    async def _fetch(self, chunk: ChunkRef, ticket: Ticket) -> bytes:
        """Fetch and decode *chunk*, retrying transient failures until the deadline.

        Every waiter of the flight shares these attempts. Raises
        `ChunkUnavailable` when the deadline passes, or the first error that
        no retry can fix (a missing object, refused access).
        """
        started = trio.current_time()
        deadline = started + self._retry.deadline_s
        last_error: BaseException | None = None
        attempt = 0
        corrupt = 0
        while True:
            attempt += 1
            try:
                with trio.fail_at(deadline):
                    return await self._fetch_once(chunk, ticket, deadline)
            except trio.TooSlowError:
                raise ChunkUnavailable(
                    chunk.key, attempt, trio.current_time() - started, last_error
                ) from None
            except ChunkLengthWrong:
                # The manifest is wrong, so another fetch cannot help.
                raise
            except TRANSIENT_ERRORS as exc:
                last_error = exc
                corrupt += isinstance(exc, ChunkCorrupt)
                delay = backoff_delay(self._retry, attempt)
                out_of_time = trio.current_time() + delay >= deadline
                # With replicas, each copy gets its chance to be the good one.
                corrupt_limit = max(MAX_CORRUPT_ATTEMPTS, getattr(self._store, "replicas", 1))
                if out_of_time or corrupt >= corrupt_limit:
                    raise ChunkUnavailable(
                        chunk.key, attempt, trio.current_time() - started, exc
                    ) from None
                self.stats.retries += 1
                _log_retry(chunk.key, attempt, delay, exc)
                await trio.sleep(delay)

    async def _fetch_once(self, chunk: ChunkRef, ticket: Ticket, deadline: float) -> bytes:
        await self.connections.acquire(ticket)
        request = _StoreRequest(chunk.key, trio.current_time())
        token = trio.lowlevel.current_trio_token()
        key = chunk_object_key(chunk.key)

        def deliver(result: outcome.Outcome) -> None:
            # Runs in the worker thread, which must not block here.
            try:
                token.run_sync_soon(self._end_request, request, result)
            except trio.RunFinishedError:
                pass

        # The thread is started here, at once and outside any cancellation,
        # so every request that took a slot reaches `_end_request`.
        trio.lowlevel.start_thread_soon(
            lambda: self._store.get(key), deliver, name=f"get chunk {chunk.key}"
        )
        try:
            await request.done.wait()
        except trio.Cancelled:
            if request.result is None:
                self._abandon(request, timed_out=trio.current_time() >= deadline)
            raise
        finally:
            self.fetch_latency.observe(trio.current_time() - request.started)
        stored = request.result.unwrap()
        self.stats.chunks_fetched += 1
        self.stats.bytes_fetched += len(stored)
        if ticket.started_as == PREFETCH:
            self.stats.prefetch_fetches += 1
        try:
            async with self._decoders:
                data = await trio.to_thread.run_sync(
                    codec.decode, chunk.key, chunk.length, stored
                )
        except ChunkLengthWrong:
            # The copy is good and the manifest wrong, so the copy is not
            # reported as bad.
            raise
        except ChunkCorrupt:
            self.stats.corrupt_chunks += 1
            # A store with replicas serves the next attempt from another copy.
            report_bad_copy = getattr(self._store, "report_bad_copy", None)
            if report_bad_copy is not None:
                report_bad_copy(chunk_object_key(chunk.key))
            raise
        self.stats.bytes_decoded += len(data)
        return data

    def _abandon(self, request: _StoreRequest, timed_out: bool) -> None:
        """Let *request* run on without its reader, off its slot while the cap allows."""
        self.stats.abandoned_fetches += 1
        if len(self._abandoned) < self.max_abandoned:
            self._abandoned.add(request)
            request.holds_slot = False
            self.connections.release()
        if not timed_out:
            # Shutdown, or a warm-up whose client went away.
            log.debug("store request for chunk %s abandoned by its reader", request.chunk_key)
            return
        remaining = ABANDONED_WARNING_S - (trio.current_time() - request.started)
        if remaining <= 0 or self._nursery is None:
            self._warn_abandoned(request)
        else:
            self._nursery.start_soon(self._warn_abandoned_later, request, remaining)

    async def _warn_abandoned_later(self, request: _StoreRequest, delay: float) -> None:
        await trio.sleep(delay)
        if request.result is None:
            self._warn_abandoned(request)

    def _warn_abandoned(self, request: _StoreRequest) -> None:
        request.warned = True
        elapsed = trio.current_time() - request.started
        if request.holds_slot:
            log.warning(
                "store request for chunk %s to %s is still running after %.1f s, past its "
                "read's deadline; %d abandoned requests run already, so it keeps its "
                "connection slot until it ends",
                request.chunk_key,
                self._store.url,
                elapsed,
                self.max_abandoned,
            )
        else:
            log.warning(
                "store request for chunk %s to %s is still running after %.1f s, past its "
                "read's deadline; it runs on without a connection slot (%d of at most %d "
                "such requests)",
                request.chunk_key,
                self._store.url,
                elapsed,
                len(self._abandoned),
                self.max_abandoned,
            )

    def _end_request(self, request: _StoreRequest, result: outcome.Outcome) -> None:
        request.result = result
        if request.holds_slot:
            self.connections.release()
        self._abandoned.discard(request)
        if request.warned:
            log.info(
                "abandoned store request for chunk %s to %s ended after %.1f s",
                request.chunk_key,
                self._store.url,
                trio.current_time() - request.started,
            )
        request.done.set()


def _check_length(chunk: ChunkRef, data: bytes) -> bytes:
    """Return *data*, the verified bytes of *chunk*'s key, if the manifest
    gives their length; else raise `ChunkLengthWrong`.

    Another manifest, or another file of one, may name the same key with
    its true length. A slice of the shared copy would then give a reader
    bytes of the wrong length, which the kernel takes as the end of the file.
    """
    if len(data) != chunk.length:
        raise _wrong_length(chunk, len(data))
    return data


def _wrong_length(chunk: ChunkRef, actual: int) -> ChunkLengthWrong:
    return ChunkLengthWrong(chunk.key, actual, chunk.length)


def _log_retry(key: str, attempt: int, delay: float, exc: Exception) -> None:
    # The first retry is routine; later ones are logged as warnings, at
    # attempts 2, 4, 8 and so on, so a long outage writes a few lines.
    if attempt == 1:
        level = logging.INFO
    elif attempt & (attempt - 1) == 0:
        level = logging.WARNING
    else:
        level = logging.DEBUG
    log.log(level, "retrying chunk %s in %.2f s, attempt %d failed: %s", key, delay, attempt, exc)


def backoff_delay(config: RetryConfig, attempt: int) -> float:
    """Return the pause after failed attempt number *attempt*, with jitter."""
    delay = min(config.base_delay_s * 2 ** (attempt - 1), config.max_delay_s)
    return delay * (0.5 + random.random() / 2)

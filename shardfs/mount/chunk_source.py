"""Decoded chunks for readers: memory LRU, single-flight fetch and decode.

`ChunkSource.get` returns verified, decoded chunk bytes. Concurrent requests
for one chunk, from any number of readers, share one fetch. Store requests
and decoding run in worker threads under two capacity limiters, one for
store connections and one for CPU-bound decoding. All methods run in the
trio thread of the daemon.
"""

import collections
import dataclasses
import logging

import trio

from shardfs import codec
from shardfs.errors import ChunkCorrupt
from shardfs.manifest import ChunkRef
from shardfs.stores.base import Store, chunk_object_key

log = logging.getLogger(__name__)

# A chunk whose fetch or decode failed is fetched once more before the error
# reaches the reader: a corrupt transfer is rarely repeated.
FETCH_ATTEMPTS = 2


@dataclasses.dataclass
class ChunkSourceStats:
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    memory_hits: int = 0
    corrupt_chunks: int = 0


class MemoryCache:
    """A byte-bounded LRU of decoded chunks, keyed by chunk key."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.size_bytes = 0
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if key in self._items or len(data) > self.limit_bytes:
            return
        self._items[key] = data
        self.size_bytes += len(data)
        while self.size_bytes > self.limit_bytes:
            _, evicted = self._items.popitem(last=False)
            self.size_bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._items)


class _Flight:
    """One fetch in progress; waiters share its outcome."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkSource:
    def __init__(self, store: Store, memory_limit: int, connections: int, decoders: int):
        self._store = store
        self.memory = MemoryCache(memory_limit)
        self._flights: dict[str, _Flight] = {}
        self._connections = trio.CapacityLimiter(connections)
        self._decoders = trio.CapacityLimiter(decoders)
        self.stats = ChunkSourceStats()

    async def get(self, chunk: ChunkRef) -> bytes:
        """Return the decoded bytes of *chunk*, verified against its key.

        Raises `ChunkCorrupt` or a `StoreError` when no good copy was found.
        """
        while True:
            data = self.memory.get(chunk.key)
            if data is not None:
                self.stats.memory_hits += 1
                return data

            flight = self._flights.get(chunk.key)
            if flight is None:
                return await self._lead_flight(chunk)

            await flight.done.wait()
            # A leader that was cancelled says nothing about the chunk, so
            # its waiters start a new flight instead of sharing the cancel.
            if isinstance(flight.error, trio.Cancelled):
                continue
            if flight.error is not None:
                raise flight.error
            return flight.data

    async def _lead_flight(self, chunk: ChunkRef) -> bytes:
        flight = _Flight()
        self._flights[chunk.key] = flight
        try:
            flight.data = await self._fetch(chunk)
            self.memory.put(chunk.key, flight.data)
            return flight.data
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[chunk.key]
            flight.done.set()

    async def _fetch(self, chunk: ChunkRef) -> bytes:
        object_key = chunk_object_key(chunk.key)
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            async with self._connections:
                stored = await trio.to_thread.run_sync(self._store.get, object_key)
            self.stats.chunks_fetched += 1
            self.stats.bytes_fetched += len(stored)
            try:
                async with self._decoders:
                    return await trio.to_thread.run_sync(
                        codec.decode, chunk.key, chunk.length, stored
                    )
            except ChunkCorrupt as exc:
                self.stats.corrupt_chunks += 1
                if attempt == FETCH_ATTEMPTS:
                    raise
                log.warning("fetching chunk again, attempt %d failed: %s", attempt, exc)
        raise AssertionError("unreachable")

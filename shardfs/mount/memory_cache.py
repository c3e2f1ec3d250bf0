"""A byte-bounded cache of decoded chunks in three LRU segments.

* *protected*: chunks readers asked for recently, at most `protected_share`
  of the limit;
* *demoted*: chunks that aged out of protected; evicted first;
* *prefetched*: chunks fetched ahead that no reader has asked for yet.

A reader's hit in demoted or prefetched moves the chunk to protected.
When room is needed, demoted chunks go first, then prefetched ones, then
protected ones, and a prefetched chunk is never admitted by evicting a
protected one: prefetch cannot push out the chunks readers use, and chunks
readers are done with make room for chunks they have not reached yet. Not
thread-safe: it is used from the daemon's trio thread only.
"""

import collections


class MemoryCache:
    def __init__(self, limit_bytes: int, protected_share: float = 0.5):
        self.limit_bytes = limit_bytes
        self.protected_limit = int(limit_bytes * protected_share)
        self.size_bytes = 0
        self._sizes = {"protected": 0, "demoted": 0, "prefetched": 0}
        self._segments: dict[str, collections.OrderedDict[str, bytes]] = {
            name: collections.OrderedDict() for name in self._sizes
        }

    def __len__(self) -> int:
        return sum(len(segment) for segment in self._segments.values())

    def __contains__(self, key: str) -> bool:
        return any(key in segment for segment in self._segments.values())

    @property
    def unread_prefetched_bytes(self) -> int:
        """Bytes of prefetched chunks that no reader has asked for yet."""
        return self._sizes["prefetched"]

    @property
    def probation_room(self) -> int:
        """Bytes that prefetched chunks may occupy without evicting protected ones."""
        return self.limit_bytes - self._sizes["protected"]

    def peek(self, key: str) -> bytes | None:
        """Return the chunk without changing its place in the LRU, or None."""
        for segment in self._segments.values():
            data = segment.get(key)
            if data is not None:
                return data
        return None

    def get(self, key: str) -> bytes | None:
        """Return the chunk and mark it used by a reader, or None."""
        protected = self._segments["protected"]
        data = protected.get(key)
        if data is not None:
            protected.move_to_end(key)
            return data
        for name in ("demoted", "prefetched"):
            data = self._segments[name].pop(key, None)
            if data is not None:
                self._sizes[name] -= len(data)
                self._add("protected", key, data)
                self._demote_overflow()
                return data
        return None

    def put(self, key: str, data: bytes, prefetched: bool = False) -> bool:
        """Admit a chunk; return False if it was not admitted."""
        if key in self or len(data) > self.limit_bytes:
            return False
        if prefetched:
            if len(data) > self.probation_room:
                return False
            self._add("prefetched", key, data)
        else:
            self._add("protected", key, data)
            self._demote_overflow()
        self.size_bytes += len(data)
        self._evict()
        return True

    def _add(self, name: str, key: str, data: bytes) -> None:
        self._segments[name][key] = data
        self._sizes[name] += len(data)

    def _pop_oldest(self, name: str) -> tuple[str, bytes]:
        key, data = self._segments[name].popitem(last=False)
        self._sizes[name] -= len(data)
        return key, data

    def _demote_overflow(self) -> None:
        while self._sizes["protected"] > self.protected_limit and len(self._segments["protected"]) > 1:
            key, data = self._pop_oldest("protected")
            self._add("demoted", key, data)

    def _evict(self) -> None:
        for name in ("demoted", "prefetched", "protected"):
            while self.size_bytes > self.limit_bytes and self._segments[name]:
                _, data = self._pop_oldest(name)
                self.size_bytes -= len(data)

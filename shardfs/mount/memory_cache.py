"""A byte-bounded LRU of decoded chunks in two segments.

Chunks that readers asked for sit in the *protected* segment; prefetched
chunks enter the *probation* segment and move to protected on their first
demand hit. The protected segment may fill only `protected_share` of the
limit, and its oldest chunks move down to probation beyond that, so there
is always room ahead of readers. Eviction takes the oldest probation
chunks, and a prefetched chunk is never admitted by evicting protected
ones, so prefetch cannot push out the chunks readers used most recently.
Not thread-safe: it is used from the daemon's trio thread only.
"""

import collections


class MemoryCache:
    def __init__(self, limit_bytes: int, protected_share: float = 0.5):
        self.limit_bytes = limit_bytes
        self.protected_limit = int(limit_bytes * protected_share)
        self.size_bytes = 0
        self._protected_bytes = 0
        self._protected: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._probation: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._protected) + len(self._probation)

    def __contains__(self, key: str) -> bool:
        return key in self._protected or key in self._probation

    @property
    def probation_room(self) -> int:
        """Bytes that prefetched chunks may occupy without evicting protected ones."""
        return self.limit_bytes - self._protected_bytes

    def peek(self, key: str) -> bytes | None:
        """Return the chunk without changing its place in the LRU, or None."""
        data = self._protected.get(key)
        return data if data is not None else self._probation.get(key)

    def get(self, key: str) -> bytes | None:
        """Return the chunk and mark it used by a reader, or None."""
        data = self._protected.get(key)
        if data is not None:
            self._protected.move_to_end(key)
            return data
        data = self._probation.pop(key, None)
        if data is not None:
            self._add_protected(key, data)
        return data

    def put(self, key: str, data: bytes, prefetched: bool = False) -> bool:
        """Admit a chunk; return False if it was not admitted."""
        if key in self or len(data) > self.limit_bytes:
            return False
        if prefetched:
            if len(data) > self.probation_room:
                return False
            self._probation[key] = data
        else:
            self._add_protected(key, data)
        self.size_bytes += len(data)
        self._evict()
        return True

    def _add_protected(self, key: str, data: bytes) -> None:
        self._protected[key] = data
        self._protected_bytes += len(data)
        while self._protected_bytes > self.protected_limit and len(self._protected) > 1:
            old_key, old_data = self._protected.popitem(last=False)
            self._protected_bytes -= len(old_data)
            self._probation[old_key] = old_data

    def _evict(self) -> None:
        while self.size_bytes > self.limit_bytes and self._probation:
            _, evicted = self._probation.popitem(last=False)
            self.size_bytes -= len(evicted)
        while self.size_bytes > self.limit_bytes and self._protected:
            _, evicted = self._protected.popitem(last=False)
            self._protected_bytes -= len(evicted)
            self.size_bytes -= len(evicted)

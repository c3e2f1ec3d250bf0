"""A byte-bounded LRU of decoded chunks in two segments.

Chunks that readers asked for sit in the *protected* segment; prefetched
chunks enter the *probation* segment and move to protected on their first
demand hit. Eviction takes the oldest probation chunks first, and a
prefetched chunk is never admitted by evicting protected ones, so prefetch
cannot push out chunks that readers are using. Not thread-safe: it is used
from the daemon's trio thread only.
"""

import collections


class MemoryCache:
    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.size_bytes = 0
        self._protected: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._probation: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._protected) + len(self._probation)

    def __contains__(self, key: str) -> bool:
        return key in self._protected or key in self._probation

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
            self._protected[key] = data
        return data

    def put(self, key: str, data: bytes, prefetched: bool = False) -> bool:
        """Admit a chunk; return False if it was not admitted."""
        if key in self or len(data) > self.limit_bytes:
            return False
        if prefetched:
            if not self._make_room(len(data), self._probation):
                return False
            self._probation[key] = data
        else:
            self._make_room(len(data), self._probation, self._protected)
            self._protected[key] = data
        self.size_bytes += len(data)
        return True

    def _make_room(self, needed: int, *segments: collections.OrderedDict) -> bool:
        for segment in segments:
            while self.size_bytes + needed > self.limit_bytes and segment:
                _, evicted = segment.popitem(last=False)
                self.size_bytes -= len(evicted)
        return self.size_bytes + needed <= self.limit_bytes

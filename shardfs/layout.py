"""Map a byte range of a file onto the chunks that cover it (pure functions).

Ranges are half-open, ``[start, end)``, in file offsets.
"""

import bisect
import dataclasses
from collections.abc import Sequence

from shardfs.manifest import ChunkRef


@dataclasses.dataclass(frozen=True)
class ChunkSlice:
    """The part ``[start, end)`` of one chunk's decoded bytes that a read needs."""

    chunk: ChunkRef
    start: int
    end: int


def chunk_offsets(chunks: Sequence[ChunkRef]) -> list[int]:
    """Return the start offsets of *chunks*, the index `slices_for_range` searches."""
    return [chunk.offset for chunk in chunks]


def slices_for_range(
    chunks: Sequence[ChunkRef], offsets: Sequence[int], start: int, end: int
) -> list[ChunkSlice]:
    """Return the chunk slices that make up ``[start, end)``, in file order.

    *chunks* tile the file and *offsets* is `chunk_offsets(chunks)`. A range
    that reaches past the last chunk is cut at the end of the file, so a read
    at or past EOF gets no slices.
    """
    if not chunks:
        return []
    end = min(end, chunks[-1].end)
    if start >= end:
        return []
    index = bisect.bisect_right(offsets, start) - 1
    slices = []
    while index < len(chunks) and chunks[index].offset < end:
        chunk = chunks[index]
        slice_start = max(start, chunk.offset) - chunk.offset
        slice_end = min(end, chunk.end) - chunk.offset
        slices.append(ChunkSlice(chunk, slice_start, slice_end))
        index += 1
    return slices

"""Chunk boundaries of a file (pure functions).

Files of no known format are cut into fixed-size spans; the last span may
be shorter. When the format is known (`shardfs.formats.Layout`), chunk
boundaries fall on region boundaries instead:

- a header or directory region is chunked on its own;
- consecutive small tensors are grouped into chunks of up to the chunk
  size, walking the tensors in file order. A group closes when the next
  tensor would not fit, so the grouping depends only on tensor sizes and
  never on absolute offsets. A header that grows moves every tensor but
  leaves the chunks of the tensors, and so their keys, unchanged;
- a tensor of the chunk size or more is cut at multiples of the chunk size
  from its own start, and its last, shorter piece is a chunk of its own.

Spans are half-open ``(start, end)`` offsets.
"""

import dataclasses
from collections.abc import Iterator

from shardfs.formats import Layout, Region


@dataclasses.dataclass(frozen=True)
class PlannedChunk:
    """One chunk to cut from a file, with what the codec should know of it."""

    start: int
    end: int
    # Bytes per element of the chunk's content, or None when unknown.
    element_size: int | None = None
    # Offset in the chunk of an element boundary, for byte grouping.
    element_offset: int = 0


def fixed_spans(size: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` spans of *chunk_size* bytes that tile ``[0, size)``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk size must be positive, not {chunk_size}")
    for start in range(0, size, chunk_size):
        yield start, min(start + chunk_size, size)


def plan_chunks(layout: Layout | None, size: int, chunk_size: int) -> list[PlannedChunk]:
    """Return the chunks that tile ``[0, size)``, on the regions of *layout* if given."""
    if layout is None:
        return [PlannedChunk(start, end) for start, end in fixed_spans(size, chunk_size)]
    if chunk_size <= 0:
        raise ValueError(f"chunk size must be positive, not {chunk_size}")

    chunks: list[PlannedChunk] = []
    group: list[Region] = []
    for region in _tiling_regions(layout.regions, size):
        length = region.end - region.start
        if region.standalone or length >= chunk_size:
            _close_group(group, chunks)
            chunks.extend(_split_region(region, chunk_size))
            continue
        if group and region.end - group[0].start > chunk_size:
            _close_group(group, chunks)
        group.append(region)
    _close_group(group, chunks)
    return chunks


def _tiling_regions(regions: tuple[Region, ...], size: int) -> list[Region]:
    """Return *regions* clipped to ``[0, size)`` and widened to tile it.

    Bytes between two regions join the region before them; bytes before
    the first region form a standalone region of their own.
    """
    tiled: list[Region] = []
    position = 0
    for region in regions:
        start, end = max(region.start, position), min(region.end, size)
        if end <= start:
            continue
        if start > position:
            if tiled:
                tiled[-1] = dataclasses.replace(tiled[-1], end=start)
            else:
                tiled.append(Region(0, start, standalone=True))
        tiled.append(dataclasses.replace(region, start=start, end=end))
        position = end
    if position < size:
        if tiled:
            tiled[-1] = dataclasses.replace(tiled[-1], end=size)
        else:
            tiled.append(Region(0, size))
    return tiled


def _split_region(region: Region, chunk_size: int) -> Iterator[PlannedChunk]:
    for start in range(region.start, region.end, chunk_size):
        end = min(start + chunk_size, region.end)
        yield PlannedChunk(
            start, end, region.element_size, region.element_start - start
        )


def _close_group(group: list[Region], chunks: list[PlannedChunk]) -> None:
    """Append the chunk of the grouped regions, if any, and empty *group*."""
    if not group:
        return
    start, end = group[0].start, group[-1].end
    # The codec groups the whole chunk by one element size: take the one
    # that covers the most bytes, and align to its first region.
    covered: dict[int | None, int] = {}
    for region in group:
        covered[region.element_size] = (
            covered.get(region.element_size, 0) + region.end - region.start
        )
    element_size = max(covered, key=covered.get)
    first = next(region for region in group if region.element_size == element_size)
    chunks.append(PlannedChunk(start, end, element_size, first.element_start - start))
    group.clear()

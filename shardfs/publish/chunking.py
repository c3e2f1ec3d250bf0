"""Chunk boundaries of a file (pure functions).

Files are cut into fixed-size spans; the last span may be shorter. Spans
are half-open ``(start, end)`` offsets.
"""

from collections.abc import Iterator


def fixed_spans(size: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` spans of *chunk_size* bytes that tile ``[0, size)``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk size must be positive, not {chunk_size}")
    for start in range(0, size, chunk_size):
        yield start, min(start + chunk_size, size)

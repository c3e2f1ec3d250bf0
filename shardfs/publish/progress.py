"""Push progress: a bar on a terminal, one summary line otherwise."""

import sys
import time

from shardfs.config import format_size


class PushProgress:
    """Counts of one push; safe to update from one thread only."""

    def __init__(self, total_bytes: int, stream=None):
        self.total_bytes = total_bytes
        self.bytes_read = 0
        self.bytes_stored = 0
        self.bytes_uploaded = 0
        self.chunks = 0
        self.chunks_present = 0
        self.started = time.monotonic()
        self._stream = stream or sys.stderr
        self._interactive = self._stream.isatty()
        self._last_draw = 0.0

    def add_chunk(self, length: int, stored: int, uploaded: bool) -> None:
        self.bytes_read += length
        self.bytes_stored += stored
        self.chunks += 1
        if uploaded:
            self.bytes_uploaded += stored
        else:
            self.chunks_present += 1
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._interactive or (not force and now - self._last_draw < 0.1):
            return
        self._last_draw = now
        share = self.bytes_read / self.total_bytes if self.total_bytes else 1.0
        filled = int(share * 30)
        bar = "#" * filled + "-" * (30 - filled)
        self._stream.write(
            f"\r[{bar}] {format_size(self.bytes_read)} / {format_size(self.total_bytes)}"
            f"  {format_size(self.rate())}/s  {self.chunks_present} chunks present "
        )
        self._stream.flush()

    def rate(self) -> float:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return self.bytes_read / elapsed

    def finish(self, name: str, file_count: int) -> None:
        if self._interactive:
            self._draw(force=True)
            self._stream.write("\n")
        elapsed = time.monotonic() - self.started
        self._stream.write(
            f"pushed {name}: {_count(file_count, 'file')}, {format_size(self.bytes_read)} read, "
            f"{format_size(self.bytes_stored)} stored, "
            f"{format_size(self.bytes_uploaded)} uploaded, {_count(self.chunks, 'chunk')} "
            f"({self.chunks_present} already present) in {elapsed:.1f} s\n"
        )
        self._stream.flush()


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"

"""Progress of push and repair: a bar on a terminal, and push's summary line."""

import sys
import time

from shardfs.config import format_size


class ProgressBar:
    """A bar with a status text, redrawn in place when *stream* is a terminal.

    Writes nothing to any other stream. Not thread-safe, so a caller that
    updates from several threads holds its own lock around `due` and `draw`.
    """

    WIDTH = 30
    MIN_INTERVAL_S = 0.1

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self._last_draw = 0.0

    def due(self, force: bool = False) -> bool:
        """Return whether to redraw now.

        True only on a terminal, when *force* is set or MIN_INTERVAL_S
        seconds have passed since the last draw.
        """
        if not self.interactive:
            return False
        return force or time.monotonic() - self._last_draw >= self.MIN_INTERVAL_S

    def draw(self, share: float, text: str) -> None:
        """Redraw the bar filled to *share* of WIDTH, followed by *text*.

        A *share* above 1 draws a bar longer than WIDTH.
        """
        self._last_draw = time.monotonic()
        filled = int(share * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\r[{bar}] {text}")
        self.stream.flush()

    def end_line(self) -> None:
        """End the bar's line on a terminal, so that later output starts on its own."""
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


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
        self._bar = ProgressBar(stream)

    def add_chunk(self, length: int, stored: int, uploaded: bool) -> None:
        """Count the first chunk of a key in this push: read, stored, and
        uploaded unless the store already had it."""
        self.bytes_read += length
        self.bytes_stored += stored
        self.chunks += 1
        if uploaded:
            self.bytes_uploaded += stored
        else:
            self.chunks_present += 1
        self._draw()

    def add_repeat(self, length: int) -> None:
        """Count a chunk equal to one counted before in this push: read only,
        since the store keeps one copy."""
        self.bytes_read += length
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self._bar.due(force):
            return
        share = self.bytes_read / self.total_bytes if self.total_bytes else 1.0
        self._bar.draw(
            share,
            f"{format_size(self.bytes_read)} / {format_size(self.total_bytes)}"
            f"  {format_size(self.rate())}/s  {self.chunks_present} chunks present ",
        )

    def rate(self) -> float:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return self.bytes_read / elapsed

    def finish(self, name: str, file_count: int) -> None:
        self._draw(force=True)
        self._bar.end_line()
        elapsed = time.monotonic() - self.started
        self._bar.stream.write(
            f"pushed {name}: {_count(file_count, 'file')}, {format_size(self.bytes_read)} read, "
            f"{format_size(self.bytes_stored)} stored, "
            f"{format_size(self.bytes_uploaded)} uploaded, {_count(self.chunks, 'chunk')} "
            f"({self.chunks_present} already present) in {elapsed:.1f} s\n"
        )
        self._bar.stream.flush()


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"

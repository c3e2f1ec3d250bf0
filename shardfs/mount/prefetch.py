"""Read-ahead: decide which chunks of a file to fetch before readers ask.

State is kept per file, shared by every handle and process reading it,
because loaders read one file from thread pools and forked workers: a
per-handle guess would see random reads. Two rules decide what to fetch:

* A reader that starts on a tensor (a span known from the file's header,
  see `shardfs.formats`) reads all of it, so the rest of that span is
  fetched at once, in parallel, and nothing past it.
* A stream of reads that moves forward through the file, and past the end
  of the span it started in, is a whole-file load: its window starts at
  `initial_chunks` and doubles on every new chunk up to `max_chunks`.

`ReadAhead` is the pure decision logic; `Prefetcher` feeds it the reads of
the mount and hands its decisions to the chunk source.
"""

import bisect
import collections
import dataclasses
import logging
import mmap

from shardfs import formats
from shardfs.config import PrefetchConfig
from shardfs.manifest import FileEntry

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
# The gap a read may leave after the furthest read of a stream and still
# continue it: twice the 1 MiB FUSE read size, for reads that arrive out
# of order.
MAX_GAP = 2 * 1024 * 1024


@dataclasses.dataclass
class _Stream:
    last_chunk: int
    window: int
    unit_end: int  # end offset of the span the stream started in
    last_end: int  # the furthest end offset of its reads
    crossed: bool = False
    # The end of the span past unit_end, while the stream's first read
    # left open which of the two spans the reader is in.
    undecided_end: int | None = None


class ReadAhead:
    """Read-ahead decisions for one file."""

    def __init__(self, chunk_starts: list[int], size: int, config: PrefetchConfig):
        self._chunk_starts = chunk_starts
        self._size = size
        self._config = config
        self._streams: collections.OrderedDict[int, _Stream] = collections.OrderedDict()
        self.spans: list[tuple[int, int]] | None = None
        self._span_starts: list[int] = []

    def set_spans(self, spans: list[tuple[int, int]]) -> None:
        self.spans = spans
        self._span_starts = [start for start, _ in spans]

    def _chunk_of(self, offset: int) -> int:
        return bisect.bisect_right(self._chunk_starts, offset) - 1

    def _span_end(self, offset: int) -> int:
        """Return the end of the span holding *offset*, or the file's end."""
        if not self.spans:
            return self._size
        index = bisect.bisect_right(self._span_starts, offset) - 1
        if index < 0:
            return self._size
        start, end = self.spans[index]
        return end if start <= offset < end else self._size

    def on_read(self, start: int, end: int) -> range:
        """Record a read of ``[start, end)``; return the chunk indexes to fetch."""
        if start >= end or start >= self._size:
            return range(0)
        first = self._chunk_of(start)
        last = self._chunk_of(min(end, self._size) - 1)
        stream = self._match_stream(first, start)

        if stream is None:
            stream = self._new_stream(start, end, last)
        elif stream.undecided_end is not None:
            self._decide_span(stream, start)
        if last > stream.last_chunk:
            del self._streams[stream.last_chunk]
            stream.last_chunk = last
            if end >= stream.unit_end + self._config.crossing_margin:
                stream.crossed = True
            # Inside its first span a stream needs no window (the rest of
            # the span is fetched anyway), so the window starts small when
            # the stream leaves it and grows only as the stream goes on.
            if stream.crossed or not self.spans:
                if stream.window == 0:
                    stream.window = self._config.initial_chunks
                else:
                    stream.window = min(stream.window * 2, self._config.max_chunks)
            self._remember(last, stream)

        stream.last_end = max(stream.last_end, end)

        if not self.spans:
            limit = last + stream.window
        elif stream.undecided_end is not None:
            limit = last
        elif not stream.crossed:
            # The rest of the span the stream started in: the reader will
            # read it all. Kernel read-ahead that runs into the next span
            # is not taken as a reader starting on it.
            limit = self._chunk_of(stream.unit_end - 1)
        else:
            span_end = self._span_end(min(end, self._size) - 1)
            limit = max(self._chunk_of(span_end - 1), last + stream.window)
        limit = min(limit, last + self._config.max_chunks, len(self._chunk_starts) - 1)
        return range(last + 1, limit + 1)

    def _new_stream(self, start: int, end: int, last_chunk: int) -> _Stream:
        """Start a stream at the read ``[start, end)``, which no stream continues.

        A page fault makes the kernel read around the faulting page, and
        tensor data is not page-aligned, so a first read that reaches the
        page of a span boundary does not show which span the reader is in.
        The kernel may end that read where the faulting page starts, up to
        a page before the tensor the reader wants, or center it on the
        fault, as when a reader's memcpy touches the last page of a tensor
        first. Such a stream fetches nothing until its next read decides.
        """
        start_span_end = self._span_end(start)
        next_span_end = self._span_end(min(end + PAGE_SIZE, self._size) - 1)
        stream = _Stream(last_chunk, 0, start_span_end, end)
        if next_span_end != start_span_end:
            stream.undecided_end = next_span_end
        self._remember(last_chunk, stream)
        return stream

    def _decide_span(self, stream: _Stream, start: int) -> None:
        """Settle an undecided stream by its next read, which starts at *start*.

        A read that starts on the page of the boundary or later is in the
        later span. An earlier one keeps the stream in the earlier span.
        """
        boundary_page = stream.unit_end - stream.unit_end % PAGE_SIZE
        if start >= boundary_page:
            stream.unit_end = stream.undecided_end
        stream.undecided_end = None

    def _match_stream(self, first_chunk: int, start: int) -> _Stream | None:
        """Return the stream that a read at *start*, in *first_chunk*, continues."""
        for last_chunk, stream in reversed(self._streams.items()):
            reach = max(1, stream.window)
            if not last_chunk <= first_chunk <= last_chunk + reach:
                continue
            # A stream with no window yet reads one tensor, and the reads of
            # one reader leave no gaps. A read further on is another reader
            # that came back near an old tensor: counting it as the same
            # stream would make that stream look like a whole-file load.
            if stream.window == 0 and start > stream.last_end + MAX_GAP:
                continue
            return stream
        return None

    def _remember(self, last_chunk: int, stream: _Stream) -> None:
        self._streams[last_chunk] = stream
        self._streams.move_to_end(last_chunk)
        while len(self._streams) > self._config.max_streams:
            self._streams.popitem(last=False)


class Prefetcher:
    """Feeds the reads of each file to its `ReadAhead` and starts the fetches."""

    def __init__(self, chunks, config: PrefetchConfig, max_outstanding: int):
        self._chunks = chunks
        self._config = config
        self._max_outstanding = max_outstanding
        self._files: dict[int, ReadAhead] = {}
        self._spans_tried: set[int] = set()

    def _state(self, file_id: int, entry: FileEntry, offsets: list[int]) -> ReadAhead:
        state = self._files.get(file_id)
        if state is None:
            state = ReadAhead(offsets, entry.size, self._config)
            self._files[file_id] = state
        return state

    def on_read(self, file_id: int, entry: FileEntry, offsets: list[int], start: int, end: int) -> None:
        """Record a demand read of ``[start, end)`` and start the fetches it calls for."""
        if len(entry.chunks) < 2:
            return
        state = self._state(file_id, entry, offsets)
        if state.spans is None:
            self._learn_spans(file_id, entry, state)
        for index in state.on_read(start, end):
            chunk = entry.chunks[index]
            if self._chunks.is_present(chunk.key):
                # A chunk only in the disk cache is still read ahead, into
                # the page cache, so a load after a restart streams too.
                self._chunks.advise(chunk)
                continue
            if self._chunks.prefetches_outstanding >= self._max_outstanding:
                break
            if not self._chunks.can_prefetch(chunk.length):
                break
            self._chunks.prefetch(chunk)

    def _learn_spans(self, file_id: int, entry: FileEntry, state: ReadAhead) -> None:
        """Parse tensor spans from the first or last chunk once it is in memory."""
        first, last = entry.chunks[0], entry.chunks[-1]
        head = self._chunks.memory.peek(first.key)
        spans = None
        if head is not None:
            spans = formats.safetensors_spans(head, entry.size)
        tail = self._chunks.memory.peek(last.key)
        if spans is None and tail is not None:
            spans = formats.zip_spans(tail, last.offset, entry.size)
        if spans is not None:
            state.set_spans(spans)
            log.debug("file %d: %d tensor spans", file_id, len(spans))
        elif head is not None and tail is not None:
            # Neither format: plain read-ahead from here on.
            state.set_spans([])

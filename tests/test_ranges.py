"""Byte ranges read through the mount equal the same ranges of the source.

Each chunk size gets one store and one mount, shared by the tests of this
module. The files have sizes around the page size and the chunk size C, so
reads meet chunk boundaries, the last partial chunk and the end of file.
Expected bytes are read with ``os.pread`` from the source file itself.
"""

import errno
import mmap
import os
import random

import numpy
import pytest

from conftest import mounted, needs_fuse, run_shardfs

pytestmark = needs_fuse

MiB = 1024 * 1024
CHUNK_SIZES = {"chunk-1MiB": 1 * MiB, "chunk-64MiB": 64 * MiB}
MODEL = "org/ranges"

# File size labels in terms of the chunk size C, with the size each one means.
SIZE_LABELS = ("0", "1", "4095", "4096", "4097", "C-1", "C", "C+1", "3C+17")


def size_for(label: str, chunk_size: int) -> int:
    sizes = {
        "C-1": chunk_size - 1,
        "C": chunk_size,
        "C+1": chunk_size + 1,
        "3C+17": 3 * chunk_size + 17,
    }
    return sizes[label] if label in sizes else int(label)


def file_name(label: str) -> str:
    return f"size-{label}.bin"


class Served:
    """A source directory pushed with one chunk size and mounted."""

    def __init__(self, source: str, mount_path: str, chunk_size: int):
        self.source = source
        self.model_path = os.path.join(mount_path, MODEL)
        self.chunk_size = chunk_size

    def source_path(self, label: str) -> str:
        return os.path.join(self.source, file_name(label))

    def mounted_path(self, label: str) -> str:
        return os.path.join(self.model_path, file_name(label))

    def size(self, label: str) -> int:
        return size_for(label, self.chunk_size)


@pytest.fixture(scope="module", params=list(CHUNK_SIZES.values()), ids=list(CHUNK_SIZES))
def served(request, tmp_path_factory):
    chunk_size = request.param
    root = tmp_path_factory.mktemp(f"ranges-{chunk_size}")
    source = root / "source"
    source.mkdir()
    rng = numpy.random.default_rng(chunk_size)
    for label in SIZE_LABELS:
        # Random bytes do not compress, so every chunk is stored raw and an
        # offset error anywhere shows up as different bytes.
        (source / file_name(label)).write_bytes(rng.bytes(size_for(label, chunk_size)))

    store = str(root / "store")
    result = run_shardfs(
        "push", "--store", store, "--chunk-size", str(chunk_size), str(source), MODEL
    )
    assert result.returncode == 0, result.stderr
    with mounted(store, str(root / "mnt")) as mount:
        yield Served(str(source), mount.path, chunk_size)


def read_source(served: Served, label: str, length: int, offset: int) -> bytes:
    with open(served.source_path(label), "rb") as file:
        return os.pread(file.fileno(), length, offset)


# Ways a test read reaches the daemon. In "page-cache" mode the file's cached
# pages are dropped first, so the kernel requests whole pages and read-ahead.
# In "direct" mode O_DIRECT passes the read's exact offset and length through.
READ_MODES = ("page-cache", "direct")


def read_mounted(served: Served, label: str, length: int, offset: int, mode: str) -> bytes:
    """Return one ``os.pread`` of the mounted file, made in *mode*."""
    path = served.mounted_path(label)
    if mode == "direct":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                pytest.skip("the mount rejects O_DIRECT opens with EINVAL")
            raise
    else:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def read_both(
    served: Served, label: str, length: int, offset: int, mode: str
) -> tuple[bytes, bytes]:
    """Return ``(expected, actual)``: one pread of the source and of the mount."""
    expected = read_source(served, label, length, offset)
    return expected, read_mounted(served, label, length, offset, mode)


@pytest.mark.parametrize("label", SIZE_LABELS)
def test_size_matches_source(served, label):
    assert os.stat(served.mounted_path(label)).st_size == served.size(label)


@pytest.mark.parametrize("label", SIZE_LABELS)
def test_whole_file_equals_source(served, label):
    with open(served.source_path(label), "rb") as file:
        expected = file.read()
    with open(served.mounted_path(label), "rb") as file:
        actual = file.read()
    assert len(actual) == served.size(label)
    assert actual == expected


@pytest.mark.parametrize("label", [label for label in SIZE_LABELS if label != "0"])
@pytest.mark.parametrize("mode", READ_MODES)
def test_random_ranges_equal_source(served, mode, label):
    size = served.size(label)
    rng = random.Random(f"{served.chunk_size}-{label}")
    for _ in range(40):
        offset = rng.randrange(size + 1)
        # Log-uniform lengths from 1 byte to 2C mix page-sized probes with
        # reads that span several chunks.
        length = int(2 ** rng.uniform(0, (2 * served.chunk_size).bit_length()))
        expected, actual = read_both(served, label, length, offset, mode)
        assert len(actual) == len(expected), f"length at offset {offset}, {length} bytes"
        assert actual == expected, f"bytes at offset {offset}, {length} bytes"


@pytest.mark.parametrize("label", ["C+1", "3C+17"])
@pytest.mark.parametrize("mode", READ_MODES)
def test_reads_across_chunk_boundaries(served, mode, label):
    chunk_size = served.chunk_size
    size = served.size(label)
    for boundary in range(chunk_size, size, chunk_size):
        for before, after in ((1, 1), (100, 100), (4096, 4096), (1, 0), (0, 1)):
            offset = boundary - before
            expected, actual = read_both(served, label, before + after, offset, mode)
            assert actual == expected, f"{before}+{after} bytes around {boundary}"


@pytest.mark.parametrize("mode", READ_MODES)
def test_read_spanning_three_chunks(served, mode):
    chunk_size = served.chunk_size
    offset = chunk_size - 5
    expected, actual = read_both(served, "3C+17", chunk_size + 10, offset, mode)
    assert len(actual) == chunk_size + 10
    assert actual == expected


@pytest.mark.parametrize("label", ["C+1", "3C+17"])
@pytest.mark.parametrize("mode", READ_MODES)
def test_last_partial_chunk(served, mode, label):
    size = served.size(label)
    last_start = size - size % served.chunk_size
    expected, actual = read_both(served, label, served.chunk_size, last_start, mode)
    assert len(actual) == size - last_start
    assert actual == expected


def test_zero_length_file(served):
    path = served.mounted_path("0")
    assert os.stat(path).st_size == 0
    with open(path, "rb") as file:
        assert file.read() == b""
        assert os.pread(file.fileno(), 10, 0) == b""


@pytest.mark.parametrize("mode", READ_MODES)
def test_file_of_exactly_one_chunk(served, mode):
    chunk_size = served.chunk_size
    expected_last, actual_last = read_both(served, "C", 1, chunk_size - 1, mode)
    assert actual_last == expected_last
    _, past_end = read_both(served, "C", 10, chunk_size, mode)
    assert past_end == b""


@pytest.mark.parametrize("label", [label for label in SIZE_LABELS if label not in ("0", "1")])
@pytest.mark.parametrize("mode", READ_MODES)
def test_reads_at_and_past_eof(served, mode, label):
    size = served.size(label)
    expected_tail, actual_tail = read_both(served, label, 10, size - 3, mode)
    assert actual_tail == expected_tail
    assert len(actual_tail) == 3
    _, at_eof = read_both(served, label, 10, size, mode)
    assert at_eof == b""
    _, past_eof = read_both(served, label, 10, size + 1000, mode)
    assert past_eof == b""


@pytest.mark.parametrize("label", ["C", "C+1", "3C+17"])
@pytest.mark.parametrize("mode", READ_MODES)
def test_large_pread_reaches_eof(served, mode, label):
    offset = served.chunk_size - 100
    expected, actual = read_both(served, label, 64 * MiB, offset, mode)
    assert len(actual) == min(64 * MiB, served.size(label) - offset)
    assert actual == expected


def aligned_read(fd: int, length: int, offset: int) -> bytes:
    """Read into a page-aligned buffer, as O_DIRECT requires on most filesystems."""
    with mmap.mmap(-1, length) as buffer:
        count = os.preadv(fd, [buffer], offset)
        return buffer[:count]


def test_o_direct_aligned_reads(served):
    label = "3C+17"
    size = served.size(label)
    chunk_size = served.chunk_size
    try:
        fd = os.open(served.mounted_path(label), os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        assert exc.errno == errno.EINVAL, f"O_DIRECT open failed with {exc}"
        return
    try:
        cases = [
            (4096, 0),
            (4096, 4096),
            (4096, chunk_size),
            (MiB, 0),
            (MiB, chunk_size),
            (MiB, chunk_size - 4096),
            (MiB, 2 * chunk_size - MiB // 2),
            (16 * MiB, 0),
        ]
        for length, offset in cases:
            actual = aligned_read(fd, length, offset)
            expected = read_source(served, label, length, offset)
            assert actual == expected, f"O_DIRECT read of {length} bytes at {offset}"

        # A read across EOF returns the bytes that remain.
        last_page = size - size % 4096
        actual_tail = aligned_read(fd, MiB, last_page)
        expected_tail = read_source(served, label, MiB, last_page)
        assert len(actual_tail) == size - last_page
        assert actual_tail == expected_tail
    finally:
        os.close(fd)

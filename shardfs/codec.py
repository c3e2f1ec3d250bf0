"""Encode, decode and verify one chunk (pure functions over bytes).

A stored chunk object is a 16-byte header followed by the payload::

    magic "SHC1" | codec u8 | transform u8 | reserved u16 | length u64

all little-endian, where *length* is the size of the decoded chunk. The
header makes each object self-describing, so a chunk pushed once with one
encoding decodes correctly for every manifest that names its key. The key
is the xxh3-128 of the decoded bytes, and `decode` returns bytes only after
they match it.

Encodings, as (codec, transform) pairs:

- ``raw``/``none``: the payload is the chunk itself.
- ``zstd``/``none``: the payload is one zstd frame of the chunk.
- ``split``/a byte-grouping transform: the chunk is read as elements of 2
  or 4 bytes, and byte *i* of every element goes to stream *i* (all byte
  0s, then all byte 1s, ...). The ``rotl1-`` transforms first rotate each
  little-endian element left by one bit. That moves the sign bit of a
  float next to its mantissa, so the whole exponent of a bf16, fp16 or
  fp32 value lands in its top byte. Each stream is stored raw or as its
  own zstd frame, whichever pays, so near-random mantissa bytes cost
  nothing to decode. The payload of ``split`` is::

      prefix u32 | k x (stream codec u8, 3 zero bytes, stored length u32)
      | prefix bytes | stream 0 | ... | stream k-1 | tail bytes

  where the *prefix* bytes come before the first whole element (a zip
  local header, say), ``n = (length - prefix) // k`` is the element
  count, each stream decodes to *n* bytes, and the ``(length - prefix) %
  k`` tail bytes are stored as they are.
"""

import dataclasses
import struct

import numpy
import xxhash
import zstandard

from shardfs import _grouping
from shardfs.errors import ChunkCorrupt, ChunkEncodingUnknown, ChunkLengthWrong

HEADER = struct.Struct("<4sBBHQ")
HEADER_SIZE = HEADER.size
MAGIC = b"SHC1"

CODEC_IDS = {"raw": 0, "zstd": 1, "split": 2}
_CODEC_NAMES = {value: name for name, value in CODEC_IDS.items()}


@dataclasses.dataclass(frozen=True)
class Transform:
    """A rearrangement of a chunk's bytes applied before coding."""

    name: str
    id: int
    element_size: int  # bytes per element; 1 for no grouping
    rotate: bool  # rotate each element left by one bit before grouping


TRANSFORMS = {
    item.name: item
    for item in (
        Transform("none", 0, 1, False),
        Transform("bytegroup2", 1, 2, False),
        Transform("bytegroup4", 2, 4, False),
        Transform("rotl1-bytegroup2", 3, 2, True),
        Transform("rotl1-bytegroup4", 4, 4, True),
    )
}
_TRANSFORMS_BY_ID = {item.id: item for item in TRANSFORMS.values()}

# The grouping transform the encoder uses for each element size. Rotating
# a 2-byte element saves about 1% of the stored size of bf16 weights. On a
# 4-byte element it saves about 0.3% (fp32 MiniLM) but adds a tenth to the
# decode time, so fp32 is grouped without it. Measured with
# scripts/compression_bench.py.
GROUPING_FOR_SIZE = {2: "rotl1-bytegroup2", 4: "bytegroup4"}


def is_valid_encoding(codec_name: str, transform_name: str) -> bool:
    """Return whether *codec_name* can carry *transform_name*.

    Only ``split`` carries a grouping transform, and it carries nothing else.
    """
    if codec_name not in CODEC_IDS or transform_name not in TRANSFORMS:
        return False
    return (codec_name == "split") == (transform_name != "none")


_SPLIT_PREFIX = struct.Struct("<I")
_STREAM_ENTRY = struct.Struct("<B3sI")
_STREAM_PADDING = bytes(3)

# zstd settings for one byte stream of a grouped chunk. An exponent stream
# has a skewed byte distribution but few real repeats, so the LZ matches
# that zstd level 3 finds in it cost more than they save. On bf16 normal
# weights level 3 stores 0.42 of the stream, where the byte entropy is 0.335.
# With a 64-entry hash table and matches of 7 bytes or more, almost every
# byte is left to zstd's Huffman literal coder, which stores 0.340. It
# encodes at about 500 MB/s and decodes at about 1 GB/s on one core of a
# 2-core Xeon VM (zstandard 0.25). Long runs, such as zero padding, still
# match. A 128 KiB window keeps zstd's full block size.
_STREAM_PARAMS = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST,
    window_log=17,
    hash_log=6,
    search_log=1,
    min_match=7,
)

# A stream stays raw unless zstd saves at least this share of it: decoding
# a near-random mantissa stream costs time for a saving of 1 or 2 percent.
STREAM_MIN_SAVING = 1 / 32

# Chunks shorter than this are not tried with grouping: the stream table
# and the zstd frames would eat any saving.
MIN_GROUPED_LENGTH = 4096

# Bytes of a chunk compressed with each element size to choose one when
# the format does not give it.
SAMPLE_LENGTH = 1 << 20

_UNSIGNED = {2: numpy.dtype("<u2"), 4: numpy.dtype("<u4")}


@dataclasses.dataclass(frozen=True)
class EncodedChunk:
    key: str
    length: int
    codec: str
    transform: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class ChunkHeader:
    codec: str
    transform: str
    length: int


def chunk_key(data: bytes | memoryview) -> str:
    """Return the content key of decoded chunk bytes: xxh3-128 as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


def encode(
    data: bytes | memoryview,
    level: int = 3,
    element_size: int | None = None,
    element_offset: int = 0,
) -> EncodedChunk:
    """Encode *data* with whichever of raw, zstd and byte grouping is smallest.

    *element_size* is the size in bytes of the chunk's elements when the
    file format gives it. 2 or 4 try that grouping and 1 tries none. None
    or any other size tries 2 and 4 on a sample and keeps the better.
    *element_offset* is the offset in *data* of any element boundary.
    """
    candidates = [encode_as(data, "zstd", "none", level)]
    size = _grouping_size(data, element_size, element_offset)
    if size is not None:
        candidates.append(
            encode_as(data, "split", GROUPING_FOR_SIZE[size], element_offset=element_offset)
        )
    # min keeps the first of equal sizes, so zstd wins a tie with grouping.
    best = min(candidates, key=lambda candidate: len(candidate.data))
    # Raw is built only when it wins, and it wins ties: it is fastest to read.
    if len(best.data) >= HEADER_SIZE + len(memoryview(data).cast("B")):
        return encode_as(data, "raw", "none")
    return best


def _grouping_size(data, element_size: int | None, element_offset: int) -> int | None:
    if len(data) < MIN_GROUPED_LENGTH or element_size == 1:
        return None
    if element_size in GROUPING_FOR_SIZE:
        return element_size
    # A sample from the middle, starting on an element boundary of either size.
    middle = max(0, len(data) // 2 - SAMPLE_LENGTH // 2)
    start = middle + (element_offset - middle) % 4
    sample = memoryview(data)[start : start + SAMPLE_LENGTH]
    stored = {
        size: len(encode_as(sample, "split", transform).data)
        for size, transform in GROUPING_FOR_SIZE.items()
    }
    return min(stored, key=stored.get)


def encode_as(
    data: bytes | memoryview,
    codec_name: str,
    transform_name: str,
    level: int = 3,
    element_offset: int = 0,
) -> EncodedChunk:
    """Encode *data* with the given codec and transform, whatever its size."""
    if not is_valid_encoding(codec_name, transform_name):
        raise ValueError(f"codec {codec_name!r} cannot carry transform {transform_name!r}")
    view = memoryview(data).cast("B")
    if codec_name == "raw":
        payload = bytes(view)
    elif codec_name == "zstd":
        payload = zstandard.ZstdCompressor(level=level).compress(view)
    else:
        payload = _encode_split(view, TRANSFORMS[transform_name], element_offset)
    header = HEADER.pack(
        MAGIC, CODEC_IDS[codec_name], TRANSFORMS[transform_name].id, 0, len(view)
    )
    return EncodedChunk(chunk_key(view), len(view), codec_name, transform_name, header + payload)


def _encode_split(view: memoryview, transform: Transform, element_offset: int) -> bytes:
    size = transform.element_size
    prefix = min(element_offset % size, len(view))
    count = (len(view) - prefix) // size
    body_end = prefix + count * size
    elements = numpy.frombuffer(view[prefix:body_end], dtype=_UNSIGNED[size])
    if transform.rotate:
        elements = (elements << 1) | (elements >> (8 * size - 1))
    columns = elements.view(numpy.uint8).reshape(count, size)

    table = [_SPLIT_PREFIX.pack(prefix)]
    streams = []
    compressor = zstandard.ZstdCompressor(compression_params=_STREAM_PARAMS)
    for index in range(size):
        stream = numpy.ascontiguousarray(columns[:, index])
        compressed = compressor.compress(stream) if count else b""
        if count and len(compressed) <= count * (1 - STREAM_MIN_SAVING):
            table.append(_STREAM_ENTRY.pack(CODEC_IDS["zstd"], _STREAM_PADDING, len(compressed)))
            streams.append(compressed)
        else:
            table.append(_STREAM_ENTRY.pack(CODEC_IDS["raw"], _STREAM_PADDING, count))
            streams.append(stream.tobytes())
    return b"".join([*table, view[:prefix], *streams, view[body_end:]])


def parse_header(key: str, data: bytes) -> ChunkHeader:
    """Parse the header at the start of the stored object *data* of chunk *key*.

    Raises `ChunkEncodingUnknown` for a codec or transform id this version
    does not define (an object written by a newer shardfs), and
    `ChunkCorrupt` for any other damage.
    """
    if len(data) < HEADER_SIZE:
        raise ChunkCorrupt(key, f"object is {len(data)} bytes, shorter than its header")
    magic, codec_id, transform_id, flags, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ChunkCorrupt(key, "object header has the wrong magic")
    # This version writes the reserved field as 0; a newer one that sets it
    # may have changed what the payload means.
    if codec_id not in _CODEC_NAMES or transform_id not in _TRANSFORMS_BY_ID or flags:
        raise ChunkEncodingUnknown(key, codec_id, transform_id, flags)
    codec_name = _CODEC_NAMES[codec_id]
    transform_name = _TRANSFORMS_BY_ID[transform_id].name
    if not is_valid_encoding(codec_name, transform_name):
        raise ChunkCorrupt(key, f"codec {codec_name} cannot carry transform {transform_name}")
    return ChunkHeader(codec_name, transform_name, length)


# Bytes at the start of a stored object that `stored_size` needs at most:
# the header and the stream table of a 4-stream split payload.
SIZED_HEAD_LENGTH = HEADER_SIZE + _SPLIT_PREFIX.size + 4 * _STREAM_ENTRY.size


def stored_size(key: str, head: bytes) -> int | None:
    """Return the size that the object starting with *head* must have.

    *head* is the first `SIZED_HEAD_LENGTH` bytes of the object, or the
    whole object if it is shorter. A raw or split object gives its size in
    its header and stream table. A zstd frame does not, so the result is
    None. Raises `ChunkCorrupt` for a damaged head and
    `ChunkEncodingUnknown` for an encoding this version does not define.
    """
    header = parse_header(key, head)
    if header.codec == "raw":
        return HEADER_SIZE + header.length
    if header.codec == "zstd":
        return None
    element_size = TRANSFORMS[header.transform].element_size
    table = _read_stream_table(key, memoryview(head)[HEADER_SIZE:], element_size, header.length)
    return HEADER_SIZE + table.payload_length


def decode(key: str, expected_length: int, data: bytes) -> bytes:
    """Decode the stored object *data* and verify it against *key*.

    Raises `ChunkCorrupt` when the header, the payload, the decoded length
    or the hash is wrong; no unverified bytes are ever returned.
    """
    header = parse_header(key, data)
    if header.length != expected_length:
        # Tell a wrong length in the manifest from a damaged header, by
        # decoding with the header's length where the payload agrees with it.
        if _payload_fits(key, header, data):
            try:
                _decode_payload(key, header, data)
            except ChunkCorrupt:
                pass
            else:
                raise ChunkLengthWrong(key, header.length, expected_length)
        raise ChunkCorrupt(
            key, f"header gives {header.length} bytes, expected {expected_length}"
        )
    return _decode_payload(key, header, data)


# No chunk is longer: push cuts chunks of at most 1 GiB.
MAX_CHUNK_LENGTH = 1 << 30


def _payload_fits(key: str, header: ChunkHeader, data: bytes) -> bool:
    """Return whether the payload's own sizes agree with the header's length,
    which is checked before a buffer of that length is allocated."""
    if header.length > MAX_CHUNK_LENGTH:
        return False
    payload = memoryview(data)[HEADER_SIZE:]
    if header.codec == "raw":
        return len(payload) == header.length
    if header.codec == "zstd":
        try:
            return zstandard.frame_content_size(payload) == header.length
        except zstandard.ZstdError:
            return False
    try:
        return stored_size(key, data) == len(data)
    except ChunkCorrupt:
        return False


def _decode_payload(key: str, header: ChunkHeader, data: bytes) -> bytes:
    expected_length = header.length
    payload = memoryview(data)[HEADER_SIZE:]
    if header.codec == "zstd":
        decoded = _decompress(key, payload, expected_length)
    elif header.codec == "split":
        decoded = _decode_split(key, payload, TRANSFORMS[header.transform], expected_length)
    else:
        decoded = read_exactly(payload, len(payload))
    return verify(key, expected_length, decoded)


def _decompress(key: str, payload, expected_length: int) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(payload)
    try:
        decoded = read_exactly(reader, expected_length)
        if reader.read(1):
            raise ChunkCorrupt(key, f"zstd frame is longer than {expected_length} bytes")
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(key, f"zstd failed: {exc}") from None
    except ValueError:
        raise ChunkCorrupt(key, f"zstd frame is shorter than {expected_length} bytes") from None
    return decoded


def read_exactly(source, length: int) -> bytes:
    """Return the first *length* bytes of *source* as a new bytes object.

    *source* is a buffer of exactly *length* bytes or a binary reader with
    ``readinto``. The result's pages are faulted in with one call before it
    is filled, which for a chunk-sized buffer is faster than the page
    faults of ``bytes()`` or ``read()``. Raises ValueError when *source*
    has fewer bytes.
    """
    return _grouping.assemble(length, b"", [source], b"", False)


@dataclasses.dataclass(frozen=True)
class _StreamTable:
    """The start of a ``split`` payload: its stream table, read and checked."""

    table_length: int
    prefix: int
    count: int  # elements, so bytes in each decoded stream
    tail: int
    streams: tuple[tuple[int, int], ...]  # (codec id, stored length) of each stream

    @property
    def payload_length(self) -> int:
        stored = sum(length for _, length in self.streams)
        return self.table_length + self.prefix + stored + self.tail


def _read_stream_table(
    key: str, payload: memoryview, element_size: int, length: int
) -> _StreamTable:
    """Read the stream table at the start of *payload*, a chunk of *length* bytes.

    Raises `ChunkCorrupt` unless each stream is zstd or raw, and a raw one
    contains exactly one byte per element.
    """
    table_length = _SPLIT_PREFIX.size + element_size * _STREAM_ENTRY.size
    if len(payload) < table_length:
        raise ChunkCorrupt(key, "payload is shorter than its stream table")
    (prefix,) = _SPLIT_PREFIX.unpack_from(payload)
    if prefix > length:
        raise ChunkCorrupt(key, f"prefix of {prefix} bytes is longer than the chunk")
    count = (length - prefix) // element_size
    streams = []
    for index in range(element_size):
        stream_codec, padding, stored = _STREAM_ENTRY.unpack_from(
            payload, _SPLIT_PREFIX.size + index * _STREAM_ENTRY.size
        )
        if padding != _STREAM_PADDING:
            raise ChunkCorrupt(key, f"stream {index} entry has nonzero padding")
        if stream_codec == CODEC_IDS["raw"] and stored != count:
            raise ChunkCorrupt(key, f"raw stream {index} has {stored} bytes, expected {count}")
        if stream_codec not in (CODEC_IDS["raw"], CODEC_IDS["zstd"]):
            raise ChunkCorrupt(key, f"stream {index} has codec {stream_codec}")
        streams.append((stream_codec, stored))
    tail = length - prefix - count * element_size
    return _StreamTable(table_length, prefix, count, tail, tuple(streams))


def _decode_split(key: str, payload: memoryview, transform: Transform, length: int) -> bytes:
    table = _read_stream_table(key, payload, transform.element_size, length)
    if table.payload_length != len(payload):
        raise ChunkCorrupt(key, "stream lengths do not add up to the payload length")

    position = table.table_length + table.prefix
    prefix = payload[table.table_length : position]
    streams = []
    readers = []
    for index, (stream_codec, stored) in enumerate(table.streams):
        stream = payload[position : position + stored]
        position += stored
        if stream_codec == CODEC_IDS["zstd"]:
            reader = zstandard.ZstdDecompressor().stream_reader(stream)
            streams.append(reader)
            readers.append((index, reader))
        else:
            streams.append(stream)

    try:
        decoded = _grouping.assemble(
            length,
            prefix,
            streams,
            payload[position:],
            transform.rotate,
        )
        for index, reader in readers:
            if reader.read(1):
                raise ChunkCorrupt(key, f"stream {index} is too long")
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(key, f"zstd failed: {exc}") from None
    except ValueError as exc:
        raise ChunkCorrupt(key, str(exc)) from None
    return decoded


def verify(key: str, expected_length: int, decoded: bytes) -> bytes:
    """Return *decoded* if its length and xxh3-128 match, else raise `ChunkCorrupt`."""
    if len(decoded) != expected_length:
        raise ChunkCorrupt(key, f"decoded {len(decoded)} bytes, expected {expected_length}")
    actual = chunk_key(decoded)
    if actual != key:
        raise ChunkCorrupt(key, f"content hash is {actual}")
    return decoded

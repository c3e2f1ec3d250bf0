"""Encode, decode and verify one chunk (pure functions over bytes).

A stored chunk object is a 16-byte header followed by the payload::

    magic "SHC1" | codec u8 | transform u8 | reserved u16 | length u64

all little-endian, where *length* is the size of the decoded chunk. The
header makes each object self-describing, so a chunk pushed once with one
encoding decodes correctly for every manifest that names its key. The key
is the xxh3-128 of the decoded bytes, and `decode` returns bytes only after
they match it.
"""

import dataclasses
import struct

import xxhash
import zstandard

from shardfs.errors import ChunkCorrupt

HEADER = struct.Struct("<4sBBHQ")
HEADER_SIZE = HEADER.size
MAGIC = b"SHC1"

_CODEC_IDS = {"raw": 0, "zstd": 1}
_CODEC_NAMES = {value: name for name, value in _CODEC_IDS.items()}
_TRANSFORM_IDS = {"none": 0}
_TRANSFORM_NAMES = {value: name for name, value in _TRANSFORM_IDS.items()}


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


def encode(data: bytes | memoryview, level: int = 3) -> EncodedChunk:
    """Encode *data*, keeping it raw when zstd does not make it smaller."""
    key = chunk_key(data)
    compressed = zstandard.ZstdCompressor(level=level).compress(data)
    if len(compressed) < len(data):
        codec, payload = "zstd", compressed
    else:
        codec, payload = "raw", bytes(data)
    header = HEADER.pack(MAGIC, _CODEC_IDS[codec], _TRANSFORM_IDS["none"], 0, len(data))
    return EncodedChunk(key, len(data), codec, "none", header + payload)


def parse_header(key: str, data: bytes) -> ChunkHeader:
    """Parse the header at the start of the stored object *data* of chunk *key*."""
    if len(data) < HEADER_SIZE:
        raise ChunkCorrupt(key, f"object is {len(data)} bytes, shorter than its header")
    magic, codec_id, transform_id, _, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ChunkCorrupt(key, "object header has the wrong magic")
    if codec_id not in _CODEC_NAMES or transform_id not in _TRANSFORM_NAMES:
        raise ChunkCorrupt(key, f"unknown encoding {codec_id}/{transform_id}")
    return ChunkHeader(_CODEC_NAMES[codec_id], _TRANSFORM_NAMES[transform_id], length)


def decode(key: str, expected_length: int, data: bytes) -> bytes:
    """Decode the stored object *data* and verify it against *key*.

    Raises `ChunkCorrupt` when the header, the payload, the decoded length
    or the hash is wrong; no unverified bytes are ever returned.
    """
    header = parse_header(key, data)
    if header.length != expected_length:
        raise ChunkCorrupt(
            key, f"header says {header.length} bytes, expected {expected_length}"
        )
    payload = memoryview(data)[HEADER_SIZE:]
    if header.codec == "zstd":
        try:
            decoded = zstandard.ZstdDecompressor().decompress(
                payload, max_output_size=expected_length
            )
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(key, f"zstd failed: {exc}") from None
    else:
        decoded = bytes(payload)
    return verify(key, expected_length, decoded)


def verify(key: str, expected_length: int, decoded: bytes) -> bytes:
    """Return *decoded* if its length and xxh3-128 match, else raise `ChunkCorrupt`."""
    if len(decoded) != expected_length:
        raise ChunkCorrupt(key, f"decoded {len(decoded)} bytes, expected {expected_length}")
    actual = chunk_key(decoded)
    if actual != key:
        raise ChunkCorrupt(key, f"content hash is {actual}")
    return decoded

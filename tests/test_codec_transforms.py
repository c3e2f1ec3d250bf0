"""Encodings of chunks: byte grouping, the choice per chunk, and refusal of the unknown.

The round trips cover every encoding on every element type torch has of
1, 2, 4 and 8 bytes, at lengths that are not whole elements and with
element boundaries at every phase. The mount test pushes files whose
chunks take each encoding and reads them back through a real FUSE mount.
"""

import gc
import hashlib
import io
import json
import os
import struct

import pytest
import safetensors.torch
import torch
import zstandard

from conftest import mounted, needs_fuse, run_shardfs
from shardfs import _grouping, codec
from shardfs.errors import ChunkCorrupt, ChunkEncodingUnknown, ChunkLengthWrong, ManifestInvalid
from shardfs.manifest import ChunkRef, FileEntry, Manifest, parse_manifest, to_json

ENCODINGS = [
    ("raw", "none"),
    ("zstd", "none"),
    ("split", "bytegroup2"),
    ("split", "bytegroup4"),
    ("split", "rotl1-bytegroup2"),
    ("split", "rotl1-bytegroup4"),
]
DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
]
LENGTHS = [0, 1, 2, 3, 5, 4095, 4096, 65_537, 300_001]


def tensor_bytes(dtype: torch.dtype, length: int, seed: int = 0) -> bytes:
    """Return *length* bytes of a tensor of *dtype* filled like model weights."""
    generator = torch.Generator().manual_seed(seed)
    count = length // torch.empty((), dtype=dtype).element_size() + 1
    if dtype.is_floating_point:
        values = (torch.randn(count, generator=generator) * 0.02).to(dtype)
    else:
        values = torch.randint(-100, 100, (count,), generator=generator).to(dtype)
    return values.view(torch.uint8).numpy().tobytes()[:length]


def test_encodings_match_the_manifest_names():
    encodings = {
        (name, transform)
        for name in codec.CODEC_IDS
        for transform in codec.TRANSFORMS
        if codec.is_valid_encoding(name, transform)
    }
    assert encodings == set(ENCODINGS)


@pytest.mark.parametrize("codec_name, transform", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_encoding(codec_name, transform, dtype):
    for length in LENGTHS:
        data = tensor_bytes(dtype, length, seed=length)
        for element_offset in (0, 1, 3):
            encoded = codec.encode_as(data, codec_name, transform, element_offset=element_offset)
            assert encoded.codec == codec_name
            assert encoded.transform == transform
            decoded = codec.decode(encoded.key, length, encoded.data)
            assert decoded == data, (length, element_offset)


@pytest.mark.parametrize("codec_name, transform", ENCODINGS)
def test_stored_size_from_head(codec_name, transform):
    for length in LENGTHS:
        data = tensor_bytes(torch.bfloat16, length, seed=length)
        for element_offset in (0, 1, 3):
            encoded = codec.encode_as(data, codec_name, transform, element_offset=element_offset)
            head = encoded.data[: codec.SIZED_HEAD_LENGTH]
            expected = None if codec_name == "zstd" else len(encoded.data)
            assert codec.stored_size(encoded.key, head) == expected, (length, element_offset)


@pytest.mark.parametrize("codec_name, transform", ENCODINGS)
def test_decode_tells_wrong_length_from_damage(codec_name, transform):
    data = tensor_bytes(torch.bfloat16, 65_536)
    encoded = codec.encode_as(data, codec_name, transform)
    with pytest.raises(ChunkLengthWrong) as raised:
        codec.decode(encoded.key, len(data) + 10, encoded.data)
    assert raised.value.actual == len(data)

    # A header whose length was changed does not fit its payload.
    for length in (len(data) + 10, len(data) - 2, 1 << 62):
        damaged = bytearray(encoded.data)
        struct.pack_into("<Q", damaged, 8, length)
        with pytest.raises(ChunkCorrupt) as raised:
            codec.decode(encoded.key, len(data), bytes(damaged))
        assert not isinstance(raised.value, ChunkLengthWrong), length


def test_stored_size_rejects_short_stream_table():
    data = tensor_bytes(torch.bfloat16, 65_536)
    encoded = codec.encode_as(data, "split", "rotl1-bytegroup2")
    with pytest.raises(ChunkCorrupt, match="stream table"):
        codec.stored_size(encoded.key, encoded.data[: codec.HEADER_SIZE + 4])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_round_trip_with_and_without_hint(dtype):
    size = torch.empty((), dtype=dtype).element_size()
    data = tensor_bytes(dtype, 1_000_003)
    for hint in (None, size, 1):
        encoded = codec.encode(data, element_size=hint)
        assert codec.decode(encoded.key, len(data), encoded.data) == data


@pytest.mark.parametrize(
    "dtype, transform",
    [
        (torch.bfloat16, "rotl1-bytegroup2"),
        (torch.float16, "rotl1-bytegroup2"),
        (torch.float32, "bytegroup4"),
    ],
    ids=str,
)
def test_encode_groups_float_weights(dtype, transform):
    data = tensor_bytes(dtype, 4 * 1024 * 1024)
    size = torch.empty((), dtype=dtype).element_size()
    grouped = codec.encode(data, element_size=size)
    plain = codec.encode_as(data, "zstd", "none")
    assert (grouped.codec, grouped.transform) == ("split", transform)
    assert len(grouped.data) < 0.95 * len(plain.data)


def test_encode_finds_the_element_size_of_fp32():
    data = tensor_bytes(torch.float32, 4 * 1024 * 1024)
    assert codec.encode(data).transform == "bytegroup4"


def test_encode_keeps_random_data_raw():
    data = os.urandom(1 << 20)
    for hint in (None, 2, 4):
        encoded = codec.encode(data, element_size=hint)
        assert encoded.codec == "raw"
        assert len(encoded.data) == len(data) + codec.HEADER_SIZE


def test_encode_keeps_zeros_zstd():
    encoded = codec.encode(bytes(1 << 20), element_size=2)
    assert encoded.codec == "zstd"
    assert len(encoded.data) < 1000


def test_element_size_one_is_not_grouped():
    data = tensor_bytes(torch.bfloat16, 1 << 20)
    assert codec.encode(data, element_size=1).transform == "none"


def test_grouped_streams_stay_raw_when_random():
    data = tensor_bytes(torch.bfloat16, 1 << 20)
    encoded = codec.encode_as(data, "split", "rotl1-bytegroup2")
    payload = encoded.data[codec.HEADER_SIZE :]
    low = struct.unpack_from("<B3xI", payload, 4)
    high = struct.unpack_from("<B3xI", payload, 12)
    assert low == (codec.CODEC_IDS["raw"], len(data) // 2)
    assert high[0] == codec.CODEC_IDS["zstd"]


def test_grouping_uses_the_element_offset():
    # The same fp32 values behind a 3-byte prefix, as in a zip record. A
    # shifted grouping still gathers the exponent bytes into one stream,
    # but the rotation then moves the wrong bit.
    data = b"PK\x03" + tensor_bytes(torch.float32, 1 << 20)
    aligned = codec.encode_as(data, "split", "rotl1-bytegroup4", element_offset=3)
    misaligned = codec.encode_as(data, "split", "rotl1-bytegroup4", element_offset=0)
    assert aligned.data[codec.HEADER_SIZE] == 3
    assert len(aligned.data) < len(misaligned.data)


def _with_header_bytes(data: bytes, codec_id: int, transform_id: int) -> bytes:
    damaged = bytearray(data)
    damaged[4] = codec_id
    damaged[5] = transform_id
    return bytes(damaged)


@pytest.mark.parametrize("codec_id, transform_id", [(3, 0), (255, 0), (1, 5), (2, 200)])
def test_unknown_encoding_is_refused(codec_id, transform_id):
    data = tensor_bytes(torch.bfloat16, 100_000)
    encoded = codec.encode(data, element_size=2)
    stored = _with_header_bytes(encoded.data, codec_id, transform_id)
    with pytest.raises(ChunkEncodingUnknown, match="upgrade shardfs") as caught:
        codec.decode(encoded.key, len(data), stored)
    assert f"codec {codec_id}, transform {transform_id}" in str(caught.value)
    assert isinstance(caught.value, ChunkCorrupt)


@pytest.mark.parametrize(
    "codec_name, transform",
    [("split", "none"), ("zstd", "bytegroup2"), ("raw", "rotl1-bytegroup4")],
)
def test_invalid_encoding_pair_is_refused(codec_name, transform):
    data = tensor_bytes(torch.float16, 10_000)
    encoded = codec.encode_as(data, "zstd", "none")
    stored = _with_header_bytes(
        encoded.data, codec.CODEC_IDS[codec_name], codec.TRANSFORMS[transform].id
    )
    with pytest.raises(ChunkCorrupt, match="cannot carry"):
        codec.decode(encoded.key, len(data), stored)
    with pytest.raises(ValueError, match="cannot carry"):
        codec.encode_as(data, codec_name, transform)


def test_damaged_grouped_chunk_never_misreads():
    # A flipped byte raises, or (in a zstd frame field that does not change
    # the output) still decodes to the original; it never yields other bytes.
    data = tensor_bytes(torch.bfloat16, 6001)
    encoded = codec.encode_as(data, "split", "rotl1-bytegroup2", element_offset=1)
    tolerated = []
    for position in range(len(encoded.data)):
        damaged = bytearray(encoded.data)
        damaged[position] ^= 0x10
        try:
            decoded = codec.decode(encoded.key, len(data), bytes(damaged))
        except ChunkCorrupt:
            continue
        assert decoded == data, position
        tolerated.append(position)
    table_end = codec.HEADER_SIZE + 4 + 2 * 8
    assert not [position for position in tolerated if position < table_end]


def test_reserved_header_field_is_refused():
    encoded = codec.encode_as(b"weights" * 100, "zstd", "none")
    damaged = bytearray(encoded.data)
    damaged[6] = 1
    with pytest.raises(ChunkEncodingUnknown, match="flags 0x0001"):
        codec.decode(encoded.key, 700, bytes(damaged))


@pytest.mark.parametrize("cut", [1, 7, 100, 3000])
def test_truncated_grouped_chunk_is_caught(cut):
    data = tensor_bytes(torch.float32, 8000)
    encoded = codec.encode_as(data, "split", "rotl1-bytegroup4")
    with pytest.raises(ChunkCorrupt):
        codec.decode(encoded.key, len(data), encoded.data[:-cut])


def test_decode_in_many_blocks_is_exact():
    # More elements than one decoding block, so several blocks and a
    # partial last block are assembled.
    data = tensor_bytes(torch.float32, 4 * (3 * (1 << 17) + 5) + 3)
    encoded = codec.encode_as(data, "split", "rotl1-bytegroup4", element_offset=2)
    assert codec.decode(encoded.key, len(data), encoded.data) == data


def _ungroup_reference(streams: list[bytes], rotate: bool) -> bytes:
    """Interleave *streams* the slow, obvious way: one element at a time."""
    size = len(streams)
    bits = 8 * size
    mask = (1 << bits) - 1
    out = bytearray()
    for index in range(len(streams[0])):
        value = int.from_bytes(bytes(stream[index] for stream in streams), "little")
        if rotate:
            value = ((value >> 1) | (value << (bits - 1))) & mask
        out += value.to_bytes(size, "little")
    return bytes(out)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("count", [0, 1, 7, 33, 1000, (1 << 17) + 3])
def test_assemble_matches_reference(size, rotate, count):
    # Odd counts exercise the scalar tail after the vectorized loop, and
    # the largest spans two blocks.
    streams = [os.urandom(count) for _ in range(size)]
    expected = b"head" + _ungroup_reference(streams, rotate) + b"end"
    length = len(expected)
    assert _grouping.assemble(length, b"head", streams, b"end", rotate) == expected


class _Reader:
    """A stream that hands out its bytes at most *step* at a time, like a zstd reader."""

    def __init__(self, data: bytes, step: int):
        self._data = data
        self._step = step
        self.calls = 0

    def readinto(self, buffer) -> int:
        self.calls += 1
        piece = self._data[: min(self._step, len(buffer))]
        buffer[: len(piece)] = piece
        self._data = self._data[len(piece) :]
        return len(piece)


def test_assemble_mixes_readers_and_buffers():
    count = (1 << 17) * 2 + 11
    streams = [os.urandom(count) for _ in range(4)]
    reader = _Reader(streams[1], 100_000)
    mixed = [memoryview(streams[0]), reader, bytearray(streams[2]), _Reader(streams[3], count)]
    result = _grouping.assemble(4 * count, b"", mixed, b"", True)
    assert result == _ungroup_reference(streams, True)
    assert reader.calls >= 3


@pytest.mark.parametrize(
    "length, streams, message",
    [
        (6, [b"ab", b"cd", b"ef"], "expected 1, 2 or 4 streams, got 3"),
        (4, [b"ab", b"c"], "stream 1 has 1 bytes, expected 2"),
        (5, [b"ab", b"cd"], "5 bytes of elements are not a whole number of 2-byte elements"),
        (4, [b"ab", _Reader(b"c", 10)], "stream 1 ends early"),
    ],
)
def test_assemble_rejects_bad_streams(length, streams, message):
    with pytest.raises(ValueError, match=message):
        _grouping.assemble(length, b"", streams, b"", False)


def test_read_exactly_copies_one_stream():
    data = os.urandom(300_001)
    assert codec.read_exactly(memoryview(data), len(data)) == data
    reader = io.BytesIO(data + b"more")
    assert codec.read_exactly(reader, len(data)) == data
    assert reader.read() == b"more"


def test_read_exactly_rejects_short_reader():
    with pytest.raises(ValueError, match="stream 0 ends early"):
        codec.read_exactly(io.BytesIO(b"abc"), 4)


@pytest.mark.parametrize("change", [b"", b"extra"], ids=["short", "long"])
def test_zstd_frame_of_wrong_length_is_caught(change):
    data = tensor_bytes(torch.float32, 10_000)
    frame = zstandard.ZstdCompressor().compress(data[:-100] if not change else data + change)
    header = codec.HEADER.pack(codec.MAGIC, codec.CODEC_IDS["zstd"], 0, 0, len(data))
    with pytest.raises(ChunkCorrupt):
        codec.decode(codec.chunk_key(data), len(data), header + frame)


def test_assemble_rejects_prefix_longer_than_length():
    with pytest.raises(ValueError, match="prefix and tail of 4 bytes exceed the length 2"):
        _grouping.assemble(2, b"abc", [b"", b""], b"d", False)


def test_assemble_passes_reader_errors_on():
    class Broken:
        def readinto(self, buffer):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        _grouping.assemble(4, b"", [b"ab", Broken()], b"", False)


def _manifest_with(codec_name: str, transform: str) -> bytes:
    data = b"x" * 100
    chunk = ChunkRef(0, 100, codec.chunk_key(data), 116, codec_name, transform)
    entry = FileEntry("w.bin", 100, 0o644, 0, hashlib.sha256(data).hexdigest(), (chunk,))
    return to_json(Manifest("m", 1, 100, (entry,)))


@pytest.mark.parametrize("codec_name, transform", ENCODINGS)
def test_manifest_accepts_every_encoding(codec_name, transform):
    manifest = parse_manifest("m", _manifest_with(codec_name, transform))
    chunk = manifest.files[0].chunks[0]
    assert (chunk.codec, chunk.transform) == (codec_name, transform)


@pytest.mark.parametrize(
    "codec_name, transform, message",
    [
        ("zstd", "bytegroup8", "unknown transform"),
        ("lz4", "none", "unknown codec"),
        ("split", "none", "cannot carry"),
        ("zstd", "bytegroup2", "cannot carry"),
    ],
)
def test_manifest_rejects_unknown_encoding(codec_name, transform, message):
    doc = json.loads(_manifest_with("zstd", "none"))
    doc["files"][0]["chunks"][0].update(codec=codec_name, transform=transform)
    with pytest.raises(ManifestInvalid, match=message):
        parse_manifest("m", json.dumps(doc).encode())


def _write_encoding_sources(directory) -> dict[str, bytes]:
    """Write files whose chunks take every encoding the pusher chooses."""
    torch.manual_seed(1)
    tensors = {
        "bf16": (torch.randn(300, 1000) * 0.02).to(torch.bfloat16),
        "fp16": (torch.randn(200, 1000) * 0.02).to(torch.float16),
        "fp32": torch.randn(100, 1001) * 0.02,
        "zeros": torch.zeros(100_000),
        "ids": torch.arange(5000, dtype=torch.int64),
    }
    safetensors.torch.save_file(tensors, str(directory / "model.safetensors"))
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(150_000) * 0.02, "b": torch.randn(7)}, buffer)
    (directory / "checkpoint.pt").write_bytes(buffer.getvalue())
    (directory / "random.bin").write_bytes(os.urandom(300_001))
    return {path.name: path.read_bytes() for path in directory.iterdir()}


@needs_fuse
def test_mount_decodes_every_chosen_encoding(tmp_path, local_store):
    source = tmp_path / "source"
    source.mkdir()
    originals = _write_encoding_sources(source)
    pushed = run_shardfs(
        "push", "--store", local_store, "--chunk-size", "256KiB", str(source), "org/mixed"
    )
    assert pushed.returncode == 0, pushed.stderr

    manifest_path = os.path.join(local_store, "models/org/mixed/manifest.json")
    with open(manifest_path, "rb") as file:
        manifest = parse_manifest("org/mixed", file.read())
    used = {
        (entry.path, chunk.codec, chunk.transform)
        for entry in manifest.files
        for chunk in entry.chunks
    }
    assert ("model.safetensors", "split", "rotl1-bytegroup2") in used
    assert ("model.safetensors", "split", "bytegroup4") in used
    assert ("model.safetensors", "zstd", "none") in used
    assert ("checkpoint.pt", "split", "bytegroup4") in used
    assert ("random.bin", "raw", "none") in used
    for entry in manifest.files:
        for chunk in entry.chunks:
            path = os.path.join(local_store, "chunks", chunk.key[:2], chunk.key)
            with open(path, "rb") as stored:
                header = codec.parse_header(chunk.key, stored.read(codec.HEADER_SIZE))
            assert (header.codec, header.transform) == (chunk.codec, chunk.transform)

    mountpoint = str(tmp_path / "mnt")
    with mounted(local_store, mountpoint, "--no-prefetch"):
        for name, original in originals.items():
            with open(os.path.join(mountpoint, "org/mixed", name), "rb") as file:
                assert file.read() == original, name
        loaded = safetensors.torch.load_file(os.path.join(mountpoint, "org/mixed/model.safetensors"))
        expected = safetensors.torch.load_file(str(source / "model.safetensors"))
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor), name
        checkpoint = torch.load(os.path.join(mountpoint, "org/mixed/checkpoint.pt"))
        assert torch.equal(checkpoint["w"], torch.load(source / "checkpoint.pt")["w"])
        # safetensors maps the file; the mapping must go before the unmount.
        del loaded
        gc.collect()

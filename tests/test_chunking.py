"""Chunk boundaries on tensor boundaries, checked against the files' own headers.

safetensors and torch zip files are written by the real libraries; GGUF
files by a small writer here that follows the GGUF v3 layout, and by the
gguf package where it is installed.
"""

import io
import json
import os
import struct
import zipfile

import numpy
import pytest
import safetensors.torch
import torch

from shardfs import codec, formats
from shardfs.publish.chunking import PlannedChunk, fixed_spans, plan_chunks
from shardfs.publish.push import HEAD_BYTES, read_layout

KiB = 1024
CHUNK = 64 * KiB


def layout_of(path) -> formats.Layout | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_layout(fd, os.path.getsize(path))
    finally:
        os.close(fd)


def plan_file(path, chunk_size: int = CHUNK) -> list[PlannedChunk]:
    return plan_chunks(layout_of(path), os.path.getsize(path), chunk_size)


def chunk_keys(path, chunk_size: int = CHUNK) -> list[str]:
    data = path.read_bytes()
    return [codec.chunk_key(data[chunk.start : chunk.end]) for chunk in plan_file(path, chunk_size)]


def assert_tiles(chunks: list[PlannedChunk], size: int, chunk_size: int) -> None:
    assert chunks[0].start == 0
    assert chunks[-1].end == size
    for previous, current in zip(chunks, chunks[1:]):
        assert previous.end == current.start
    for chunk in chunks:
        assert 0 < chunk.end - chunk.start <= chunk_size


def safetensors_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors from a few bytes to several chunks, in mixed dtypes."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(300, 300, generator=generator).to(torch.bfloat16),  # 180,000 bytes
        "layer0.attn": torch.randn(100, 100, generator=generator),  # 40,000
        "layer0.bias": torch.randn(100, generator=generator),
        "layer0.norm": torch.randn(100, generator=generator).to(torch.float16),
        "layer1.attn": torch.randn(100, 100, generator=generator),
        "layer1.mlp": torch.randn(64 * 256, generator=generator),  # exactly one chunk
        "ids": torch.arange(1000),
        "mask": torch.ones(33, dtype=torch.uint8),
    }


def write_safetensors(path, tensors, metadata=None) -> None:
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def safetensors_header(path) -> tuple[int, dict]:
    data = path.read_bytes()
    (size,) = struct.unpack_from("<Q", data)
    return 8 + size, json.loads(data[8 : 8 + size])


def test_safetensors_chunks_on_tensor_boundaries(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, safetensors_tensors())
    data_start, header = safetensors_header(path)
    tensors = {
        name: (data_start + info["data_offsets"][0], data_start + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }
    chunks = plan_file(path)
    assert_tiles(chunks, os.path.getsize(path), CHUNK)

    assert (chunks[0].start, chunks[0].end) == (0, data_start)
    for chunk in chunks[1:]:
        # A chunk starts at a tensor's start or a whole number of chunks into it.
        owner = [name for name, (start, end) in tensors.items() if start <= chunk.start < end]
        assert len(owner) == 1
        start, end = tensors[owner[0]]
        assert (chunk.start - start) % CHUNK == 0
        # and ends at a tensor's end, or a whole number of chunks into one.
        assert any(
            chunk.end == end or (start < chunk.end < end and (chunk.end - start) % CHUNK == 0)
            for start, end in tensors.values()
        )


def test_safetensors_large_tensor_split_from_its_start(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, safetensors_tensors())
    data_start, header = safetensors_header(path)
    start, end = (data_start + offset for offset in header["embed"]["data_offsets"])
    pieces = [(chunk.start, chunk.end) for chunk in plan_file(path) if start <= chunk.start < end]
    assert pieces == [(start, start + CHUNK), (start + CHUNK, start + 2 * CHUNK), (start + 2 * CHUNK, end)]


def test_safetensors_chunks_carry_dtype_sizes(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, safetensors_tensors())
    data_start, header = safetensors_header(path)
    chunks = plan_file(path)
    assert chunks[0].element_size == 1
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8, "U8": 1}
    for name in ("embed", "layer1.mlp"):
        start = data_start + header[name]["data_offsets"][0]
        chunk = next(chunk for chunk in chunks if chunk.start == start)
        assert chunk.element_size == sizes[header[name]["dtype"]]
        assert chunk.element_offset == 0


def test_safetensors_header_growth_keeps_tensor_chunks(tmp_path):
    tensors = safetensors_tensors()
    before, after = tmp_path / "before.safetensors", tmp_path / "after.safetensors"
    write_safetensors(before, tensors)
    write_safetensors(after, tensors, metadata={"note": "x" * 5000, "format": "pt"})
    assert safetensors_header(after)[0] > safetensors_header(before)[0]

    keys_before, keys_after = chunk_keys(before), chunk_keys(after)
    assert keys_before[0] != keys_after[0]
    assert keys_before[1:] == keys_after[1:]


def test_safetensors_header_over_head_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, safetensors_tensors(), metadata={"big": "y" * (2 * HEAD_BYTES)})
    layout = layout_of(path)
    assert layout is not None
    assert layout.format == "safetensors"
    assert layout.regions[0].end == safetensors_header(path)[0]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:100],  # header cut short
        lambda data: b"\xff" * 8 + data[8:],  # absurd header size
        lambda data: data[:8] + b"[" + data[9:],  # not a JSON object
    ],
    ids=["truncated", "huge-size", "not-json"],
)
def test_damaged_safetensors_falls_back_to_fixed(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, safetensors_tensors())
    path.write_bytes(damage(path.read_bytes()))
    size = os.path.getsize(path)
    assert layout_of(path) is None
    assert [(chunk.start, chunk.end) for chunk in plan_file(path)] == list(fixed_spans(size, CHUNK))


def test_overlapping_tensors_fall_back_to_fixed():
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    encoded = json.dumps(header).encode()
    data = struct.pack("<Q", len(encoded)) + encoded + bytes(24)
    assert formats.safetensors_layout(data, len(data)) is None


def test_plain_file_gets_fixed_chunks(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(5 * CHUNK + 17))
    chunks = plan_file(path)
    assert layout_of(path) is None
    assert [(chunk.start, chunk.end) for chunk in chunks] == list(fixed_spans(5 * CHUNK + 17, CHUNK))
    assert all(chunk.element_size is None for chunk in chunks)


def test_gaps_join_the_region_before():
    layout = formats.Layout(
        "test",
        (
            formats.Region(10, 20, 4, 10),
            formats.Region(30, 40, 2, 30),
            formats.Region(40, 50, element_size=1, standalone=True),
        ),
    )
    chunks = plan_chunks(layout, 60, 1000)
    spans = [(chunk.start, chunk.end) for chunk in chunks]
    assert spans == [(0, 10), (10, 40), (40, 60)]
    # The first region, widened to 30, covers more bytes than the second.
    assert chunks[1].element_size == 4
    assert chunks[1].element_offset == 0


def test_small_tensors_grouped_up_to_chunk_size():
    regions = tuple(formats.Region(start, start + 300, 4, start) for start in range(0, 3000, 300))
    chunks = plan_chunks(formats.Layout("test", regions), 3000, 1000)
    assert [(chunk.start, chunk.end) for chunk in chunks] == [
        (0, 900),
        (900, 1800),
        (1800, 2700),
        (2700, 3000),
    ]


def torch_checkpoint(tensors: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def zip_records(data: bytes) -> tuple[list[int], int]:
    """Return the local header offsets of a zip file and its directory offset."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        offsets = sorted(info.header_offset for info in archive.infolist())
    return offsets, formats.zip_directory_start(data, 0)


def checkpoint_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(50_000, generator=generator),  # 200,000 bytes
        "small1": torch.randn(1000, generator=generator),
        "small2": torch.randn(2000, generator=generator).to(torch.bfloat16),
        "small3": torch.randn(3000, generator=generator),
    }


def test_torch_zip_chunks_on_records(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(torch_checkpoint(checkpoint_tensors()))
    offsets, directory = zip_records(path.read_bytes())
    bounds = offsets + [directory]
    chunks = plan_file(path)
    assert_tiles(chunks, os.path.getsize(path), CHUNK)
    assert layout_of(path).format == "zip"
    for chunk in chunks:
        record = max(bound for bound in bounds if bound <= chunk.start)
        assert (chunk.start - record) % CHUNK == 0
    with zipfile.ZipFile(path) as archive:
        big = archive.getinfo("archive/data/0")
    assert big.header_offset in {chunk.start for chunk in chunks}


def test_torch_zip_metadata_chunked_apart(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(torch_checkpoint(checkpoint_tensors()))
    with zipfile.ZipFile(path) as archive:
        records = sorted(archive.infolist(), key=lambda info: info.header_offset)
    storage = [info for info in records if info.filename.startswith("archive/data/")]
    first_storage, last_storage = storage[0], storage[-1]
    after_storage = records[records.index(last_storage) + 1]
    chunks = plan_file(path)

    # The pickle and the records beside it, up to the first tensor record.
    assert records[0].filename == "archive/data.pkl"
    assert (chunks[0].start, chunks[0].end) == (0, first_storage.header_offset)
    # The records after the last tensor record, with the directory.
    assert (chunks[-1].start, chunks[-1].end) == (after_storage.header_offset, os.path.getsize(path))
    assert chunks[-1].element_size == 1
    for chunk in chunks[1:-1]:
        assert first_storage.header_offset <= chunk.start
        assert chunk.end <= after_storage.header_offset


def test_plain_zip_records_not_standalone(tmp_path):
    path = tmp_path / "arrays.npz"
    numpy.savez(path, first=numpy.arange(20_000.0), second=numpy.arange(30_000.0))
    offsets, directory = zip_records(path.read_bytes())
    chunks = plan_file(path)
    assert layout_of(path).format == "zip"
    assert_tiles(chunks, os.path.getsize(path), CHUNK)
    assert offsets[1] in {chunk.start for chunk in chunks}
    assert (chunks[-1].start, chunks[-1].end) == (directory, os.path.getsize(path))


def test_torch_zip_one_tensor_changed(tmp_path):
    before, after = tmp_path / "before.pt", tmp_path / "after.pt"
    tensors = checkpoint_tensors()
    before.write_bytes(torch_checkpoint(tensors))
    tensors["small3"] = tensors["small3"] + 1
    after.write_bytes(torch_checkpoint(tensors))
    keys_before, keys_after = chunk_keys(before), chunk_keys(after)
    assert len(keys_before) == len(keys_after)
    changed = [index for index, key in enumerate(keys_after) if key != keys_before[index]]
    # The group holding small3's record and the directory (whose CRCs and
    # serialization id change); the big tensor's chunks are untouched.
    assert len(changed) <= 3
    assert changed[-1] == len(keys_after) - 1
    assert keys_before[1:4] == keys_after[1:4]


def test_torch_zip_elements_aligned(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(torch_checkpoint(checkpoint_tensors()))
    data = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo("archive/data/0")
    (name_length, extra_length) = struct.unpack_from("<HH", data, info.header_offset + 26)
    data_start = info.header_offset + 30 + name_length + extra_length
    chunk = next(chunk for chunk in plan_file(path) if chunk.start == info.header_offset)
    assert (chunk.start + chunk.element_offset - data_start) % 4 == 0


GGUF_F32, GGUF_F16, GGUF_Q8_0, GGUF_BF16 = 0, 1, 8, 30


def gguf_string(text: str) -> bytes:
    encoded = text.encode()
    return struct.pack("<Q", len(encoded)) + encoded


def write_gguf(path, tensors, metadata=(), alignment: int = 32) -> dict[str, tuple[int, int]]:
    """Write a GGUF v3 file; return each tensor's absolute (start, end)."""
    kv = b""
    for key, value in metadata:
        if isinstance(value, str):
            kv += gguf_string(key) + struct.pack("<I", 8) + gguf_string(value)
        elif isinstance(value, list):
            kv += gguf_string(key) + struct.pack("<IIQ", 9, 8, len(value))
            kv += b"".join(gguf_string(item) for item in value)
        else:
            kv += gguf_string(key) + struct.pack("<II", 4, value)
    infos, offset, relative = b"", 0, {}
    for name, tensor_type, dims, data in tensors:
        infos += gguf_string(name) + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", dim) for dim in dims)
        infos += struct.pack("<IQ", tensor_type, offset)
        relative[name] = (offset, offset + len(data))
        offset = -(-(offset + len(data)) // alignment) * alignment
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + kv + infos
    data_start = -(-len(header) // alignment) * alignment
    body = bytearray(offset)
    for name, _, _, data in tensors:
        start, end = relative[name]
        body[start:end] = data
    path.write_bytes(header + bytes(data_start - len(header)) + bytes(body))
    return {name: (data_start + start, data_start + end) for name, (start, end) in relative.items()}


def gguf_tensors(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(40_000, generator=generator)
    quantized = torch.randint(0, 256, (34 * 64,), generator=generator, dtype=torch.uint8)
    quantized = quantized.numpy().tobytes()
    bf16 = weights.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return [
        ("token_embd.weight", GGUF_F16, [200, 200], weights.to(torch.float16).numpy().tobytes()),
        ("blk.0.attn_q.weight", GGUF_Q8_0, [64, 32], quantized),
        ("blk.0.attn_norm.weight", GGUF_F32, [333], weights[:333].numpy().tobytes()),
        ("output.weight", GGUF_BF16, [200, 200], bf16),
    ]


def test_gguf_chunks_on_tensor_boundaries(tmp_path):
    path = tmp_path / "model.gguf"
    spans = write_gguf(path, gguf_tensors(), metadata=[("general.name", "tiny")])
    layout = layout_of(path)
    assert layout.format == "gguf"
    starts = sorted(start for start, _ in spans.values())
    assert [region.start for region in layout.regions[1:]] == starts
    assert layout.regions[0].end == starts[0]

    chunks = plan_file(path)
    assert_tiles(chunks, os.path.getsize(path), CHUNK)
    for chunk in chunks[1:]:
        owner = max(start for start in starts if start <= chunk.start)
        assert (chunk.start - owner) % CHUNK == 0
    sizes = {chunk.start: chunk.element_size for chunk in chunks}
    assert sizes[spans["token_embd.weight"][0]] == 2
    assert sizes[spans["output.weight"][0]] == 2


def test_gguf_alignment_and_header_growth(tmp_path):
    small, large = tmp_path / "small.gguf", tmp_path / "large.gguf"
    write_gguf(small, gguf_tensors(), metadata=[("general.alignment", 64)], alignment=64)
    vocabulary = [f"token{index}" for index in range(100_000)]  # over HEAD_BYTES of header
    spans = write_gguf(
        large,
        gguf_tensors(),
        metadata=[("general.alignment", 64), ("tokenizer.ggml.tokens", vocabulary)],
        alignment=64,
    )
    assert min(start for start, _ in spans.values()) > HEAD_BYTES
    assert all(start % 64 == 0 for start, _ in spans.values())
    assert layout_of(large).regions[1].start == min(start for start, _ in spans.values())
    # The large header takes many chunks; the tensors' chunks are the same.
    header_chunks = len([chunk for chunk in plan_file(large) if chunk.end <= layout_of(large).regions[1].start])
    assert header_chunks > 1
    assert chunk_keys(small)[1:] == chunk_keys(large)[header_chunks:]


@pytest.mark.parametrize("cut", [10, 30, 200])
def test_truncated_gguf_header_is_not_parsed(tmp_path, cut):
    path = tmp_path / "model.gguf"
    write_gguf(path, gguf_tensors(), metadata=[("general.name", "tiny")])
    head = path.read_bytes()[:cut]
    assert formats.gguf_layout(head, os.path.getsize(path)) is None


def test_gguf_regions_match_gguf_package(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", 32)
    writer.add_array("tokenizer.ggml.tokens", [f"t{index}" for index in range(5000)])
    generator = np.random.default_rng(0)
    writer.add_tensor("a", generator.standard_normal((100, 300)).astype(np.float32))
    writer.add_tensor("b", generator.standard_normal(77).astype(np.float16))
    writer.add_tensor("c", generator.standard_normal((64, 64)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    expected = sorted(int(tensor.data_offset) for tensor in reader.tensors)
    layout = layout_of(path)
    assert [region.start for region in layout.regions[1:]] == expected
    sizes = {int(tensor.data_offset): tensor.data.dtype.itemsize for tensor in reader.tensors}
    assert {region.start: region.element_size for region in layout.regions[1:]} == sizes

"""Pure tests of size parsing, the codec, the layout math and manifests."""

import json
import os

import pytest

from shardfs import codec
from shardfs.config import StoreConfig, format_count, parse_size
from shardfs.errors import ChunkCorrupt, ManifestInvalid, UsageError
from shardfs.layout import chunk_offsets, slices_for_range
from shardfs.manifest import (
    ChunkRef,
    FileEntry,
    Manifest,
    check_file_path,
    check_model_name,
    parse_manifest,
    to_json,
)
from shardfs.mount.daemon import escape_fuse_option
from shardfs.mount.mount_table import MAX_SOURCE_BYTES, mount_source
from shardfs.publish.chunking import fixed_spans
from shardfs.stores.placed import MemberConfig, PlacedStoreConfig

MiB = 1024 * 1024


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8M", 8 * MiB),
        ("64MiB", 64 * MiB),
        ("1048576", MiB),
        ("1.5G", 3 * 512 * MiB),
        ("10MB", 10_000_000),
        ("4k", 4096),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1", "8X", "eight", "1e6", "8 M B"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    "count, noun, plural, expected",
    [(0, "model", None, "0 models"), (1, "model", None, "1 model"), (2, "file", None, "2 files"),
     (1, "retry", "retries", "1 retry"), (3, "retry", "retries", "3 retries")],
)
def test_format_count(count, noun, plural, expected):
    assert format_count(count, noun, plural) == expected


@pytest.mark.parametrize(
    "value, expected",
    [("s3://bucket/prefix", "s3://bucket/prefix"),
     ("/srv/a,b", "/srv/a\\,b"),
     ("/srv/back\\slash", "/srv/back\\\\slash"),
     ("/srv/caf\u00e9", "/srv/caf\\303\\251"),
     ("/srv/tab\there", "/srv/tab\\011here")],
    ids=["plain", "comma", "backslash", "non-ascii", "tab"],
)
def test_escape_fuse_option(value, expected):
    assert escape_fuse_option(value) == expected


def placed_store_config(urls: list[str]) -> PlacedStoreConfig:
    return PlacedStoreConfig(tuple(MemberConfig(StoreConfig(url), weight=2.0) for url in urls))


def test_mount_source_plain_store():
    assert mount_source(StoreConfig("s3://bucket/prefix", "http://127.0.0.1:9000")) == (
        "s3://bucket/prefix"
    )


def test_mount_source_placed_store():
    source = mount_source(placed_store_config(["s3://a/p", "/srv/b"]))
    assert source == "s3://a/p+/srv/b"


def test_mount_source_long_placed_store():
    urls = [f"/srv/{index:02d}" + "x" * 250 for index in range(20)]
    source = mount_source(placed_store_config(urls))
    assert len(source.encode()) <= MAX_SOURCE_BYTES
    assert source.startswith(f"{urls[0]}+19-more-members-")
    assert mount_source(placed_store_config(urls)) == source
    assert mount_source(placed_store_config(urls[::-1])) != source


@pytest.mark.parametrize(
    "data",
    [b"", b"x", bytes(1 << 20), os.urandom(100_000), b"abc" * 50_000],
    ids=["empty", "one-byte", "zeros", "random", "repetitive"],
)
def test_codec_round_trip(data):
    encoded = codec.encode(data)
    assert codec.decode(encoded.key, len(data), encoded.data) == data


def test_codec_keeps_random_data_raw():
    assert codec.encode(os.urandom(65536)).codec == "raw"


def test_codec_compresses_zeros():
    encoded = codec.encode(bytes(MiB))
    assert encoded.codec == "zstd"
    assert len(encoded.data) < 1000


@pytest.mark.parametrize("position", [0, 5, 17, -1], ids=["magic", "codec", "payload", "last"])
def test_codec_detects_flipped_byte(position):
    data = b"weights" * 10_000
    encoded = codec.encode(data)
    damaged = bytearray(encoded.data)
    damaged[position] ^= 0x40
    with pytest.raises(ChunkCorrupt):
        codec.decode(encoded.key, len(data), bytes(damaged))


def test_codec_detects_truncation():
    encoded = codec.encode(os.urandom(4096))
    with pytest.raises(ChunkCorrupt):
        codec.decode(encoded.key, 4096, encoded.data[:-1])


def test_codec_detects_wrong_key():
    encoded = codec.encode(b"a" * 1000)
    other = codec.chunk_key(b"b" * 1000)
    with pytest.raises(ChunkCorrupt, match="hash"):
        codec.decode(other, 1000, encoded.data)


def _refs(sizes):
    refs, offset = [], 0
    for size in sizes:
        refs.append(ChunkRef(offset, size, "0" * 32, size))
        offset += size
    return refs


@pytest.mark.parametrize(
    "start, end, expected",
    [
        (0, 10, [(0, 0, 10)]),
        (5, 15, [(0, 5, 10), (1, 0, 5)]),
        (10, 20, [(1, 0, 10)]),
        (0, 25, [(0, 0, 10), (1, 0, 10), (2, 0, 5)]),
        (24, 100, [(2, 4, 5)]),
        (25, 30, []),
        (30, 40, []),
        (7, 7, []),
    ],
    ids=["first", "across", "aligned", "whole", "past-end", "at-eof", "after-eof", "empty"],
)
def test_slices_for_range(start, end, expected):
    chunks = _refs([10, 10, 5])
    slices = slices_for_range(chunks, chunk_offsets(chunks), start, end)
    assert [(chunks.index(s.chunk), s.start, s.end) for s in slices] == expected


def test_fixed_spans_tile_the_file():
    assert list(fixed_spans(25, 10)) == [(0, 10), (10, 20), (20, 25)]
    assert list(fixed_spans(20, 10)) == [(0, 10), (10, 20)]
    assert list(fixed_spans(0, 10)) == []


@pytest.mark.parametrize("name", ["m", "org/model", "a/b/c", "Qwen2.5-7B_v1"])
def test_model_name_accepts(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../x", "a//b", "/abs", ".hidden", "a/", "a b", "a/b/c/d/e", "x" * 129]
)
def test_model_name_rejects(name):
    with pytest.raises(ValueError):
        check_model_name(name)


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "../up", "a/../b", "a//b", "./a", "a/.", "nul\0", "x" * 256]
)
def test_file_path_rejects(path):
    with pytest.raises(ValueError):
        check_file_path(path)


def _manifest_doc(**file_changes):
    data = b"hello world"
    encoded = codec.encode(data)
    entry = FileEntry(
        "model.bin",
        len(data),
        0o644,
        0,
        "0" * 64,
        (ChunkRef(0, len(data), encoded.key, len(encoded.data), encoded.codec),),
    )
    doc = json.loads(to_json(Manifest("org/m", 1, 8 * MiB, (entry,))))
    doc["files"][0].update(file_changes)
    return doc


def test_manifest_round_trip():
    doc = _manifest_doc()
    manifest = parse_manifest("org/m", json.dumps(doc).encode())
    assert manifest.files[0].path == "model.bin"
    assert manifest.files[0].size == 11


BAD_FILE_FIELDS = {
    "traversal": {"path": "../../etc/passwd"},
    "absolute": {"path": "/etc/passwd"},
    "nul": {"path": "a\0b"},
    "size-string": {"size": "11"},
    "size-bool": {"size": True},
    "negative-size": {"size": -1},
    "size-mismatch": {"size": 12},
    "huge-size": {"size": 1 << 70},
    "bad-sha": {"sha256": "xyz"},
    "chunks-not-list": {"chunks": {}},
    "mode-too-big": {"mode": 0o100000},
}


@pytest.mark.parametrize("changes", BAD_FILE_FIELDS.values(), ids=BAD_FILE_FIELDS.keys())
def test_manifest_rejects_bad_file(changes):
    doc = _manifest_doc(**changes)
    with pytest.raises(ManifestInvalid):
        parse_manifest("org/m", json.dumps(doc).encode())


def test_manifest_rejects_gap():
    doc = _manifest_doc()
    doc["files"][0]["chunks"][0]["offset"] = 1
    with pytest.raises(ManifestInvalid, match="gap"):
        parse_manifest("org/m", json.dumps(doc).encode())


def test_manifest_rejects_duplicate_paths():
    doc = _manifest_doc()
    doc["files"].append(dict(doc["files"][0]))
    with pytest.raises(ManifestInvalid, match="same path"):
        parse_manifest("org/m", json.dumps(doc).encode())


def test_manifest_rejects_wrong_name():
    doc = _manifest_doc()
    with pytest.raises(ManifestInvalid, match="stored as"):
        parse_manifest("org/other", json.dumps(doc).encode())


@pytest.mark.parametrize(
    "data", [b"", b"{", b"[]", b'"x"', b"\xff\xfe"], ids=["empty", "truncated", "list", "string", "binary"]
)
def test_manifest_rejects_non_manifest(data):
    with pytest.raises(ManifestInvalid):
        parse_manifest("org/m", data)

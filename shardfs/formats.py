"""Tensor spans of model file formats, from their headers (pure functions).

A span is a half-open ``(start, end)`` byte range of the file that a loader
reads as one unit: the header, one tensor, one zip record. The prefetcher
uses spans to fetch the rest of a tensor a reader has started on, without
fetching past it. Each parser returns None when the bytes are not of its
format or do not reach far enough.
"""

import json
import struct

# A safetensors header larger than this is taken as not safetensors; the
# format's own reference implementation caps it at 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL_ENTRY = b"PK\x01\x02"


def safetensors_spans(head: bytes, file_size: int) -> list[tuple[int, int]] | None:
    """Return the header span and tensor spans, in file order, of a safetensors file.

    *head* is the start of the file; it must contain the whole header.
    """
    if len(head) < 8:
        return None
    (header_size,) = struct.unpack_from("<Q", head)
    data_start = 8 + header_size
    if header_size > MAX_SAFETENSORS_HEADER or data_start > len(head):
        return None
    try:
        header = json.loads(head[8:data_start])
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None

    spans = [(0, data_start)]
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not _is_offset_pair(offsets):
            return None
        start, end = data_start + offsets[0], data_start + offsets[1]
        if end > file_size:
            return None
        spans.append((start, end))
    spans.sort()
    return spans


def _is_offset_pair(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(item, int) and item >= 0 for item in value)
        and value[0] <= value[1]
    )


def zip_spans(tail: bytes, tail_offset: int, file_size: int) -> list[tuple[int, int]] | None:
    """Return the record spans of a zip file (a ``torch.save`` checkpoint).

    *tail* holds the file's bytes from *tail_offset* to its end; it must
    contain the central directory. Each span runs from one record's local
    header to the next; the central directory is the last span.
    """
    eocd = tail.rfind(_EOCD, max(0, len(tail) - 65_557))
    if eocd < 0 or len(tail) - eocd < 22:
        return None
    entries, cd_size, cd_offset = struct.unpack_from("<HIQ", _eocd_fields(tail, eocd))
    if 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        zip64 = _zip64_directory(tail, tail_offset, eocd)
        if zip64 is None:
            return None
        entries, cd_size, cd_offset = zip64

    start = cd_offset - tail_offset
    if start < 0 or start + cd_size > len(tail):
        return None
    offsets = _local_header_offsets(tail[start : start + cd_size], entries)
    if offsets is None or any(offset >= cd_offset for offset in offsets):
        return None
    bounds = sorted(set(offsets)) + [cd_offset]
    spans = [(bounds[index], bounds[index + 1]) for index in range(len(bounds) - 1)]
    spans.append((cd_offset, file_size))
    return spans


def _eocd_fields(tail: bytes, eocd: int) -> bytes:
    # Total entries (u16 at 10), directory size (u32 at 12) and offset (u32
    # at 16), repacked so the offset unpacks as u64 like its zip64 form.
    entries, cd_size, cd_offset = struct.unpack_from("<HII", tail, eocd + 10)
    return struct.pack("<HIQ", entries, cd_size, cd_offset)


def _zip64_directory(tail: bytes, tail_offset: int, eocd: int):
    locator = eocd - 20
    if locator < 0 or tail[locator : locator + 4] != _EOCD64_LOCATOR:
        return None
    (record_offset,) = struct.unpack_from("<Q", tail, locator + 8)
    record = record_offset - tail_offset
    if record < 0 or record + 56 > len(tail) or tail[record : record + 4] != _EOCD64:
        return None
    entries, cd_size, cd_offset = struct.unpack_from("<QQQ", tail, record + 32)
    return entries, cd_size, cd_offset


def _local_header_offsets(directory: bytes, entries: int) -> list[int] | None:
    offsets = []
    position = 0
    for _ in range(entries):
        if directory[position : position + 4] != _CENTRAL_ENTRY or position + 46 > len(directory):
            return None
        compressed, uncompressed = struct.unpack_from("<II", directory, position + 20)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", directory, position + 28)
        (offset,) = struct.unpack_from("<I", directory, position + 42)
        extra_start = position + 46 + name_len
        extra = directory[extra_start : extra_start + extra_len]
        if offset == 0xFFFFFFFF:
            offset = _zip64_offset(extra, compressed, uncompressed)
            if offset is None:
                return None
        offsets.append(offset)
        position = extra_start + extra_len + comment_len
    return offsets


def _zip64_offset(extra: bytes, compressed: int, uncompressed: int) -> int | None:
    """Return the local header offset from a zip64 extra field."""
    position = 0
    while position + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4 : position + 4 + size]
        if tag == 0x0001:
            # The field holds, in order, only the values whose 32-bit slot
            # is 0xFFFFFFFF: uncompressed size, compressed size, offset.
            index = (uncompressed == 0xFFFFFFFF) + (compressed == 0xFFFFFFFF)
            if len(body) < 8 * (index + 1):
                return None
            return struct.unpack_from("<Q", body, 8 * index)[0]
        position += 4 + size
    return None

"""Tensor spans of model file formats, from their headers (pure functions).

A span is a half-open ``(start, end)`` byte range of the file that a loader
reads as one unit: the header, one tensor, one zip record. The prefetcher
uses spans to fetch the rest of a tensor a reader has started on, without
fetching past it. The pusher uses the richer `Layout` of a file, whose
regions also carry the element size of each tensor, to put chunk
boundaries on tensor boundaries and to pick each chunk's encoding. Each
parser returns None when the bytes are not of its format or do not reach
far enough.
"""

import dataclasses
import json
import struct

# A safetensors header larger than this is taken as not safetensors; the
# format's own reference implementation caps it at 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL_ENTRY = b"PK\x01\x02"

# Bytes per element of the safetensors dtypes. Sub-byte and 1-byte types
# are 1: byte grouping has nothing to group in them.
SAFETENSORS_ELEMENT_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F4": 1,
    "F6_E2M3": 1,
    "F6_E3M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclasses.dataclass(frozen=True)
class Region:
    """A byte range of a model file that chunking keeps whole where it can."""

    start: int
    end: int
    # Bytes per element, when the format gives it: None for unknown, 1 for
    # data that byte grouping cannot help (text, int8, quantized blocks).
    element_size: int | None = None
    # A file offset where an element begins; elements repeat every
    # element_size bytes from it.
    element_start: int = 0
    # A header or a directory: kept apart from tensor data, so the chunks
    # of the tensors stay the same when it changes.
    standalone: bool = False


@dataclasses.dataclass(frozen=True)
class Layout:
    """The regions of one model file, sorted and disjoint, perhaps with gaps."""

    format: str
    regions: tuple[Region, ...]


def safetensors_spans(head: bytes, file_size: int) -> list[tuple[int, int]] | None:
    """Return the header span and tensor spans, in file order, of a safetensors file.

    *head* is the start of the file; it must contain the whole header.
    """
    parsed = _safetensors_header(head)
    if parsed is None:
        return None
    header, data_start = parsed

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


def _safetensors_header(head: bytes) -> tuple[dict, int] | None:
    """Return the decoded JSON header at the start of *head* and the data start."""
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
    return header, data_start


def safetensors_layout(head: bytes, file_size: int) -> Layout | None:
    """Return the header and tensor regions of a safetensors file.

    *head* is the start of the file; it must contain the whole header.
    """
    parsed = _safetensors_header(head)
    if parsed is None or parsed[1] > file_size:
        return None
    header, data_start = parsed

    regions = [Region(0, data_start, element_size=1, standalone=True)]
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not _is_offset_pair(info.get("data_offsets")):
            return None
        start, end = (data_start + offset for offset in info["data_offsets"])
        if end > file_size:
            return None
        if end > start:
            size = SAFETENSORS_ELEMENT_SIZES.get(info.get("dtype"))
            regions.append(Region(start, end, size, start))
    return _sorted_layout("safetensors", regions)


def _sorted_layout(format_name: str, regions: list[Region]) -> Layout | None:
    """Return the regions sorted as a `Layout`, or None if any two overlap."""
    regions.sort(key=lambda region: region.start)
    for previous, current in zip(regions, regions[1:]):
        if current.start < previous.end:
            return None
    return Layout(format_name, tuple(regions))


def _is_offset_pair(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(item, int) and item >= 0 for item in value)
        and value[0] <= value[1]
    )


def zip_spans(tail: bytes, tail_offset: int, file_size: int) -> list[tuple[int, int]] | None:
    """Return the record spans of a zip file (a ``torch.save`` checkpoint).

    *tail* contains the file's bytes from *tail_offset* to its end, and it
    must contain the central directory. Each span runs from one record's
    local header to the next, and the central directory is the last span.
    """
    records = _zip_records(tail, tail_offset, file_size)
    if records is None:
        return None
    return [(start, end) for start, end, _ in records]


def _zip_records(tail: bytes, tail_offset: int, file_size: int):
    """Return ``(start, end, name)`` of each record in file order, then of
    the central directory (named None), or None if *tail* is not a zip tail."""
    directory = _zip_directory(tail, tail_offset)
    if directory is None:
        return None
    entries, cd_size, cd_offset = directory

    start = cd_offset - tail_offset
    if start < 0 or start + cd_size > len(tail):
        return None
    headers = _local_headers(tail[start : start + cd_size], entries)
    if headers is None or any(offset >= cd_offset for offset in headers):
        return None
    bounds = sorted(headers) + [cd_offset]
    records = [
        (bounds[index], bounds[index + 1], headers[bounds[index]])
        for index in range(len(bounds) - 1)
    ]
    records.append((cd_offset, file_size, None))
    return records


def _is_torch_storage(name: str) -> bool:
    """Return whether a ``torch.save`` record contains tensor data (``<archive>/data/<key>``)."""
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


def zip_layout(tail: bytes, tail_offset: int, file_size: int) -> Layout | None:
    """Return the record regions of a zip file, the central directory last.

    *tail* is as for `zip_spans`. Element sizes are unknown, and element
    boundaries are taken at absolute multiples of the element size, as
    ``torch.save`` aligns each record's data to 64 bytes.

    In a ``torch.save`` checkpoint (one with a ``data.pkl`` record), each
    run of records other than tensor data (the pickle, the version and
    byte-order records) is one standalone region, as is the directory with
    the records just before it. A pickle that changes size then moves the
    tensor records without changing their chunks.
    """
    records = _zip_records(tail, tail_offset, file_size)
    if records is None:
        return None
    names = [name for _, _, name in records[:-1]]
    is_torch = any(name.rsplit("/", 1)[-1] == "data.pkl" for name in names)

    regions: list[Region] = []
    for start, end, name in records:
        if end <= start:
            continue
        if name is not None and (not is_torch or _is_torch_storage(name)):
            regions.append(Region(start, end))
            continue
        # Metadata records and the directory are not element data.
        if regions and regions[-1].standalone and regions[-1].end == start:
            regions[-1] = dataclasses.replace(regions[-1], end=end)
        else:
            regions.append(Region(start, end, element_size=1, standalone=True))
    return Layout("zip", tuple(regions))


def zip_directory_start(tail: bytes, tail_offset: int) -> int | None:
    """Return the file offset of the central directory that *tail* locates.

    *tail* contains the file's bytes from *tail_offset* to its end, and it
    must reach back to the end-of-central-directory record (the last 65,557 bytes do).
    """
    directory = _zip_directory(tail, tail_offset)
    return None if directory is None else directory[2]


def _zip_directory(tail: bytes, tail_offset: int) -> tuple[int, int, int] | None:
    """Return (entries, size, offset) of the central directory."""
    eocd = tail.rfind(_EOCD, max(0, len(tail) - 65_557))
    if eocd < 0 or len(tail) - eocd < 22:
        return None
    entries, cd_size, cd_offset = struct.unpack_from("<HIQ", _eocd_fields(tail, eocd))
    if 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        return _zip64_directory(tail, tail_offset, eocd)
    return entries, cd_size, cd_offset


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


def _local_headers(directory: bytes, entries: int) -> dict[int, str] | None:
    """Return the record names of a central directory by local header offset."""
    headers = {}
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
        name = directory[position + 46 : extra_start].decode("utf-8", "replace")
        headers[offset] = name
        position = extra_start + extra_len + comment_len
    return headers


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


GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32

# Bytes per element of the GGUF tensor types (ggml_type) that hold plain
# numbers: F32 0, F16 1, I8 24, I16 25, I32 26, I64 27, F64 28, BF16 30.
# Every other type is a quantized block format, given as 1.
GGUF_ELEMENT_SIZES = {0: 4, 1: 2, 24: 1, 25: 2, 26: 4, 27: 8, 28: 8, 30: 2}

# Sizes of the fixed-size metadata value types, by GGUF value type id.
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING = 8
_GGUF_ARRAY = 9
_GGUF_UINT32 = 4


class _Truncated(Exception):
    """The bytes end before the structure being read."""


class _GGUFReader:
    """Reads little-endian GGUF header fields from the start of a file."""

    def __init__(self, head: bytes):
        self.head = head
        self.position = 0

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.position + size > len(self.head):
            raise _Truncated
        values = struct.unpack_from(fmt, self.head, self.position)
        self.position += size
        return values

    def string(self) -> bytes:
        (length,) = self.unpack("<Q")
        if self.position + length > len(self.head):
            raise _Truncated
        value = self.head[self.position : self.position + length]
        self.position += length
        return value

    def skip_value(self, value_type: int, depth: int = 0) -> None:
        if value_type in _GGUF_SCALARS:
            self.skip(_GGUF_SCALARS[value_type])
        elif value_type == _GGUF_STRING:
            self.string()
        elif value_type == _GGUF_ARRAY and depth < 4:
            item_type, count = self.unpack("<IQ")
            if item_type in _GGUF_SCALARS:
                self.skip(_GGUF_SCALARS[item_type] * count)
            else:
                for _ in range(count):
                    self.skip_value(item_type, depth + 1)
        else:
            raise ValueError(f"unknown GGUF value type {value_type}")

    def skip(self, size: int) -> None:
        if self.position + size > len(self.head):
            raise _Truncated
        self.position += size


def gguf_layout(head: bytes, file_size: int) -> Layout | None:
    """Return the header and tensor regions of a GGUF file (versions 2 and 3).

    *head* is the start of the file; it must reach the end of the tensor
    infos, which can be many megabytes when the metadata holds a
    vocabulary. A tensor's region runs to the next tensor's offset, so it
    takes its alignment padding with it, and the last runs to the end of
    the file.
    """
    if head[:4] != GGUF_MAGIC:
        return None
    reader = _GGUFReader(head)
    try:
        return _gguf_layout(reader, file_size)
    except (_Truncated, ValueError):
        return None


def _gguf_layout(reader: _GGUFReader, file_size: int) -> Layout | None:
    reader.skip(4)
    version, tensor_count, kv_count = reader.unpack("<IQQ")
    if version not in (2, 3):
        return None
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = reader.string()
        (value_type,) = reader.unpack("<I")
        if key == b"general.alignment" and value_type == _GGUF_UINT32:
            (alignment,) = reader.unpack("<I")
        else:
            reader.skip_value(value_type)
    if alignment <= 0:
        return None

    tensors = []
    for _ in range(tensor_count):
        reader.string()
        (dimensions,) = reader.unpack("<I")
        reader.skip(8 * dimensions)
        tensor_type, offset = reader.unpack("<IQ")
        tensors.append((offset, GGUF_ELEMENT_SIZES.get(tensor_type, 1)))
    data_start = -(-reader.position // alignment) * alignment
    if data_start > file_size:
        return None

    regions = [Region(0, data_start, element_size=1, standalone=True)]
    starts = sorted({data_start + offset for offset, _ in tensors} | {file_size})
    if starts[-1] > file_size:
        return None
    sizes = {data_start + offset: size for offset, size in tensors}
    for start, end in zip(starts, starts[1:]):
        regions.append(Region(start, end, sizes[start], start))
    return Layout("gguf", tuple(regions))

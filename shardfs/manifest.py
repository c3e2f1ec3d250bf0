"""The manifest of one model: its schema, validation and JSON form.

A manifest is untrusted input when it is read back from a store, so
`parse_manifest` checks every rule before any part of it is used: types,
bounds, normalized relative paths, and chunk tables that tile each file
exactly. Anything that breaks a rule raises `ManifestInvalid`.
"""

import dataclasses
import json
import re
import stat

from shardfs import codec
from shardfs.errors import ManifestInvalid

FORMAT = "shardfs-manifest"
VERSION = 1

# The encodings this version can decode; a manifest naming any other is
# rejected, so a daemon never serves a model it would misread.
CODECS = tuple(codec.CODEC_IDS)
TRANSFORMS = tuple(codec.TRANSFORMS)

# A manifest of 64 MiB describes about 200,000 chunks, over 1.5 TiB of model
# at the default chunk size; anything larger is taken as damage or abuse.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_FILES = 100_000
# 1 EiB: far past any real model, small enough that sums stay exact.
MAX_FILE_SIZE = 1 << 60
MAX_CHUNK_LENGTH = codec.MAX_CHUNK_LENGTH
MAX_PATH_DEPTH = 32
MAX_NAME_BYTES = 255

_KEY_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MODEL_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_MODEL_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class ChunkRef:
    """One chunk of a file: where its bytes sit and how they are stored."""

    offset: int
    length: int
    key: str
    stored_length: int
    codec: str = "zstd"
    transform: str = "none"

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mode: int
    mtime_ns: int
    sha256: str
    chunks: tuple[ChunkRef, ...]

    @property
    def stored_size(self) -> int:
        return sum(chunk.stored_length for chunk in self.chunks)


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    created_ns: int
    chunk_size: int
    files: tuple[FileEntry, ...]

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files)

    @property
    def stored_size(self) -> int:
        """Bytes of the distinct chunk objects the model names, each counted once."""
        stored = {
            chunk.key: chunk.stored_length for entry in self.files for chunk in entry.chunks
        }
        return sum(stored.values())


def check_model_name(name: str) -> str:
    """Return *name* if it is a valid model name, else raise ValueError.

    A name is one to four ``/``-separated components of letters, digits,
    ``.``, ``_`` and ``-`` that start with a letter or digit, like the
    ``org/model`` names of model hubs.
    """
    parts = name.split("/")
    if len(parts) > MAX_MODEL_DEPTH:
        raise ValueError(f"more than {MAX_MODEL_DEPTH} components")
    for part in parts:
        if not _MODEL_COMPONENT_RE.fullmatch(part):
            raise ValueError(
                f"component {part!r} must be 1-128 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit"
            )
    return name


def check_file_path(path: str) -> str:
    """Return *path* if it is a normalized relative path, else raise ValueError."""
    if not path:
        raise ValueError("empty path")
    if "\0" in path:
        raise ValueError("path contains NUL")
    if path.startswith("/"):
        raise ValueError("path is absolute")
    parts = path.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise ValueError(f"path is deeper than {MAX_PATH_DEPTH} components")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"path component {part!r} is not allowed")
        # Python keeps the bytes of a file name that is not UTF-8 as lone
        # surrogates, which JSON can carry but strict encoding rejects.
        try:
            encoded = part.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the name is not valid UTF-8; rename the file") from None
        if len(encoded) > MAX_NAME_BYTES:
            raise ValueError(f"path component is longer than {MAX_NAME_BYTES} bytes")
    return path


def to_json(manifest: Manifest) -> bytes:
    """Serialize *manifest* as compact, deterministic JSON."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "name": manifest.name,
        "created_ns": manifest.created_ns,
        "chunk_size": manifest.chunk_size,
        "files": [_file_to_dict(entry) for entry in manifest.files],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _file_to_dict(entry: FileEntry) -> dict:
    return {
        "path": entry.path,
        "size": entry.size,
        "mode": entry.mode,
        "mtime_ns": entry.mtime_ns,
        "sha256": entry.sha256,
        "chunks": [dataclasses.asdict(chunk) for chunk in entry.chunks],
    }


def is_newer_version(data: bytes) -> bool:
    """Return whether *data* is a JSON manifest of a format version above this one's."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    version = doc.get("version") if isinstance(doc, dict) else None
    return isinstance(version, int) and version > VERSION


def parse_manifest(model: str, data: bytes) -> Manifest:
    """Parse and validate the manifest *data* stored for *model*."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(model, f"{len(data)} bytes is over the limit")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestInvalid(model, f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ManifestInvalid(model, "nested too deeply") from None
    try:
        return _manifest_from_doc(model, doc)
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestInvalid(model, _describe(exc)) from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc)


def _field(doc: object, name: str, kind: type) -> object:
    if not isinstance(doc, dict):
        raise TypeError(f"expected an object holding {name!r}")
    value = doc[name]
    # bool is a subclass of int, but true is no size.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"field {name!r} must be of type {kind.__name__}")
    return value


def _bounded_int(doc: object, name: str, low: int, high: int) -> int:
    value = _field(doc, name, int)
    if not low <= value <= high:
        raise ValueError(f"field {name!r} is {value}, outside {low}..{high}")
    return value


def _manifest_from_doc(model: str, doc: object) -> Manifest:
    if _field(doc, "format", str) != FORMAT:
        raise ValueError(f"format is not {FORMAT!r}")
    version = _field(doc, "version", int)
    if version != VERSION:
        raise ValueError(f"version {version} is not supported (expected {VERSION})")
    name = _field(doc, "name", str)
    if name != model:
        raise ValueError(f"names model {name!r} but is stored as {model!r}")

    raw_files = _field(doc, "files", list)
    if len(raw_files) > MAX_FILES:
        raise ValueError(f"lists {len(raw_files)} files, over {MAX_FILES}")
    files = tuple(_file_from_doc(item) for item in raw_files)
    _check_paths_distinct(files)

    return Manifest(
        name=name,
        created_ns=_bounded_int(doc, "created_ns", 0, 1 << 63),
        chunk_size=_bounded_int(doc, "chunk_size", 1, MAX_CHUNK_LENGTH),
        files=files,
    )


def _file_from_doc(doc: object) -> FileEntry:
    path = _field(doc, "path", str)
    check_file_path(path)
    size = _bounded_int(doc, "size", 0, MAX_FILE_SIZE)
    sha256 = _field(doc, "sha256", str)
    if not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"file {path!r}: sha256 is not 64 lowercase hex digits")
    raw_chunks = _field(doc, "chunks", list)
    chunks = tuple(_chunk_from_doc(item) for item in raw_chunks)
    _check_tiling(path, size, chunks)
    return FileEntry(
        path=path,
        size=size,
        mode=stat.S_IMODE(_bounded_int(doc, "mode", 0, 0o7777)),
        mtime_ns=_bounded_int(doc, "mtime_ns", -(1 << 62), 1 << 62),
        sha256=sha256,
        chunks=chunks,
    )


def _chunk_from_doc(doc: object) -> ChunkRef:
    key = _field(doc, "key", str)
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"chunk key {key!r} is not 32 lowercase hex digits")
    codec_name = _field(doc, "codec", str)
    if codec_name not in CODECS:
        raise ValueError(f"chunk {key}: unknown codec {codec_name!r}")
    transform = _field(doc, "transform", str)
    if transform not in TRANSFORMS:
        raise ValueError(f"chunk {key}: unknown transform {transform!r}")
    if not codec.is_valid_encoding(codec_name, transform):
        raise ValueError(f"chunk {key}: codec {codec_name!r} cannot carry transform {transform!r}")
    return ChunkRef(
        offset=_bounded_int(doc, "offset", 0, MAX_FILE_SIZE),
        length=_bounded_int(doc, "length", 1, MAX_CHUNK_LENGTH),
        key=key,
        stored_length=_bounded_int(doc, "stored_length", 1, 2 * MAX_CHUNK_LENGTH),
        codec=codec_name,
        transform=transform,
    )


def _check_tiling(path: str, size: int, chunks: tuple[ChunkRef, ...]) -> None:
    position = 0
    for chunk in chunks:
        if chunk.offset != position:
            kind = "gap" if chunk.offset > position else "overlap"
            raise ValueError(f"file {path!r}: chunk table has a {kind} at {position}")
        position = chunk.end
    if position != size:
        raise ValueError(
            f"file {path!r}: chunks cover {position} bytes but the size is {size}"
        )


def _check_paths_distinct(files: tuple[FileEntry, ...]) -> None:
    """Reject duplicate paths and a file that is also a parent directory."""
    paths = {entry.path for entry in files}
    if len(paths) != len(files):
        raise ValueError("lists the same path twice")
    for entry in files:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in paths:
                raise ValueError(f"path {parent!r} is both a file and a directory")

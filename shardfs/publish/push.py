"""Push a file or a model directory into a store as chunks and a manifest.

Every chunk is uploaded (or found already present) before the manifest is
written, in one atomic put, so a reader never sees a manifest whose chunks
are missing. A failed push leaves the store's existing models untouched.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import stat
import struct
import threading
import time

from shardfs import codec, formats
from shardfs.config import PushConfig, format_count
from shardfs.errors import (
    ChunkCorrupt,
    ChunkEncodingUnknown,
    ObjectInvalid,
    ObjectNotFound,
    UsageError,
)
from shardfs.manifest import (
    ChunkRef,
    FileEntry,
    Manifest,
    check_file_path,
    check_model_name,
    to_json,
)
from shardfs.publish.chunking import PlannedChunk, plan_chunks
from shardfs.publish.progress import PushProgress
from shardfs.publish.retire import retire_manifest
from shardfs.stores.base import Store, chunk_object_key, list_models, manifest_object_key
from shardfs.stores.placed import PlacedStore

log = logging.getLogger(__name__)

# Directories that tools keep beside a model but that are not part of it.
SKIPPED_DIRS = {".git", ".cache", "__pycache__"}

# Before writing its manifest, a push renews again each chunk that it
# uploaded or renewed longer ago than this. gc with a longer grace period
# then keeps the chunks of a push in progress, however long it runs.
RENEW_AGAIN_AFTER_S = 600.0


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str  # relative path inside the model, '/'-separated
    abspath: str
    size: int
    mode: int
    mtime_ns: int
    # (device, inode, size, mtime, ctime) when the file was listed; a push
    # stops if the file no longer matches it after being read.
    identity: tuple[int, int, int, int, int]


def collect_sources(source: str) -> list[SourceFile]:
    """Return the regular files to push from the file or directory *source*.

    Symbolic links are followed, as a Hugging Face snapshot directory links
    each file into a blob store. Raises `UsageError` for a missing or
    unreadable source.
    """
    try:
        info = os.stat(source)
    except OSError as exc:
        raise UsageError(f"cannot read source {source!r}: {exc.strerror}") from None
    if stat.S_ISREG(info.st_mode):
        return [_source_file(os.path.basename(source), source, info)]
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"source {source!r} is neither a file nor a directory")

    files = []
    for directory, subdirs, names in os.walk(source, followlinks=True, onerror=_raise):
        subdirs[:] = sorted(name for name in subdirs if name not in SKIPPED_DIRS)
        _check_no_link_loop(source, directory, subdirs)
        for name in sorted(names):
            abspath = os.path.join(directory, name)
            relative = os.path.relpath(abspath, source).replace(os.sep, "/")
            try:
                file_info = os.stat(abspath)
            except OSError as exc:
                raise UsageError(f"cannot read {abspath!r}: {exc.strerror}") from None
            if stat.S_ISREG(file_info.st_mode):
                files.append(_source_file(relative, abspath, file_info))
            else:
                log.warning("skipping %s: not a regular file", abspath)
    if not files:
        raise UsageError(f"source directory {source!r} contains no files")
    return files


def _check_no_link_loop(source: str, directory: str, subdirs: list[str]) -> None:
    """Raise `UsageError` if a subdirectory links back to a directory above it."""
    above = os.path.realpath(directory)
    ancestors = set()
    while True:
        ancestors.add(above)
        if above == os.path.realpath(source) or above == os.path.dirname(above):
            break
        above = os.path.dirname(above)
    for name in subdirs:
        path = os.path.join(directory, name)
        if os.path.islink(path) and os.path.realpath(path) in ancestors:
            raise UsageError(
                f"cannot push {source!r}: the symbolic link {path!r} loops back to "
                f"{os.path.realpath(path)!r}"
            )


def _raise(exc: OSError) -> None:
    raise UsageError(f"cannot read {exc.filename!r}: {exc.strerror}")


def _source_file(relative: str, abspath: str, info: os.stat_result) -> SourceFile:
    try:
        check_file_path(relative)
    except ValueError as exc:
        raise UsageError(f"cannot push {abspath!r}: {exc}") from None
    if not os.access(abspath, os.R_OK):
        raise UsageError(f"cannot read {abspath!r}: permission denied")
    return SourceFile(
        relative,
        abspath,
        info.st_size,
        stat.S_IMODE(info.st_mode),
        info.st_mtime_ns,
        _identity(info),
    )


def _identity(info: os.stat_result) -> tuple[int, int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class _ChunkUploader:
    """Encodes chunks and uploads those the store lacks, on a thread pool.

    A chunk found in the store has its modification time renewed, so that
    `shardfs gc`, which deletes only unnamed chunks older than its grace
    period, does not delete it before the manifest that names it is written.
    `renew_old` renews again the chunks confirmed long ago, for long pushes.
    """

    def __init__(
        self, store: Store, config: PushConfig, progress: PushProgress, clock=time.monotonic
    ):
        self._store = store
        self._config = config
        self._progress = progress
        self._clock = clock
        # When each chunk was last uploaded or renewed, and where its bytes are.
        self._confirmed: dict[str, tuple[float, str, PlannedChunk]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(config.workers)
        # Bounds the chunks held in memory: read, queued or being uploaded.
        self._slots = threading.BoundedSemaphore(config.workers * 2)
        self._lock = threading.Lock()
        # The first chunk of each key in this push; later equal chunks wait
        # for it instead of being encoded and uploaded again.
        self._first: dict[str, concurrent.futures.Future] = {}

    def submit(self, source: str, plan: PlannedChunk, data: bytes) -> concurrent.futures.Future:
        """Start storing the chunk *data* cut at *plan* from the file *source*.

        The future returns the chunk's `ChunkRef`.
        """
        key = codec.chunk_key(data)
        first = self._first.get(key)
        if first is not None:
            return self._repeat(first, plan)
        self._slots.acquire()
        try:
            future = self._pool.submit(self._store_chunk, source, plan, key, data)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._first[key] = future
        return future

    def _repeat(self, first: concurrent.futures.Future, plan: PlannedChunk):
        repeat = concurrent.futures.Future()

        def resolve(done: concurrent.futures.Future) -> None:
            if done.cancelled():
                repeat.cancel()
                return
            if done.exception() is not None:
                repeat.set_exception(done.exception())
                return
            ref = dataclasses.replace(done.result(), offset=plan.start)
            with self._lock:
                self._progress.add_repeat(ref.length)
            repeat.set_result(ref)

        first.add_done_callback(resolve)
        return repeat

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _store_chunk(self, source: str, plan: PlannedChunk, key: str, data: bytes) -> ChunkRef:
        object_key = chunk_object_key(key)
        existing = self._existing_header(key, object_key, data)
        if existing is not None and not self._renew(object_key):
            existing = None
        if existing is None:
            encoded = self._upload(object_key, plan, data)
            codec_name, transform = encoded.codec, encoded.transform
            stored_length, uploaded = len(encoded.data), True
        else:
            (codec_name, transform, stored_length), uploaded = existing, False
        with self._lock:
            self._confirmed[key] = (self._clock(), source, plan)
            self._progress.add_chunk(len(data), stored_length, uploaded)
        return ChunkRef(plan.start, len(data), key, stored_length, codec_name, transform)

    def _upload(self, object_key: str, plan: PlannedChunk, data: bytes) -> codec.EncodedChunk:
        encoded = codec.encode(
            data, self._config.zstd_level, plan.element_size, plan.element_offset
        )
        self._store.put(object_key, encoded.data)
        return encoded

    def renew_old(self) -> int:
        """Renew every chunk confirmed more than `RENEW_AGAIN_AFTER_S` ago.

        A chunk deleted since is uploaded again from its source file. Returns
        the number of chunks renewed.
        """
        cutoff = self._clock() - RENEW_AGAIN_AFTER_S
        with self._lock:
            old = [
                (key, source, plan)
                for key, (confirmed_at, source, plan) in self._confirmed.items()
                if confirmed_at < cutoff
            ]
        futures = [self._pool.submit(self._renew_again, *item) for item in old]
        for future in futures:
            future.result()
        return len(old)

    def _renew_again(self, key: str, source: str, plan: PlannedChunk) -> None:
        object_key = chunk_object_key(key)
        if not self._renew(object_key):
            try:
                with open(source, "rb") as file:
                    data = os.pread(file.fileno(), plan.end - plan.start, plan.start)
            except OSError as exc:
                raise UsageError(f"cannot read {source!r}: {exc.strerror}") from None
            if codec.chunk_key(data) != key:
                raise UsageError(f"source file {source!r} changed while pushing")
            self._upload(object_key, plan, data)
        with self._lock:
            self._confirmed[key] = (self._clock(), source, plan)

    def _renew(self, object_key: str) -> bool:
        """Renew the age of a chunk found in the store; False if it is gone since."""
        try:
            self._store.touch(object_key)
        except ObjectNotFound:
            log.info("chunk %s was deleted while pushing; uploading it again", object_key)
            return False
        return True

    def _existing_header(
        self, key: str, object_key: str, data: bytes
    ) -> tuple[str, str, int] | None:
        """Return (codec, transform, stored length) of a good chunk already in the store.

        Returns None when the chunk must be uploaded: it is missing, or a
        copy is damaged or of an encoding this version does not know. In a
        placed store every copy of the chunk's placement is checked, and a
        bad copy is deleted first, because members upload only a chunk they
        lack.
        """
        # The zstd size a copy is compared with is computed once, for all copies.
        zstd_length = functools.cache(
            lambda: len(codec.encode_as(data, "zstd", "none", self._config.zstd_level).data)
        )
        if not isinstance(self._store, PlacedStore):
            try:
                return self._check_copy(self._store, key, object_key, data, zstd_length)
            except ChunkEncodingUnknown as exc:
                log.info("rewriting chunk in an encoding this version knows: %s", exc)
            except (ChunkCorrupt, ObjectInvalid) as exc:
                log.warning("replacing damaged chunk object: %s", exc)
            return None

        found = []
        for member in self._store.placement(key):
            try:
                found.append(self._check_copy(member.store, key, object_key, data, zstd_length))
                continue
            except ChunkEncodingUnknown as exc:
                log.info("rewriting the copy of chunk %s on %s: %s", key, member.name, exc)
            except (ChunkCorrupt, ObjectInvalid) as exc:
                log.warning("replacing the copy of chunk %s on %s: %s", key, member.name, exc)
            member.store.delete(object_key)
            found.append(None)
        if None in found:
            return None
        return found[0]

    def _check_copy(
        self, store: Store, key: str, object_key: str, data: bytes, zstd_length
    ) -> tuple[str, str, int] | None:
        """Check the copy of a chunk on *store*: its header, and its size where
        the header gives it or, for zstd, against `zstd_length()`. With
        ``check_existing`` the whole object is fetched and decoded instead.

        Returns (codec, transform, stored length), or None if *store* lacks
        the chunk. Raises `ChunkCorrupt`, `ChunkEncodingUnknown` or
        `ObjectInvalid` for a bad copy.
        """
        length = len(data)
        try:
            size = store.head(object_key)
            if size is None:
                return None
            if self._config.check_existing:
                head = store.get(object_key)
                size = len(head)
            else:
                head = store.get_range(object_key, 0, codec.SIZED_HEAD_LENGTH)
        except ObjectNotFound:
            return None
        header = codec.parse_header(key, head)
        if header.length != length:
            raise ChunkCorrupt(key, f"header gives {header.length} bytes, expected {length}")
        if self._config.check_existing:
            codec.decode(key, length, head)
        else:
            self._check_size(store, key, object_key, data, head, size, zstd_length)
        return header.codec, header.transform, size

    def _check_size(
        self,
        store: Store,
        key: str,
        object_key: str,
        data: bytes,
        head: bytes,
        size: int,
        zstd_length,
    ) -> None:
        """Raise `ChunkCorrupt` unless the object's *size* fits its encoding.

        A raw or split object's header gives its exact size. A zstd frame
        does not, so the chunk is compressed here as the store's copy
        would have been. A copy of another size, as another zstd version
        may write, is fetched and decoded once to tell it from a truncated
        one.
        """
        expected = codec.stored_size(key, head)
        if expected is not None:
            if size != expected:
                raise ChunkCorrupt(key, f"object is {size} bytes, its header gives {expected}")
            return
        if size != zstd_length():
            codec.decode(key, len(data), store.get(object_key))


def push(
    store: Store,
    source: str,
    name: str,
    config: PushConfig,
    progress_stream=None,
    sources: list[SourceFile] | None = None,
    on_commit=None,
) -> Manifest:
    """Push *source* (a file or a directory) into *store* as model *name*.

    *sources* are the files `collect_sources` found in *source*, when the
    caller has collected them already. *on_commit*, if given, is called
    once every chunk is stored, right before the manifest is written.
    """
    try:
        check_model_name(name)
    except ValueError as exc:
        raise UsageError(f"invalid model name {name!r}: {exc}") from None
    if sources is None:
        sources = collect_sources(source)
    store.check()
    _check_not_nested(store, name)

    progress = PushProgress(sum(item.size for item in sources), progress_stream)
    uploader = _ChunkUploader(store, config, progress)
    try:
        entries = tuple(_push_file(uploader, item, config) for item in sources)
        renewed = uploader.renew_old()
    finally:
        uploader.close()
    if renewed:
        log.info("renewed %s again before writing the manifest", format_count(renewed, "chunk"))

    manifest = Manifest(name, time.time_ns(), config.chunk_size, entries)
    if on_commit is not None:
        on_commit()
    # The replaced manifest is kept for gc's grace period, so that readers
    # that still hold it keep finding its chunks.
    retire_manifest(store, name)
    store.put(manifest_object_key(name), to_json(manifest))
    progress.finish(name, len(entries))
    return manifest


def _check_not_nested(store: Store, name: str) -> None:
    """Raise `UsageError` if *name* is inside another model's name, or contains one.

    The mount shows each model as a directory, so ``org/m`` and
    ``org/m/v2`` cannot both be models.
    """
    for other in list_models(store):
        if other.startswith(name + "/"):
            raise UsageError(
                f"cannot push {name!r}: the model {other!r} is inside that name; "
                "choose a name that is not a directory of another model"
            )
        if name.startswith(other + "/"):
            raise UsageError(
                f"cannot push {name!r}: it is inside the model {other!r}; "
                "choose a name that is not a directory of another model"
            )


def _push_file(uploader: _ChunkUploader, item: SourceFile, config: PushConfig) -> FileEntry:
    digest = hashlib.sha256()
    futures = []
    try:
        with open(item.abspath, "rb") as file:
            _check_unchanged(item, os.fstat(file.fileno()))
            layout = read_layout(file.fileno(), item.size)
            for plan in plan_chunks(layout, item.size, config.chunk_size):
                data = file.read(plan.end - plan.start)
                if len(data) != plan.end - plan.start:
                    raise _changed(item)
                digest.update(data)
                futures.append(uploader.submit(item.abspath, plan, data))
            if file.read(1):
                raise _changed(item)
            # A write in place keeps the size, so only the times show it. A
            # write within the clock tick of the file's last change before
            # the push began would not show, but nothing else can tell.
            _check_unchanged(item, os.fstat(file.fileno()))
    except OSError as exc:
        raise UsageError(f"cannot read {item.abspath!r}: {exc.strerror}") from None
    chunks = tuple(future.result() for future in futures)
    return FileEntry(
        item.path, item.size, item.mode, item.mtime_ns, digest.hexdigest(), chunks
    )


def _check_unchanged(item: SourceFile, info: os.stat_result) -> None:
    if _identity(info) != item.identity:
        raise _changed(item)


def _changed(item: SourceFile) -> UsageError:
    return UsageError(
        f"source file {item.abspath!r} changed while pushing; "
        "push again once nothing writes to it"
    )


# The head read first to find a file's format; a safetensors or GGUF header
# larger than this is read in full before chunking starts.
HEAD_BYTES = 1024 * 1024
# A GGUF header or zip central directory past this size is taken as
# damage, and the file is chunked as a plain file.
MAX_HEADER_BYTES = 256 * 1024 * 1024


def read_layout(fd: int, size: int) -> formats.Layout | None:
    """Return the tensor layout of the open file *fd*, or None for no known format.

    Reads with pread, so the file position is left where it was.
    """
    head = os.pread(fd, min(size, HEAD_BYTES), 0)
    if len(head) >= 8:
        (header_size,) = struct.unpack_from("<Q", head)
        if len(head) < 8 + header_size <= min(size, formats.MAX_SAFETENSORS_HEADER + 8):
            head = os.pread(fd, 8 + header_size, 0)
    layout = formats.safetensors_layout(head, size)
    if layout is not None:
        return layout

    while head[:4] == formats.GGUF_MAGIC:
        layout = formats.gguf_layout(head, size)
        if layout is not None or len(head) >= min(size, MAX_HEADER_BYTES):
            return layout
        head = os.pread(fd, min(size, MAX_HEADER_BYTES, 4 * len(head)), 0)

    tail_start = max(0, size - 65_557)
    tail = os.pread(fd, size - tail_start, tail_start)
    directory_start = formats.zip_directory_start(tail, tail_start)
    if directory_start is None:
        return None
    if 0 <= directory_start < tail_start and size - directory_start <= MAX_HEADER_BYTES:
        tail_start = directory_start
        tail = os.pread(fd, size - tail_start, tail_start)
    return formats.zip_layout(tail, tail_start, size)

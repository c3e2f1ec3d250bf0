"""The SSD cache: decoded chunks as files named by their key.

Layout under the cache directory (mode 0700)::

    chunks/<key[0:2]>/<key>   one decoded chunk
    tmp/                      files being written; emptied at start

A chunk is written to ``tmp/`` and renamed into ``chunks/``, so a crashed
daemon leaves no partial file under a chunk's name. A file that is damaged
anyway (a lost page after a power cut, a full disk, tampering) is caught
because each chunk is verified against its key the first time it is read
after a start; a bad file is deleted and counts as a miss. The index is
rebuilt by a scan at start; its LRU order starts from the files' mtimes.

Methods block and are called from worker threads; one lock guards the
index. The size cap is kept exactly: room is made before a chunk is added.
"""

import collections
import fcntl
import logging
import os
import re
import shutil
import tempfile
import threading
import time

from shardfs import codec
from shardfs.config import format_count
from shardfs.errors import ChunkCorrupt, UsageError

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"[0-9a-f]{32}")

# After a write fails (a full or read-only disk), nothing is written for
# this long. Then writes are tried again, so a disk that has room again,
# or was remounted writable, serves as a cache without a daemon restart.
WRITE_RETRY_AFTER_S = 60.0


class DiskCache:
    def __init__(self, directory: str, limit_bytes: int, clock=time.monotonic):
        self.directory = directory
        self.limit_bytes = limit_bytes
        self.size_bytes = 0
        self._chunks_dir = os.path.join(directory, "chunks")
        self._tmp_dir = os.path.join(directory, "tmp")
        self._lock = threading.Lock()
        self._index: collections.OrderedDict[str, int] = collections.OrderedDict()
        # Keys verified since this start; later reads of them may be partial.
        self._verified: set[str] = set()
        self._writing: set[str] = set()
        self._lock_fd: int | None = None
        self._clock = clock
        # When the last failed write happened, by *clock*; None after a success.
        self._write_failed_at: float | None = None

    def open(self) -> None:
        """Create the directories and rebuild the index from the files present."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._lock_directory()
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        os.makedirs(self._tmp_dir, mode=0o700, exist_ok=True)
        os.makedirs(self._chunks_dir, mode=0o700, exist_ok=True)

        found = []
        for entry in _scan_files(self._chunks_dir):
            if _KEY_RE.fullmatch(entry.name):
                info = entry.stat()
                found.append((info.st_mtime_ns, entry.name, info.st_size))
            else:
                _unlink(entry.path)
        found.sort()
        with self._lock:
            for _, key, size in found:
                self._index[key] = size
                self.size_bytes += size
            evicted = self._evict_until(self.limit_bytes)
        if evicted:
            log.warning(
                "disk cache %s is over its cap of %d bytes: removed %s",
                self.directory,
                self.limit_bytes,
                format_count(len(evicted), "chunk"),
            )
        self._unlink_all(evicted)
        log.info(
            "disk cache %s: %s, %d of %d bytes",
            self.directory,
            format_count(len(self._index), "chunk"),
            self.size_bytes,
            self.limit_bytes,
        )

    def _lock_directory(self) -> None:
        """Hold an exclusive lock on the directory for the daemon's lifetime.

        Two daemons on one cache would each keep their own index and cap and
        delete each other's chunks. The lock ends with the process.
        """
        self._lock_fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise UsageError(
                f"cache directory {self.directory!r} is in use by another mount; "
                "give each mount its own --cache-dir"
            ) from None

    def check_free(self) -> None:
        """Raise `UsageError` if another daemon holds the directory's lock.

        Takes the lock and releases it at once, so a mount in use is
        reported before a new daemon starts.
        """
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._lock_directory()
        except OSError as exc:
            raise UsageError(f"cannot lock cache directory {self.directory!r}: {exc.strerror}") from None
        self.close()

    def close(self) -> None:
        """Release the directory lock; the index stays usable for reads."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __contains__(self, key: str) -> bool:
        return key in self._index

    @property
    def write_failed(self) -> bool:
        """Whether a write failed less than `WRITE_RETRY_AFTER_S` ago, so
        that nothing is written now."""
        failed_at = self._write_failed_at
        return failed_at is not None and self._clock() - failed_at < WRITE_RETRY_AFTER_S

    def can_hold(self, length: int) -> bool:
        """Whether a chunk of *length* bytes can be written now; False for
        a while after a write failed (full or read-only disk)."""
        return not self.write_failed and length <= self.limit_bytes

    def is_verified(self, key: str) -> bool:
        return key in self._verified and key in self._index

    def verified_length(self, key: str) -> int | None:
        """Return the length of chunk *key*'s file if it was verified since start."""
        with self._lock:
            if key in self._verified:
                return self._index.get(key)
        return None

    def _path(self, key: str) -> str:
        return os.path.join(self._chunks_dir, key[:2], key)

    def read(self, key: str, length: int) -> bytes | None:
        """Return the verified chunk, or None if it is missing or damaged."""
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        try:
            with open(self._path(key), "rb", buffering=0) as file:
                data = codec.read_exactly(file, length)
                longer = file.read(1)
        except FileNotFoundError:
            self._forget(key)
            return None
        except ValueError:
            log.warning("dropping damaged cache file: chunk %s is shorter than %d bytes", key, length)
            self.drop(key)
            return None
        try:
            if longer:
                raise ChunkCorrupt(key, f"cache file is longer than {length} bytes")
            codec.verify(key, length, data)
        except ChunkCorrupt as exc:
            log.warning("dropping damaged cache file: %s", exc)
            self.drop(key)
            return None
        self._verified.add(key)
        return data

    def read_range(self, key: str, length: int, start: int, end: int) -> bytes | None:
        """Return bytes ``[start, end)`` of a chunk verified since start, or None.

        Returns None also when the verified file is not *length* bytes long,
        the chunk's length in the manifest.
        """
        with self._lock:
            if key not in self._index or key not in self._verified:
                return None
            if self._index[key] != length:
                return None
            self._index.move_to_end(key)
        try:
            with open(self._path(key), "rb") as file:
                data = os.pread(file.fileno(), end - start, start)
        except FileNotFoundError:
            self._forget(key)
            return None
        # A verified file can still shrink under us only by outside damage.
        return data if len(data) == end - start else None

    def advise(self, key: str) -> None:
        """Ask the kernel to start reading chunk *key*'s file into the page cache.

        The read runs in the background (POSIX_FADV_WILLNEED), so a reader
        that reaches the chunk later finds it in memory. A missing file is
        left to the read that needs it.
        """
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError as exc:
            log.debug("read-ahead hint for cache file %s failed: %s", key, exc)
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes) -> None:
        """Store a verified chunk; failures are logged once and leave no file."""
        if len(data) > self.limit_bytes:
            return
        with self._lock:
            if key in self._index or key in self._writing:
                return
            if self.write_failed:
                return
            evicted = self._evict_until(self.limit_bytes - len(data))
            # Writes still in progress hold space that cannot be evicted. When
            # they leave no room, this chunk is not cached.
            fits = self.size_bytes + len(data) <= self.limit_bytes
            if fits:
                # Reserve the space now, so concurrent writers cannot pass the cap.
                self.size_bytes += len(data)
                self._writing.add(key)
        self._unlink_all(evicted)
        if not fits:
            return
        try:
            self._write_file(key, data)
        except OSError as exc:
            with self._lock:
                self.size_bytes -= len(data)
                self._writing.discard(key)
                # Concurrent writes that fail together log one warning.
                first_failure = not self.write_failed
                self._write_failed_at = self._clock()
            if first_failure:
                log.warning(
                    "disk cache write failed, serving from memory; writes are tried "
                    "again in %.0f s: %s",
                    WRITE_RETRY_AFTER_S,
                    exc,
                )
            return
        with self._lock:
            if self._write_failed_at is not None:
                self._write_failed_at = None
                log.info("disk cache writes work again")
            self._writing.discard(key)
            self._index[key] = len(data)
            self._verified.add(key)

    def _write_file(self, key: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(self._path(key)), mode=0o700, exist_ok=True)
        fd, temp_path = tempfile.mkstemp(dir=self._tmp_dir)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.rename(temp_path, self._path(key))
        except BaseException:
            _unlink(temp_path)
            raise

    def drop(self, key: str) -> None:
        self._forget(key)
        _unlink(self._path(key))

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self.size_bytes -= size
        self._verified.discard(key)

    def _evict_until(self, target_bytes: int) -> list[str]:
        """Remove LRU entries from the index until the total is at most *target_bytes*.

        Returns the evicted keys; the caller deletes their files outside the lock.
        """
        evicted = []
        while self.size_bytes > target_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self.size_bytes -= size
            self._verified.discard(key)
            evicted.append(key)
        return evicted

    def _unlink_all(self, keys: list[str]) -> None:
        for key in keys:
            _unlink(self._path(key))


def _scan_files(directory: str):
    with os.scandir(directory) as top:
        for subdir in top:
            if not subdir.is_dir(follow_symlinks=False):
                continue
            with os.scandir(subdir.path) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        yield entry


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

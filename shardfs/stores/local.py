"""A store in a local directory, for a single host or a shared filesystem."""

import errno
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator

from shardfs.errors import (
    ObjectInvalid,
    ObjectNotFound,
    StoreAccessDenied,
    StoreError,
    StoreNotFound,
)
from shardfs.stores.base import ObjectInfo


# The top-level directories of a store; see `shardfs.stores.base`.
log = logging.getLogger(__name__)

STORE_DIRS = {"models", "chunks", "retired"}


class LocalStore:
    def __init__(self, root: str, url: str | None = None):
        self.root = os.path.abspath(root)
        self.url = url or self.root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def _check_no_links(self, key: str) -> None:
        """Raise `ObjectInvalid` if a directory between the root and *key* is a
        symbolic link.

        A write or delete through a linked model directory would change
        another model's objects, and the listing does not follow such links.
        """
        parts = key.split("/")[:-1]
        # The top directories (models/, chunks/) may be links to other disks.
        for depth in range(2, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if os.path.islink(self._path(directory)):
                raise ObjectInvalid(
                    self.url, key, f"{directory} is a symbolic link; remove it from the store"
                )

    def check(self) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreNotFound(self.url, "it exists and is not a directory")
        if not os.path.isdir(self.root):
            raise StoreNotFound(self.url, "no such directory")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StoreAccessDenied(self.url, "directory is not readable")
        # A directory with other files and no store layout is most likely a
        # wrong path; treating it as an empty store would hide the mistake.
        entries = set(os.listdir(self.root))
        # A mount's cache has chunks/ too, of decoded chunks, with its lock.
        if {"lock", "tmp", "chunks"} <= entries:
            raise StoreNotFound(
                self.url, "the directory is a mount's cache directory, not a shardfs store"
            )
        if entries and not entries & STORE_DIRS:
            raise StoreNotFound(
                self.url, "the directory is not a shardfs store (no models/ or chunks/ in it)"
            )

    def create(self) -> None:
        """Create the store directory if it does not exist yet."""
        try:
            os.makedirs(self.root, exist_ok=True)
        except FileExistsError:
            raise StoreNotFound(self.url, "it exists and is not a directory") from None
        except OSError as exc:
            raise StoreError(f"cannot create store {self.url}: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreAccessDenied(self.url, "directory is not writable")

    def get(self, key: str) -> bytes:
        try:
            with open(self._open_regular(key), "rb") as file:
                return file.read()
        except OSError as exc:
            raise self._error(exc, key) from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with open(self._open_regular(key), "rb") as file:
                return os.pread(file.fileno(), end - start, start)
        except OSError as exc:
            raise self._error(exc, key) from None

    def _open_regular(self, key: str) -> int:
        """Open the object's file for reading and return its descriptor.

        Raises `ObjectInvalid` unless it is a regular file. The open does
        not block (O_NONBLOCK), because opening a FIFO waits for a writer,
        and reading a FIFO or a device may never end.
        """
        fd = os.open(self._path(key), os.O_RDONLY | os.O_NONBLOCK)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise ObjectInvalid(self.url, key, f"it is {_file_type(mode)}, not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def head(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            if os.path.islink(self._path(key)):
                raise ObjectInvalid(self.url, key, "it is a symbolic link to a missing file") from None
            return None
        except OSError as exc:
            raise self._error(exc, key) from None

    def put(self, key: str, data: bytes) -> None:
        self._check_no_links(key)
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            # Write a temporary file beside the target, flush it to disk, and
            # rename it into place, so a crash leaves the old object or the
            # whole new one, never a torn one.
            fd, temp_path = _create_temp_file(directory)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.chmod(temp_path, 0o644)
                try:
                    os.rename(temp_path, path)
                except IsADirectoryError:
                    # An empty directory in the object's place is replaced. One
                    # that contains files makes rmdir fail, and that is reported.
                    os.rmdir(path)
                    os.rename(temp_path, path)
            except BaseException:
                os.unlink(temp_path)
                raise
        except OSError as exc:
            raise self._error(exc, key) from None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            info = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(exc, key) from None
        return ObjectInfo(key, info.st_size, info.st_mtime)

    def touch(self, key: str) -> None:
        self._check_no_links(key)
        try:
            os.utime(self._path(key))
        except OSError as exc:
            raise self._error(exc, key) from None

    def delete(self, key: str) -> None:
        self._check_no_links(key)
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            # An empty directory in an object's place is removed. One with
            # files in it is left for the user, and the error names it.
            try:
                os.rmdir(self._path(key))
            except OSError as exc:
                raise self._error(exc, key) from None
        except OSError as exc:
            raise self._error(exc, key) from None
        self._remove_empty_parents(key)

    def _remove_empty_parents(self, key: str) -> None:
        """Remove the directories of *key* that the delete left empty,
        deepest first, up to and not including its top-level directory.

        The chunks/<xx>/ directories stay, because there are at most 256 and
        pushes write into them all the time. os.rmdir removes only an empty
        directory, and a put that finds its directory gone creates it again.
        """
        parts = key.split("/")
        if parts[0] == "chunks":
            return
        for depth in range(len(parts) - 1, 1, -1):
            directory = "/".join(parts[:depth])
            try:
                os.rmdir(self._path(directory))
            except OSError as exc:
                # Not empty (Linux returns ENOTEMPTY, POSIX also allows EEXIST),
                # or removed by a concurrent delete that goes on upwards.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    log.warning(
                        "failed to remove empty directory %s from store %s: %s",
                        directory,
                        self.url,
                        exc.strerror,
                    )
                return

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in self.list(prefix):
            info = self.stat(key)
            # A file deleted between the listing and its stat is gone.
            if info is not None:
                yield info

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/"))
        for directory, subdirs, files in os.walk(base):
            subdirs.sort()
            relative = os.path.relpath(directory, self.root)
            # A directory with a manifest's name is listed as the object it
            # displaces, so that reading it fails instead of the model
            # silently vanishing (and gc deleting its chunks).
            names = files + [name for name in subdirs if _MANIFEST_NAME_RE.fullmatch(name)]
            for name in subdirs:
                if relative != "." and os.path.islink(os.path.join(directory, name)):
                    log.warning(
                        "skipping %s/%s in store %s: it is a symbolic link to a directory",
                        relative,
                        name,
                        self.url,
                    )
            for name in sorted(names):
                if name.startswith(".tmp-"):
                    continue
                path = name if relative == "." else f"{relative}/{name}"
                yield path.replace(os.sep, "/")

    def remove_partial_writes(self, cutoff: float, dry_run: bool = False) -> tuple[int, int]:
        """Delete the temporary files of puts that were killed before their
        rename, if last modified before *cutoff* (a Unix time).

        Returns the number of files and their bytes.
        """
        count = size = 0
        for directory, _, files in os.walk(self.root):
            for name in files:
                if not name.startswith(".tmp-"):
                    continue
                path = os.path.join(directory, name)
                try:
                    info = os.lstat(path)
                    if info.st_mtime >= cutoff:
                        continue
                    if not dry_run:
                        os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise self._error(exc, os.path.relpath(path, self.root)) from None
                count += 1
                size += info.st_size
        return count, size

    def _error(self, exc: OSError, key: str) -> StoreError:
        if exc.errno == errno.ENOENT:
            # A store directory that was moved or unmounted is an outage, not
            # a missing object, so a placed store marks the member failed.
            if not os.path.isdir(self.root):
                return StoreNotFound(self.url, "no such directory")
            # A link to nothing is damage to be reported, not a missing object
            # that gc and push may take as removed.
            if os.path.islink(self._path(key)):
                return ObjectInvalid(self.url, key, "it is a symbolic link to a missing file")
            return ObjectNotFound(key)
        if exc.errno == errno.ELOOP:
            return ObjectInvalid(self.url, key, "it is a symbolic link loop")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return StoreAccessDenied(self.url, f"{key}: {exc.strerror}")
        return StoreError(f"store {self.url}: {key}: {exc.strerror}")


# The file names of manifests: current ones, and retired copies
# (`shardfs.publish.retire`).
_MANIFEST_NAME_RE = re.compile(r"manifest\.json|\d+-[0-9a-f]{8}\.json")


def _create_temp_file(directory: str) -> tuple[int, str]:
    """Create *directory* if needed and a temporary file in it; return the
    file's descriptor and path.

    A delete that empties the directory removes it, and can do so between
    the two steps, so they are tried once more when the directory is gone.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        return tempfile.mkstemp(dir=directory, prefix=".tmp-")
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        return tempfile.mkstemp(dir=directory, prefix=".tmp-")


def _file_type(mode: int) -> str:
    """Return the file type of *mode* in words, such as "a FIFO"."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return f"a file of type {stat.S_IFMT(mode):#o}"

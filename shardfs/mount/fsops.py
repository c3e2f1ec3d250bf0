"""The pyfuse3 adapter: kernel requests in, plain calls on the tree and the
chunk source, attributes and errno values out.

Every handler runs behind `_fuse_errors`, the one place where exceptions
become errno replies: pyfuse3 passes only `FUSEError` to the kernel and any
other exception would end its request loop.
"""

import errno
import functools
import itertools
import logging
import os
import time

import pyfuse3
import trio

from shardfs.config import MountConfig
from shardfs.errors import ReadFailed, ShardfsError, errno_for
from shardfs.layout import slices_for_range
from shardfs.mount.chunk_source import ChunkSource
from shardfs.mount.metrics import Histogram
from shardfs.mount.prefetch import Prefetcher
from shardfs.mount.tree import Node, Tree

log = logging.getLogger(__name__)

# The block size reported by stat and statfs. Reads are served in chunk
# units, but tools size their buffers by st_blksize, and 128 KiB is the
# kernel's default FUSE read size.
BLOCK_SIZE = 128 * 1024


class _ErrorLog:
    """Rate limit for error lines: one per failing chunk (or cause) a minute.

    The kernel retries a failed read page by page, and a reader may retry in
    a loop, so one broken chunk would otherwise write a line per request.
    """

    INTERVAL_S = 60.0

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def should_log(self, exc: Exception) -> bool:
        cause = getattr(exc, "cause", None) or exc
        key = getattr(cause, "key", None) or str(cause)
        now = time.monotonic()
        if now - self._last.get(key, -self.INTERVAL_S) < self.INTERVAL_S:
            self.suppressed += 1
            return False
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = now
        return True


_error_log = _ErrorLog()


def _fuse_errors(handler):
    """Turn exceptions of *handler* into `FUSEError` replies, logging failures."""

    @functools.wraps(handler)
    async def wrapper(self, *args):
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except ShardfsError as exc:
            code = errno_for(exc)
            if _error_log.should_log(exc):
                log.error(
                    "%s failed with %s in %s: %s",
                    handler.__name__,
                    errno.errorcode[code],
                    self._config.mountpoint,
                    exc,
                )
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("%s failed with an unexpected error", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _read_only(name: str):
    async def handler(self, *args):
        log.debug("%s rejected: the filesystem is read-only", name)
        raise pyfuse3.FUSEError(errno.EROFS)

    handler.__name__ = name
    return handler


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(
        self,
        tree: Tree,
        chunks: ChunkSource,
        config: MountConfig,
        prefetcher: Prefetcher | None = None,
    ):
        super().__init__()
        self._tree = tree
        self._chunks = chunks
        self._prefetcher = prefetcher
        self.reads = 0
        self.bytes_read = 0
        self.read_errors = 0
        self.read_latency = Histogram()
        self._config = config
        self._handles: dict[int, Node] = {}
        self._handle_ids = itertools.count(1)
        self._uid = os.getuid()
        self._gid = os.getgid()

    def _node(self, inode: int) -> Node:
        node = self._tree.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.st_mode = node.mode
        attrs.st_nlink = 2 if node.is_dir else 1
        attrs.st_uid = self._uid
        attrs.st_gid = self._gid
        attrs.st_size = node.size
        # Tools treat st_blocks == 0 as a file of holes, so count the bytes.
        attrs.st_blocks = (node.size + 511) // 512
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_atime_ns = node.mtime_ns
        attrs.st_mtime_ns = node.mtime_ns
        attrs.st_ctime_ns = node.mtime_ns
        attrs.entry_timeout = self._config.attr_timeout_s
        attrs.attr_timeout = self._config.attr_timeout_s
        return attrs

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        node = self._tree.lookup(parent_inode, os.fsdecode(name))
        if node is None:
            if self._tree.is_unavailable(parent_inode, os.fsdecode(name)):
                # The store lists the model but its manifest cannot be read
                # now: an error to retry, not a missing name.
                raise pyfuse3.FUSEError(errno.EIO)
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(node)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._attributes(self._node(inode))

    @_fuse_errors
    async def opendir(self, inode, ctx):
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        directory = self._node(fh)
        names = sorted(directory.children)
        # start_id is the index of the next entry to send, so a reply that
        # filled the kernel's buffer resumes exactly where it stopped.
        for index in range(start_id, len(names)):
            child = self._tree.node(directory.children[names[index]])
            if not pyfuse3.readdir_reply(
                token, os.fsencode(names[index]), self._attributes(child), index + 1
            ):
                break

    @_fuse_errors
    async def releasedir(self, fh):
        pass

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        handle = next(self._handle_ids)
        self._handles[handle] = node
        # The files never change while mounted, so the page cache stays
        # valid from one open to the next.
        return pyfuse3.FileInfo(fh=handle, keep_cache=True, direct_io=False)

    @_fuse_errors
    async def read(self, fh, off, size):
        node = self._handles.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        self.reads += 1
        started = trio.current_time()
        if self._prefetcher is not None:
            self._prefetcher.on_read(node.inode, node.entry, node.offsets, off, off + size)
        try:
            data = await self._read_range(node, off, off + size)
        except ShardfsError as exc:
            self.read_errors += 1
            raise ReadFailed(node.model, node.entry.path, off, off + size, exc) from exc
        finally:
            self.read_latency.observe(trio.current_time() - started)
        self.bytes_read += len(data)
        return data

    async def _read_range(self, node: Node, start: int, end: int) -> bytes | memoryview:
        slices = slices_for_range(node.entry.chunks, node.offsets, start, end)
        if len(slices) == 1:
            piece = slices[0]
            return await self._chunks.read(piece.chunk, piece.start, piece.end)

        parts: list[bytes | memoryview] = [b""] * len(slices)
        errors: list[ShardfsError] = []

        async def fetch(index: int) -> None:
            piece = slices[index]
            try:
                parts[index] = await self._chunks.read(piece.chunk, piece.start, piece.end)
            except ShardfsError as exc:
                # Kept apart so the reader's error is the chunk's own, not
                # an exception group of the nursery.
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for index in range(len(slices)):
                nursery.start_soon(fetch, index)
        if errors:
            raise errors[0]
        return b"".join(parts)

    @_fuse_errors
    async def release(self, fh):
        self._handles.pop(fh, None)

    @_fuse_errors
    async def flush(self, fh):
        pass

    @_fuse_errors
    async def statfs(self, ctx):
        result = pyfuse3.StatvfsData()
        result.f_bsize = BLOCK_SIZE
        result.f_frsize = BLOCK_SIZE
        result.f_blocks = max(1, -(-self._tree.total_size() // BLOCK_SIZE))
        result.f_bfree = 0
        result.f_bavail = 0
        result.f_files = self._tree.count_nodes()
        result.f_ffree = 0
        result.f_favail = 0
        result.f_namemax = 255
        return result

    @_fuse_errors
    async def access(self, inode, mode, ctx):
        self._node(inode)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)

    @_fuse_errors
    async def getxattr(self, inode, name, ctx):
        # ENOSYS makes the kernel stop sending getxattr for this mount, so a
        # scan of many files reaches the daemon once, not once per file.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_fuse_errors
    async def listxattr(self, inode, ctx):
        self._node(inode)
        return []

    setattr = _read_only("setattr")
    mknod = _read_only("mknod")
    mkdir = _read_only("mkdir")
    unlink = _read_only("unlink")
    rmdir = _read_only("rmdir")
    symlink = _read_only("symlink")
    rename = _read_only("rename")
    link = _read_only("link")
    create = _read_only("create")
    write = _read_only("write")
    setxattr = _read_only("setxattr")
    removexattr = _read_only("removexattr")

    @_fuse_errors
    async def readlink(self, inode, ctx):
        raise pyfuse3.FUSEError(errno.EINVAL)

"""The mount's lifecycle: checks, tree building, the FUSE session, shutdown.

`serve` runs in the foreground until the filesystem is unmounted (by
`fusermount3 -u`, `shardfs unmount`, SIGINT or SIGTERM). Once the mount
responds to a stat, it reports readiness through the optional *on_ready*
call and, under systemd, with ``READY=1``. It sends ``STOPPING=1`` to
systemd when it starts to unmount.

SIGINT and SIGTERM unmount even while files are open or mapped: as root,
libfuse's unmount is a lazy ``umount2(MNT_DETACH)``, and otherwise it runs
``fusermount3 -u -z``. Processes that still hold a file then get ENOTCONN,
or SIGBUS for a mapped page that was never read.
"""

import errno
import faulthandler
import json
import logging
import os
import shutil
import signal
import subprocess

import pyfuse3
import trio

from shardfs.config import MountConfig, StoreConfig, format_count
from shardfs.errors import StoreError, StoreUnavailable, UsageError
from shardfs.mount.chunk_source import ChunkSource
from shardfs.mount.control import ControlServer
from shardfs.mount.disk_cache import DiskCache
from shardfs.mount.fsops import Operations
from shardfs.mount.kernel import tune_mount
from shardfs.mount.listing import ListingState, ManifestCopy, apply_listing, fetch_manifests
from shardfs.mount.malloc import fix_mmap_threshold
from shardfs.mount.memory_cache import MemoryCache
from shardfs.mount.mount_table import (
    SHARDFS_TYPE,
    enclosing_shardfs_mount,
    mount_at,
    mount_source,
)
from shardfs.mount.notify import Notifier
from shardfs.mount.prefetch import Prefetcher
from shardfs.mount.tree import Tree
from shardfs.stores import Store, open_store

log = logging.getLogger(__name__)


def check_mountpoint(path: str) -> None:
    """Raise `UsageError` unless *path* is a directory with nothing mounted on it.

    A shardfs mount left behind by a daemon that was killed is unmounted
    first; any other mount on *path* is an error.
    """
    if _is_stale_shardfs_mount(path):
        _clear_stale_mount(path)
    try:
        os.stat(path)
    except OSError as exc:
        raise UsageError(f"mountpoint {path!r} is not usable: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path!r} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"mountpoint {path!r} is already a mount point")
    inside = enclosing_shardfs_mount(path)
    if inside is not None:
        raise UsageError(f"mountpoint {path!r} is inside the shardfs mount {inside!r}")
    if os.listdir(path):
        raise UsageError(
            f"mountpoint {path!r} is not empty; its files would be hidden while mounted"
        )


def _is_stale_shardfs_mount(path: str) -> bool:
    entry = mount_at(path)
    if entry is None or entry.fstype != SHARDFS_TYPE:
        return False
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _clear_stale_mount(path: str) -> None:
    log.warning("clearing the stale mount at %s left by a daemon that exited", path)
    fusermount = shutil.which("fusermount3") or "fusermount3"
    result = subprocess.run([fusermount, "-u", "-z", path], capture_output=True, text=True)
    if result.returncode != 0:
        raise UsageError(
            f"mountpoint {path!r} has a stale mount that could not be cleared: "
            f"{result.stderr.strip()}; clear it with 'fusermount3 -u -z {path}'"
        )


def load_listing(store: Store, copy: ManifestCopy) -> tuple[dict[str, bytes], set[str]]:
    """Return the raw manifests of the store, or the last good copy if it is down.

    With no copy (a mount that never reached the store), an unreachable
    store is an error: there is nothing to serve, and under systemd the
    unit's restart tries again.
    """
    try:
        store.check()
        manifests, unavailable = fetch_manifests(store, copy.load() if copy.exists() else None)
    except StoreUnavailable as exc:
        if not copy.exists():
            raise
        manifests = copy.load()
        log.warning(
            "store is unreachable, serving %s from the last listing: %s",
            format_count(len(manifests), "model"),
            exc,
        )
        return manifests, set()
    copy.save(manifests)
    return manifests, unavailable


def escape_fuse_option(value: str) -> str:
    """Escape *value* for a libfuse ``-o`` option string.

    libfuse splits options at commas and reads a backslash followed by a
    character as that character, or by three octal digits as that byte.
    pyfuse3 passes options as ASCII, so every byte outside printable ASCII
    is written in octal.
    """
    escaped = []
    for byte in os.fsencode(value):
        character = chr(byte)
        if character in ",\\":
            escaped.append("\\" + character)
        elif 0x20 <= byte < 0x7F:
            escaped.append(character)
        else:
            escaped.append(f"\\{byte:03o}")
    return "".join(escaped)


def mount_options(config: MountConfig, source: str) -> set[str]:
    """Return the FUSE mount options. *source* is what /proc/mounts shows as the mount's source."""
    options = set(pyfuse3.default_options)
    options |= {"ro", "nosuid", "nodev", "subtype=shardfs"}
    # The type stays fuse.shardfs through subtype; fsname sets the source.
    options.add(f"fsname={escape_fuse_option(source)}")
    if config.allow_other:
        options.add("allow_other")
    return options


def open_disk_cache(config: MountConfig) -> DiskCache | None:
    """Open the SSD cache, or return None (serving from memory) if it cannot be used."""
    directory = config.cache_dir
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        limit = config.cache_bytes
        if limit is None:
            info = os.statvfs(directory)
            limit = int(info.f_blocks * info.f_frsize * config.cache_share)
        cache = DiskCache(directory, limit)
        cache.open()
    except OSError as exc:
        log.warning("disk cache %s is unusable, serving from memory: %s", directory, exc)
        return None
    return cache


class _InterruptedReplyFilter(logging.Filter):
    """Demote pyfuse3's error for a reply to a request the kernel dropped.

    When a reader is interrupted or exits while its read is in flight, the
    kernel forgets the request and the reply fails with ENOENT. That is an
    expected outcome, not a failure of the mount.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "fuse_reply_" in message and "No such file or directory" in message:
            record.levelno = logging.DEBUG
            record.levelname = "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def serve(store_config: StoreConfig, config: MountConfig, on_ready=None) -> None:
    """Mount the store and serve it until unmounted."""
    faulthandler.enable()
    fix_mmap_threshold()
    logging.getLogger("pyfuse3").addFilter(_InterruptedReplyFilter())
    notifier = Notifier.from_environment()
    check_mountpoint(config.mountpoint)
    store = open_store(store_config)
    copy = ManifestCopy(os.path.join(config.cache_dir, "manifests"), store.url)
    os.makedirs(config.cache_dir, mode=0o700, exist_ok=True)
    tree = Tree()
    listing = ListingState()
    manifests, unavailable = load_listing(store, copy)
    apply_listing(tree, listing, manifests)
    tree.unavailable = unavailable
    log.info(
        "store %s: %s, %s, %d bytes",
        store.url,
        format_count(len(listing.digests), "model"),
        format_count(tree.count_files(), "file"),
        tree.total_size(),
    )
    chunks = ChunkSource(
        store,
        MemoryCache(config.memory_limit),
        open_disk_cache(config),
        connections=store_config.max_connections,
        decoders=config.decode_workers,
        retry=config.retry,
    )
    prefetcher = None
    if config.prefetch.enabled:
        # Leave a quarter of the connections free for demand reads, which
        # still go first in the queue for the rest.
        outstanding = max(1, store_config.max_connections * 3 // 4)
        prefetcher = Prefetcher(chunks, config.prefetch, outstanding)
    operations = Operations(tree, chunks, config, prefetcher)
    control = ControlServer(
        config.mountpoint, operations, chunks, tree, store_config.max_connections
    )
    # Bound before mounting, so an unusable address fails the mount at once.
    control.bind_metrics(config.metrics_address)
    try:
        options = mount_options(config, mount_source(store_config))
        pyfuse3.init(operations, config.mountpoint, options)
    except RuntimeError as exc:
        raise UsageError(f"mounting {config.mountpoint!r} failed: {exc}") from None

    log.info("mounted %s at %s", store.url, config.mountpoint)
    stats_path = os.path.join(config.cache_dir, "stats.json")
    models = format_count(len(listing.digests), "model")
    status = f"serving {models} of {store.url} at {config.mountpoint}"
    readiness = Readiness(on_ready, notifier, status)
    try:
        refresher = Refresher(store, copy, tree, listing, config.refresh_interval_s)
        trio.run(_run_session, config, chunks, refresher, control, stats_path, readiness)
    finally:
        notifier.stopping()
        pyfuse3.close(unmount=True)
        write_stats(stats_path, control)
        _unlink_quietly(control.path)
    log.info("unmounted %s", config.mountpoint)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_stats(path: str, control: ControlServer) -> None:
    """Write the daemon's counters to *path* as JSON, replacing it atomically."""
    temp_path = f"{path}.tmp"
    try:
        with open(temp_path, "w") as file:
            json.dump(control.figures(), file, indent=1, sort_keys=True)
        os.replace(temp_path, path)
    except OSError as exc:
        log.warning("cannot write statistics to %s: %s", path, exc)


async def _run_session(config, chunks, refresher, control, stats_path, readiness) -> None:
    async with trio.open_nursery() as nursery:
        chunks.start(nursery)
        nursery.start_soon(_guarded, "listing refresh", refresher.run)
        nursery.start_soon(_guarded, "control channel", control.serve)
        nursery.start_soon(_guarded, "activity summary", _log_activity, control)
        nursery.start_soon(_handle_signals, control, stats_path, readiness.notifier)
        nursery.start_soon(_report_ready, config, readiness)
        await pyfuse3.main()
        # Threads still fetching may delay the exit, so systemd hears first.
        readiness.notifier.stopping()
        nursery.cancel_scope.cancel()


# Seconds between the summary lines logged while readers are active.
SUMMARY_INTERVAL_S = 60.0


async def _log_activity(control: ControlServer) -> None:
    """Log one INFO line per interval in which readers were served, not one per read."""
    last_reads = 0
    while True:
        await trio.sleep(SUMMARY_INTERVAL_S)
        figures = control.figures()
        if figures["reads"] == last_reads:
            continue
        last_reads = figures["reads"]
        log.info(
            "served %d bytes in %d reads; fetched %d bytes in %d requests, %d retries, "
            "%d failed reads; cache hit ratio %.2f",
            figures["bytes_read"],
            figures["reads"],
            figures["bytes_fetched"],
            figures["chunks_fetched"],
            figures["retries"],
            figures["read_errors"],
            figures["cache_hit_ratio"],
        )


async def _guarded(name: str, function, *args) -> None:
    """Run a background service of the mount; its failure must not end the mount."""
    try:
        await function(*args)
    except Exception:
        log.exception("%s failed and is stopped; the mount keeps serving reads", name)


async def _handle_signals(control, stats_path, notifier: Notifier) -> None:
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    with trio.open_signal_receiver(*signals) as received:
        async for signum in received:
            if signum == signal.SIGUSR1:
                await trio.to_thread.run_sync(write_stats, stats_path, control)
                continue
            log.info("received %s, unmounting", signal.Signals(signum).name)
            notifier.stopping()
            pyfuse3.terminate()
            return


class Readiness:
    """The two receivers of the ready report: the caller's *on_ready* and systemd."""

    def __init__(self, on_ready, notifier: Notifier, status: str):
        self.on_ready = on_ready
        self.notifier = notifier
        self.status = status


async def _report_ready(config: MountConfig, readiness: Readiness) -> None:
    # The stat goes through the kernel to this daemon's own request loop, so
    # it runs in a thread while the loop serves it.
    await trio.to_thread.run_sync(os.stat, config.mountpoint)
    applied = await trio.to_thread.run_sync(
        tune_mount, config.mountpoint, config.read_ahead_kb, config.max_background
    )
    log.info("mount at %s is ready, kernel settings %s", config.mountpoint, applied)
    if readiness.on_ready is not None:
        readiness.on_ready()
    readiness.notifier.ready(readiness.status)


class Refresher:
    """Re-reads the model listing every *interval_s* seconds and applies it."""

    def __init__(self, store, copy, tree, listing, interval_s: float):
        self._store = store
        self._copy = copy
        self._tree = tree
        self._listing = listing
        self._interval_s = interval_s
        self._failures = 0

    async def run(self) -> None:
        if self._interval_s <= 0:
            return
        while True:
            await trio.sleep(self._interval_s)
            await self.refresh()

    async def refresh(self) -> None:
        try:
            raw, unavailable = await trio.to_thread.run_sync(
                fetch_manifests, self._store, self._listing.raw
            )
        except StoreError as exc:
            self._failures += 1
            # One line when the store goes away, then one per hundred tries.
            if self._failures % 100 == 1:
                log.warning("listing the store failed, keeping the last listing: %s", exc)
            return
        if self._failures:
            log.info("listing the store works again after %d failures", self._failures)
            self._failures = 0
        stale = apply_listing(self._tree, self._listing, raw)
        self._tree.unavailable = unavailable
        for parent_inode, name in stale:
            pyfuse3.invalidate_entry_async(parent_inode, os.fsencode(name), ignore_enoent=True)
        if stale or len(raw) != len(self._listing.digests):
            await trio.to_thread.run_sync(self._copy.save, raw)

"""The mount's lifecycle: checks, tree building, the FUSE session, shutdown.

`serve` runs in the foreground until the filesystem is unmounted (by
`fusermount3 -u`, `shardfs unmount`, SIGINT or SIGTERM). Once the mount
answers a stat, it reports readiness through the optional *on_ready* call.
"""

import errno
import faulthandler
import logging
import os
import signal

import pyfuse3
import trio

from shardfs.config import MountConfig, StoreConfig
from shardfs.errors import ManifestInvalid, ObjectNotFound, UsageError
from shardfs.manifest import parse_manifest
from shardfs.mount.chunk_source import ChunkSource
from shardfs.mount.fsops import Operations
from shardfs.mount.tree import Tree
from shardfs.stores import Store, list_models, open_store
from shardfs.stores.base import manifest_object_key

log = logging.getLogger(__name__)


def check_mountpoint(path: str) -> None:
    """Raise `UsageError` unless *path* is a directory with nothing mounted on it."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UsageError(
                f"mountpoint {path!r} holds a stale mount of a daemon that exited; "
                f"clear it with 'fusermount3 -u {path}'"
            ) from None
        raise UsageError(f"mountpoint {path!r} is not usable: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path!r} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"mountpoint {path!r} is already a mount point")


def build_tree(store: Store) -> Tree:
    """Read every manifest in *store* into a tree, skipping invalid ones."""
    tree = Tree()
    names = list_models(store)
    for name in names:
        try:
            manifest = parse_manifest(name, store.get(manifest_object_key(name)))
            tree.add_model(manifest)
        except ObjectNotFound:
            log.info("model %r was removed while the store was read", name)
        except ManifestInvalid as exc:
            log.warning("model refused: %s", exc)
        except ValueError as exc:
            log.warning("model %r refused: %s", name, exc)
    log.info(
        "store %s: %d models, %d files, %d bytes",
        store.url,
        len(names),
        tree.count_files(),
        tree.total_size(),
    )
    return tree


def mount_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"ro", "nosuid", "nodev", "fsname=shardfs", "subtype=shardfs"}
    if config.allow_other:
        options.add("allow_other")
    return options


def serve(store_config: StoreConfig, config: MountConfig, on_ready=None) -> None:
    """Mount the store and serve it until unmounted."""
    faulthandler.enable()
    check_mountpoint(config.mountpoint)
    store = open_store(store_config)
    store.check()
    tree = build_tree(store)
    chunks = ChunkSource(
        store,
        memory_limit=config.memory_limit,
        connections=store_config.max_connections,
        decoders=config.decode_workers,
    )
    operations = Operations(tree, chunks, config)
    try:
        pyfuse3.init(operations, config.mountpoint, mount_options(config))
    except RuntimeError as exc:
        raise UsageError(f"mounting {config.mountpoint!r} failed: {exc}") from None

    log.info("mounted %s at %s", store.url, config.mountpoint)
    try:
        trio.run(_run_session, config.mountpoint, on_ready)
    finally:
        pyfuse3.close(unmount=True)
    log.info("unmounted %s", config.mountpoint)


async def _run_session(mountpoint: str, on_ready) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        nursery.start_soon(_report_ready, mountpoint, on_ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _report_ready(mountpoint: str, on_ready) -> None:
    # The stat goes through the kernel to this daemon's own request loop, so
    # it runs in a thread while the loop serves it.
    await trio.to_thread.run_sync(os.stat, mountpoint)
    log.info("mount at %s is ready", mountpoint)
    if on_ready is not None:
        on_ready()

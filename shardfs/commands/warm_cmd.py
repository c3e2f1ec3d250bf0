"""``shardfs warm``: pull models into a mount's disk cache before a job starts."""

import os
import sys

from shardfs import control_protocol
from shardfs.config import format_size
from shardfs.errors import ShardfsError, UsageError

# Failure messages printed; the count covers the rest.
MAX_PRINTED_FAILURES = 10


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "warm", help="fetch models or files into the disk cache of a running mount"
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument(
        "paths",
        metavar="NAME",
        nargs="+",
        help="a model name such as org/model, or a path under the mount",
    )
    parser.set_defaults(run=run)


def _relative(mountpoint: str, path: str) -> str:
    """Return *path* relative to the mount when it is a path under it."""
    absolute = os.path.abspath(path)
    root = os.path.abspath(mountpoint)
    if absolute.startswith(root + os.sep):
        return os.path.relpath(absolute, root)
    if os.path.isabs(path):
        raise UsageError(f"path {path!r} is not under the mount {mountpoint!r}")
    return path


def run(args) -> int:
    paths = [_relative(args.mountpoint, path) for path in args.paths]
    interactive = sys.stderr.isatty()
    final = None
    for reply in control_protocol.request(
        args.mountpoint, {"op": "warm", "paths": paths}, timeout_s=None
    ):
        final = reply
        if interactive:
            share = reply["done_bytes"] / reply["total"] if reply["total"] else 1.0
            sys.stderr.write(
                f"\rwarming: {format_size(reply['done_bytes'])} / "
                f"{format_size(reply['total'])} ({share:.0%}) "
            )
    if interactive:
        sys.stderr.write("\n")
    return _report(args.mountpoint, final)


def _report(mountpoint: str, final: dict) -> int:
    """Print the outcome of a warm-up from the daemon's last reply; raise if it is incomplete."""
    total = final["total"]
    failures = final["failed"]
    resident = final.get("resident_bytes")
    if resident is None:
        # A daemon of an older shardfs reports only whether every chunk is cached.
        if not final.get("resident"):
            raise ShardfsError(
                f"not every chunk is in the disk cache of {mountpoint!r}, and its daemon "
                "runs an older shardfs, which reports no more; remount it and warm again"
            )
        resident = total
    print(
        f"warmed {format_size(resident)} of {format_size(total)}: "
        f"{format_size(final['cached_before'])} was already cached"
    )
    count = final.get("failed_chunks", len(failures))
    for failure in failures[:MAX_PRINTED_FAILURES]:
        print(f"failed: {failure}", file=sys.stderr)
    if count > MAX_PRINTED_FAILURES:
        print(f"failed: {count - MAX_PRINTED_FAILURES} more chunks", file=sys.stderr)
    not_cached = format_size(total - resident)
    if count:
        raise ShardfsError(
            f"{count} chunk{'s' if count != 1 else ''} could not be fetched; "
            f"{not_cached} is not cached"
        )
    if resident < total:
        raise ShardfsError(
            f"{not_cached} was fetched but evicted from the disk cache again, most likely "
            "because the cache is smaller than what was warmed; raise --cache-size or "
            "warm less"
        )
    return 0

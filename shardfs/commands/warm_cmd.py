"""``shardfs warm``: pull models into a mount's disk cache before a job starts."""

import os
import sys

from shardfs import control_protocol
from shardfs.config import format_size
from shardfs.errors import ShardfsError, UsageError


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
    resident = final["total"] - final["failed_bytes"]
    print(
        f"warmed {format_size(resident)} of {format_size(final['total'])}: "
        f"{format_size(final['cached_before'])} was already cached"
    )
    if final["failed"] or not final.get("resident"):
        for failure in final["failed"][:10]:
            print(f"failed: {failure}", file=sys.stderr)
        count = len(final["failed"])
        raise ShardfsError(
            f"{count} chunk{'s' if count != 1 else ''} could not be fetched; "
            f"{format_size(final['failed_bytes'])} is not cached"
        )
    return 0

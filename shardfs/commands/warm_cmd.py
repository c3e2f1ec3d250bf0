"""``shardfs warm``: pull models into a mount's disk cache before a job starts."""

import os
import sys

from shardfs import control_protocol
from shardfs.config import format_count, format_size
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
    # A daemon of an older shardfs sends no not_kept_chunks and counts those
    # chunks among the failed ones.
    if count or final.get("not_kept_chunks", 0):
        raise ShardfsError(_describe_missed_chunks(final, count, not_cached))
    if resident < total:
        raise ShardfsError(
            f"{not_cached} was fetched but evicted from the disk cache again, most likely "
            "because the cache is smaller than what was warmed; raise --cache-size or "
            "warm less"
        )
    return 0


def _describe_missed_chunks(final: dict, failed: int, not_cached: str) -> str:
    """Return one line on the chunks that failed to fetch and those fetched but not kept."""
    not_kept = final.get("not_kept_chunks", 0)
    problems = []
    if failed:
        problems.append(f"{format_count(failed, 'chunk')} could not be fetched")
    if not_kept:
        reason, fix = _not_kept_reason(final)
        problems.append(
            f"{format_count(not_kept, 'chunk')} ({format_size(final['not_kept_bytes'])}) "
            f"{'was' if not_kept == 1 else 'were'} fetched but not kept, because {reason}"
        )
    message = f"{' and '.join(problems)}; {not_cached} is not cached"
    if not_kept:
        message += f"; {fix}"
    return message


def _not_kept_reason(final: dict) -> tuple[str, str]:
    """Return why the disk cache wrote no fetched chunks, and how to fix it."""
    limit = final["disk_cache_limit_bytes"]
    if limit == 0:
        return (
            "the disk cache is off (--cache-size 0)",
            "mount again with a --cache-size that can hold what you warm",
        )
    if final["disk_write_failed"]:
        return (
            "a write to the disk cache failed, and the daemon writes no more to it "
            "until it is mounted again",
            "see the daemon log for the error",
        )
    return (
        f"each is larger than the disk cache cap of {format_size(limit)}",
        "mount again with a larger --cache-size",
    )

"""``shardfs mount`` and ``shardfs unmount``.

Without ``--foreground``, mount starts the daemon as a new session and waits
on a pipe: the daemon writes ``ready`` once the mount answers a stat, or one
line with the reason it failed. So the command's exit status means mounted.
"""

import argparse
import logging
import os
import select
import shutil
import subprocess
import sys

from shardfs.commands import add_store_options, store_config
from shardfs.config import (
    MountConfig,
    PrefetchConfig,
    RetryConfig,
    default_cache_dir,
    parse_cache_size,
    parse_size,
)
from shardfs.errors import ShardfsError, UsageError

log = logging.getLogger(__name__)

# Time for the daemon to read every manifest and answer the first stat.
READY_TIMEOUT_S = 120.0
READY = b"ready\n"
MIN_MEMORY_LIMIT = 16 * 1024 * 1024


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("mount", help="mount a store as a read-only filesystem")
    add_store_options(parser, positional=True)
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    parser.add_argument(
        "--foreground", action="store_true", help="serve in this process until unmounted"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help=f"local cache and daemon log (default: {default_cache_dir()})",
    )
    parser.add_argument(
        "--cache-size",
        default="20%",
        metavar="SIZE",
        help="SSD cache cap: bytes such as 50G, or a share of the cache "
        "directory's disk such as 20%% (default: 20%%)",
    )
    parser.add_argument(
        "--memory-limit",
        default="256MiB",
        metavar="SIZE",
        help="decoded chunks kept in memory, such as 512M (default: 256MiB)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=16,
        metavar="N",
        help="concurrent store requests of the whole mount (default: 16)",
    )
    parser.add_argument(
        "--refresh-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often to re-read the model listing; 0 reads it only at "
        "start (default: 60)",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a read fails with EIO once its data has not arrived for this "
        "long, retries included (default: 30)",
    )
    parser.add_argument(
        "--metrics-address",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, such as "
        "127.0.0.1:9464 (default: off)",
    )
    tuning = parser.add_argument_group("tuning")
    tuning.add_argument(
        "--no-prefetch",
        action="store_true",
        help="fetch only the chunks readers ask for",
    )
    tuning.add_argument(
        "--read-ahead-kb",
        type=int,
        default=1024,
        metavar="KB",
        help="kernel read-ahead of the mount in KiB; 0 keeps the kernel "
        "default (default: 1024)",
    )
    tuning.add_argument(
        "--max-background",
        type=int,
        default=64,
        metavar="N",
        help="background requests the kernel queues to the mount; 0 keeps "
        "the kernel default of 12 (default: 64)",
    )
    parser.add_argument(
        "--allow-other",
        action="store_true",
        help="let users other than the one mounting read the files (needs "
        "user_allow_other in /etc/fuse.conf unless run as root; off by default)",
    )
    # The write end of the readiness pipe, set only by a parent mount command.
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(run=run_mount)

    unmount = subparsers.add_parser("unmount", help="unmount a shardfs mount")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    unmount.set_defaults(run=run_unmount)


def _mount_config(args) -> MountConfig:
    cache_bytes, cache_share = parse_cache_size(args.cache_size)
    for option, value in (
        ("--max-connections", args.max_connections),
        ("--read-ahead-kb", args.read_ahead_kb),
        ("--max-background", args.max_background),
    ):
        if value < 0 or (option == "--max-connections" and value < 1):
            raise UsageError(f"invalid {option} {value}: expected a positive number")
    for option, seconds in (
        ("--refresh-interval", args.refresh_interval),
        ("--read-timeout", args.read_timeout),
    ):
        if not 0 <= seconds < 1e6 or (option == "--read-timeout" and seconds == 0):
            raise UsageError(f"invalid {option} {seconds}: expected seconds above 0")
    memory_limit = parse_size(args.memory_limit)
    if memory_limit < MIN_MEMORY_LIMIT:
        raise UsageError(
            f"invalid memory limit {args.memory_limit!r}: expected at least 16MiB"
        )
    return MountConfig(
        mountpoint=os.path.abspath(args.mountpoint),
        cache_dir=os.path.abspath(args.cache_dir or default_cache_dir()),
        allow_other=args.allow_other,
        memory_limit=memory_limit,
        cache_bytes=cache_bytes,
        cache_share=cache_share,
        read_ahead_kb=args.read_ahead_kb,
        max_background=args.max_background,
        refresh_interval_s=args.refresh_interval,
        metrics_address=parse_address(args.metrics_address),
        prefetch=PrefetchConfig(enabled=not args.no_prefetch),
        retry=RetryConfig(deadline_s=args.read_timeout),
    )


def parse_address(text: str | None) -> tuple[str, int] | None:
    """Parse ``HOST:PORT``; None stays None."""
    if text is None:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"invalid metrics address {text!r}: expected HOST:PORT, such as 127.0.0.1:9464")
    return host.strip("[]"), int(port)


def run_mount(args) -> int:
    config = _mount_config(args)
    if args.foreground:
        return _serve_foreground(args, config)
    return _start_daemon(args, config)


def _serve_foreground(args, config: MountConfig) -> int:
    from shardfs.mount.daemon import serve

    ready_pipe = os.fdopen(args.ready_fd, "wb", buffering=0) if args.ready_fd else None

    def on_ready() -> None:
        if ready_pipe is not None:
            ready_pipe.write(READY)
            ready_pipe.close()

    try:
        serve(store_config(args), config, on_ready)
    except ShardfsError as exc:
        if ready_pipe is not None and not ready_pipe.closed:
            kind = "usage" if isinstance(exc, UsageError) else "failed"
            ready_pipe.write(f"{kind} {exc}\n".encode())
        raise
    return 0


def _start_daemon(args, config: MountConfig) -> int:
    from shardfs.mount.daemon import check_mountpoint

    # Cheap checks first, so the common mistakes fail here and not in the log.
    check_mountpoint(config.mountpoint)
    log_path = _open_log_dir(config.cache_dir)

    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "shardfs", "--log-level", "INFO", "mount"]
    command += _forwarded_options(args, config)
    command += ["--foreground", "--ready-fd", str(write_fd)]
    with open(log_path, "ab") as log_file:
        subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb", buffering=0) as ready_pipe:
        message = _read_until_closed(ready_pipe, READY_TIMEOUT_S)
    if message is None:
        raise UsageError(
            f"the daemon did not report the mount ready within {READY_TIMEOUT_S:.0f} s; "
            f"see {log_path}"
        )
    if message == READY:
        return 0
    kind, _, reason = message.decode(errors="replace").strip().partition(" ")
    if kind == "usage":
        raise UsageError(reason)
    if kind == "failed":
        raise ShardfsError(reason)
    raise ShardfsError(f"the daemon exited before the mount was ready; see {log_path}")


def _read_until_closed(pipe, timeout_s: float) -> bytes | None:
    """Return what *pipe* delivers until its writer closes it, or None on timeout."""
    data = b""
    while True:
        readable, _, _ = select.select([pipe], [], [], timeout_s)
        if not readable:
            return None
        block = pipe.read(4096)
        if not block:
            return data
        data += block


def _forwarded_options(args, config: MountConfig) -> list[str]:
    options = [
        "--cache-dir",
        config.cache_dir,
        "--cache-size",
        args.cache_size,
        "--memory-limit",
        str(config.memory_limit),
        "--max-connections",
        str(args.max_connections),
        "--read-ahead-kb",
        str(config.read_ahead_kb),
        "--max-background",
        str(config.max_background),
        "--refresh-interval",
        str(config.refresh_interval_s),
        "--read-timeout",
        str(config.retry.deadline_s),
    ]
    if args.no_prefetch:
        options.append("--no-prefetch")
    if args.metrics_address:
        options += ["--metrics-address", args.metrics_address]
    if args.endpoint_url:
        options += ["--endpoint-url", args.endpoint_url]
    if config.allow_other:
        options.append("--allow-other")
    store = args.store
    if "://" not in store:
        store = os.path.abspath(store)
    return options + [store, config.mountpoint]


def _open_log_dir(cache_dir: str) -> str:
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create cache directory {cache_dir!r}: {exc.strerror}") from None
    return os.path.join(cache_dir, "daemon.log")


def run_unmount(args) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        raise UsageError("fusermount3 not found; install the fuse3 package")
    result = subprocess.run(
        [fusermount, "-u", mountpoint], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        raise UsageError(f"unmounting {mountpoint!r} failed: {detail}")
    return 0

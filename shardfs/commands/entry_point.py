"""Logging setup and error reporting shared by the shardfs entry points.

Both ``shardfs`` and ``mount.fuse.shardfs`` log to stderr in one format and
turn a shardfs error into a one-line message and an exit status. Each
caller passes its own exit status numbers, because a mount(8) helper
follows mount(8)'s.
"""

import logging
import os
import signal
import sys
from collections.abc import Callable

from shardfs.errors import ShardfsError, UsageError

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def configure_logging(level: int | str) -> None:
    """Send log records at *level* and above to stderr in `LOG_FORMAT`."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # The S3 client logs every request and retry at DEBUG; shardfs logs the
    # failures that matter itself.
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def raise_on_sigterm() -> None:
    """Make SIGTERM raise `Terminated`, so a command that writes to a store
    finishes the writes in progress instead of leaving partial files."""

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def ignore_sigterm() -> None:
    """Ignore SIGTERM from now on, once a command's result is being written
    and stopping could only make its exit status disagree with the store."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_with_exit_status(
    run: Callable[[], int | None], *, exit_usage: int, exit_failed: int, exit_interrupted: int
) -> int:
    """Call *run* and return its exit status, or 0 when it returns None.

    A `UsageError` returns *exit_usage*, any other `ShardfsError`
    *exit_failed*, KeyboardInterrupt *exit_interrupted* and `Terminated`
    143, and any other OSError *exit_failed*, each after a one-line message
    on stderr. A closed standard output returns 141 quietly, as SIGPIPE
    would. Other exceptions propagate.
    """
    try:
        status = run() or 0
        if sys.stdout is not None:
            sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader of the output went away, as with `shardfs ls | head -1`.
        # Later writes, and the flush at exit, go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except UsageError as exc:
        print(f"shardfs: error: {exc}", file=sys.stderr)
        return exit_usage
    except ShardfsError as exc:
        print(f"shardfs: error: {exc}", file=sys.stderr)
        return exit_failed
    except Terminated:
        print("shardfs: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("shardfs: interrupted", file=sys.stderr)
        return exit_interrupted
    except OSError as exc:
        # Commands turn the failures they expect into ShardfsError; what is
        # left is mostly writing the output (a full disk), and it gets one
        # line too. Output still buffered is dropped.
        if sys.stdout is not None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"shardfs: error: {exc.strerror or exc}", file=sys.stderr)
        return exit_failed

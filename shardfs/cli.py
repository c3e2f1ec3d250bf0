"""The ``shardfs`` command: parse arguments, dispatch, print one-line errors.

Exit status: 0 on success, 1 when a store request or a read failed, 2 for
invalid arguments or local preconditions, 130 when interrupted.
"""

import argparse
import logging
import sys

from shardfs import __version__
from shardfs.commands import (
    gc_cmd,
    ls_cmd,
    mount_cmd,
    push_cmd,
    repair_cmd,
    rm_cmd,
    status_cmd,
    verify_cmd,
    warm_cmd,
)
from shardfs.errors import ShardfsError, UsageError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

COMMANDS = (
    push_cmd,
    mount_cmd,
    ls_cmd,
    status_cmd,
    warm_cmd,
    verify_cmd,
    repair_cmd,
    gc_cmd,
    rm_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardfs",
        description="Serve model files from a chunk store as a read-only filesystem.",
    )
    parser.add_argument("--version", action="version", version=f"shardfs {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="messages to print on stderr (default: WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(levelname)s %(name)s: %(message)s"
    )
    # The S3 client logs every request and retry at DEBUG; shardfs logs the
    # failures that matter itself.
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.run(args) or 0
    except UsageError as exc:
        print(f"shardfs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ShardfsError as exc:
        print(f"shardfs: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("shardfs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

"""``shardfs repair``: restore the copies of a placed store to their placement."""

import time

from shardfs.commands import add_store_options, store_config
from shardfs.errors import UsageError
from shardfs.publish.repair import describe, repair
from shardfs.stores import PlacedStore, open_store


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "repair",
        help="copy chunks of a store of several --store members back into place "
        "and delete copies outside their placement",
        description="Write every chunk that the manifests name onto each member of "
        "its placement that lacks a good copy, from a good copy on any member, then "
        "delete its copies on members outside the placement; give every member "
        "manifests it lacks. Run it after a member lost data, or after members "
        "were added, removed or reweighted. Exit status 0 means that every chunk "
        "a manifest names now has a copy on each member of its placement, of a "
        "size that a manifest records (with --check-content: one that decodes "
        "to its key), and none outside it, and that every member has the newest "
        "copy of each manifest. With --dry-run nothing is written, and exit "
        "status 0 means only that no chunk or manifest lacks a good copy and no "
        "store request failed. Without --check-content a "
        "copy of the right size is trusted unread, so a corrupt copy of the "
        "right size can remain at exit status 0; run shardfs verify or repair "
        "--check-content to check content. Exit status 1 means that a chunk has "
        "no good copy on any member, a manifest has no valid copy, or a store "
        "request or the check of a copy failed.",
    )
    add_store_options(parser, positional=True)
    parser.add_argument(
        "--check-content",
        action="store_true",
        help="fetch and decode every copy in place, and replace the corrupt ones "
        "(default: trust a listed copy of the right size)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="report what would be copied and deleted, change nothing",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    store = open_store(store_config(args))
    if not isinstance(store, PlacedStore):
        raise UsageError(
            f"repair needs several --store values, one per member; {store.url} is a single store"
        )
    started = time.monotonic()
    report = repair(store, check_content=args.check_content, dry_run=args.dry_run)
    for chunk in report.lost:
        print(f"{chunk.model}/{chunk.path}: chunk {chunk.key} has no good copy on any member")
    for name in report.unreadable:
        print(f"manifest {name}")
    for failure in report.failures:
        print(f"repair failed: {failure}")
    print(describe(report, time.monotonic() - started))
    return 0 if report.complete else 1

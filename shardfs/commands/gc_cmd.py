"""``shardfs gc``: delete chunks that no manifest names, past a grace period."""

from shardfs.commands import add_store_options, store_config
from shardfs.config import format_count, format_size, parse_duration
from shardfs.publish.gc import collect_garbage
from shardfs.stores import open_store


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "gc", help="delete chunks that no manifest names and that are older than --grace"
    )
    add_store_options(parser, positional=True)
    parser.add_argument(
        "--grace",
        default="24h",
        metavar="DURATION",
        help="keep unnamed chunks, and replaced or removed manifests, this long, "
        "such as 30m, 24h, 7d or 0 (default: 24h); a reader that loaded a model "
        "before it was replaced keeps working this long",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="report what would be deleted, delete nothing"
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    grace_s = parse_duration(args.grace)
    store = open_store(store_config(args))
    report = collect_garbage(store, grace_s, args.dry_run)
    verb = "would delete" if report.dry_run else "deleted"
    summary = (
        f"{format_count(report.manifests, 'model')} and "
        f"{format_count(report.retired_kept, 'retired manifest')} name "
        f"{format_count(report.named_chunks, 'chunk')}; "
        f"{format_count(report.orphans, 'unnamed chunk')}: {verb} {report.deleted} "
        f"({format_size(report.deleted_bytes)})"
    )
    # With a grace period of 0 no chunk is younger than it.
    if grace_s > 0:
        summary += (
            f", kept {report.kept_young} younger than {args.grace} "
            f"({format_size(report.kept_young_bytes)})"
        )
    summary += f"; {verb} {format_count(report.retired_deleted, 'expired retired manifest')}"
    if report.partial_deleted:
        summary += (
            f" and {format_count(report.partial_deleted, 'partial write')} of interrupted "
            f"pushes ({format_size(report.partial_deleted_bytes)})"
        )
    print(summary)
    return 0

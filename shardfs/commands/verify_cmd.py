"""``shardfs verify``: fetch and check every chunk of the named models."""

from shardfs.commands import add_store_options, store_config
from shardfs.config import format_size
from shardfs.publish.verify import verify_models
from shardfs.stores import open_store


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="fetch and check every chunk of models; exit 1 if any is missing or corrupt",
    )
    add_store_options(parser, positional=True)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="models to check (default: every model)"
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    store = open_store(store_config(args))
    report = verify_models(store, args.names)
    for problem in report.problems:
        print(problem.describe())
    print(
        f"verified {plural(report.models, 'model')}, {plural(report.chunks, 'chunk')}, "
        f"{format_size(report.stored_bytes)} stored: {_summary(report)}"
    )
    return 1 if report.problems else 0


def _summary(report) -> str:
    parts = [
        f"{report.count(kind)} {kind}"
        for kind in ("missing", "corrupt", "unsupported")
        if report.count(kind)
    ]
    unreadable = report.count("manifest")
    if unreadable:
        parts.append(f"{plural(unreadable, 'model')} not found or invalid")
    return ", ".join(parts) or "all good"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"

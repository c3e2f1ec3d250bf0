"""``shardfs verify``: fetch and check every chunk of the named models."""

from shardfs.commands import add_store_options, store_config
from shardfs.config import format_size
from shardfs.errors import UsageError
from shardfs.manifest import check_model_name
from shardfs.publish.verify import verify_models
from shardfs.stores import open_store
from shardfs.stores.placed import PlacedStore


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="fetch and check every chunk of models; exit 1 if any is missing or corrupt",
    )
    add_store_options(parser, positional=True)
    parser.add_argument(
        "--check-files",
        action="store_true",
        help="also read each file in order and compare its sha256 with the manifest's; "
        "fetches a chunk again for each file that names it",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="models to check (default: every model)"
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    for name in args.names:
        try:
            check_model_name(name)
        except ValueError as exc:
            raise UsageError(f"invalid model name {name!r}: {exc}") from None
    store = open_store(store_config(args))
    report = verify_models(store, args.names, check_files=args.check_files)
    for problem in report.problems:
        print(problem.describe())
    damaged = report.chunks_with("missing") + report.chunks_with("corrupt")
    if damaged and not isinstance(store, PlacedStore):
        print(
            "to replace missing or corrupt chunks, push each model named above again "
            "from its original files with --check-existing"
        )
    if report.count("content") or report.count("mislabeled"):
        print(
            "a damaged or edited manifest names good chunks wrongly: "
            "push its model again from the original files"
        )
    files = f", {plural(report.files_checked, 'file')} read whole" if args.check_files else ""
    print(
        f"verified {plural(report.models, 'model')}, {plural(report.chunks, 'chunk')}, "
        f"{format_size(report.stored_bytes)} stored{files}: {_summary(report)}"
    )
    return 1 if report.problems else 0


def _summary(report) -> str:
    parts = [
        f"{report.chunks_with(kind)} {kind}"
        for kind in ("missing", "corrupt", "unsupported", "mislabeled")
        if report.chunks_with(kind)
    ]
    unreadable = report.count("manifest")
    if unreadable:
        parts.append(f"{plural(unreadable, 'model')} not found or invalid")
    diverged = report.count("diverged")
    if diverged:
        parts.append(f"{plural(diverged, 'model')} with different manifests on members")
    mismatched = report.count("content")
    if mismatched:
        parts.append(f"{plural(mismatched, 'file')} not matching its sha256")
    return ", ".join(parts) or "all good"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"

"""``shardfs push``: store a file or a model directory as a model."""

from shardfs.commands import add_store_options, store_config
from shardfs.commands.entry_point import ignore_sigterm
from shardfs.config import PushConfig, parse_size
from shardfs.errors import UsageError
from shardfs.manifest import MAX_CHUNK_LENGTH, check_model_name
from shardfs.publish.push import SourceFile, collect_sources, push
from shardfs.stores import LocalStore, open_store
from shardfs.stores.placed import PlacedStore

MIN_CHUNK_SIZE = 64 * 1024


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push", help="store a file or a model directory in a store"
    )
    add_store_options(parser, positional=False)
    parser.add_argument(
        "--chunk-size",
        default="8MiB",
        metavar="SIZE",
        help="bytes of file content per chunk, such as 8M, 64MiB or 1048576 "
        "(default: 8MiB)",
    )
    parser.add_argument(
        "--check-existing",
        action="store_true",
        help="download and check each chunk the store already has, and upload "
        "again those that are damaged",
    )
    parser.add_argument("source", metavar="SOURCE", help="a file or a model directory")
    parser.add_argument("name", metavar="NAME", help="model name, such as org/model")
    parser.set_defaults(run=run)


def check_push_input(source: str, name: str) -> list[SourceFile]:
    """Return the files to push, or raise `UsageError` for an invalid model
    name or an unreadable source."""
    try:
        check_model_name(name)
    except ValueError as exc:
        raise UsageError(f"invalid model name {name!r}: {exc}") from None
    return collect_sources(source)


def run(args) -> int:
    chunk_size = parse_size(args.chunk_size)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_LENGTH:
        raise UsageError(
            f"invalid chunk size {args.chunk_size!r}: expected 64KiB to 1GiB"
        )
    store = open_store(store_config(args))
    sources = None
    if isinstance(store, (LocalStore, PlacedStore)):
        # Check the input first, so a failed push leaves no new directory.
        sources = check_push_input(args.source, args.name)
        store.create()
    config = PushConfig(chunk_size=chunk_size, check_existing=args.check_existing)
    # A SIGTERM that arrives while the manifest is written would report a
    # failed push for a model that is published.
    push(store, args.source, args.name, config, sources=sources, on_commit=ignore_sigterm)
    return 0

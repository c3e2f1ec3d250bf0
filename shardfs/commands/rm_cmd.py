"""``shardfs rm``: remove a model's manifest from a store."""

from shardfs.commands import add_store_options, store_config
from shardfs.errors import UsageError
from shardfs.manifest import check_model_name
from shardfs.publish.retire import remove_model
from shardfs.stores import open_store


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "rm",
        help="remove a model; its chunks stay until `shardfs gc` deletes them",
    )
    add_store_options(parser, positional=True)
    parser.add_argument("name", metavar="NAME", help="model name, such as org/model")
    parser.set_defaults(run=run)


def run(args) -> int:
    try:
        check_model_name(args.name)
    except ValueError as exc:
        raise UsageError(f"invalid model name {args.name!r}: {exc}") from None
    store = open_store(store_config(args))
    remove_model(store, args.name)
    print(f"removed {args.name}; its chunks stay until gc deletes them")
    return 0

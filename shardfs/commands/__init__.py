"""One module per subcommand, each with `add_parser` and a run function."""

from shardfs.config import StoreConfig, default_store_url
from shardfs.errors import UsageError
from shardfs.stores.members import SINGLE_STORE_REPLICAS, store_from_values
from shardfs.stores.placed import DEFAULT_REPLICAS, MEMBER_SYNTAX

STORE_HELP = "store URL: a directory, file:///path or s3://bucket/prefix"


def add_store_options(parser, positional: bool) -> None:
    """Add the store options to *parser*: STORE or ``--store``, and ``--endpoint-url``.

    ``--store`` may be repeated for a placed store, with ``--replicas``.
    With *positional*, STORE is optional, and `store_config` requires it
    or ``--store``.
    """
    if positional:
        parser.add_argument(
            "store",
            metavar="STORE",
            nargs="?",
            help=f"{STORE_HELP}; or give --store once per member store instead",
        )
    default = "" if positional else f" (default: {default_store_url()})"
    parser.add_argument(
        "--store",
        action="append",
        dest="stores",
        default=None,
        metavar="URL",
        help=f"{STORE_HELP}; repeat it to keep chunks on several stores, each "
        f"value {MEMBER_SYNTAX}, where weight sets the member's share of "
        f"chunks (default 1){default}",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help=f"copies of each chunk when --store is repeated (default: {DEFAULT_REPLICAS})",
    )
    parser.add_argument(
        "--endpoint-url",
        default=None,
        metavar="URL",
        help="S3-compatible server to use instead of AWS (default: boto3's own, "
        "which reads AWS_ENDPOINT_URL)",
    )


def store_config(args):
    """Return the `StoreConfig`, or `PlacedStoreConfig` for several ``--store`` values.

    A single ``--store`` value is a plain store, as STORE is.
    """
    max_connections = getattr(args, "max_connections", StoreConfig.max_connections)
    positional = getattr(args, "store", None)
    values = getattr(args, "stores", None) or []
    replicas = getattr(args, "replicas", None)
    if values and positional is not None:
        if getattr(args, "names", None) is None:
            raise UsageError(
                f"store given twice, as STORE {positional!r} and as --store; give one of them"
            )
        # With --store, a positional value before the NAME values is the
        # first model name (``shardfs verify --store A --store B NAME``).
        args.names = [positional, *args.names]
        positional = args.store = None

    if values:
        return store_from_values(values, replicas, args.endpoint_url, max_connections)
    if replicas is not None and replicas != 1:
        raise UsageError(f"invalid --replicas {replicas}: {SINGLE_STORE_REPLICAS}")
    if positional is None and hasattr(args, "store"):
        raise UsageError("missing store: give STORE, or --store once per member store")
    return StoreConfig(
        url=positional or default_store_url(),
        endpoint_url=args.endpoint_url,
        max_connections=max_connections,
    )

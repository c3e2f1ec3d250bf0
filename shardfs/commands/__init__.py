"""One module per subcommand, each with `add_parser` and a run function."""

from shardfs.config import StoreConfig, default_store_url


def add_store_options(parser, positional: bool) -> None:
    """Add the store URL and ``--endpoint-url`` options to *parser*."""
    if positional:
        parser.add_argument(
            "store", metavar="STORE", help="store URL: a directory, file:///path or s3://bucket/prefix"
        )
    else:
        parser.add_argument(
            "--store",
            default=None,
            metavar="URL",
            help="store URL: a directory, file:///path or s3://bucket/prefix "
            f"(default: {default_store_url()})",
        )
    parser.add_argument(
        "--endpoint-url",
        default=None,
        metavar="URL",
        help="S3-compatible server to use instead of AWS (default: boto3's own, "
        "which reads AWS_ENDPOINT_URL)",
    )


def store_config(args) -> StoreConfig:
    return StoreConfig(
        url=args.store or default_store_url(),
        endpoint_url=args.endpoint_url,
        max_connections=getattr(args, "max_connections", StoreConfig.max_connections),
    )

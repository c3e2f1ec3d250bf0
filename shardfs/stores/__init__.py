"""Stores named by URL (a directory, ``file:///abs/path``, ``s3://``) and placed stores."""

import urllib.parse

from shardfs import paths
from shardfs.config import StoreConfig
from shardfs.errors import UsageError
from shardfs.stores.base import Store, list_models
from shardfs.stores.local import LocalStore
from shardfs.stores.placed import PlacedStore, PlacedStoreConfig

__all__ = ["Store", "LocalStore", "PlacedStore", "open_store", "list_models"]


def open_store(config: StoreConfig | PlacedStoreConfig) -> Store:
    """Return the store that *config* names; nothing is contacted yet."""
    if isinstance(config, PlacedStoreConfig):
        stores = [open_store(member.store) for member in config.members]
        _check_members_apart(stores)
        return PlacedStore(config, stores)
    url = config.url
    if url.startswith("s3://"):
        from shardfs.stores.s3 import S3Store, split_s3_url

        bucket, _ = split_s3_url(url)
        if not bucket:
            raise UsageError(f"invalid store URL {url!r}: expected s3://bucket/prefix")
        return S3Store(config)
    if url.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise UsageError(f"invalid store URL {url!r}: expected file:///abs/path")
        return LocalStore(urllib.parse.unquote(parsed.path), url)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise UsageError(
            f"invalid store URL {url!r}: scheme {scheme!r} is not supported "
            "(use a directory path, file:///abs/path or s3://bucket/prefix)"
        )
    if not url:
        raise UsageError("invalid store URL '': expected a path or URL")
    return LocalStore(url)


def _check_members_apart(stores: list[Store]) -> None:
    """Raise `UsageError` if one local member's directory is inside another's.

    gc and repair on one member would then delete the other's objects.
    """
    local = [store for store in stores if isinstance(store, LocalStore)]
    for index, first in enumerate(local):
        for second in local[index + 1 :]:
            if paths.overlap(first.root, second.root):
                raise UsageError(
                    f"store members {first.url} and {second.url} overlap; give each "
                    "member a directory of its own"
                )


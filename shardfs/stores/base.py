"""The store interface: opaque objects by key under one root.

Keys are relative paths such as ``models/org/m/manifest.json`` and
``chunks/ab/ab12...``. Methods block, so the daemon calls them from worker
threads; an implementation must be safe to call from several threads at once.
"""

import dataclasses
from collections.abc import Iterator
from typing import Protocol


def chunk_object_key(key: str) -> str:
    """Return the object key of the chunk whose content key is *key*."""
    return f"chunks/{key[:2]}/{key}"


def manifest_object_key(model: str) -> str:
    return f"models/{model}/manifest.json"


MANIFEST_SUFFIX = "/manifest.json"
CHUNKS_PREFIX = "chunks/"


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # Last modification (S3 LastModified, a file's mtime), in seconds
    # since the epoch by the store's clock.
    modified: float


class Store(Protocol):
    url: str

    def check(self) -> None:
        """Raise `StoreNotFound`, `StoreAccessDenied` or `StoreUnavailable`
        unless the store can be read."""

    def get(self, key: str) -> bytes:
        """Return the whole object; raise `ObjectNotFound` if it is missing."""

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of the object, fewer at its end."""

    def head(self, key: str) -> int | None:
        """Return the object's size, or None if it is missing."""

    def put(self, key: str, data: bytes) -> None:
        """Write the object atomically: readers see the old or the new bytes."""

    def list(self, prefix: str) -> Iterator[str]:
        """Yield the keys that start with *prefix*, in no set order."""

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield size and modification time of the objects under *prefix*."""

    def stat(self, key: str) -> ObjectInfo | None:
        """Return the object's size and modification time, or None if it is missing."""

    def touch(self, key: str) -> None:
        """Set the object's modification time to now, keeping its bytes.

        Raises `ObjectNotFound` if it is missing.
        """

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is no error."""

    def remove_partial_writes(self, cutoff: float, dry_run: bool = False) -> tuple[int, int]:
        """Delete what puts killed midway left, if older than *cutoff* (a Unix time).

        Returns the number of leftovers and their bytes. A store whose puts
        are atomic on the server leaves none.
        """
        return 0, 0


def list_models(store: Store) -> list[str]:
    """Return the names of the models that have a manifest in *store*, sorted."""
    names = []
    for key in store.list("models/"):
        if key.endswith(MANIFEST_SUFFIX):
            names.append(key[len("models/") : -len(MANIFEST_SUFFIX)])
    return sorted(names)

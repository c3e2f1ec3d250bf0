"""Retired manifests: the replaced or removed manifests that gc still honours.

Replacing a model (a new push) or removing it (``shardfs rm``) first copies
its manifest to ``retired/<name>/<time>-<random>.json``. Readers that
loaded the old manifest keep reading its chunks, and `shardfs gc` keeps
every chunk a retired manifest names until the retired copy is older than
the grace period, then deletes the copy. The age is the object's
modification time in the store, the same clock that dates the chunks.
"""

import logging
import os
import re
import time

from shardfs.errors import ManifestInvalid, ModelNotFound, ObjectInvalid, ObjectNotFound
from shardfs.manifest import check_model_name, is_newer_version, parse_manifest
from shardfs.stores.base import Store, manifest_object_key
from shardfs.stores.placed import PlacedStore

log = logging.getLogger(__name__)

RETIRED_PREFIX = "retired/"

# The keys `retire_manifest` writes: the model name, then the time in
# nanoseconds and 8 random hex digits.
_RETIRED_KEY_RE = re.compile(re.escape(RETIRED_PREFIX) + r"(.+)/[0-9]+-[0-9a-f]{8}\.json")


def retire_manifest(store: Store, name: str) -> str | None:
    """Copy the current manifest of *name* to a retired key and return that key.

    Returns None when *name* has no manifest, or one that no reader can
    have loaded (damaged, or not a file), which would only make gc stop.
    A manifest of a newer format version is kept, for newer readers. The
    current manifest is left in place: the caller replaces or deletes it.

    In a placed store each member's copy is read, because two pushes that
    ran at once can leave members with different manifests, and readers
    may hold any of them. Each distinct one is retired, and the key of the
    first is returned.
    """
    object_key = manifest_object_key(name)
    if isinstance(store, PlacedStore):
        copies = [_read_copy(member.store, object_key, name) for member in store.members]
    else:
        copies = [_read_copy(store, object_key, name)]
    retired = None
    for data in dict.fromkeys(copy for copy in copies if copy is not None):
        key = retire_copy(store, name, data)
        retired = retired or key
    return retired


def _read_copy(store: Store, object_key: str, name: str) -> bytes | None:
    try:
        return store.get(object_key)
    except ObjectNotFound:
        return None
    except ObjectInvalid as exc:
        log.warning("keeping no retired copy of the manifest of %s: %s", name, exc.reason)
        return None


def retire_copy(store: Store, name: str, data: bytes) -> str | None:
    """Write the manifest *data* of *name* to a new retired key and return it.

    Returns None, writing nothing, for data that no reader can have loaded.
    """
    try:
        parse_manifest(name, data)
    except ManifestInvalid as exc:
        if not is_newer_version(data):
            log.warning("keeping no retired copy of the manifest of %s: %s", name, exc.reason)
            return None
    key = f"{RETIRED_PREFIX}{name}/{time.time_ns()}-{os.urandom(4).hex()}.json"
    store.put(key, data)
    return key


def retired_model_name(key: str) -> str:
    """Return the model name of the retired manifest stored at *key*."""
    return key[len(RETIRED_PREFIX) :].rsplit("/", 1)[0]


def parse_retired_key(key: str) -> str | None:
    """Return the model name in *key* if `retire_manifest` could have written
    that key, else None."""
    match = _RETIRED_KEY_RE.fullmatch(key)
    if match is None:
        return None
    try:
        return check_model_name(match.group(1))
    except ValueError:
        return None


def remove_model(store: Store, name: str) -> str | None:
    """Remove the manifest of *name*, keeping a retired copy; return the copy's key.

    Raises `ModelNotFound` when *name* has no manifest. The chunks stay
    until `shardfs gc` finds them unnamed and past its grace period.
    """
    store.check()
    try:
        exists = store.head(manifest_object_key(name)) is not None
    except ObjectInvalid:
        # Damaged, such as a symbolic link loop: removing it is the fix.
        exists = True
    if not exists:
        raise ModelNotFound(name, store.url)
    retired = retire_manifest(store, name)
    store.delete(manifest_object_key(name))
    return retired

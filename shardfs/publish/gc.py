"""Delete the chunks that no manifest names, once past a grace period.

A chunk is kept while any current manifest names it, or any retired
manifest (`shardfs.publish.retire`) younger than the grace period does.
It is also kept while it is itself younger than the grace period, because
a push uploads its chunks, and renews the age of those it finds, before it
writes its manifest. Each doomed chunk's age is read again right before it
is deleted, so a push that reused it in the meantime keeps it. A long push
renews its chunks again (`shardfs.publish.push.RENEW_AGAIN_AFTER_S`) before
it writes its manifest, so any grace period longer than that is safe.
"""

import concurrent.futures
import dataclasses
import re
import time

from shardfs.errors import ManifestInvalid, ObjectInvalid, ObjectNotFound, ShardfsError
from shardfs.manifest import parse_manifest
from shardfs.publish.retire import RETIRED_PREFIX, parse_retired_key
from shardfs.stores.base import (
    CHUNKS_PREFIX,
    ObjectInfo,
    Store,
    list_models,
    manifest_object_key,
)
from shardfs.stores.placed import PlacedStore

DEFAULT_GRACE_S = 24 * 3600.0

_CHUNK_OBJECT_RE = re.compile(r"chunks/([0-9a-f]{2})/(\1[0-9a-f]{30})")


class GcStopped(ShardfsError):
    """gc could not tell which chunks are in use, so it deleted nothing."""

    def __init__(self, detail: str):
        super().__init__(f"gc stopped before deleting anything: {detail}")


@dataclasses.dataclass
class GcReport:
    dry_run: bool
    manifests: int = 0
    retired_kept: int = 0
    named_chunks: int = 0
    orphans: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    kept_young: int = 0
    kept_young_bytes: int = 0
    retired_deleted: int = 0
    # Temporary files of puts killed before they finished (local stores).
    partial_deleted: int = 0
    partial_deleted_bytes: int = 0


def collect_garbage(
    store: Store,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    workers: int = 8,
    now=time.time,
) -> GcReport:
    """Delete (or with *dry_run* only count) the unnamed chunks older than *grace_s*.

    Raises `GcStopped` before deleting anything when a manifest cannot be
    read, since the chunks it names are then unknown.
    """
    store.check()
    report = GcReport(dry_run)
    named: set[str] = set()
    # Each member of a placed store is read on its own: concurrent pushes
    # can leave members with different manifests of one model, and a
    # reader may be served by any of them.
    if isinstance(store, PlacedStore):
        sources = [member.store for member in store.members]
    else:
        sources = [store]
    manifests = set()
    for source in sources:
        for name in list_models(source):
            if _add_named_chunks(source, manifest_object_key(name), name, named):
                manifests.add(name)
    report.manifests = len(manifests)

    expired_retired = set()
    retired_kept = set()
    for source in sources:
        for info in source.list_info(RETIRED_PREFIX):
            model = parse_retired_key(info.key)
            # Objects that retire_manifest did not write are not gc's to delete.
            if model is None:
                continue
            if now() - info.modified >= grace_s:
                expired_retired.add(info.key)
            elif _add_named_chunks(source, info.key, model, named):
                retired_kept.add(info.key)
    report.retired_kept = len(retired_kept)
    expired_retired -= retired_kept
    report.named_chunks = len(named)

    doomed = []
    for info in store.list_info(CHUNKS_PREFIX):
        match = _CHUNK_OBJECT_RE.fullmatch(info.key)
        # Objects that are not chunks are not gc's to delete.
        if match is None or match.group(2) in named:
            continue
        report.orphans += 1
        if now() - info.modified >= grace_s:
            doomed.append(info)
        else:
            report.kept_young += 1
            report.kept_young_bytes += info.size

    def delete(info: ObjectInfo) -> str:
        return _delete_if_old(store, info, grace_s, dry_run, now)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for info, outcome in zip(doomed, pool.map(delete, doomed)):
            if outcome == "deleted":
                report.deleted += 1
                report.deleted_bytes += info.size
            elif outcome == "young":
                report.kept_young += 1
                report.kept_young_bytes += info.size
        # Retired manifests go last: while any chunk deletion could fail,
        # the retired copy still marks what it named.
        if not dry_run:
            list(pool.map(store.delete, expired_retired))
    report.retired_deleted = len(expired_retired)
    report.partial_deleted, report.partial_deleted_bytes = store.remove_partial_writes(
        now() - grace_s, dry_run
    )
    return report


def _add_named_chunks(store: Store, object_key: str, model: str, named: set[str]) -> bool:
    """Add the chunk keys the manifest at *object_key* names; False if it is gone."""
    try:
        manifest = parse_manifest(model, store.get(object_key))
    except ObjectNotFound:
        # Removed since the listing: its retired copy, if any, is listed later.
        return False
    except (ManifestInvalid, ObjectInvalid) as exc:
        if object_key.startswith(RETIRED_PREFIX):
            step = (
                "delete that retired copy from the store if no reader can use it, "
                "or run gc once it is older than the grace period"
            )
        else:
            step = "push the model again or remove it with shardfs rm, then run gc again"
        raise GcStopped(
            f"{object_key}: {exc}; it may name chunks that readers use, so {step}"
        ) from None
    for entry in manifest.files:
        named.update(chunk.key for chunk in entry.chunks)
    return True


def _delete_if_old(store: Store, info: ObjectInfo, grace_s: float, dry_run: bool, now) -> str:
    """Delete the chunk unless it was renewed since it was listed.

    Returns "deleted", "young" (renewed, so kept) or "gone" (already deleted).
    """
    current = store.stat(info.key)
    if current is None:
        return "gone"
    if now() - current.modified < grace_s:
        return "young"
    if not dry_run:
        store.delete(info.key)
    return "deleted"

"""Put every copy of a placed store where its placement says it belongs.

A chunk belongs on the R members that rank first for its key
(`shardfs.stores.placement`). After a member lost its objects, a copy in
the placement is missing; after a member was added or removed, or a
weight changed, the placement of some chunks names other members than
those that hold them. Repair handles both the same way, chunk by chunk:

1. A copy in the placement that is missing, or whose size no manifest
   names (or, with ``check_content``, that fails to decode), is written
   again from a good copy: one that is fetched and decodes to its key, on
   any member.
2. Only once every member of the placement holds a good copy are the
   copies outside it (misplaced ones) deleted. Readers that still use the
   old member list find the chunk on the other members, because a read
   tries every member before it gives up.

Manifests and retired manifests belong on every member. After the chunks,
a member that lacks one, or holds an older version of a model, gets the
newest copy (the highest ``created_ns``).

Repair handles the chunks that current and retired manifests name. Chunks
that none names are left to `shardfs gc`, which deletes them from every
member.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading

from shardfs import codec
from shardfs.config import format_size
from shardfs.errors import (
    ChunkCorrupt,
    ChunkEncodingUnknown,
    ManifestInvalid,
    ObjectInvalid,
    ObjectNotFound,
    StoreError,
)
from shardfs.manifest import Manifest, parse_manifest
from shardfs.publish.progress import ProgressBar
from shardfs.publish.retire import (
    RETIRED_PREFIX,
    parse_retired_key,
    retire_copy,
    retired_model_name,
)
from shardfs.stores.base import (
    CHUNKS_PREFIX,
    MANIFEST_SUFFIX,
    chunk_object_key,
)
from shardfs.stores.placed import Member, PlacedStore

log = logging.getLogger(__name__)

MODELS_PREFIX = "models/"


@dataclasses.dataclass(frozen=True)
class NamedChunk:
    """A chunk that some manifest names, with what is needed to check a copy."""

    key: str
    length: int
    # Stored lengths the manifests record; a copy of another size is damaged.
    stored_lengths: frozenset[int]
    # One place that names it, for messages: model and file path.
    model: str
    path: str


@dataclasses.dataclass
class RepairReport:
    dry_run: bool
    members: int = 0
    chunks: int = 0
    # Copies written into place, and their stored bytes.
    copied: int = 0
    copied_bytes: int = 0
    # Copies outside the placement deleted once the placement was complete.
    deleted: int = 0
    manifests_copied: int = 0
    # Chunks without a single good copy on any member.
    lost: list[NamedChunk] = dataclasses.field(default_factory=list)
    # Manifests without a valid copy on any member: "object key: reason".
    unreadable: list[str] = dataclasses.field(default_factory=list)
    # Store requests that failed: "chunk KEY: error".
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.lost or self.unreadable or self.failures)


class RepairProgress:
    """A bar over the chunks on a terminal; nothing otherwise. Thread-safe."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.done = 0
        self.copied = 0
        self._bar = ProgressBar(stream)
        self._lock = threading.Lock()

    def advance(self, copied: int) -> None:
        with self._lock:
            self.done += 1
            self.copied += copied
            # The last chunk always redraws, so the bar ends full.
            if not self._bar.due(force=self.done >= self.total):
                return
            share = self.done / self.total if self.total else 1.0
            self._bar.draw(
                share, f"{self.done} / {self.total} chunks  {self.copied} copies written "
            )

    def finish(self) -> None:
        if self.total:
            self._bar.end_line()


def repair(
    store: PlacedStore,
    check_content: bool = False,
    dry_run: bool = False,
    workers: int = 8,
    progress_stream=None,
) -> RepairReport:
    """Copy chunks into their placement and remove misplaced copies; see the module doc.

    With *check_content*, every copy in a placement is fetched and decoded,
    not only sized from the listing. With *dry_run*, nothing is written or
    deleted and the report counts what would be. Every member must be
    reachable: a member that fails its check stops repair before it starts.
    """
    report = RepairReport(dry_run, members=len(store.members))
    for member in store.members:
        member.store.check()

    manifests = _newest_manifests(store, report)
    chunks = _named_chunks(manifests.values())
    report.chunks = len(chunks)
    # The chunks each member lists: object key -> size, one dict per member.
    holdings = [_list_chunks(member) for member in store.members]

    progress = RepairProgress(len(chunks), progress_stream)
    lock = threading.Lock()

    def repair_one(chunk: NamedChunk) -> None:
        try:
            outcome = _repair_chunk(store, chunk, holdings, check_content, dry_run)
        except (StoreError, ChunkEncodingUnknown) as exc:
            with lock:
                report.failures.append(f"chunk {chunk.key}: {exc}")
            progress.advance(0)
            return
        with lock:
            if outcome.lost:
                report.lost.append(chunk)
            report.copied += outcome.copied
            report.copied_bytes += outcome.copied_bytes
            report.deleted += outcome.deleted
        progress.advance(outcome.copied)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(repair_one, chunks))
    progress.finish()

    _sync_manifests(store, manifests, report)
    return report


@dataclasses.dataclass
class _ChunkOutcome:
    copied: int = 0
    copied_bytes: int = 0
    deleted: int = 0
    lost: bool = False


def _repair_chunk(
    store: PlacedStore,
    chunk: NamedChunk,
    holdings: list[dict[str, int]],
    check_content: bool,
    dry_run: bool,
) -> _ChunkOutcome:
    object_key = chunk_object_key(chunk.key)
    placement = store.placement(chunk.key)
    outcome = _ChunkOutcome()

    good: list[Member] = []
    targets: list[Member] = []
    for member in placement:
        size = holdings[member.index].get(object_key)
        if size is not None and size in chunk.stored_lengths:
            if not check_content or _read_good_copy(member, chunk) is not None:
                good.append(member)
                continue
        targets.append(member)

    in_place = {member.index for member in placement}
    misplaced = [
        member
        for member in store.members
        if member.index not in in_place and object_key in holdings[member.index]
    ]
    if misplaced and not check_content:
        # The misplaced copies are deleted below, so the copies that stay
        # are decoded first: a damaged copy of the right size must not be
        # all that is left.
        for member in list(good):
            if _read_good_copy(member, chunk) is None:
                good.remove(member)
                targets.append(member)

    if targets:
        data = _find_good_copy(store, chunk, holdings, good)
        if data is None:
            outcome.lost = True
            return outcome
        for member in targets:
            if not dry_run:
                member.store.put(object_key, data)
            outcome.copied += 1
            outcome.copied_bytes += len(data)

    for member in misplaced:
        if not dry_run:
            member.store.delete(object_key)
        outcome.deleted += 1
    return outcome


def _find_good_copy(
    store: PlacedStore, chunk: NamedChunk, holdings: list[dict[str, int]], good: list[Member]
) -> bytes | None:
    """Return the stored bytes of a copy that decodes to its key, or None if there is none.

    Good copies in the placement are tried first, then every other member
    that lists the chunk, in rank order.
    """
    object_key = chunk_object_key(chunk.key)
    candidates = list(good)
    candidates += [
        member
        for member in store.rank(chunk.key)
        if member not in good and object_key in holdings[member.index]
    ]
    for member in candidates:
        data = _read_good_copy(member, chunk)
        if data is not None:
            return data
    return None


def _read_good_copy(member: Member, chunk: NamedChunk) -> bytes | None:
    """Return *member*'s copy of *chunk* if it decodes to its key, else None.

    Raises `ChunkEncodingUnknown` for a copy this version cannot check.
    """
    try:
        data = member.store.get(chunk_object_key(chunk.key))
    except ObjectNotFound:
        return None
    except ObjectInvalid as exc:
        log.warning("store member %s has an invalid copy: %s", member.name, exc)
        return None
    try:
        codec.decode(chunk.key, chunk.length, data)
    except ChunkEncodingUnknown:
        raise
    except ChunkCorrupt as exc:
        log.warning("store member %s has a corrupt copy: %s", member.name, exc)
        return None
    return data


def _list_chunks(member: Member) -> dict[str, int]:
    return {info.key: info.size for info in member.store.list_info(CHUNKS_PREFIX)}


@dataclasses.dataclass
class _ManifestCopies:
    """The newest valid copy of one manifest, and each member's copy of it."""

    manifest: Manifest
    data: bytes
    # Member index -> bytes of that member's copy.
    held: dict[int, bytes]


def _newest_manifests(store: PlacedStore, report: RepairReport) -> dict[str, _ManifestCopies]:
    """Return the newest valid copy of every manifest on any member, by object key.

    Current manifests are under ``models/``, retired ones under ``retired/``.
    """
    holders: dict[str, list[Member]] = {}
    for member in store.members:
        for prefix in (MODELS_PREFIX, RETIRED_PREFIX):
            for key in member.store.list(prefix):
                if prefix == MODELS_PREFIX and not key.endswith(MANIFEST_SUFFIX):
                    continue
                # Other objects under retired/ are not manifests, as in gc.
                if prefix == RETIRED_PREFIX and parse_retired_key(key) is None:
                    continue
                holders.setdefault(key, []).append(member)

    newest: dict[str, _ManifestCopies] = {}
    for key, members in sorted(holders.items()):
        model = _model_name(key)
        held: dict[int, bytes] = {}
        best: Manifest | None = None
        reasons = []
        for member in members:
            try:
                data = member.store.get(key)
            except ObjectNotFound:
                continue
            held[member.index] = data
            try:
                manifest = parse_manifest(model, data)
            except ManifestInvalid as exc:
                reasons.append(f"{member.name}: {exc.reason}")
                continue
            if best is None or manifest.created_ns > best.created_ns:
                best, best_data = manifest, data
        if best is not None:
            newest[key] = _ManifestCopies(best, best_data, held)
        elif reasons:
            report.unreadable.append(f"{key}: {'; '.join(reasons)}")
    return newest


def _model_name(key: str) -> str:
    if key.startswith(RETIRED_PREFIX):
        return retired_model_name(key)
    return key[len(MODELS_PREFIX) : -len(MANIFEST_SUFFIX)]


def _named_chunks(manifests) -> list[NamedChunk]:
    lengths: dict[str, int] = {}
    stored: dict[str, set[int]] = {}
    places: dict[str, tuple[str, str]] = {}
    for copies in manifests:
        manifest = copies.manifest
        for entry in manifest.files:
            for chunk in entry.chunks:
                lengths[chunk.key] = chunk.length
                stored.setdefault(chunk.key, set()).add(chunk.stored_length)
                places.setdefault(chunk.key, (manifest.name, entry.path))
    return [
        NamedChunk(key, lengths[key], frozenset(stored[key]), *places[key])
        for key in sorted(lengths)
    ]


def _sync_manifests(
    store: PlacedStore, manifests: dict[str, _ManifestCopies], report: RepairReport
) -> None:
    """Give every member the newest copy of every manifest.

    NOTE: a manifest left on some members by a removal that failed part
    way is copied back to the others, so the model returns. Running
    `shardfs rm` again removes it.
    """
    for key, copies in manifests.items():
        if key.startswith(MODELS_PREFIX) and not report.dry_run:
            if not _retire_replaced(store, copies, report):
                continue
        for member in store.members:
            if copies.held.get(member.index) == copies.data:
                continue
            try:
                if not report.dry_run:
                    member.store.put(key, copies.data)
            except StoreError as exc:
                report.failures.append(f"manifest {key} on {member.name}: {exc}")
                continue
            report.manifests_copied += 1


def _retire_replaced(store: PlacedStore, copies: _ManifestCopies, report: RepairReport) -> bool:
    """Retire each other manifest that members hold before the newest replaces it.

    Readers that loaded one of them keep its chunks until gc's grace period
    has passed, as after a push. Returns False, after noting the failure,
    when a retired copy could not be written, so no copy is replaced.
    """
    others = dict.fromkeys(data for data in copies.held.values() if data != copies.data)
    for data in others:
        try:
            retire_copy(store, copies.manifest.name, data)
        except StoreError as exc:
            name = copies.manifest.name
            report.failures.append(f"retired copy of the manifest of {name}: {exc}")
            return False
    return True


def describe(report: RepairReport, elapsed_s: float) -> str:
    """Return the summary line of *report*."""
    copy_verb, delete_verb = ("copied", "deleted")
    if report.dry_run:
        copy_verb, delete_verb = ("would copy", "would delete")
    line = (
        f"{_count(report.chunks, 'chunk')} on {report.members} members: {copy_verb} "
        f"{_count(report.copied, 'copy', 'copies')} ({format_size(report.copied_bytes)}) "
        f"into place, {delete_verb} {report.deleted} misplaced, {copy_verb} "
        f"{_count(report.manifests_copied, 'manifest')}; "
        f"{_count(len(report.lost), 'chunk')} lost"
    )
    if report.failures:
        line += f", {_count(len(report.failures), 'request')} failed"
    if report.unreadable:
        line += f", {_count(len(report.unreadable), 'manifest')} unreadable"
    return f"{line} in {elapsed_s:.1f} s"


def _count(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"

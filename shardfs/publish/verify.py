"""Fetch and check every chunk of a store's models.

Each distinct chunk is fetched once, however many files and models name
it, then decoded and checked against its key (`codec.decode`). A chunk
that is missing, damaged or of an encoding this version cannot read is
so found before a reader meets it. In a placed store every copy that the
chunk's placement calls for is checked, so a chunk with fewer good copies
than the store's replicas is reported once per bad copy.
"""

import concurrent.futures
import dataclasses
import hashlib
import time

from shardfs import codec
from shardfs.errors import (
    ChunkCorrupt,
    ChunkEncodingUnknown,
    ChunkLengthWrong,
    ManifestInvalid,
    ObjectInvalid,
    ObjectNotFound,
    StoreError,
)
from shardfs.manifest import FileEntry, Manifest, parse_manifest
from shardfs.stores.base import Store, chunk_object_key, list_models, manifest_object_key
from shardfs.stores.placed import PlacedStore, describe_member_failures


# How to restore a bad copy from a good one, by kind. Plain repair trusts a
# copy of the right size, so only --check-content is sure to replace a corrupt
# one. Repair cannot check a copy of an unsupported encoding, so that needs a
# newer shardfs or a push from the original files (UNSUPPORTED_HINT).
REPAIR_HINTS = {
    "missing": "shardfs repair restores it",
    "corrupt": "shardfs repair --check-content restores it",
}
NO_COPY_HINT = "push the model again from its original files with --check-existing"
UNSUPPORTED_HINT = f"{NO_COPY_HINT} to rewrite it in an encoding this version reads"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a model: a bad manifest or a bad chunk."""

    model: str
    # The kind of problem. A chunk is missing, corrupt or unsupported, or
    # mislabeled when it is good but the manifest gives it another length.
    # The model itself has a manifest problem, or diverged when members of
    # a placed store hold different manifests. A file whose chunks do not
    # give its sha256 has a content problem.
    kind: str
    detail: str
    path: str = ""
    start: int = 0
    end: int = 0
    key: str = ""
    # The member of a placed store whose copy is bad; empty for the chunk itself.
    member: str = ""

    def describe(self) -> str:
        if not self.key:
            return f"{self.model}: {self.detail}"
        place = f"{self.model}/{self.path} bytes {self.start}-{self.end}"
        if self.kind == "mislabeled":
            return f"{place}: the manifest gives chunk {self.key} a wrong length: {self.detail}"
        where = f" on {self.member}" if self.member else ""
        return f"{place}: chunk {self.key} is {self.kind}{where}: {self.detail}"


@dataclasses.dataclass
class VerifyReport:
    models: int = 0
    chunks: int = 0
    stored_bytes: int = 0
    # Files read in order and compared with their sha256 (check_files).
    files_checked: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(problem.kind == kind for problem in self.problems)

    def chunks_with(self, kind: str) -> int:
        """Return how many distinct chunks have a problem of *kind*, however
        many files name them or copies are bad."""
        return len({problem.key for problem in self.problems if problem.kind == kind})


def verify_models(
    store: Store, names: list[str] | None = None, workers: int = 8, check_files: bool = False
) -> VerifyReport:
    """Check the models *names* (every model when None or empty) in *store*.

    With *check_files*, each file whose chunks are all good is also read in
    order and its sha256 compared with the manifest's, which finds a
    manifest that names good chunks in the wrong places. That fetches a
    chunk again for every file that names it.

    Store failures other than a missing object propagate, because they
    tell nothing about the chunks. In a placed store every member must
    pass its check and list its models, or `StoreError` names those that failed.
    """
    if isinstance(store, PlacedStore):
        # Every copy is checked on its member, so no member may be passed over.
        listed, failures = store.list_models_of_each_member()
        if failures:
            raise StoreError(
                f"cannot verify: {describe_member_failures(failures)}; verify checks the "
                "copies on every member, so each member must be reachable"
            )
    else:
        store.check()
        listed = None if names else list_models(store)
    report = VerifyReport()
    manifests = []
    for name in names or listed:
        if isinstance(store, PlacedStore):
            found = _load_member_manifests(store, name, report)
        else:
            found = [_load_manifest(store, name, report)]
        manifests.extend(manifest for manifest in found if manifest is not None)
    report.models = len({manifest.name for manifest in manifests})

    # Each distinct (key, length) once, with every place that names it.
    places: dict[tuple[str, int], list[tuple[str, str, int, int]]] = {}
    stored: dict[tuple[str, int], int] = {}
    for manifest in manifests:
        for entry in manifest.files:
            for chunk in entry.chunks:
                item = (chunk.key, chunk.length)
                places.setdefault(item, []).append(
                    (manifest.name, entry.path, chunk.offset, chunk.end)
                )
                stored[item] = chunk.stored_length
    report.chunks = len(places)
    report.stored_bytes = sum(stored.values())

    def check(item: tuple[str, int]) -> list[tuple[str, str, str]]:
        if isinstance(store, PlacedStore):
            return _check_copies(store, *item)
        outcome = _check_chunk(store, *item)
        return [] if outcome is None else [(*outcome, "")]

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for item, outcomes in zip(places, pool.map(check, places)):
            for kind, detail, member in outcomes:
                for model, path, start, end in places[item]:
                    report.problems.append(
                        Problem(model, kind, detail, path, start, end, item[0], member)
                    )
        if check_files:
            _check_files(store, manifests, report, pool)
    return report


def _check_files(store: Store, manifests: list[Manifest], report: VerifyReport, pool) -> None:
    bad_keys = {problem.key for problem in report.problems}
    files = [
        (manifest.name, entry)
        for manifest in manifests
        for entry in manifest.files
        if not any(chunk.key in bad_keys for chunk in entry.chunks)
    ]
    report.files_checked = len(files)
    outcomes = pool.map(lambda item: _file_problem(store, item[1]), files)
    for (model, entry), detail in zip(files, outcomes):
        if detail is not None:
            report.problems.append(Problem(model, "content", f"{entry.path}: {detail}"))


def _file_problem(store: Store, entry: FileEntry) -> str | None:
    """Return None if *entry*'s chunks in order give its sha256, else what differs."""
    digest = hashlib.sha256()
    for chunk in entry.chunks:
        try:
            data = codec.decode(chunk.key, chunk.length, store.get(chunk_object_key(chunk.key)))
        except (ObjectNotFound, ObjectInvalid, ChunkCorrupt) as exc:
            # The chunk was good in the first pass, so it changed since then.
            return f"chunk {chunk.key} failed when read again: {exc}"
        digest.update(data)
    if digest.hexdigest() != entry.sha256:
        return (
            f"the sha256 of its chunks is {digest.hexdigest()}, "
            f"but the manifest gives {entry.sha256}"
        )
    return None


def _load_manifest(store: Store, name: str, report: VerifyReport) -> Manifest | None:
    try:
        return parse_manifest(name, store.get(manifest_object_key(name)))
    except ObjectNotFound:
        report.problems.append(Problem(name, "manifest", "model not found"))
    except (ManifestInvalid, ObjectInvalid) as exc:
        report.problems.append(Problem(name, "manifest", f"manifest is invalid: {exc.reason}"))
    return None


def _load_member_manifests(store: PlacedStore, name: str, report: VerifyReport) -> list[Manifest]:
    """Return every distinct manifest of *name* on the members of *store*.

    Members should hold the same manifest, but two pushes that ran at once
    can leave different ones, and a reader is served the one of the first
    member it tries. Members that differ are reported, and the chunks of
    every version are checked.
    """
    holders: dict[bytes | None, list[str]] = {}
    invalid: list[str] = []
    for member in store.members:
        try:
            data = member.store.get(manifest_object_key(name))
        except ObjectNotFound:
            data = None
        except ObjectInvalid as exc:
            invalid.append(f"an invalid one on {member.name} ({exc.reason})")
            continue
        holders.setdefault(data, []).append(member.name)

    manifests = []
    versions = []
    for data, members in holders.items():
        where = ", ".join(members)
        if data is None:
            versions.append(f"none on {where}")
            continue
        try:
            manifest = parse_manifest(name, data)
        except ManifestInvalid as exc:
            invalid.append(f"an invalid one on {where} ({exc.reason})")
            continue
        manifests.append(manifest)
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(manifest.created_ns / 1e9))
        versions.append(f"one created {created} UTC on {where}")
    versions.extend(invalid)
    # Without a valid copy the model itself is reported; otherwise the
    # invalid copies are among the members that differ.
    if not manifests:
        detail = "model not found" if not invalid else f"manifest is invalid: {'; '.join(invalid)}"
        report.problems.append(Problem(name, "manifest", detail))
        return []
    if len(versions) > 1:
        report.problems.append(
            Problem(
                name,
                "diverged",
                f"store members hold different manifests: {'; '.join(versions)}; "
                "shardfs repair copies the newest to every member",
            )
        )
    return manifests


def _check_chunk(store: Store, key: str, length: int) -> tuple[str, str] | None:
    """Return None for a good chunk, else (kind, detail)."""
    try:
        data = store.get(chunk_object_key(key))
    except ObjectNotFound:
        return "missing", "object not found in the store"
    except ObjectInvalid as exc:
        return "corrupt", exc.reason
    try:
        codec.decode(key, length, data)
    except ChunkEncodingUnknown as exc:
        # A newer shardfs may have written it, or its header is damaged.
        return "unsupported", f"{exc.reason}, or {UNSUPPORTED_HINT}"
    except ChunkLengthWrong as exc:
        return "mislabeled", exc.reason
    except ChunkCorrupt as exc:
        return "corrupt", _size_reason(key, data) or exc.reason
    return None


def _size_reason(key: str, data: bytes) -> str | None:
    """Return why the object *data* has the wrong size, when its header gives
    the size, as it does for a truncated raw or byte-grouped chunk."""
    try:
        expected = codec.stored_size(key, data)
    except ChunkCorrupt:
        return None
    if expected is None or expected == len(data):
        return None
    return f"object is {len(data)} bytes, its header gives {expected}"


def _check_copies(store: PlacedStore, key: str, length: int) -> list[tuple[str, str, str]]:
    """Check each copy of the placement of *key*; return (kind, detail, member) per bad one."""
    placement = store.placement(key)
    bad = []
    for member in placement:
        outcome = _check_chunk(member.store, key, length)
        if outcome is not None:
            bad.append((member, *outcome))
    if not bad:
        return []
    # A good copy named with a wrong length is reported once, as the
    # manifest's fault, not once per copy.
    for member, kind, detail in bad:
        if kind == "mislabeled":
            return [(kind, detail, "")]
    good = len(placement) - len(bad)
    summary = f"{good} of {len(placement)} copies good"
    others = store.rank(key)[len(placement) :]
    elsewhere = sum(member.store.head(chunk_object_key(key)) is not None for member in others)
    if elsewhere:
        summary += f", {elsewhere} more outside the placement"
    outcomes = []
    for member, kind, detail in bad:
        text = f"{detail}; {summary}"
        if (good or elsewhere) and kind in REPAIR_HINTS:
            text += f"; {REPAIR_HINTS[kind]}"
        elif kind in REPAIR_HINTS:
            text += f"; {NO_COPY_HINT}"
        outcomes.append((kind, text, member.name))
    return outcomes

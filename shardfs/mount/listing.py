"""The model listing: manifests from the store, a local copy, and refresh.

`fetch_manifests` reads every manifest from the store; a copy of the last
good listing is kept under ``manifests/`` in the cache directory, so a
daemon that starts while the store is down still serves the models (and
the chunks) it has cached. `apply_listing` brings the tree up to date with
a new listing: added models appear, removed ones disappear, and replaced
ones get new inodes while open files keep reading the version they opened.
"""

import hashlib
import logging
import os
import shutil
import tempfile
import time

from shardfs.config import format_count
from shardfs.errors import ManifestInvalid, ObjectNotFound, StoreError, StoreUnavailable
from shardfs.manifest import Manifest, parse_manifest
from shardfs.mount.tree import Tree
from shardfs.stores import Store, list_models
from shardfs.stores.base import manifest_object_key
from shardfs.stores.placed import PlacedStore

log = logging.getLogger(__name__)


# Attempts and first pause for one manifest whose read fails transiently.
MANIFEST_ATTEMPTS = 3
MANIFEST_RETRY_DELAY_S = 0.2


def fetch_manifests(
    store: Store, fallback: dict[str, bytes] | None = None
) -> tuple[dict[str, bytes], set[str]]:
    """Return the raw manifest of every model in *store*, by name, and the
    names whose manifest could not be read; blocks.

    A listing that fails raises. A single manifest that still fails after
    a few attempts keeps its version from *fallback* (the last good
    listing); with none, its name is returned as unavailable, so one bad
    object does not take down every model.
    """
    manifests = {}
    unavailable = set()
    for name in list_models(store):
        try:
            manifests[name] = _get_manifest(store, name)
        except ObjectNotFound:
            log.debug("model %r was removed while the store was listed", name)
        except StoreError as exc:
            if fallback and name in fallback:
                manifests[name] = fallback[name]
                log.warning("reading the manifest of %r failed, keeping its last version: %s", name, exc)
            else:
                log.warning("reading the manifest of %r failed, model unavailable: %s", name, exc)
                unavailable.add(name)
    return manifests, unavailable


def _get_manifest(store: Store, name: str) -> bytes:
    for attempt in range(1, MANIFEST_ATTEMPTS + 1):
        try:
            data = store.get(manifest_object_key(name))
        except StoreUnavailable:
            if attempt == MANIFEST_ATTEMPTS:
                raise
            time.sleep(MANIFEST_RETRY_DELAY_S * 2 ** (attempt - 1))
            continue
        if isinstance(store, PlacedStore):
            return valid_member_copy(store, name, data)
        return data
    raise AssertionError("unreachable")


_REPORTED_INVALID_COPIES: set[tuple[str, bytes]] = set()


def valid_member_copy(store: PlacedStore, name: str, data: bytes) -> bytes:
    """Return *data*, the manifest of *name* that the placed *store* served,
    or if it is invalid, a valid copy from another member.

    Members hold copies of every manifest, so one damaged copy does not
    hide the model. Without a valid copy, *data* is returned and rejected
    by the caller.
    """
    try:
        parse_manifest(name, data)
        return data
    except ManifestInvalid:
        pass
    for member in store.members:
        try:
            copy = member.store.get(manifest_object_key(name))
            parse_manifest(name, copy)
        except (StoreError, ManifestInvalid):
            continue
        # Logged once per model and served copy, not at every refresh.
        if (name, copy) not in _REPORTED_INVALID_COPIES:
            _REPORTED_INVALID_COPIES.add((name, copy))
            log.warning(
                "the manifest of %r is invalid on a store member; serving the valid copy "
                "of %s; shardfs repair copies it to every member",
                name,
                member.name,
            )
        return copy
    return data


# The file in a listing copy that names its store; no model has this name,
# as model names start with a letter or digit.
_STORE_FILE = ".store-url"


class ManifestCopy:
    """The last good listing of the store *store_url*, kept as files under
    *directory*; methods block.

    The copy records its store's URL, so a cache directory reused for
    another store does not serve the first store's models. The same bucket
    and prefix behind another endpoint count as the same store, since a
    store that moved or is down looks just like that.
    """

    def __init__(self, directory: str, store_url: str):
        self.directory = directory
        self.store_url = store_url

    def save(self, manifests: dict[str, bytes]) -> None:
        try:
            temp_dir = tempfile.mkdtemp(dir=os.path.dirname(self.directory), prefix=".manifests-")
        except OSError as exc:
            log.warning("cannot keep a copy of the model listing: %s", exc)
            return
        try:
            with open(os.path.join(temp_dir, _STORE_FILE), "w") as file:
                file.write(self.store_url)
            for name, data in manifests.items():
                path = os.path.join(temp_dir, name, "manifest.json")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as file:
                    file.write(data)
            old_dir = f"{self.directory}.old"
            shutil.rmtree(old_dir, ignore_errors=True)
            if os.path.exists(self.directory):
                os.rename(self.directory, old_dir)
            os.rename(temp_dir, self.directory)
            shutil.rmtree(old_dir, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(temp_dir, ignore_errors=True)
            log.warning("cannot keep a copy of the model listing: %s", exc)

    def exists(self) -> bool:
        """Return whether a copy of this store's listing is kept."""
        try:
            with open(os.path.join(self.directory, _STORE_FILE)) as file:
                return file.read() == self.store_url
        except OSError:
            return False

    def load(self) -> dict[str, bytes]:
        manifests = {}
        for directory, _, files in os.walk(self.directory):
            if "manifest.json" in files:
                name = os.path.relpath(directory, self.directory).replace(os.sep, "/")
                with open(os.path.join(directory, "manifest.json"), "rb") as file:
                    manifests[name] = file.read()
        return manifests


class ListingState:
    """What the tree was last built from, so each change is applied once."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        # The manifest bytes each model in the tree was built from.
        self.raw: dict[str, bytes] = {}
        self._reported: set[tuple[str, str]] = set()

    def report_once(self, name: str, digest: str, message: str, *args) -> None:
        """Log a refused model once per manifest content, not on every refresh."""
        if (name, digest) not in self._reported:
            self._reported.add((name, digest))
            log.warning(message, *args)


def apply_listing(tree: Tree, state: ListingState, raw: dict[str, bytes]) -> list[tuple[int, str]]:
    """Update *tree* to the manifests in *raw*.

    Returns the directory entries (parent inode, name) whose kernel cache
    must be dropped because they were removed or replaced.
    """
    stale = []
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in raw.items()}
    for name in sorted(set(state.digests) - set(digests)):
        stale.append(_remove(tree, state, name))
        log.info("model %s was removed from the store", name)

    for name in sorted(digests):
        if state.digests.get(name) == digests[name]:
            continue
        manifest = _parse(state, name, digests[name], raw[name])
        if manifest is None:
            continue
        replaced = name in state.digests
        if replaced:
            stale.append(_remove(tree, state, name, prune=False))
        try:
            tree.add_model(manifest)
        except ValueError as exc:
            state.report_once(name, digests[name], "model %r refused: %s", name, exc)
            continue
        state.digests[name] = digests[name]
        state.raw[name] = raw[name]
        files = format_count(len(manifest.files), "file")
        log.info("model %s %s: %s", name, "replaced" if replaced else "added", files)
    return stale


def _parse(state: ListingState, name: str, digest: str, data: bytes) -> Manifest | None:
    try:
        return parse_manifest(name, data)
    except ManifestInvalid as exc:
        state.report_once(name, digest, "model refused: %s", exc)
        return None


def _remove(tree: Tree, state: ListingState, name: str, prune: bool = True) -> tuple[int, str]:
    del state.digests[name]
    state.raw.pop(name, None)
    return tree.remove_model(name, prune)

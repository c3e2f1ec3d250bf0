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

from shardfs.errors import ManifestInvalid, ObjectNotFound
from shardfs.manifest import Manifest, parse_manifest
from shardfs.mount.tree import Tree
from shardfs.stores import Store, list_models
from shardfs.stores.base import manifest_object_key

log = logging.getLogger(__name__)


def fetch_manifests(store: Store) -> dict[str, bytes]:
    """Return the raw manifest of every model in *store*, by name; blocks."""
    manifests = {}
    for name in list_models(store):
        try:
            manifests[name] = store.get(manifest_object_key(name))
        except ObjectNotFound:
            log.debug("model %r was removed while the store was listed", name)
    return manifests


class ManifestCopy:
    """The last good listing, kept as files under *directory*; methods block."""

    def __init__(self, directory: str):
        self.directory = directory

    def save(self, manifests: dict[str, bytes]) -> None:
        temp_dir = tempfile.mkdtemp(dir=os.path.dirname(self.directory), prefix=".manifests-")
        try:
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
        return os.path.isdir(self.directory)

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
        log.info("model %s %s: %d files", name, "replaced" if replaced else "added", len(manifest.files))
    return stale


def _parse(state: ListingState, name: str, digest: str, data: bytes) -> Manifest | None:
    try:
        return parse_manifest(name, data)
    except ManifestInvalid as exc:
        state.report_once(name, digest, "model refused: %s", exc)
        return None


def _remove(tree: Tree, state: ListingState, name: str, prune: bool = True) -> tuple[int, str]:
    del state.digests[name]
    return tree.remove_model(name, prune)

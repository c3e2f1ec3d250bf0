"""Inodes and directories built from manifests (no FUSE calls here).

The root directory holds one directory per model name component, so the
model ``org/model`` appears as ``org/model/``. A model that is replaced
gets new inodes for its directory and files, so the kernel's page cache of
the old version is never served for the new one; the old nodes stay
reachable by inode for readers that still have them open. The tree is
changed only from the daemon's trio thread, so it needs no lock.
"""

import collections
import dataclasses
import itertools
import stat

from shardfs.layout import chunk_offsets
from shardfs.manifest import FileEntry, Manifest

ROOT_INODE = 1

# Nodes of replaced or removed models kept so that open files and cached
# inodes keep answering getattr; the oldest are dropped past this count.
MAX_RETIRED_NODES = 100_000


@dataclasses.dataclass
class Node:
    inode: int
    name: str
    mode: int  # st_mode, with the file type bits
    size: int
    mtime_ns: int
    # Directories only: child name -> inode.
    children: dict[str, int] | None = None
    # Files only.
    entry: FileEntry | None = None
    model: str = ""
    offsets: list[int] = dataclasses.field(default_factory=list)
    path: str = ""  # relative to the mount's root

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclasses.dataclass
class _Model:
    manifest: Manifest
    directory: int  # inode of the model's directory
    inodes: list[int]  # every node the model owns, its directory included


class Tree:
    def __init__(self) -> None:
        self._inodes = itertools.count(ROOT_INODE + 1)
        self._nodes: dict[int, Node] = {}
        self._retired: collections.OrderedDict[int, Node] = collections.OrderedDict()
        self._models: dict[str, _Model] = {}
        # Models listed in the store whose manifest could not be read; a
        # lookup on their path fails with EIO instead of ENOENT.
        self.unavailable: set[str] = set()
        self._nodes[ROOT_INODE] = self._new_dir(ROOT_INODE, "", 0)

    @staticmethod
    def _new_dir(inode: int, name: str, mtime_ns: int) -> Node:
        return Node(inode, name, stat.S_IFDIR | 0o555, 0, mtime_ns, children={})

    @property
    def models(self) -> dict[str, Manifest]:
        return {name: model.manifest for name, model in self._models.items()}

    def is_unavailable(self, parent: int, name: str) -> bool:
        """Whether *name* in *parent* leads to a model whose manifest could not be read."""
        directory = self.node(parent)
        if directory is None or not self.unavailable:
            return False
        path = f"{directory.path}/{name}" if directory.path else name
        return any(model == path or model.startswith(path + "/") for model in self.unavailable)

    def node(self, inode: int) -> Node | None:
        """Return the node of *inode*, current or retired, or None."""
        node = self._nodes.get(inode)
        return node if node is not None else self._retired.get(inode)

    def lookup(self, parent: int, name: str) -> Node | None:
        directory = self.node(parent)
        if directory is None or directory.children is None:
            return None
        inode = directory.children.get(name)
        return None if inode is None else self.node(inode)

    def add_model(self, manifest: Manifest) -> None:
        """Add the directory and files of *manifest*.

        Raises ValueError, leaving the tree unchanged, when a path of the
        model collides with a file or another model in the tree.
        """
        if manifest.name in self._models:
            raise ValueError(f"model {manifest.name!r} is already in the tree")
        self._check_fits(manifest)
        *parents, last = manifest.name.split("/")
        parent = self._make_dirs(ROOT_INODE, parents, manifest.created_ns, owned=None)
        owned: list[int] = []
        model_dir = self._make_dirs(parent.inode, [last], manifest.created_ns, owned)
        for entry in manifest.files:
            *subdirs, filename = entry.path.split("/")
            directory = self._make_dirs(model_dir.inode, subdirs, manifest.created_ns, owned)
            inode = next(self._inodes)
            self._nodes[inode] = Node(
                inode,
                filename,
                stat.S_IFREG | (entry.mode & 0o777),
                entry.size,
                entry.mtime_ns,
                entry=entry,
                model=manifest.name,
                offsets=chunk_offsets(entry.chunks),
            )
            directory.children[filename] = inode
            owned.append(inode)
        self._models[manifest.name] = _Model(manifest, model_dir.inode, owned)

    def remove_model(self, name: str, prune: bool = True) -> tuple[int, str]:
        """Remove model *name*; return (parent inode, name) of the entry removed.

        Its nodes move to the retired set, so open files keep working. With
        *prune*, parent directories left empty go too, and the entry
        returned is the topmost of them. A model about to be replaced keeps
        its parents, so their inodes, which the kernel caches, stay valid.
        """
        model = self._models.pop(name)
        *parents, last = name.split("/")
        parent = self._resolve(parents)
        del parent.children[last]
        for inode in model.inodes:
            self._retired[inode] = self._nodes.pop(inode)
        while len(self._retired) > MAX_RETIRED_NODES:
            self._retired.popitem(last=False)
        if prune:
            return self._prune_empty_dirs(parents) or (parent.inode, last)
        return parent.inode, last

    def _resolve(self, names: list[str]) -> Node:
        node = self._nodes[ROOT_INODE]
        for name in names:
            node = self._nodes[node.children[name]]
        return node

    def _prune_empty_dirs(self, names: list[str]) -> tuple[int, str] | None:
        """Remove directories on *names* that no model uses any more, deepest first.

        Returns the entry (parent inode, name) of the topmost one removed.
        """
        removed = None
        while names:
            parent = self._resolve(names[:-1])
            inode = parent.children[names[-1]]
            if self._nodes[inode].children:
                break
            del parent.children[names[-1]]
            self._retired[inode] = self._nodes.pop(inode)
            removed = (parent.inode, names[-1])
            names = names[:-1]
        return removed

    def _make_dirs(self, parent: int, names, mtime_ns: int, owned: list[int] | None) -> Node:
        directory = self._nodes[parent]
        for name in names:
            child = self.lookup(directory.inode, name)
            if child is None:
                child = self._new_dir(next(self._inodes), name, mtime_ns)
                child.path = f"{directory.path}/{name}" if directory.path else name
                self._nodes[child.inode] = child
                directory.children[name] = child.inode
                if owned is not None:
                    owned.append(child.inode)
            directory.mtime_ns = max(directory.mtime_ns, mtime_ns)
            directory = child
        return directory

    def _check_fits(self, manifest: Manifest) -> None:
        """Raise ValueError if a path of *manifest* would cross a node in the tree."""
        name_parts = manifest.name.split("/")
        if self._walk(name_parts) is not None:
            raise ValueError(f"path {manifest.name!r} is already in the tree")
        for depth in range(1, len(name_parts)):
            prefix = "/".join(name_parts[:depth])
            if prefix in self._models:
                raise ValueError(f"path {manifest.name!r} is inside model {prefix!r}")

    def _walk(self, names: list[str]) -> Node | None:
        node = self._nodes[ROOT_INODE]
        for name in names:
            node = self.lookup(node.inode, name)
            if node is None:
                return None
        return node

    def count_files(self) -> int:
        return sum(1 for node in self._nodes.values() if not node.is_dir)

    def count_nodes(self) -> int:
        return len(self._nodes)

    def total_size(self) -> int:
        return sum(node.size for node in self._nodes.values() if not node.is_dir)

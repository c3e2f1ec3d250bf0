"""Inodes and directories built from manifests (no FUSE calls here).

The root directory holds one directory per model name component, so the
model ``org/model`` appears as ``org/model/``. The tree is built once and
then only read, so it needs no lock.
"""

import dataclasses
import stat
from collections.abc import Iterable

from shardfs.layout import chunk_offsets
from shardfs.manifest import FileEntry, Manifest

ROOT_INODE = 1


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

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class Tree:
    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self._add_dir(ROOT_INODE, "", 0)

    def _add_dir(self, inode: int, name: str, mtime_ns: int) -> Node:
        node = Node(inode, name, stat.S_IFDIR | 0o555, 0, mtime_ns, children={})
        self.nodes[inode] = node
        return node

    def _next_inode(self) -> int:
        return len(self.nodes) + 1

    def lookup(self, parent: int, name: str) -> Node | None:
        directory = self.nodes.get(parent)
        if directory is None or directory.children is None:
            return None
        inode = directory.children.get(name)
        return None if inode is None else self.nodes[inode]

    def add_model(self, manifest: Manifest) -> None:
        """Add the directory and files of *manifest*.

        Raises ValueError, leaving the tree unchanged, when a name of the
        model collides with a file already in the tree.
        """
        self._check_fits(manifest)
        model_dir = self._make_dirs(ROOT_INODE, manifest.name.split("/"), manifest.created_ns)
        for entry in manifest.files:
            *parents, filename = entry.path.split("/")
            directory = self._make_dirs(model_dir.inode, parents, manifest.created_ns)
            inode = self._next_inode()
            self.nodes[inode] = Node(
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

    def _make_dirs(self, parent: int, names: Iterable[str], mtime_ns: int) -> Node:
        directory = self.nodes[parent]
        for name in names:
            child = self.lookup(directory.inode, name)
            if child is None:
                child = self._add_dir(self._next_inode(), name, mtime_ns)
                directory.children[name] = child.inode
            directory.mtime_ns = max(directory.mtime_ns, mtime_ns)
            directory = child
        return directory

    def _check_fits(self, manifest: Manifest) -> None:
        """Raise ValueError if a path of *manifest* would cross a file in the tree."""
        for entry in manifest.files:
            path = manifest.name.split("/") + entry.path.split("/")
            node = self.nodes[ROOT_INODE]
            for depth, name in enumerate(path):
                child = self.lookup(node.inode, name)
                if child is None:
                    break
                is_last = depth == len(path) - 1
                if not child.is_dir or is_last:
                    raise ValueError(
                        f"path {'/'.join(path[: depth + 1])!r} is already in the tree"
                    )
                node = child

    def count_files(self) -> int:
        return sum(1 for node in self.nodes.values() if not node.is_dir)

    def total_size(self) -> int:
        return sum(node.size for node in self.nodes.values() if not node.is_dir)

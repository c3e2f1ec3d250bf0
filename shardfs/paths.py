"""Whether two local directories overlap, seen through links and bind mounts.

A mount's cache directory, its mountpoint and the local stores it serves
must not overlap: the cache deletes files it does not know, and a mount
inside a store would list itself. Paths are compared by device and inode
along the resolved path, so a symbolic link or a bind mount of the same
directory counts as that directory.
"""

import os


def is_within(path: str, directory: str) -> bool:
    """Return whether *path* is *directory* or lies under it.

    For a *directory* that does not exist yet, the absolute paths are
    compared as text.
    """
    try:
        target = os.stat(directory)
    except OSError:
        inner, outer = os.path.abspath(path), os.path.abspath(directory)
        return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)
    current = os.path.realpath(path)
    while True:
        try:
            info = os.stat(current)
        except OSError:
            info = None
        if info is not None and (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            return True
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def overlap(first: str, second: str) -> bool:
    """Return whether one of the two paths is, or lies under, the other."""
    return is_within(first, second) or is_within(second, first)

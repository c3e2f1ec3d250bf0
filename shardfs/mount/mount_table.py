"""The kernel's mount table, and the source that a shardfs mount shows in it.

A shardfs mount's source (the first field of /proc/mounts, which mount(8),
findmnt and df print) is its store URL. A local store's path is absolute,
because the mount command makes it so. A placed store shows its member
URLs joined by ``+``, in the order given, without their endpoint, weight
and id options. When that is too long for the kernel, it shows the first
member's URL, the number of other members and a hash of the whole list.
mount(8) compares this source with the first field of an /etc/fstab line
to tell whether the line is mounted already.
"""

import dataclasses
import hashlib
import os
import re

from shardfs.config import StoreConfig
from shardfs.stores.placed import PlacedStoreConfig

SHARDFS_TYPE = "fuse.shardfs"
PLACED_SOURCE_SEPARATOR = "+"
# mount(2) fails with EINVAL for a source longer than this: PATH_MAX less
# its terminating NUL.
MAX_SOURCE_BYTES = 4095
# The kernel writes space, tab, newline and backslash in /proc/mounts
# fields as a backslash and three octal digits.
_OCTAL_ESCAPE_RE = re.compile(rb"\\([0-7]{3})")


@dataclasses.dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mounts."""

    source: str
    mountpoint: str
    fstype: str


def mount_source(store: StoreConfig | PlacedStoreConfig) -> str:
    """Return the source that a mount of *store* shows in /proc/mounts."""
    if not isinstance(store, PlacedStoreConfig):
        return store.url
    urls = [member.store.url for member in store.members]
    source = PLACED_SOURCE_SEPARATOR.join(urls)
    if len(os.fsencode(source)) <= MAX_SOURCE_BYTES:
        return source
    digest = hashlib.blake2b(os.fsencode(source), digest_size=8).hexdigest()
    return f"{urls[0]}{PLACED_SOURCE_SEPARATOR}{len(urls) - 1}-more-members-{digest}"


def _unescape(field: str) -> str:
    raw = _OCTAL_ESCAPE_RE.sub(lambda match: bytes([int(match.group(1), 8)]), os.fsencode(field))
    return os.fsdecode(raw)


def read_mount_table() -> list[MountEntry]:
    """Return the mounts of this process's mount namespace, oldest first."""
    entries = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3:
                entries.append(MountEntry(_unescape(fields[0]), _unescape(fields[1]), fields[2]))
    return entries


def mount_at(path: str) -> MountEntry | None:
    """Return the last mount on *path*, the visible one of stacked mounts, or None."""
    target = os.path.abspath(path)
    found = None
    for entry in read_mount_table():
        if entry.mountpoint == target:
            found = entry
    return found


def enclosing_shardfs_mount(path: str) -> str | None:
    """Return the shardfs mount that contains *path*, or None."""
    target = os.path.abspath(path)
    for entry in read_mount_table():
        if entry.fstype == SHARDFS_TYPE and target.startswith(entry.mountpoint.rstrip("/") + "/"):
            return entry.mountpoint
    return None


def is_serving(path: str) -> bool:
    """Return whether the filesystem mounted on *path* responds.

    A FUSE mount whose daemon exited fails every call with ENOTCONN.
    """
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def store_mounted_at(store: StoreConfig | PlacedStoreConfig, path: str) -> bool:
    """Return whether a responding shardfs mount of *store* is on *path*."""
    entry = mount_at(path)
    if entry is None or entry.fstype != SHARDFS_TYPE:
        return False
    return entry.source == mount_source(store) and is_serving(path)

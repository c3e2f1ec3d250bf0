"""Settings of each component as frozen dataclasses, and value parsers.

Components receive their config object and never read argv or the
environment themselves; the command line builds these objects.
"""

import dataclasses
import os
import re

from shardfs.errors import UsageError

MiB = 1024 * 1024

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1000,
    "KIB": 1024,
    "M": MiB,
    "MB": 1000**2,
    "MIB": MiB,
    "G": 1024**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Parse a byte count such as ``8M``, ``64MiB``, ``1.5G`` or ``4096``.

    Single letters and IEC suffixes are powers of 1024; ``KB``, ``MB`` and
    ``GB`` are powers of 1000, as `dd` and most storage tools read them.
    """
    match = _SIZE_RE.fullmatch(text)
    unit = match and _SIZE_UNITS.get(match.group(2).upper())
    if not match or unit is None:
        raise UsageError(
            f"invalid size {text!r}: expected a number of bytes with an "
            "optional unit, such as 8M, 64MiB or 1048576"
        )
    return int(float(match.group(1)) * unit)


def format_size(count: float) -> str:
    """Format a byte count with a binary unit, as ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def default_store_url() -> str:
    """Return the local store used when no ``--store`` is given."""
    if os.geteuid() == 0:
        return "/var/lib/shardfs/store"
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data_home, "shardfs", "store")


def default_cache_dir() -> str:
    """Return the cache directory used when no ``--cache-dir`` is given."""
    if os.geteuid() == 0:
        return "/var/cache/shardfs"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache_home, "shardfs")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    # Store root: a directory path, file:///abs/path or s3://bucket/prefix.
    url: str
    # S3-compatible server to use instead of AWS; None lets boto3 decide,
    # which includes its own AWS_ENDPOINT_URL variable.
    endpoint_url: str | None = None
    # Connections the S3 client keeps open; also the bound on concurrent
    # store requests of one process.
    max_connections: int = 16
    # Per-request timeouts in seconds, so a stalled connection fails instead
    # of holding a reader forever.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class PushConfig:
    # Bytes of file content per chunk; the last chunk of a file may be shorter.
    chunk_size: int = 8 * MiB
    # zstd level 3 is zstd's own default: about 300 MB/s per core to encode,
    # within a few percent of the ratio of much slower levels on weights.
    zstd_level: int = 3
    # Threads that compress and upload chunks at once.
    workers: int = 8


@dataclasses.dataclass(frozen=True)
class MountConfig:
    mountpoint: str
    cache_dir: str
    allow_other: bool = False
    # Decoded chunks kept in memory. 1 GiB holds 128 chunks of the default
    # 8 MiB, enough for many readers each working in a few chunks.
    memory_limit: int = 1024 * MiB
    # Threads that decompress and verify chunks at once. Decoding is
    # CPU-bound and zstd releases the GIL, so one per core keeps all busy.
    decode_workers: int = max(1, os.cpu_count() or 1)
    # The kernel caches attributes and names this long; files never change.
    attr_timeout_s: float = 3600.0

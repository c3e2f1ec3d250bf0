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


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]?)\s*")


def parse_duration(text: str) -> float:
    """Parse a duration such as ``30m``, ``24h``, ``7d``, ``90s`` or ``0``, in seconds.

    A plain number is seconds.
    """
    match = _DURATION_RE.fullmatch(text.lower())
    if not match or match.group(2) not in _DURATION_UNITS:
        raise UsageError(
            f"invalid duration {text!r}: expected a number with an optional "
            "unit s, m, h, d or w, such as 30m, 24h or 7d"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_size(count: float) -> str:
    """Format a byte count with a binary unit, as ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_count(count: int, noun: str, plural: str | None = None) -> str:
    """Format *count* with *noun*, or with *plural* (default: *noun* + "s") unless it is 1."""
    return f"{count} {noun}" if count == 1 else f"{count} {plural or noun + 's'}"


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
    # store requests of one process. A mount lets up to as many requests
    # again run on after their read's deadline (see `ChunkSource`).
    max_connections: int = 16
    # Per-request timeouts in seconds, so a stalled connection fails and is
    # retried well within a read's deadline (RetryConfig.deadline_s).
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0


@dataclasses.dataclass(frozen=True)
class PushConfig:
    # Bytes of file content per chunk; the last chunk of a file may be shorter.
    chunk_size: int = 8 * MiB
    # zstd level 3 is zstd's own default: about 300 MB/s per core to encode,
    # within a few percent of the ratio of much slower levels on weights.
    zstd_level: int = 3
    # Threads that compress and upload chunks at once.
    workers: int = 8
    # Fetch and decode each chunk found in the store, and replace damaged ones.
    check_existing: bool = False


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    # A read fails with EIO once its chunk has not arrived for this long. A
    # page fault waits this long in the kernel, so it stays well under the
    # 120 s after which the kernel reports a task as hung.
    deadline_s: float = 30.0
    # Backoff before the second attempt, doubled for each further attempt
    # up to max_delay_s, each with random jitter of up to half its length.
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    # A chunk that failed for good fails again at once for this long, so a
    # reader retrying in a loop does not hammer the store.
    failure_ttl_s: float = 2.0


@dataclasses.dataclass(frozen=True)
class PrefetchConfig:
    enabled: bool = True
    # Chunks fetched ahead when a forward stream of reads is first seen.
    initial_chunks: int = 2
    # The window's cap, in chunks. With 8 MiB chunks, 16 keep 128 MiB in
    # flight: at 1 GB/s and 20 ms per request that is about six round trips
    # of data, and it stays well inside the default memory limit.
    max_chunks: int = 16
    # A stream counts as a whole-file load once it reads this far past the
    # end of the tensor it started in. It must exceed the kernel's own
    # read-ahead past a tensor (read_ahead_kb) and also let a random reader
    # take the tensor right after one it read, which is common (a layer's
    # weight, then its bias) and no sign of a whole-file load.
    crossing_margin: int = 8 * MiB
    # Streams tracked per file: about one per loader thread or process.
    max_streams: int = 32


@dataclasses.dataclass(frozen=True)
class MountConfig:
    mountpoint: str
    cache_dir: str
    allow_other: bool = False
    # Decoded chunks kept in memory, in bytes. The SSD cache holds the rest,
    # so this bounds resident memory rather than speed: 192 MiB is 24
    # chunks of the default 8 MiB. Chunks in flight from the store come on
    # top: with 192 MiB a cold 2 GiB load from S3 peaked at 337 MiB
    # resident, with 256 MiB at 410 MiB, at the same speed
    # (scripts/bench.py, 2-core VM).
    memory_limit: int = 192 * MiB
    # The SSD cache cap: a byte count, or else a share of the cache
    # directory's filesystem, resolved at start.
    cache_bytes: int | None = None
    cache_share: float = 0.2
    # Threads that decompress and verify chunks at once. Decoding is
    # CPU-bound and zstd releases the GIL, so one per core keeps all busy.
    decode_workers: int = max(1, os.cpu_count() or 1)
    # The kernel caches attributes and names this long; files never change.
    attr_timeout_s: float = 3600.0
    # The mount's read-ahead, written to /sys/class/bdi/<dev>/read_ahead_kb.
    # 1 MiB matches the largest FUSE read request (256 pages), so the kernel
    # sends whole 1 MiB reads ahead of a sequential reader; longer reach
    # comes from the prefetcher, which knows where tensors end. Mapped files
    # also fault this much around each missed page, so a larger value costs
    # bytes on random access. 0 leaves the kernel default.
    read_ahead_kb: int = 1024
    # Background requests the kernel queues to this mount before it stalls
    # read-ahead (its default is 12), written to
    # /sys/fs/fuse/connections/<dev>/max_background. 0 leaves the default.
    max_background: int = 64
    # Seconds between re-reads of the model listing; new opens see models
    # pushed, replaced or removed since. 0 reads the listing only at start.
    refresh_interval_s: float = 60.0
    # Address (host, port) of the Prometheus endpoint; None turns it off.
    metrics_address: tuple[str, int] | None = None
    prefetch: PrefetchConfig = PrefetchConfig()
    retry: RetryConfig = RetryConfig()


def parse_cache_size(text: str) -> tuple[int | None, float]:
    """Parse ``--cache-size``: a byte count such as ``20G``, or a share such as ``20%``."""
    if text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise UsageError(
                f"invalid cache size {text!r}: a share must be above 0% and at most 100%"
            )
        return None, share
    return parse_size(text), 0.0

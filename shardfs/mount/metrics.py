"""Latency histograms and the Prometheus text format of the daemon's figures.

The figures themselves are the counters of the chunk source and the FUSE
operations; this module only renders them, following the Prometheus text
exposition format (version 0.0.4).
"""

import bisect

# Seconds; from a page-cache-speed disk hit to a slow store request.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Histogram:
    """Counts of observed durations by upper bound, as Prometheus histograms keep them."""

    def __init__(self, buckets=LATENCY_BUCKETS_S):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total}")
        lines.append(f"{name}_count {self.count}")
        return lines


# Counter name in the status figures -> (metric name, type, help).
_METRICS = {
    "reads": ("shardfs_reads_total", "counter", "FUSE read requests served"),
    "bytes_read": ("shardfs_read_bytes_total", "counter", "Bytes returned to readers"),
    "read_errors": ("shardfs_read_errors_total", "counter", "Reads that failed with an errno"),
    "chunks_fetched": ("shardfs_fetches_total", "counter", "Chunk requests sent to the store"),
    "bytes_fetched": ("shardfs_fetched_bytes_total", "counter", "Stored bytes received from the store"),
    "prefetch_fetches": ("shardfs_prefetch_fetches_total", "counter", "Store requests made by read-ahead"),
    "memory_hits": ("shardfs_memory_hits_total", "counter", "Chunk lookups served from memory"),
    "disk_hits": ("shardfs_disk_hits_total", "counter", "Chunk lookups served from the disk cache"),
    "disk_read_ahead": (
        "shardfs_disk_read_ahead_total", "counter", "Cache files read ahead into the page cache"
    ),
    "retries": ("shardfs_retries_total", "counter", "Store requests retried after a transient failure"),
    "corrupt_chunks": ("shardfs_corrupt_chunks_total", "counter", "Chunks that failed verification"),
    "failed_chunks": ("shardfs_failed_chunks_total", "counter", "Chunks no good copy was found for"),
    "abandoned_fetches": (
        "shardfs_abandoned_fetches_total", "counter",
        "Store requests still running when their reader stopped waiting",
    ),
    "fetches_in_flight": (
        "shardfs_fetches_in_flight", "gauge", "Store requests running now on a connection slot"
    ),
    "abandoned_in_flight": (
        "shardfs_abandoned_fetches_in_flight", "gauge",
        "Abandoned store requests running now without a connection slot",
    ),
    "store_failovers": (
        "shardfs_store_failovers_total", "counter",
        "Store reads served by a member other than the one first in line for the object",
    ),
    "unhealthy_members": (
        "shardfs_store_members_unhealthy", "gauge",
        "Store members marked unhealthy, which reads try last",
    ),
    "memory_bytes": ("shardfs_memory_cache_bytes", "gauge", "Decoded chunk bytes held in memory"),
    "disk_cache_bytes": ("shardfs_disk_cache_bytes", "gauge", "Bytes held in the disk cache"),
    "disk_cache_limit_bytes": ("shardfs_disk_cache_limit_bytes", "gauge", "Disk cache cap"),
    "models": ("shardfs_models", "gauge", "Models served"),
}


def render_prometheus(figures: dict, read_latency: Histogram, fetch_latency: Histogram) -> str:
    """Return *figures* and the two histograms in the Prometheus text format."""
    lines = []
    for key, (name, kind, help_text) in _METRICS.items():
        if key in figures:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {figures[key]}"]
    lines += read_latency.render("shardfs_read_seconds", "Time to serve a FUSE read")
    lines += fetch_latency.render("shardfs_fetch_seconds", "Time of one chunk request to the store")
    return "\n".join(lines) + "\n"

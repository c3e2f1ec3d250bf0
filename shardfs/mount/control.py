"""The daemon side of the control channel: status, warm-up and metrics.

`ControlServer.serve` listens on the mount's control socket (see
`shardfs.control_protocol`) and, if configured, on a Prometheus metrics
address. It runs in the daemon's nursery, in the trio thread, and reads the
same objects the FUSE operations use.
"""

import json
import logging
import os
import socket
import struct
from collections.abc import Iterable

import trio

from shardfs import control_protocol
from shardfs.errors import UsageError
from shardfs.manifest import ChunkRef
from shardfs.mount.chunk_source import ChunkSource
from shardfs.mount.metrics import render_prometheus
from shardfs.mount.priority import PREFETCH
from shardfs.stores.placed import PlacedStore

log = logging.getLogger(__name__)

# Warm-up progress is sent at most this often, in seconds.
PROGRESS_INTERVAL_S = 0.2
# Largest request line accepted on the control socket.
MAX_REQUEST_BYTES = 64 * 1024
# Failure messages a warm-up reply carries; the count covers all of them.
MAX_WARM_FAILURES = 100


class ControlServer:
    def __init__(self, mountpoint, operations, chunks, tree, max_connections: int):
        self._mountpoint = mountpoint
        self._operations = operations
        self._chunks = chunks
        self._tree = tree
        self._warm_workers = max(1, max_connections)
        self._uid = os.getuid()
        self.path = control_protocol.socket_path(mountpoint)
        self._metrics_socket: socket.socket | None = None

    def figures(self) -> dict:
        """Return the daemon's counters and gauges, as status and metrics show them."""
        chunks = self._chunks
        stats = {
            "mountpoint": self._mountpoint,
            "models": len(self._tree.models),
            "reads": self._operations.reads,
            "bytes_read": self._operations.bytes_read,
            "read_errors": self._operations.read_errors,
            "fetches_in_flight": chunks.connections.in_use,
            "abandoned_in_flight": chunks.abandoned_in_flight,
            "memory_bytes": chunks.memory.size_bytes,
            "disk_cache_bytes": chunks.disk.size_bytes if chunks.disk else 0,
            "disk_cache_limit_bytes": chunks.disk.limit_bytes if chunks.disk else 0,
        }
        stats.update(vars(chunks.stats))
        if isinstance(chunks.store, PlacedStore):
            stats["store_members"] = len(chunks.store.members)
            stats["unhealthy_members"] = chunks.store.unhealthy_members()
            stats["store_failovers"] = chunks.store.failovers
        lookups = stats["memory_hits"] + stats["disk_hits"] + stats["chunks_fetched"]
        stats["cache_hit_ratio"] = (
            (stats["memory_hits"] + stats["disk_hits"]) / lookups if lookups else 0.0
        )
        return stats

    def model_figures(self) -> list[dict]:
        """Return each model's size and the share of it held in the caches."""
        result = []
        for name, manifest in sorted(self._tree.models.items()):
            cached = sum(
                chunk.length
                for entry in manifest.files
                for chunk in entry.chunks
                if self._chunks.is_cached(chunk.key)
            )
            size = manifest.size
            result.append(
                {"name": name, "files": len(manifest.files), "size": size, "cached": cached}
            )
        return result

    def bind_metrics(self, address: tuple[str, int] | None) -> None:
        """Bind the metrics address now; raise `UsageError` if it cannot be used."""
        if address is None:
            return
        host, port = address
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise UsageError(
                f"cannot serve metrics at {host}:{port}: {exc.strerror}"
            ) from None
        self._metrics_socket = sock
        log.info("metrics at http://%s:%d/metrics", host, port)

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            listener = await self._listen()
            nursery.start_soon(trio.serve_listeners, self._handle, [listener])
            if self._metrics_socket is not None:
                metrics = trio.SocketListener(trio.socket.from_stdlib_socket(self._metrics_socket))
                nursery.start_soon(trio.serve_listeners, self._handle_metrics, [metrics])

    async def _listen(self) -> trio.SocketListener:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        return trio.SocketListener(sock)

    def _peer_allowed(self, stream: trio.SocketStream) -> bool:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return uid in (0, self._uid)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if not self._peer_allowed(stream):
                await self._send(stream, {"error": "permission denied: not root or the mount's owner"})
                return
            try:
                message = json.loads(await _receive_line(stream))
                operation = message.get("op")
                if operation == "status":
                    reply = self.figures()
                    reply["model_list"] = self.model_figures()
                    reply["done"] = True
                    await self._send(stream, reply)
                elif operation == "warm":
                    await self._warm(stream, message.get("paths", []))
                else:
                    await self._send(stream, {"error": f"unknown request {operation!r}"})
            except (ValueError, AttributeError, TypeError) as exc:
                await self._send(stream, {"error": f"invalid request: {exc}"})
            except trio.BrokenResourceError:
                log.debug("control client went away")

    async def _send(self, stream: trio.SocketStream, reply: dict) -> None:
        await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def _warm(self, stream: trio.SocketStream, paths: list[str]) -> None:
        entries, missing = self._resolve(paths)
        if missing:
            await self._send(stream, {"error": f"not found under the mount: {', '.join(missing)}"})
            return
        if self._chunks.disk is None:
            await self._send(stream, {"error": "the disk cache is unusable, so nothing can be warmed"})
            return

        chunks: dict[str, ChunkRef] = {}
        where: dict[str, str] = {}
        for entry in entries:
            for chunk in entry.chunks:
                chunks.setdefault(chunk.key, chunk)
                where.setdefault(chunk.key, entry.path)
        progress = new_warm_progress(self._chunks, chunks.values())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_progress, stream, progress)
            await warm_chunks(self._chunks, list(chunks.values()), where, self._warm_workers, progress)
            nursery.cancel_scope.cancel()
        log.info(
            "warmed %s: %d of %d bytes in the disk cache, %d chunks failed, "
            "%d fetched but not kept",
            ", ".join(paths),
            progress["resident_bytes"],
            progress["total"],
            progress["failed_chunks"],
            progress["not_kept_chunks"],
        )
        progress["done"] = True
        await self._send(stream, progress)

    async def _report_progress(self, stream, progress) -> None:
        while True:
            await self._send(stream, dict(progress))
            await trio.sleep(PROGRESS_INTERVAL_S)

    def _resolve(self, paths: list[str]):
        """Return the file entries under the relative *paths*, and paths not found."""
        entries, missing = [], []
        for path in paths:
            node = self._tree.node(1)
            for name in (part for part in path.strip("/").split("/") if part):
                node = self._tree.lookup(node.inode, name) if node is not None else None
            if node is None:
                missing.append(path)
                continue
            entries.extend(self._files_under(node))
        return entries, missing

    def _files_under(self, node):
        if not node.is_dir:
            return [node.entry]
        files = []
        for inode in node.children.values():
            files.extend(self._files_under(self._tree.node(inode)))
        return files

    async def _handle_metrics(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                request = await _receive_line(stream)
            except (ValueError, trio.BrokenResourceError):
                return
            if not request.startswith(b"GET /metrics"):
                await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            body = render_prometheus(
                self.figures(), self._operations.read_latency, self._chunks.fetch_latency
            ).encode()
            header = (
                "HTTP/1.1 200 OK\r\n"
                "Content-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            try:
                await stream.send_all(header.encode() + body)
            except trio.BrokenResourceError:
                pass


def new_warm_progress(source: ChunkSource, chunks: Iterable[ChunkRef]) -> dict:
    """Return the progress of a warm-up of *chunks* before it starts, as sent to the client."""
    chunks = list(chunks)
    cached = sum(chunk.length for chunk in chunks if source.disk_holds(chunk.key))
    return {
        "total": sum(chunk.length for chunk in chunks),
        "cached_before": cached,
        # Bytes of the chunks that were tried or already cached.
        "done_bytes": cached,
        # Chunks whose fetch failed.
        "failed_chunks": 0,
        "failed_bytes": 0,
        # The first MAX_WARM_FAILURES failures, as "path: error".
        "failed": [],
        # Chunks fetched that the disk cache cannot write, because it is off,
        # the chunk is larger than its cap, or a write failed before.
        "not_kept_chunks": 0,
        "not_kept_bytes": 0,
    }


async def warm_chunks(
    source: ChunkSource,
    chunks: list[ChunkRef],
    where: dict[str, str],
    workers: int,
    progress: dict,
) -> None:
    """Fetch each of *chunks* into the disk cache and record the outcome in *progress*.

    Every chunk is tried, whatever became of the others, with the chunk
    source's retries. A chunk fails when its fetch fails. A fetched chunk
    that the disk cache cannot write counts as not kept: the cache is off
    (a cap of 0), the chunk is larger than the cap, or a write failed
    before. The reply gives the cap and whether a write failed, so that the
    client can name the cause. At the end, ``resident_bytes`` counts only
    the chunks that the disk cache contains then, because a cache smaller
    than *chunks* evicts some of them again.
    *where* names the file of each chunk key for messages.
    """

    def fail(chunk: ChunkRef, reason: str) -> None:
        progress["failed_chunks"] += 1
        progress["failed_bytes"] += chunk.length
        if len(progress["failed"]) < MAX_WARM_FAILURES:
            progress["failed"].append(f"{where[chunk.key]}: {reason}")

    async def worker(receive: trio.MemoryReceiveChannel) -> None:
        async with receive:
            async for chunk in receive:
                try:
                    await source.ensure_on_disk(chunk, PREFETCH)
                except Exception as exc:
                    fail(chunk, str(exc))
                else:
                    # A chunk that is gone again at once was either evicted,
                    # which the final count covers, or never written.
                    if not source.disk_holds(chunk.key) and not source.disk.can_hold(chunk.length):
                        progress["not_kept_chunks"] += 1
                        progress["not_kept_bytes"] += chunk.length
                progress["done_bytes"] += chunk.length

    pending = [chunk for chunk in chunks if not source.disk_holds(chunk.key)]
    async with trio.open_nursery() as nursery:
        send, receive = trio.open_memory_channel(0)
        async with receive:
            for _ in range(workers):
                nursery.start_soon(worker, receive.clone())
        async with send:
            for chunk in pending:
                await send.send(chunk)
    resident = [chunk for chunk in chunks if source.disk_holds(chunk.key)]
    progress["resident_bytes"] = sum(chunk.length for chunk in resident)
    progress["resident"] = len(resident) == len(chunks)
    progress["disk_cache_limit_bytes"] = source.disk.limit_bytes
    progress["disk_write_failed"] = source.disk.write_failed


async def _receive_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        block = await stream.receive_some(4096)
        if not block:
            break
        data += block
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]

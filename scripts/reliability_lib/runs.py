"""The runs of the reliability report: one fault or bad input each, on a fresh mount."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import fault_harness
from fault_harness import (
    CHUNK_SIZE,
    LOAD_SCRIPT,
    RANDOM_PREAD_SCRIPT,
    RAW_PATH,
    SAFETENSORS_NAME,
    SAFETENSORS_PATH,
    TORCH_NAME,
    TORCH_PATH,
    WHOLE_READ_SCRIPT,
    FaultPlan,
    PlannedProxy,
    PushedStore,
    Sources,
    large_manifests,
    nested_manifest,
    push,
    tmpfs,
)
from reliability_lib.mounts import Daemon, running
from reliability_lib.readers import (
    describe_chunk_reads,
    describe_error,
    describe_load,
    describe_stat,
    describe_whole_read,
    last_line,
    read_chunks_at_once,
    read_whole,
    run_script,
)
from reliability_lib.report import Row
from s3proxy import Fault
from shardfs import manifest as manifest_module

MIB = 1024 * 1024

# The read deadline of runs that expect a read to fail, and the time a
# failing read may take past it (the last attempt's cancellation and the
# kernel's retry of the failed page).
READ_TIMEOUT_S = 3.0
DEADLINE_SLACK_S = 1.0

TRANSIENT_DELAY_S = 0.5


def describe_daemon(daemon: Daemon, extra: str = "") -> tuple[str, bool]:
    if daemon.start_error is not None:
        reason = textwrap.shorten(daemon.start_error, width=240, placeholder=" ...")
        return f"no: did not start ({reason})", False
    if not daemon.alive():
        return f"no: exited with {daemon.process.returncode}", False
    return f"yes{extra}", True


class Runner:
    """Runs the rows of the report against one pushed store, through one proxy."""

    def __init__(self, work: str, endpoint: str, sources: Sources, pushed: PushedStore):
        self.work = work
        self.sources = sources
        self.pushed = pushed
        self.rows: list[Row] = []
        # Words that select runs by section and label. With none, every run runs.
        self.only: list[str] = []
        self._runs = 0
        self.proxy = PlannedProxy(endpoint)
        self.proxy.start()

    def close(self) -> None:
        self.proxy.close()

    def mountpoint(self, label: str) -> str:
        self._runs += 1
        return os.path.join(self.work, f"run{self._runs:02d}-{label}", "mnt")

    def add(self, section: str, fault: str, how_often: str, saw, daemon) -> None:
        """Add a row. *saw* and *daemon* are (phrase, promise kept) pairs."""
        row = Row(
            section,
            fault,
            how_often,
            self._scrub(saw[0]),
            self._scrub(daemon[0]),
            saw[1] and daemon[1],
        )
        self.rows.append(row)
        kept = "kept" if row.promise_kept else "BROKEN"
        print(f"[{section}] {fault} | {how_often} | {saw[0]} | {daemon[0]} | {kept}", flush=True)

    def _scrub(self, text: str) -> str:
        """Replace the names that change from run to run, so reports compare line by line."""
        bucket = self.pushed.url.removeprefix("s3://").split("/", 1)[0]
        return text.replace(self.work, "WORK").replace(bucket, "BUCKET")

    def guarded(self, section: str, label: str, run) -> None:
        """Call *run* unless `only` leaves it out. A failure of the run itself becomes a row."""
        name = f"{section} {label}"
        if self.only and not any(word in name for word in self.only):
            return
        try:
            run()
        except Exception as exc:
            saw = (f"run failed: {type(exc).__name__}: {exc}", False)
            self.add(section, label, "", saw, ("unknown", False))
        finally:
            self.proxy.plan = None
            self.proxy.delay_s = 0.0
            self.proxy.reset()

    # Transient faults under the real loaders

    def transient(self, kind: str, rate: float, failures: int) -> None:
        plan = FaultPlan(
            (kind,),
            rate,
            self.pushed.stored_lengths(),
            failures=failures,
            delay_s=TRANSIENT_DELAY_S,
            seed=1,
        )
        self.proxy.plan = plan
        with running(self.pushed.url, self.mountpoint(kind), endpoint=self.proxy.url) as daemon:
            if daemon.start_error is not None:
                saw = ("mount did not start", False)
            else:
                load = run_script(LOAD_SCRIPT, daemon.path(TORCH_PATH), daemon.path(SAFETENSORS_PATH))
                load_saw = describe_load(load, self.sources)
                raw_saw = describe_whole_read(
                    read_whole(daemon.path(RAW_PATH)), self.sources.raw, "24 MiB file"
                )
                saw = (f"{load_saw[0]}; {raw_saw[0]}", load_saw[1] and raw_saw[1])
            up = describe_daemon(daemon)
        attempts = "first attempt" if failures == 1 else f"first {failures} attempts"
        delay = f" by {TRANSIENT_DELAY_S} s" if kind == fault_harness.DELAY else ""
        how = (
            f"{rate:.0%} of chunks, {attempts}{delay}: "
            f"{plan.injected[kind]} of {plan.chunk_requests} chunk GETs"
        )
        self.add("transient", fault_harness.DESCRIPTIONS[kind], how, saw, up)

    def mixed_random_reads(self, seconds: float) -> None:
        plan = FaultPlan(
            fault_harness.KINDS, 0.2, self.pushed.stored_lengths(), failures=2, delay_s=0.3, seed=3
        )
        self.proxy.plan = plan
        options = ["--memory-limit", "16MiB", "--cache-size", "0", "--read-timeout", "20"]
        mountpoint = self.mountpoint("mixed")
        with running(self.pushed.url, mountpoint, *options, endpoint=self.proxy.url) as daemon:
            pairs = []
            for relative, source in (
                (RAW_PATH, self.sources.raw),
                (SAFETENSORS_PATH, self.sources.safetensors),
                (TORCH_PATH, self.sources.checkpoint),
            ):
                pairs += [daemon.path(relative), source]
            status, stdout, stderr, _ = run_script(
                RANDOM_PREAD_SCRIPT, "16", str(seconds), str(CHUNK_SIZE), *pairs
            )
            up = describe_daemon(daemon)
        if status != 0:
            saw = (f"readers failed: {last_line(stderr)[:160]}", False)
        else:
            summary = json.loads(stdout)
            totals = summary["totals"]
            text = (
                f"{totals['reads']} preads, {totals['bytes'] / MIB:.0f} MiB: "
                f"{summary['mismatch_count']} wrong, {summary['error_count']} errors"
            )
            if summary["errors"]:
                text += f" (first: {summary['errors'][0][:120]})"
            saw = (text, summary["mismatch_count"] == 0 and summary["error_count"] == 0)
        spoiled = ", ".join(f"{count} {kind}" for kind, count in sorted(plan.injected.items()))
        how = (
            "20% of chunk fetches, first 2 attempts, kinds mixed; "
            f"16 threads for {seconds:.0f} s, 16 MiB memory, no disk cache: "
            f"{spoiled} of {plan.chunk_requests} chunk GETs"
        )
        self.add("transient", "all of the above, mixed", how, saw, up)

    # Faults that persist

    def persistent(self) -> None:
        entry = self.pushed.entries[RAW_PATH]
        kinds = fault_harness.KINDS
        broken = {kind: entry.chunks[4 * index + 2] for index, kind in enumerate(kinds)}
        plan = FaultPlan(
            (),
            0.0,
            self.pushed.stored_lengths(),
            delay_s=READ_TIMEOUT_S + 2,
            persistent={chunk.key: kind for kind, chunk in broken.items()},
        )
        self.proxy.plan = plan
        options = ["--read-timeout", str(READ_TIMEOUT_S)]
        mountpoint = self.mountpoint("persistent")
        with running(self.pushed.url, mountpoint, *options, endpoint=self.proxy.url) as daemon:
            results = read_chunks_at_once(daemon.path(RAW_PATH), list(broken.values()))
            other = describe_whole_read(
                read_whole(daemon.path(SAFETENSORS_PATH)), self.sources.safetensors, "another file"
            )
            daemon_saw, daemon_ok = describe_daemon(daemon, f"; {other[0]}")
            up = (daemon_saw, daemon_ok and other[1])
        for kind, chunk in broken.items():
            result, seconds = results[chunk.key]
            if isinstance(result, OSError):
                in_time = seconds <= READ_TIMEOUT_S + DEADLINE_SLACK_S
                saw = (
                    f"{describe_error(result)} after {seconds:.1f} s",
                    result.errno == errno.EIO and in_time,
                )
            else:
                saw = (f"{len(result)} bytes after {seconds:.1f} s", False)
            description = fault_harness.DESCRIPTIONS[kind]
            if kind == fault_harness.DELAY:
                description = f"reply delayed by {READ_TIMEOUT_S + 2:.0f} s"
            how = (
                f"every GET of one chunk, --read-timeout {READ_TIMEOUT_S:.0f}: "
                f"{count(plan.injected[kind], 'GET')}"
            )
            self.add("persistent", description, how, saw, up)

    def abandoned_requests(self) -> None:
        connections = 4
        read_timeout_s = 1.0
        entry = self.pushed.entries[RAW_PATH]
        stalled = entry.chunks[:connections]
        later = entry.chunks[connections : 2 * connections]
        self.proxy.plan = FaultPlan(
            (),
            0.0,
            self.pushed.stored_lengths(),
            delay_s=3 * read_timeout_s,
            persistent={chunk.key: fault_harness.DELAY for chunk in stalled},
        )
        options = [
            "--max-connections", str(connections),
            "--read-timeout", str(read_timeout_s),
            "--no-prefetch",
        ]

        mountpoint = self.mountpoint("abandoned")
        with running(self.pushed.url, mountpoint, *options, endpoint=self.proxy.url) as daemon:
            stalled_results = read_chunks_at_once(daemon.path(RAW_PATH), stalled)
            later_results = read_chunks_at_once(daemon.path(RAW_PATH), later)
            up = describe_daemon(daemon)

        stalled_saw = describe_chunk_reads(stalled_results, stalled, self.sources.raw)
        later_saw = describe_chunk_reads(later_results, later, self.sources.raw)
        in_flight = self.proxy.max_chunk_gets_in_flight()
        # Abandoned requests run without a connection slot, up to as many
        # again as --max-connections, so the other chunks read at once.
        limit = 2 * connections
        later_exact = all(isinstance(result, bytes) for result, _ in later_results.values())
        saw = (
            f"delayed chunks: {stalled_saw[0]}; other chunks: {later_saw[0]}; "
            f"{in_flight} chunk GETs in flight at once (limit {limit})",
            stalled_saw[1] and later_saw[1] and later_exact and in_flight <= limit,
        )
        self.add(
            "persistent",
            f"replies delayed by {3 * read_timeout_s:.0f} s on 4 chunks, then 4 other chunks read",
            f"every GET of the 4 chunks, --read-timeout {read_timeout_s:.0f}, "
            f"--max-connections {connections}, no prefetch",
            saw,
            up,
        )

    # Manifests and the listing

    def manifest_throttled_at_start(self) -> None:
        manifest_key = f"/models/{TORCH_NAME}/manifest.json"
        first_chunk = self.pushed.entries[TORCH_PATH].chunks[0].key
        self.proxy.add_fault(
            Fault(status=503),
            match=lambda request: request.method == "GET" and request.path.endswith(manifest_key),
            count=3,
        )
        self.proxy.add_fault(
            Fault(status=503),
            match=lambda request: request.is_chunk_get and request.key == first_chunk,
            count=3,
        )
        started = time.monotonic()
        mountpoint = self.mountpoint("manifest-503-x3")
        with running(self.pushed.url, mountpoint, endpoint=self.proxy.url) as daemon:
            ready_s = time.monotonic() - started
            if daemon.start_error is not None:
                saw = ("mount did not start", False)
            else:
                stat_saw, stat_errno = describe_stat(daemon.path(TORCH_PATH))
                read_saw = describe_whole_read(
                    read_whole(daemon.path(TORCH_PATH)), self.sources.checkpoint, "read"
                )
                saw = (
                    f"ready in {ready_s:.1f} s; {stat_saw}; {read_saw[0]}",
                    stat_errno is None and read_saw[1],
                )
            up = describe_daemon(daemon)
        self.add(
            "manifests",
            "HTTP 503 SlowDown on a manifest and a chunk at start",
            "first 3 GETs of the manifest and of the file's first chunk",
            saw,
            up,
        )

    def manifest_truncated_at_start(self) -> None:
        manifest_key = f"/models/{TORCH_NAME}/manifest.json"
        self.proxy.add_fault(
            Fault(truncate_to=10),
            match=lambda request: request.method == "GET" and request.path.endswith(manifest_key),
            count=1,
        )
        mountpoint = self.mountpoint("manifest-truncated")
        with running(self.pushed.url, mountpoint, endpoint=self.proxy.url) as daemon:
            if daemon.start_error is not None:
                saw = ("no mount, so no model is served", False)
            else:
                saw = describe_whole_read(
                    read_whole(daemon.path(TORCH_PATH)), self.sources.checkpoint, "read"
                )
            up = describe_daemon(daemon)
        self.add(
            "manifests",
            "body of a manifest cut to 10 bytes at start",
            "the first GET of one manifest",
            saw,
            up,
        )

    def manifest_throttled_for_good(self) -> None:
        manifest_key = f"/models/{SAFETENSORS_NAME}/manifest.json"
        self.proxy.add_fault(
            Fault(status=503),
            match=lambda request: request.method == "GET" and request.path.endswith(manifest_key),
            count=None,
        )
        mountpoint = self.mountpoint("manifest-503-always")
        options = ["--refresh-interval", "0.5"]
        with running(self.pushed.url, mountpoint, *options, endpoint=self.proxy.url) as daemon:
            if daemon.start_error is not None:
                saw = ("no mount, so the other models are not served either", False)
            else:
                during, during_errno = describe_stat(daemon.path(SAFETENSORS_PATH))
                self.proxy.reset()
                time.sleep(2)
                after, after_errno = describe_stat(daemon.path(SAFETENSORS_PATH))
                saw = (
                    f"{during}; 2 s after the store recovers: {after}",
                    during_errno in (errno.EIO, errno.EAGAIN) and after_errno is None,
                )
            up = describe_daemon(daemon)
        self.add(
            "manifests",
            "HTTP 503 SlowDown on one model's manifest at start, for good",
            "every GET of that manifest; the other two models answer",
            saw,
            up,
        )

    def listing_throttled_at_refresh(self) -> None:
        mountpoint = self.mountpoint("listing-503")
        options = ["--refresh-interval", "0.2"]
        with running(self.pushed.url, mountpoint, *options, endpoint=self.proxy.url) as daemon:
            if daemon.start_error is not None:
                saw = ("mount did not start", False)
            else:
                self.proxy.add_fault(Fault(status=503), match=is_listing_or_manifest, count=None)
                # botocore backs off about a second per throttled attempt, so
                # the first refresh fails a few seconds after the faults start.
                deadline = time.monotonic() + 30
                while not daemon.lines("WARNING", "listing the store failed"):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                stat_saw, stat_errno = describe_stat(daemon.path(SAFETENSORS_PATH))
                read_saw = describe_whole_read(
                    read_whole(daemon.path(SAFETENSORS_PATH)), self.sources.safetensors, "read"
                )
                failures = len(daemon.lines("WARNING", "listing the store failed"))
                saw = (
                    f"{stat_saw}; {read_saw[0]}; "
                    f"{count(failures, 'warning line')} for the failed refreshes",
                    stat_errno is None and read_saw[1],
                )
            up = describe_daemon(daemon)
        self.add(
            "manifests",
            "HTTP 503 SlowDown on the listing and every manifest, while mounted",
            "every listing and manifest GET, refresh every 0.2 s, until a refresh has failed",
            saw,
            up,
        )

    def bad_manifests(self) -> None:
        store = os.path.join(self.work, "bad-store")
        push(store, self.sources.checkpoint, "org/good")
        with open(os.path.join(store, "models", "org/good", "manifest.json"), "rb") as file:
            good = json.loads(file.read())
        cases = large_manifests(
            good, manifest_module.MAX_MANIFEST_BYTES, manifest_module.MAX_FILES
        )
        cases.update(small_bad_manifests(good))
        for name, data in cases.items():
            write_manifest(store, name, data)
        with running(store, self.mountpoint("bad-manifests")) as daemon:
            if daemon.start_error is None:
                good_saw = describe_whole_read(
                    read_whole(daemon.path("org/good/model.pt")),
                    self.sources.checkpoint,
                    "good model",
                )
            for name, data in cases.items():
                if daemon.start_error is not None:
                    saw = ("no mount", False)
                else:
                    saw = self._rejection(daemon, name, good_saw)
                size = f"{len(data) / MIB:.0f} MiB" if len(data) >= MIB else f"{len(data)} bytes"
                up = describe_daemon(daemon)
                self.add("manifests", f"manifest {name}", f"once, {size}", saw, up)

    def _rejection(self, daemon: Daemon, name: str, good_saw: tuple[str, bool]):
        lines = [
            line
            for line in daemon.log_text().splitlines()
            if line.startswith(("WARNING", "ERROR")) and name in line
        ]
        hidden = not os.path.lexists(daemon.path(name))
        shown = "absent" if hidden else "PRESENT"
        text = f"{shown}, {count(len(lines), 'log line')}; {good_saw[0]}"
        return text, hidden and len(lines) == 1 and good_saw[1]

    def nested_manifest_at_start(self, case: str) -> None:
        store = os.path.join(self.work, f"nested-{case}")
        push(store, self.sources.checkpoint, "org/good")
        name = f"bad/{case}"
        write_manifest(store, name, nested_manifest(case, name))
        with running(store, self.mountpoint(f"nested-{case}")) as daemon:
            if daemon.start_error is not None:
                saw = ("no mount, so the good model is not served either", False)
            else:
                good_saw = describe_whole_read(
                    read_whole(daemon.path("org/good/model.pt")),
                    self.sources.checkpoint,
                    "good model",
                )
                saw = self._rejection(daemon, name, good_saw)
            up = describe_daemon(daemon)
        depth = f"{fault_harness.NESTING_DEPTH:,} levels"
        self.add("manifests", f"manifest {name} ({depth}) at start", "once", saw, up)

    def nested_manifest_at_refresh(self) -> None:
        store = os.path.join(self.work, "nested-refresh")
        push(store, self.sources.checkpoint, "org/good")
        mountpoint = self.mountpoint("nested-refresh")
        with running(store, mountpoint, "--refresh-interval", "0.2") as daemon:
            if daemon.start_error is not None:
                saw = ("mount did not start", False)
            else:
                write_manifest(store, "bad/nested", nested_manifest("nested-arrays", "bad/nested"))
                time.sleep(1)
                push(store, self.sources.safetensors, "org/later")
                later = daemon.path("org/later/model.safetensors")
                deadline = time.monotonic() + 5
                while not os.path.exists(later) and time.monotonic() < deadline:
                    time.sleep(0.1)
                appeared = os.path.exists(later)
                stopped = bool(daemon.lines("ERROR", "listing refresh failed"))
                text = f"a model pushed 1 s later {'appears' if appeared else 'NEVER APPEARS'}"
                text += " within 5 s" + (" (the refresh task stopped)" if stopped else "")
                saw = (text, appeared)
            up = describe_daemon(daemon)
        self.add(
            "manifests",
            "manifest bad/nested-arrays added while mounted",
            "once, refresh every 0.2 s",
            saw,
            up,
        )

    # The daemon killed, and cache disks that fail

    def kill_during_load(self) -> None:
        fault = "kill -9 of the daemon during a cold load"
        mountpoint = self.mountpoint("kill-9")
        keys = [chunk.key for chunk in self.pushed.entries[RAW_PATH].chunks]
        # Two connections and 50 ms per request make the cold load take seconds.
        self.proxy.delay_s = 0.05
        daemon = Daemon(
            self.pushed.url, mountpoint, "--max-connections", "2", endpoint=self.proxy.url
        )

        try:
            if not daemon.wait_ready():
                self.add("cache", fault, "", ("", False), describe_daemon(daemon))
                return
            reader = subprocess.Popen(
                [sys.executable, "-c", WHOLE_READ_SCRIPT, daemon.path(RAW_PATH)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60
            while len(cached_keys(daemon.cache_dir)) < len(keys) // 3:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait()
            cached = cached_keys(daemon.cache_dir)
            _, reader_err = reader.communicate(timeout=30)
        finally:
            if daemon.process.poll() is None:
                daemon.kill()

        self.proxy.delay_s = 0.0
        self.proxy.reset()
        with running(self.pushed.url, mountpoint, endpoint=self.proxy.url) as restarted:
            read_saw = describe_whole_read(
                read_whole(restarted.path(RAW_PATH)), self.sources.raw, "read"
            )
            fetched = self.proxy.chunk_gets_by_key()
            refetched = len(set(fetched) & cached)
            saw = (
                f"the reader got: {last_line(reader_err)[-80:]}; after a new mount on the "
                f"same cache: {read_saw[0]}, {sum(fetched.values())} of {len(keys)} chunks "
                f"fetched again, {refetched} of them complete in the cache",
                read_saw[1] and refetched == 0,
            )
            up = describe_daemon(restarted, " (the new daemon)")
        how = f"once, with {len(cached)} of {len(keys)} chunks in the cache"
        self.add("cache", fault, how, saw, up)

    def full_cache_disk(self) -> None:
        mountpoint = self.mountpoint("full-disk")
        options = ["--cache-size", "64M", "--memory-limit", "16MiB"]
        with tmpfs(f"{mountpoint}.cache", "size=4m"):
            with running(self.pushed.url, mountpoint, *options, endpoint=self.proxy.url) as daemon:
                if daemon.start_error is not None:
                    saw = ("mount did not start", False)
                else:
                    first = describe_whole_read(
                        read_whole(daemon.path(RAW_PATH)), self.sources.raw, "first read"
                    )
                    second = describe_whole_read(
                        read_whole(daemon.path(RAW_PATH)), self.sources.raw, "second read"
                    )
                    warnings = len(daemon.lines("WARNING"))
                    saw = (
                        f"{first[0]}; {second[0]}; {count(warnings, 'warning line')}",
                        first[1] and second[1],
                    )
                up = describe_daemon(daemon)
        self.add(
            "cache",
            "cache disk full (4 MiB tmpfs, cap 64 MiB)",
            "every cache write after the disk fills; 24 MiB file read twice",
            saw,
            up,
        )

    def read_only_cache(self) -> None:
        mountpoint = self.mountpoint("read-only-cache")
        with tmpfs(f"{mountpoint}.cache", "size=4m", "ro"):
            with running(self.pushed.url, mountpoint, endpoint=self.proxy.url) as daemon:
                if daemon.start_error is not None:
                    saw = ("no mount, so nothing can be read", False)
                else:
                    read_saw = describe_whole_read(
                        read_whole(daemon.path(RAW_PATH)), self.sources.raw, "read"
                    )
                    warnings = len(daemon.lines("WARNING"))
                    saw = (f"{read_saw[0]}; {count(warnings, 'warning line')}", read_saw[1])
                up = describe_daemon(daemon)
        self.add("cache", "cache directory on a read-only filesystem", "at start", saw, up)


def count(number: int, noun: str) -> str:
    """Return *number* and *noun*, with an "s" unless *number* is 1."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def is_listing_or_manifest(request) -> bool:
    listing = "list-type=2" in request.query
    return request.method == "GET" and (listing or request.path.endswith("/manifest.json"))


def cached_keys(cache_dir: str) -> set[str]:
    """Return the keys of the chunk files in the disk cache under *cache_dir*."""
    keys = set()
    for _, _, names in os.walk(os.path.join(cache_dir, "chunks")):
        keys.update(names)
    return keys


def write_manifest(store: str, name: str, data: bytes) -> None:
    directory = os.path.join(store, "models", name)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "manifest.json"), "wb") as file:
        file.write(data)


def small_bad_manifests(good: dict) -> dict[str, bytes]:
    """Return small manifests that each break one rule, by model name."""

    def edited(name: str, change) -> bytes:
        doc = json.loads(json.dumps(good))
        doc["name"] = name
        change(doc)
        return json.dumps(doc).encode()

    def set_path(path):
        return lambda doc: doc["files"][0].__setitem__("path", path)

    def shift_chunk(delta):
        def change(doc) -> None:
            doc["files"][0]["chunks"][1]["offset"] += delta

        return change

    def size_as_string(doc) -> None:
        doc["files"][0]["size"] = str(doc["files"][0]["size"])

    return {
        "bad/not-json": b'{"format": "shardfs-manifest", "files": [',
        "bad/parent-path": edited("bad/parent-path", set_path("../../escape.bin")),
        "bad/absolute-path": edited("bad/absolute-path", set_path("/etc/passwd")),
        "bad/chunk-gap": edited("bad/chunk-gap", shift_chunk(1)),
        "bad/chunk-overlap": edited("bad/chunk-overlap", shift_chunk(-1)),
        "bad/size-as-string": edited("bad/size-as-string", size_as_string),
    }

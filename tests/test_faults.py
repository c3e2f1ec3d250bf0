"""Loads and reads through a mount while the store and the cache disk misbehave.

The models are pushed once, straight to the moto server, in 256 KiB chunks:
a `torch.save` checkpoint, a safetensors file and a file of random bytes.
Each mount reads through a `PlannedProxy`, which spoils chunk GETs at a set
rate or for good (see `fault_harness`). A read must return the file's exact
bytes, or fail with EIO within the read deadline, and the daemon must stay
up. The property tests of manifest validation need no mount.

The proxy runs in threads of the test process, so loaders that hold the GIL
while they read (safetensors, torch) run in child processes. Plain reads and
preads release the GIL and run here.
"""

import errno
import hashlib
import json
import os
import posixpath
import signal
import subprocess
import sys
import threading
import time

import hypothesis
import pytest
from hypothesis import strategies as st

import fault_harness
from conftest import mounted, needs_fuse, run_shardfs, shardfs_command
from fault_harness import (
    CHUNK_SIZE,
    LOAD_SCRIPT,
    NESTED_MANIFESTS,
    RAW_NAME,
    RANDOM_PREAD_SCRIPT,
    RAW_PATH,
    RAW_SIZE,
    SAFETENSORS_NAME,
    SAFETENSORS_PATH,
    TORCH_NAME,
    TORCH_PATH,
    WHOLE_READ_SCRIPT,
    FaultPlan,
    PlannedProxy,
    PushedStore,
    Sources,
    file_sha256,
    large_manifests,
    nested_manifest,
    push,
    push_models,
    read_source,
    timed_pread,
    tmpfs,
    write_sources,
)
from s3proxy import Fault
from shardfs import manifest as manifest_module
from shardfs.config import RetryConfig
from shardfs.errors import ManifestInvalid
from shardfs.manifest import ChunkRef, FileEntry, Manifest, parse_manifest, to_json

MIB = 1024 * 1024

# The read deadline of the mounts that expect a read to fail.
READ_TIMEOUT_S = 3.0
# Time a failing read may take past the deadline: the last attempt's
# cancellation and the kernel's retry of the failed page.
DEADLINE_SLACK_S = 1.0
# How long a chunk that failed for good keeps failing at once.
FAILURE_TTL_S = RetryConfig().failure_ttl_s

RETRY_LOG = r"retrying chunk"
EIO_LOG = r"read failed with EIO"
ABANDONED_LOG = r"past its read's deadline; it runs on without a connection slot"


# Sources and the pushed store


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Sources:
    return write_sources(str(tmp_path_factory.mktemp("fault-sources")), RAW_SIZE)


@pytest.fixture(scope="module")
def pushed(moto_endpoint, sources) -> PushedStore:
    return push_models(moto_endpoint, sources, "faults")


@pytest.fixture
def proxy(moto_endpoint):
    """A `PlannedProxy` in front of the moto server, with no plan yet."""
    planned = PlannedProxy(moto_endpoint)
    planned.start()
    yield planned
    planned.close()


# Helpers


def run_script(script: str, *arguments: str, timeout_s: float) -> tuple[int, str, str]:
    """Run *script* in a child Python and return its exit status, stdout and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"child timed out after {timeout_s} s: {stderr[-2000:]}")
    return process.returncode, stdout, stderr


def read_text(path: str) -> str:
    with open(path, errors="replace") as file:
        return file.read()


def read_whole(path: str) -> str:
    """Read *path* with the page cache dropped first and return its sha256."""
    with open(path, "rb", buffering=0) as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return hashlib.file_digest(file, "sha256").hexdigest()


def log_lines(mount, level: str, pattern: str) -> list[str]:
    return [
        line
        for line in mount.log_text().splitlines()
        if line.startswith(level) and pattern in line
    ]


def wait_until(condition, timeout_s: float, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting until {description}")
        time.sleep(0.02)


def daemon_stats(mount) -> dict:
    """Ask the daemon for its counters with SIGUSR1 and return them."""
    path = os.path.join(f"{mount.path}.cache", "stats.json")

    def identity():
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_mtime_ns

    before = identity()
    mount.process.send_signal(signal.SIGUSR1)
    wait_until(lambda: identity() not in (None, before), 10, "stats.json is written")
    with open(path) as file:
        return json.load(file)


# Transient faults under real loaders

TRANSIENT_CASES = {
    "http-500": (fault_harness.STATUS_500, 2),
    # botocore backs off about a second per throttled attempt, so one
    # SlowDown per run keeps the load short.
    "http-503-slowdown": (fault_harness.STATUS_503, 1),
    "tcp-reset": (fault_harness.RESET, 2),
    "truncated-body": (fault_harness.TRUNCATED, 2),
    # One flip per run: a chunk damaged twice in one read fails on purpose.
    "flipped-byte": (fault_harness.FLIPPED, 1),
    "delayed-reply": (fault_harness.DELAY, 1),
}


@needs_fuse
@pytest.mark.parametrize("case", list(TRANSIENT_CASES))
def test_loaders_exact_under_transient_faults(pushed, sources, proxy, tmp_path, case):
    kind, failures = TRANSIENT_CASES[case]
    plan = FaultPlan((kind,), 0.3, pushed.stored_lengths(), failures=failures, delay_s=0.5, seed=1)
    proxy.plan = plan

    with mounted(pushed.url, str(tmp_path / "mnt"), endpoint=proxy.url) as mount:
        mount.expect_log(RETRY_LOG)
        status, stdout, stderr = run_script(
            LOAD_SCRIPT,
            os.path.join(mount.path, TORCH_PATH),
            os.path.join(mount.path, SAFETENSORS_PATH),
            timeout_s=90,
        )
        daemon_running = mount.process.poll() is None

    assert status == 0, stderr[-3000:]
    assert json.loads(stdout) == sources.expected_tensors
    assert daemon_running
    assert plan.injected[kind] > 0, f"no {kind} fault was injected"


# Faults that persist


PERSISTENT_KINDS = (
    fault_harness.STATUS_500,
    fault_harness.STATUS_503,
    fault_harness.RESET,
    fault_harness.TRUNCATED,
    fault_harness.FLIPPED,
    # A reply that takes longer than the read deadline.
    fault_harness.DELAY,
)


@needs_fuse
def test_persistent_fault_eio_within_deadline(pushed, sources, proxy, tmp_path):
    entry = pushed.entries[RAW_PATH]
    # Every fourth chunk fails for good, each with its own kind. The chunk
    # after each stays good.
    broken = {kind: entry.chunks[4 * index + 2] for index, kind in enumerate(PERSISTENT_KINDS)}
    persistent = {chunk.key: kind for kind, chunk in broken.items()}
    proxy.plan = FaultPlan(
        (), 0.0, pushed.stored_lengths(), delay_s=READ_TIMEOUT_S + 2, persistent=persistent
    )
    options = ["--read-timeout", str(READ_TIMEOUT_S)]
    results: dict[str, tuple[bytes | OSError, float]] = {}

    with mounted(pushed.url, str(tmp_path / "mnt"), *options, endpoint=proxy.url) as mount:
        mount.expect_log(RETRY_LOG)
        mount.expect_log(EIO_LOG)
        # Requests abandoned at the deadline keep running with their
        # connections, so urllib3 may find its pool full when the reads of
        # other files follow. test_abandoned_requests_free_their_slots
        # checks the limit itself.
        mount.expect_log(r"Connection pool is full")
        mount.expect_log(ABANDONED_LOG)
        path = os.path.join(mount.path, RAW_PATH)

        def read_broken(kind: str) -> None:
            chunk = broken[kind]
            results[kind] = timed_pread(path, chunk.offset, chunk.length)

        threads = [threading.Thread(target=read_broken, args=(kind,)) for kind in broken]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        failed_at = time.monotonic()

        daemon_running = mount.process.poll() is None
        status = run_shardfs("status", "--json", mount.path, timeout=30)
        neighbours_good = []
        for kind, chunk in broken.items():
            after = entry.chunks[entry.chunks.index(chunk) + 1]
            data, _ = timed_pread(path, after.offset, after.length)
            neighbours_good.append(data == read_source(sources.raw, after.offset, after.length))
        other_file_digest = read_whole(os.path.join(mount.path, SAFETENSORS_PATH))

        # Once the store recovers and the failures expire, the chunks read correctly.
        proxy.plan = None
        time.sleep(max(0.0, failed_at + FAILURE_TTL_S - time.monotonic()))
        recovered = {}
        for kind, chunk in broken.items():
            data, _ = timed_pread(path, chunk.offset, chunk.length)
            recovered[kind] = data == read_source(sources.raw, chunk.offset, chunk.length)
        error_lines = log_lines(mount, "ERROR", EIO_LOG)
        mountpoint = mount.path

    for kind, (result, elapsed) in results.items():
        assert isinstance(result, OSError), f"{kind}: read returned {len(result)} bytes"
        assert result.errno == errno.EIO, f"{kind}: {result}"
        assert elapsed <= READ_TIMEOUT_S + DEADLINE_SLACK_S, f"{kind}: EIO after {elapsed:.2f} s"
    assert daemon_running
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["read_errors"] >= len(broken)
    assert all(neighbours_good)
    assert other_file_digest == file_sha256(sources.safetensors)
    assert recovered == {kind: True for kind in broken}
    for kind, chunk in broken.items():
        naming = [line for line in error_lines if chunk.key in line and RAW_PATH in line]
        assert len(naming) == 1, f"{kind}: {error_lines}"
        assert f"bytes {chunk.offset}-" in naming[0], naming[0]
    for line in error_lines:
        assert mountpoint in line, f"the error line does not name the mount: {line}"


@needs_fuse
def test_abandoned_requests_free_their_slots(pushed, sources, proxy, tmp_path):
    connections = 4
    entry = pushed.entries[RAW_PATH]
    stalled = entry.chunks[:connections]
    later = entry.chunks[connections : 2 * connections]
    # Each stalled reply takes three read deadlines, so the requests
    # abandoned at the deadline are still in flight when the later reads
    # start. They run without a connection slot, so the later reads get
    # slots at once, and the abandoned ones are capped at --max-connections.
    read_timeout_s = 1.0
    proxy.plan = FaultPlan(
        (),
        0.0,
        pushed.stored_lengths(),
        delay_s=3 * read_timeout_s,
        persistent={chunk.key: fault_harness.DELAY for chunk in stalled},
    )
    options = [
        "--max-connections", str(connections),
        "--read-timeout", str(read_timeout_s),
        "--no-prefetch",
    ]
    stalled_results = {}
    later_results = {}

    def read_into(results: dict, chunk) -> None:
        results[chunk.key] = timed_pread(path, chunk.offset, chunk.length)

    def read_all(results: dict, chunks) -> None:
        threads = [threading.Thread(target=read_into, args=(results, chunk)) for chunk in chunks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    with mounted(pushed.url, str(tmp_path / "mnt"), *options, endpoint=proxy.url) as mount:
        mount.expect_log(EIO_LOG)
        mount.expect_log(r"Connection pool is full")
        mount.expect_log(ABANDONED_LOG)
        path = os.path.join(mount.path, RAW_PATH)
        read_all(stalled_results, stalled)
        read_all(later_results, later)
        in_flight = proxy.max_chunk_gets_in_flight()
        abandoned_lines = log_lines(mount, "WARNING", ABANDONED_LOG)

    for chunk in stalled:
        result, elapsed = stalled_results[chunk.key]
        assert isinstance(result, OSError) and result.errno == errno.EIO, result
        assert elapsed <= read_timeout_s + DEADLINE_SLACK_S, f"EIO after {elapsed:.2f} s"
    for chunk in later:
        result, _ = later_results[chunk.key]
        assert result == read_source(sources.raw, chunk.offset, chunk.length)
    assert in_flight <= 2 * connections, (
        f"{in_flight} chunk GETs were in flight at once with --max-connections {connections}"
    )
    for chunk in stalled:
        naming = [line for line in abandoned_lines if chunk.key in line]
        assert len(naming) == 1, abandoned_lines


# Manifest throttling


def is_manifest_get(request) -> bool:
    return request.method == "GET" and request.path.endswith("/manifest.json")


def is_listing_request(request) -> bool:
    return request.method == "GET" and "list-type=2" in request.query


@needs_fuse
def test_throttled_start_still_serves(pushed, sources, proxy, tmp_path):
    # Three 503 SlowDown replies to one model's manifest and to its first chunk.
    manifest_path = f"/models/{TORCH_NAME}/manifest.json"
    first_chunk = pushed.entries[TORCH_PATH].chunks[0].key
    proxy.add_fault(
        Fault(status=503),
        match=lambda request: is_manifest_get(request) and request.path.endswith(manifest_path),
        count=3,
    )
    proxy.add_fault(
        Fault(status=503),
        match=lambda request: request.is_chunk_get and request.key == first_chunk,
        count=3,
    )

    with mounted(pushed.url, str(tmp_path / "mnt"), endpoint=proxy.url) as mount:
        mount.expect_log(RETRY_LOG)
        path = os.path.join(mount.path, TORCH_PATH)
        size = os.stat(path).st_size
        digest = read_whole(path)

    throttled = [record for record in proxy.records() if record.status == 503]
    assert len(throttled) == 6
    assert size == os.path.getsize(sources.checkpoint)
    assert digest == file_sha256(sources.checkpoint)


@needs_fuse
def test_truncated_manifest_at_start_still_serves(pushed, sources, proxy, tmp_path):
    # One manifest GET whose body is cut short, as a dropped connection
    # leaves it. botocore does not retry a body that ends early.
    manifest_path = f"/models/{TORCH_NAME}/manifest.json"
    proxy.add_fault(
        Fault(truncate_to=10),
        match=lambda request: is_manifest_get(request) and request.path.endswith(manifest_path),
        count=1,
    )

    with mounted(pushed.url, str(tmp_path / "mnt"), endpoint=proxy.url) as mount:
        digest = read_whole(os.path.join(mount.path, TORCH_PATH))

    assert digest == file_sha256(sources.checkpoint)


@needs_fuse
def test_throttled_manifest_not_enoent(pushed, sources, proxy, tmp_path):
    throttled = f"/models/{SAFETENSORS_NAME}/manifest.json"
    proxy.add_fault(
        Fault(status=503),
        match=lambda request: is_manifest_get(request) and request.path.endswith(throttled),
        count=None,
    )
    options = ["--refresh-interval", "0.5"]

    with mounted(pushed.url, str(tmp_path / "mnt"), *options, endpoint=proxy.url) as mount:
        mount.expect_log(SAFETENSORS_NAME)
        other_digest = read_whole(os.path.join(mount.path, RAW_PATH))
        path = os.path.join(mount.path, SAFETENSORS_PATH)
        try:
            os.stat(path)
            throttled_error = None
        except OSError as exc:
            throttled_error = exc.errno
        proxy.reset()
        started = time.monotonic()
        wait_until(lambda: os.path.exists(path), 5, "the model appears once its manifest reads")
        appeared_after = time.monotonic() - started
        digest = read_whole(path)

    assert other_digest == file_sha256(sources.raw)
    assert throttled_error in (errno.EIO, errno.EAGAIN), errno.errorcode.get(throttled_error)
    assert appeared_after < 2
    assert digest == file_sha256(sources.safetensors)


@needs_fuse
def test_throttled_refresh_keeps_listing(pushed, sources, proxy, tmp_path):
    options = ["--refresh-interval", "0.2"]

    with mounted(pushed.url, str(tmp_path / "mnt"), *options, endpoint=proxy.url) as mount:
        mount.expect_log(r"listing the store failed")
        proxy.add_fault(
            Fault(status=503),
            match=lambda request: is_listing_request(request) or is_manifest_get(request),
            count=None,
        )
        wait_until(
            lambda: log_lines(mount, "WARNING", "listing the store failed"),
            10,
            "a refresh fails",
        )
        time.sleep(0.5)
        path = os.path.join(mount.path, SAFETENSORS_PATH)
        size = os.stat(path).st_size
        digest = read_whole(path)
        proxy.reset()
        wait_until(
            lambda: "listing the store works again" in mount.log_text(),
            10,
            "a refresh succeeds again",
        )
        failure_lines = log_lines(mount, "WARNING", "listing the store failed")

    assert size == os.path.getsize(sources.safetensors)
    assert digest == file_sha256(sources.safetensors)
    assert len(failure_lines) == 1


# Many readers under mixed faults


@needs_fuse
def test_random_preads_exact_under_mixed_faults(pushed, sources, proxy, tmp_path):
    plan = FaultPlan(
        fault_harness.KINDS, 0.2, pushed.stored_lengths(), failures=2, delay_s=0.3, seed=3
    )
    proxy.plan = plan
    # No disk cache and the smallest memory limit, so evicted chunks are
    # fetched again and keep meeting faults.
    options = ["--memory-limit", "16MiB", "--cache-size", "0", "--read-timeout", "20"]

    with mounted(pushed.url, str(tmp_path / "mnt"), *options, endpoint=proxy.url) as mount:
        mount.expect_log(RETRY_LOG)
        pairs = []
        for relative, source in (
            (RAW_PATH, sources.raw),
            (SAFETENSORS_PATH, sources.safetensors),
            (TORCH_PATH, sources.checkpoint),
        ):
            pairs += [os.path.join(mount.path, relative), source]
        status, stdout, stderr = run_script(
            RANDOM_PREAD_SCRIPT, "16", "15", str(CHUNK_SIZE), *pairs, timeout_s=120
        )
        daemon_running = mount.process.poll() is None

    assert status == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["error_count"] == 0, summary["errors"]
    assert summary["mismatch_count"] == 0, summary["mismatches"]
    assert summary["totals"]["reads"] > 500
    assert daemon_running
    for kind in fault_harness.KINDS:
        assert plan.injected[kind] > 0, f"no {kind} fault was injected: {plan.injected}"


# A daemon killed in the middle of a cold load


def cached_chunk_keys(cache_directory: str) -> set[str]:
    keys = set()
    for _, _, names in os.walk(os.path.join(cache_directory, "chunks")):
        keys.update(names)
    return keys


@needs_fuse
def test_restart_after_kill_reuses_cache(pushed, sources, proxy, tmp_path):
    mountpoint = str(tmp_path / "mnt")
    cache_directory = f"{mountpoint}.cache"
    os.makedirs(mountpoint)
    keys = [chunk.key for chunk in pushed.entries[RAW_PATH].chunks]
    # Two connections and 50 ms per request make the cold load take seconds.
    proxy.delay_s = 0.05
    log_path = f"{mountpoint}.first.log"
    command = shardfs_command(
        "--log-level", "INFO", "mount", "--foreground", "--cache-dir", cache_directory,
        "--max-connections", "2", "--endpoint-url", proxy.url, pushed.url, mountpoint,
    )
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    reader = None
    try:
        wait_until(lambda: "is ready" in read_text(log_path), 60, "the first daemon is ready")
        reader = subprocess.Popen(
            [sys.executable, "-c", WHOLE_READ_SCRIPT, os.path.join(mountpoint, RAW_PATH)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: len(cached_chunk_keys(cache_directory)) >= len(keys) // 3,
            60,
            "a third of the chunks are in the disk cache",
        )
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=10)
        cached_at_kill = cached_chunk_keys(cache_directory)
        reader.wait(timeout=30)
    except BaseException:
        # The next mount would clear the dead daemon's mount, but there is none.
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
        raise
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    proxy.delay_s = 0.0
    proxy.reset()

    with mounted(pushed.url, mountpoint, endpoint=proxy.url) as mount:
        mount.expect_log(r"clearing the stale mount")
        digest = read_whole(os.path.join(mount.path, RAW_PATH))
        stats = daemon_stats(mount)

    fetched = proxy.chunk_gets_by_key()
    assert digest == file_sha256(sources.raw)
    assert len(cached_at_kill) < len(keys), "the kill must come before the load ends"
    assert set(fetched) & cached_at_kill == set()
    assert sum(fetched.values()) <= len(keys) - len(cached_at_kill)
    assert stats["disk_hits"] >= len(cached_at_kill)


# Cache disk faults


@needs_fuse
def test_full_cache_disk_serves_reads(pushed, sources, proxy, tmp_path):
    mountpoint = str(tmp_path / "mnt")
    # The cap is larger than the 4 MiB disk, so cache writes fill it and fail.
    options = ["--cache-size", "64M", "--memory-limit", "16MiB"]

    with tmpfs(f"{mountpoint}.cache", "size=4m") as cache_directory:
        with mounted(pushed.url, mountpoint, *options, endpoint=proxy.url) as mount:
            mount.expect_log(r"disk cache write failed")
            path = os.path.join(mount.path, RAW_PATH)
            # The file is larger than the memory limit, so the second read
            # fetches from the store again.
            first = read_whole(path)
            second = read_whole(path)
            daemon_running = mount.process.poll() is None
            warnings = log_lines(mount, "WARNING", "disk cache write failed")
            leftovers = os.listdir(os.path.join(cache_directory, "tmp"))
        fetched = proxy.chunk_gets()

    assert first == file_sha256(sources.raw)
    assert second == first
    assert fetched > len(pushed.entries[RAW_PATH].chunks)
    assert daemon_running
    assert len(warnings) == 1, warnings
    assert leftovers == []


@needs_fuse
def test_read_only_cache_serves_reads(pushed, sources, proxy, tmp_path):
    mountpoint = str(tmp_path / "mnt")

    with tmpfs(f"{mountpoint}.cache", "size=4m", "ro"):
        with mounted(pushed.url, mountpoint, endpoint=proxy.url) as mount:
            mount.expect_log(r"disk cache .* is unusable")
            mount.expect_log(r"cannot keep a copy of the model listing")
            mount.expect_log(r"cannot write statistics")
            path = os.path.join(mount.path, RAW_PATH)
            first = read_whole(path)
            second = read_whole(path)
            daemon_running = mount.process.poll() is None
            warnings = log_lines(mount, "WARNING", "disk cache")

    assert first == file_sha256(sources.raw)
    assert second == first
    assert daemon_running
    assert len(warnings) == 1, warnings


# Manifest validation as a property


MODEL = "org/model"
KEY = "0" * 32

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)

def mostly(valid, other):
    """Draw from *valid* 19 times in 20, else from *other*, so many drawn documents pass."""
    return st.integers(min_value=0, max_value=19).flatmap(
        lambda roll: other if roll == 0 else valid
    )


good_components = st.sampled_from(["a", "b.bin", "model.safetensors", "...", " ", "é", "a" * 255])
bad_components = st.sampled_from(["", ".", "..", "x\0y", "a" * 256, "\ud800"])
paths = mostly(
    st.lists(good_components, min_size=1, max_size=4).map("/".join),
    st.lists(mostly(good_components, bad_components), min_size=1, max_size=4).map("/".join)
    | st.sampled_from(["/etc/passwd", "a/", "/", "a//b", "./a", "a/.."]),
)
small_ints = st.integers(min_value=-2, max_value=70)


@st.composite
def chunk_docs(draw, offset: int) -> dict:
    length = draw(st.integers(min_value=1, max_value=30))
    return {
        "offset": draw(mostly(st.just(offset), small_ints)),
        "length": draw(mostly(st.just(length), small_ints | json_scalars)),
        "key": draw(
            mostly(st.just(KEY), st.text(alphabet="0123456789abcdefA", min_size=31, max_size=33))
        ),
        "stored_length": draw(mostly(st.just(length), small_ints)),
        "codec": draw(mostly(st.sampled_from(["zstd", "raw"]), st.text(max_size=5))),
        "transform": draw(mostly(st.just("none"), st.sampled_from(manifest_module.TRANSFORMS))),
    }


@st.composite
def file_docs(draw) -> dict:
    chunks = []
    offset = 0
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        chunk = draw(chunk_docs(offset))
        chunks.append(chunk)
        if isinstance(chunk["offset"], int) and isinstance(chunk["length"], int):
            offset = chunk["offset"] + chunk["length"]
    doc = {
        "path": draw(paths),
        "size": draw(mostly(st.just(offset), small_ints)),
        "mode": draw(mostly(st.just(0o644), st.integers(min_value=-1, max_value=0o10000))),
        "mtime_ns": draw(mostly(st.just(0), st.integers())),
        "sha256": draw(
            mostly(st.just("0" * 64), st.text(alphabet="0123456789abcdefG", max_size=65))
        ),
        "chunks": chunks,
    }
    for name in draw(mostly(st.just(set()), st.sets(st.sampled_from(sorted(doc)), max_size=2))):
        del doc[name]
    return doc


manifest_docs = st.fixed_dictionaries(
    {
        "format": mostly(st.just(manifest_module.FORMAT), st.text(max_size=5)),
        "version": mostly(st.just(manifest_module.VERSION), json_scalars),
        "name": mostly(st.just(MODEL), st.text(max_size=5)),
        "created_ns": mostly(st.just(1), st.integers()),
        "chunk_size": mostly(st.just(CHUNK_SIZE), small_ints),
        "files": st.lists(file_docs(), max_size=4),
    }
)


@st.composite
def valid_manifests(draw) -> Manifest:
    entries = []
    used_paths = set()
    for index in range(draw(st.integers(min_value=0, max_value=4))):
        lengths = draw(st.lists(st.integers(min_value=1, max_value=50), max_size=5))
        chunks = []
        offset = 0
        for length in lengths:
            chunks.append(ChunkRef(offset, length, f"{index:032x}", length))
            offset += length
        path = draw(st.sampled_from(["w.bin", "sub/config.json", "a/b/c.safetensors"]))
        path = f"{index}/{path}"
        used_paths.add(path)
        entries.append(FileEntry(path, offset, 0o644, 0, "0" * 64, tuple(chunks)))
    return Manifest(MODEL, 1, CHUNK_SIZE, tuple(entries))


def mutate(doc, data) -> object:
    """Replace, drop, add or nudge one value somewhere inside *doc*, and return *doc*.

    A *doc* that is no container is replaced whole.
    """
    if not isinstance(doc, (dict, list)):
        return data.draw(json_values)
    containers = [doc]
    stack = [doc]
    while stack:
        value = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, (dict, list)):
                containers.append(child)
                stack.append(child)
    target = data.draw(st.sampled_from(containers))
    keys = list(target) if isinstance(target, dict) else list(range(len(target)))
    action = data.draw(st.sampled_from(["replace", "drop", "add", "nudge", "path"]))
    if action == "add" or not keys:
        if isinstance(target, dict):
            target[data.draw(st.text(max_size=10))] = data.draw(json_values)
        else:
            target.insert(data.draw(st.integers(0, len(target))), data.draw(json_values))
        return doc
    key = data.draw(st.sampled_from(keys))
    if action == "drop":
        del target[key]
    elif action == "nudge" and isinstance(target[key], int) and not isinstance(target[key], bool):
        target[key] += data.draw(st.sampled_from([-1, 1, 2**63, -(2**63)]))
    elif action == "path":
        target[key] = data.draw(paths)
    else:
        target[key] = data.draw(json_values)
    return doc


def assert_manifest_is_safe(manifest: Manifest) -> None:
    """Assert what every accepted manifest guarantees: tiling and safe paths."""
    assert manifest.name == MODEL
    paths_seen = set()
    for entry in manifest.files:
        position = 0
        for chunk in entry.chunks:
            assert chunk.offset == position, entry
            assert chunk.length >= 1, entry
            position = chunk.end
        assert position == entry.size, entry
        path = entry.path
        assert path and not path.startswith("/"), path
        assert "\0" not in path, path
        assert posixpath.normpath(path) == path, path
        assert all(part not in ("", ".", "..") for part in path.split("/")), path
        resolved = posixpath.normpath(posixpath.join("/model", path))
        assert resolved.startswith("/model/"), path
        path.encode("utf-8")
        assert path not in paths_seen, path
        paths_seen.add(path)
    for path in paths_seen:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            assert "/".join(parts[:depth]) not in paths_seen, path


def parse_or_none(data: bytes) -> Manifest | None:
    """Parse *data*, or return None when it is rejected with `ManifestInvalid`.

    Any other exception propagates and fails the property.
    """
    try:
        return parse_manifest(MODEL, data)
    except ManifestInvalid:
        return None


PROPERTY_SETTINGS = hypothesis.settings(
    max_examples=200, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@hypothesis.given(
    st.binary(max_size=200) | json_values.map(lambda value: json.dumps(value).encode())
)
def test_manifest_parse_random_input(data):
    manifest = parse_or_none(data)
    if manifest is not None:
        assert_manifest_is_safe(manifest)


@PROPERTY_SETTINGS
@hypothesis.given(manifest_docs)
def test_manifest_parse_shaped_input(doc):
    manifest = parse_or_none(json.dumps(doc).encode())
    if manifest is not None:
        assert_manifest_is_safe(manifest)


@PROPERTY_SETTINGS
@hypothesis.given(valid_manifests(), st.data())
def test_manifest_parse_mutated_manifest(manifest, data):
    encoded = to_json(manifest)
    assert parse_manifest(MODEL, encoded) == manifest
    doc = json.loads(encoded)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        doc = mutate(doc, data)
    parsed = parse_or_none(json.dumps(doc).encode())
    if parsed is not None:
        assert_manifest_is_safe(parsed)


@pytest.mark.parametrize("case", list(NESTED_MANIFESTS))
def test_manifest_deep_nesting_rejected(case):
    with pytest.raises(ManifestInvalid):
        parse_manifest(MODEL, nested_manifest(case, MODEL))


# Manifests that are too large or too deep, through a mount


GOOD_NAME = "org/good"


def write_manifest(store: str, name: str, data: bytes) -> None:
    directory = os.path.join(store, "models", name)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "manifest.json"), "wb") as file:
        file.write(data)


@pytest.fixture
def local_store_with_good_model(tmp_path, sources):
    store = str(tmp_path / "store")
    push(store, sources.checkpoint, GOOD_NAME)
    with open(os.path.join(store, "models", GOOD_NAME, "manifest.json"), "rb") as file:
        good = json.loads(file.read())
    return store, good


def assert_rejected_once(mount, name: str) -> None:
    lines = [
        line
        for line in mount.log_text().splitlines()
        if line.startswith(("WARNING", "ERROR")) and name in line
    ]
    assert len(lines) == 1, f"{name}: {lines}"


@needs_fuse
def test_large_manifests_rejected_per_model(local_store_with_good_model, sources, tmp_path):
    store, good = local_store_with_good_model
    cases = large_manifests(
        good, manifest_module.MAX_MANIFEST_BYTES, manifest_module.MAX_FILES
    )
    for name, data in cases.items():
        assert len(data) > 4 * MIB, name
        write_manifest(store, name, data)

    with mounted(store, str(tmp_path / "mnt")) as mount:
        for name in cases:
            mount.expect_log(name)
        digest = read_whole(os.path.join(mount.path, GOOD_NAME, "model.pt"))
        listed = sorted(os.listdir(mount.path))
        bad_listed = os.listdir(os.path.join(mount.path, "bad")) if "bad" in listed else []
        for name in cases:
            assert_rejected_once(mount, name)

    assert digest == file_sha256(sources.checkpoint)
    assert bad_listed == []


@needs_fuse
def test_nested_manifest_rejected_per_model(local_store_with_good_model, sources, tmp_path):
    store, good = local_store_with_good_model
    names = [f"bad/{case}" for case in NESTED_MANIFESTS]
    for case, name in zip(NESTED_MANIFESTS, names):
        write_manifest(store, name, nested_manifest(case, name))

    with mounted(store, str(tmp_path / "mnt")) as mount:
        for name in names:
            mount.expect_log(name)
        digest = read_whole(os.path.join(mount.path, GOOD_NAME, "model.pt"))
        for name in names:
            assert_rejected_once(mount, name)
            assert not os.path.lexists(os.path.join(mount.path, name))

    assert digest == file_sha256(sources.checkpoint)


@needs_fuse
def test_nested_manifest_keeps_refresh_running(local_store_with_good_model, sources, tmp_path):
    store, good = local_store_with_good_model
    options = ["--refresh-interval", "0.2"]

    with mounted(store, str(tmp_path / "mnt"), *options) as mount:
        mount.expect_log("bad/nested")
        write_manifest(store, "bad/nested", nested_manifest("nested-arrays", "bad/nested"))
        time.sleep(1)
        push(store, sources.safetensors, "org/later")
        later = os.path.join(mount.path, "org/later/model.safetensors")
        deadline = time.monotonic() + 5
        while not os.path.exists(later) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Checked here, because a refresh that died also logs a traceback,
        # which fails the test at unmount with a less direct message.
        assert os.path.exists(later), (
            "a model pushed after the nested manifest must appear:\n" + mount.log_text()[-2000:]
        )
        digest = read_whole(os.path.join(mount.path, GOOD_NAME, "model.pt"))
        daemon_running = mount.process.poll() is None
        rejections = [line for line in mount.log_text().splitlines() if "bad/nested" in line]

    assert daemon_running
    assert digest == file_sha256(sources.checkpoint)
    assert len(rejections) == 1, rejections


@needs_fuse
def test_fifo_chunk_fails_only_its_reads(sources, tmp_path):
    store = str(tmp_path / "store")
    push(store, sources.raw, RAW_NAME)
    push(store, sources.checkpoint, GOOD_NAME)
    with open(os.path.join(store, "models", RAW_NAME, "manifest.json"), "rb") as file:
        (entry,) = parse_manifest(RAW_NAME, file.read()).files
    fifo_chunk = entry.chunks[1]
    chunk_path = os.path.join(store, "chunks", fifo_chunk.key[:2], fifo_chunk.key)
    os.unlink(chunk_path)
    os.mkfifo(chunk_path)
    # Two connection slots, so two reads that each held a slot for good
    # would block every other read of the mount.
    options = ["--read-timeout", str(READ_TIMEOUT_S), "--max-connections", "2", "--no-prefetch"]
    fifo_results = []

    with mounted(store, str(tmp_path / "mnt"), *options) as mount:
        mount.expect_log(EIO_LOG)
        path = os.path.join(mount.path, RAW_PATH)
        for attempt in range(2):
            if attempt:
                time.sleep(FAILURE_TTL_S + 0.2)
            fifo_results.append(timed_pread(path, fifo_chunk.offset, fifo_chunk.length))
        other_model_digest = read_whole(os.path.join(mount.path, GOOD_NAME, "model.pt"))
        after = entry.chunks[2]
        neighbour, _ = timed_pread(path, after.offset, after.length)
        error_lines = log_lines(mount, "ERROR", EIO_LOG)

    for result, elapsed in fifo_results:
        assert isinstance(result, OSError) and result.errno == errno.EIO, result
        # Rejected at once, not after waiting out the deadline.
        assert elapsed < READ_TIMEOUT_S, f"EIO after {elapsed:.2f} s"
    assert other_model_digest == file_sha256(sources.checkpoint)
    assert neighbour == read_source(sources.raw, after.offset, after.length)
    assert error_lines, "no read failure was logged"
    assert all("not a regular file" in line for line in error_lines), error_lines

"""The mount's read path: single flight, the SSD cache and prefetch.

The files are pushed once, straight to the moto server, with 1 MiB chunks.
Every test mounts through `S3Proxy`, which counts the chunk objects the
daemon fetches. Each mount starts with an empty cache, except the second
mount of the restart test and the mounts over a planted damaged cache file.
The disk cache stores decoded chunks, so its files are exactly the chunk
lengths of the manifest.

The proxy runs in threads of the test process, so loaders run in child
processes. A loader that reads while it holds the GIL, as safetensors does,
would stall the proxy and with it its own read.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid

import boto3
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from conftest import mounted, needs_fuse, run_shardfs
from fault_harness import file_sha256, read_source
from s3proxy import counting_proxy  # noqa: F401 (a fixture)
from shardfs.manifest import FileEntry, parse_manifest

pytestmark = needs_fuse

MIB = 1024 * 1024
CHUNK_SIZE = MIB

MODEL_NAME = "org/model"
MODEL_PATH = "org/model/model.safetensors"
TENSOR_COUNT = 6
# 4 MiB of float16 per tensor, so every tensor spans at least four chunks.
TENSOR_ELEMENTS = 2 * MIB

RAW_NAME = "data/raw"
RAW_PATH = "data/raw/random.bin"
RAW_SIZE = 24 * MIB

STREAM_NAME = "data/stream"
STREAM_PATH = "data/stream/stream.bin"
# Long enough that a whole-file read at the added latency takes many round
# trips, so a read that waited behind it would be plain to see.
STREAM_SIZE = 64 * MIB

LOADER_COUNT = 8

# Run by each concurrent loader: it waits until the start file exists, so
# that all loaders start together, then prints the sha256 of every tensor.
LOADER_SCRIPT = """
import hashlib, json, os, sys, time
import safetensors.numpy

path, start_file = sys.argv[1], sys.argv[2]
while not os.path.exists(start_file):
    time.sleep(0.001)
tensors = safetensors.numpy.load_file(path)
digests = {name: hashlib.sha256(array.tobytes()).hexdigest() for name, array in tensors.items()}
print(json.dumps(digests))
"""

# Maps the file with safe_open and reads the named tensors in the order given,
# printing the sha256 of each.
TENSOR_READ_SCRIPT = """
import hashlib, json, sys
import safetensors

path, names = sys.argv[1], sys.argv[2:]
digests = {}
with safetensors.safe_open(path, framework="np") as handle:
    for name in names:
        digests[name] = hashlib.sha256(handle.get_tensor(name).tobytes()).hexdigest()
print(json.dumps(digests))
"""

# Reads the file in order, 1 MiB at a time, and prints its sha256 and the
# CLOCK_MONOTONIC times it started and ended, which all processes share.
WHOLE_READ_SCRIPT = """
import hashlib, json, sys, time

start = time.monotonic()
digest = hashlib.sha256()
with open(sys.argv[1], "rb", buffering=0) as file:
    while block := file.read(1024 * 1024):
        digest.update(block)
print(json.dumps({"sha256": digest.hexdigest(), "start": start, "end": time.monotonic()}))
"""

# Opens the file, waits for the start file, then reads one range with pread
# and prints its sha256, the seconds the pread took and when it ended.
PREAD_SCRIPT = """
import hashlib, json, os, sys, time

path, start_file = sys.argv[1], sys.argv[2]
offset, length = int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_RDONLY)
while not os.path.exists(start_file):
    time.sleep(0.001)
start = time.monotonic()
data = os.pread(fd, length, offset)
end = time.monotonic()
os.close(fd)
print(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "elapsed": end - start, "end": end}))
"""


@dataclasses.dataclass(frozen=True)
class Sources:
    model: str
    raw: str
    stream: str


@dataclasses.dataclass(frozen=True)
class PushedStore:
    url: str
    entries: dict[str, FileEntry]  # file entries by path under the mountpoint

    def chunk_keys(self, path: str) -> list[str]:
        return [chunk.key for chunk in self.entries[path].chunks]


def model_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2024)
    return {
        f"layer{index}.weight": torch.randn(TENSOR_ELEMENTS, generator=generator).to(
            torch.float16
        )
        for index in range(TENSOR_COUNT)
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Sources:
    root = tmp_path_factory.mktemp("read-path-sources")
    model = root / "model.safetensors"
    safetensors.torch.save_file(model_tensors(), str(model))
    rng = np.random.default_rng(99)
    raw = root / "random.bin"
    raw.write_bytes(rng.bytes(RAW_SIZE))
    stream = root / "stream.bin"
    stream.write_bytes(rng.bytes(STREAM_SIZE))
    return Sources(model=str(model), raw=str(raw), stream=str(stream))


@pytest.fixture(scope="module")
def pushed(moto_endpoint, sources) -> PushedStore:
    """The sources pushed with 1 MiB chunks to a fresh bucket on the moto server."""
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = f"read-path-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    prefix = "models-root"
    url = f"s3://{bucket}/{prefix}"
    entries = {}
    pushes = [
        (sources.model, MODEL_NAME),
        (sources.raw, RAW_NAME),
        (sources.stream, STREAM_NAME),
    ]
    for source, name in pushes:
        result = run_shardfs(
            "push",
            "--store",
            url,
            "--endpoint-url",
            moto_endpoint,
            "--chunk-size",
            str(CHUNK_SIZE),
            source,
            name,
        )
        assert result.returncode == 0, f"push of {name} failed: {result.stderr}"
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/models/{name}/manifest.json")
        manifest = parse_manifest(name, body["Body"].read())
        for entry in manifest.files:
            entries[f"{name}/{entry.path}"] = entry
    return PushedStore(url=url, entries=entries)


@contextlib.contextmanager
def mounted_ready(store: str, mountpoint: str, *options: str, endpoint: str):
    """Mount like `mounted`, and wait until the daemon has applied its kernel settings.

    The mountpoint responds to stat before the daemon sets the mount's
    read-ahead, and reads made in between reach the daemon in smaller requests.
    """
    with mounted(store, mountpoint, *options, endpoint=endpoint) as mount:
        wait_until(
            lambda: "is ready" in mount.log_text(), 30, "the daemon reports the mount ready"
        )
        yield mount


def cache_dir(mount) -> str:
    return f"{mount.path}.cache"


def cache_file_path(directory: str, key: str) -> str:
    return os.path.join(directory, "chunks", key[:2], key)


def cache_files(directory: str) -> dict[str, int]:
    """Return the size of each file under the cache's chunks/ directory, by name."""
    sizes = {}
    root = os.path.join(directory, "chunks")
    for parent, _, names in os.walk(root):
        for name in names:
            try:
                sizes[name] = os.stat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                pass  # evicted while the scan ran
    return sizes


def poll_until(condition, timeout_s: float) -> bool:
    """Call *condition* until it returns true or *timeout_s* pass, and return whether it did."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_until(condition, timeout_s: float, description: str) -> None:
    if not poll_until(condition, timeout_s):
        pytest.fail(f"timed out after {timeout_s} s waiting until {description}")


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns


def daemon_stats(mount) -> dict:
    """Ask the daemon for its counters with SIGUSR1 and return them."""
    path = os.path.join(cache_dir(mount), "stats.json")
    before = _file_identity(path)
    mount.process.send_signal(signal.SIGUSR1)
    # The daemon replaces the file, so a new inode or mtime means new counters.
    wait_until(lambda: _file_identity(path) not in (None, before), 10, "stats.json is written")
    with open(path) as file:
        return json.load(file)


def read_in_order(path: str, block_size: int = MIB) -> str:
    """Read *path* in order in *block_size* reads and return its sha256."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        while block := file.read(block_size):
            digest.update(block)
    return digest.hexdigest()


class ChunkReader:
    """Reads whole chunks of one mounted file with the kernel's read-ahead off.

    POSIX_FADV_RANDOM makes each pread reach the daemon for exactly the bytes
    requested, so a test decides which chunks the daemon receives requests for.
    """

    def __init__(self, path: str, entry: FileEntry):
        self.entry = entry
        self.fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read_chunk(self, index: int) -> bytes:
        chunk = self.entry.chunks[index]
        return os.pread(self.fd, chunk.length, chunk.offset)

    def drop_page_cache(self, index: int) -> None:
        """Drop the kernel's cached pages of chunk *index*, so a read reaches the daemon."""
        chunk = self.entry.chunks[index]
        os.posix_fadvise(self.fd, chunk.offset, chunk.length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        os.close(self.fd)


def collect(processes: list[subprocess.Popen], timeout_s: float) -> list[tuple[int, str, str]]:
    """Wait for *processes* and return each one's exit status, stdout and stderr.

    Kill any still running on the way out, because a reader left running
    keeps the mount busy at unmount.
    """
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout_s)
            outputs.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs


def start_script(script: str, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# Single flight


def test_concurrent_loaders_fetch_each_chunk_once(pushed, sources, counting_proxy, tmp_path):
    expected = {
        name: hashlib.sha256(array.tobytes()).hexdigest()
        for name, array in safetensors.numpy.load_file(sources.model).items()
    }
    start_file = tmp_path / "start"

    with mounted_ready(pushed.url, str(tmp_path / "mnt"), endpoint=counting_proxy.url) as mount:
        path = os.path.join(mount.path, MODEL_PATH)
        loaders = [start_script(LOADER_SCRIPT, path, str(start_file)) for _ in range(LOADER_COUNT)]
        start_file.touch()
        outputs = collect(loaders, timeout_s=60)

    failures = [stderr for status, _, stderr in outputs if status != 0]
    assert failures == []
    digests = [json.loads(stdout) for _, stdout, _ in outputs]
    assert digests == [expected] * LOADER_COUNT
    keys = pushed.chunk_keys(MODEL_PATH)
    assert len(set(keys)) == len(keys), "the test needs distinct chunks"
    assert counting_proxy.chunk_gets_by_key() == {key: 1 for key in keys}


# SSD cache


def test_restart_serves_from_disk_cache(pushed, sources, counting_proxy, tmp_path):
    mountpoint = str(tmp_path / "mnt")
    keys = pushed.chunk_keys(MODEL_PATH)
    expected = file_sha256(sources.model)

    with mounted_ready(pushed.url, mountpoint, endpoint=counting_proxy.url) as mount:
        first_digest = read_in_order(os.path.join(mount.path, MODEL_PATH))
        # Cache files are written in the background after a chunk is served.
        wait_until(
            lambda: set(keys) <= set(cache_files(cache_dir(mount))),
            10,
            "every chunk is in the disk cache",
        )
    counting_proxy.reset()

    with mounted_ready(pushed.url, mountpoint, endpoint=counting_proxy.url) as mount:
        second_digest = read_in_order(os.path.join(mount.path, MODEL_PATH))
        stats = daemon_stats(mount)

    assert first_digest == expected
    assert second_digest == expected
    assert counting_proxy.chunk_gets() == 0
    assert stats["disk_hits"] >= len(keys)
    # Read-ahead covers the disk cache too: most chunks were hinted into the
    # page cache before the reader reached them (22 of 25 when measured).
    assert stats["disk_read_ahead"] >= len(keys) // 2


def test_disk_cache_stays_under_cap(pushed, sources, counting_proxy, tmp_path):
    cap = 6 * MIB
    largest_total = 0
    reading = threading.Event()
    reading.set()

    with mounted_ready(
        pushed.url,
        str(tmp_path / "mnt"),
        "--cache-size",
        str(cap),
        endpoint=counting_proxy.url,
    ) as mount:
        directory = cache_dir(mount)

        def sample_cache_size() -> None:
            nonlocal largest_total
            while reading.is_set():
                largest_total = max(largest_total, sum(cache_files(directory).values()))
                time.sleep(0.002)

        sampler = threading.Thread(target=sample_cache_size)
        sampler.start()
        try:
            digest = read_in_order(os.path.join(mount.path, RAW_PATH))
            # Let the background writes of the last chunks land.
            time.sleep(0.5)
        finally:
            reading.clear()
            sampler.join()
        final_total = sum(cache_files(directory).values())

    assert digest == file_sha256(sources.raw)
    assert largest_total <= cap + CHUNK_SIZE
    assert final_total <= cap


def test_disk_cache_evicts_least_recently_used(pushed, sources, counting_proxy, tmp_path):
    # The disk cache has room for 20 chunks and memory for 16, so reading the
    # 17 chunks of group B pushes group A out of memory. A re-read of A is
    # then served by the disk cache, which must count A as recently used.
    entry = pushed.entries[RAW_PATH]
    keys = pushed.chunk_keys(RAW_PATH)
    group_a, group_b, group_c = range(0, 3), range(3, 20), range(20, 23)
    options = ["--cache-size", str(20 * CHUNK_SIZE), "--memory-limit", "16MiB", "--no-prefetch"]
    wrong_chunks = []

    mountpoint = str(tmp_path / "mnt")
    with mounted_ready(pushed.url, mountpoint, *options, endpoint=counting_proxy.url) as mount:
        directory = cache_dir(mount)
        reader = ChunkReader(os.path.join(mount.path, RAW_PATH), entry)
        try:

            def read_and_cache(index: int) -> None:
                chunk = entry.chunks[index]
                expected = read_source(sources.raw, chunk.offset, chunk.length)
                if reader.read_chunk(index) != expected:
                    wrong_chunks.append(index)
                # Waiting for each cache file keeps the cache's order equal
                # to the read order.
                wait_until(
                    lambda: os.path.exists(cache_file_path(directory, chunk.key)),
                    10,
                    f"chunk {index} is in the disk cache",
                )

            for index in [*group_a, *group_b]:
                read_and_cache(index)
            hits_before = daemon_stats(mount)["disk_hits"]
            gets_before = counting_proxy.chunk_gets()
            for index in group_a:
                chunk = entry.chunks[index]
                expected = read_source(sources.raw, chunk.offset, chunk.length)
                reader.drop_page_cache(index)
                if reader.read_chunk(index) != expected:
                    wrong_chunks.append(index)
            hits_after = daemon_stats(mount)["disk_hits"]
            gets_after = counting_proxy.chunk_gets()
            for index in group_c:
                read_and_cache(index)
            remaining = set(cache_files(directory))
        finally:
            reader.close()

    assert wrong_chunks == []
    # The re-reads of A must reach the disk cache, so that it records A as used.
    assert gets_after == gets_before
    assert hits_after > hits_before
    read_indexes = [*group_a, *group_b, *group_c]
    evicted = {index for index in read_indexes if keys[index] not in remaining}
    assert evicted == {3, 4, 5}


DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "bit-flipped": lambda data: data[:1000] + bytes([data[1000] ^ 0x04]) + data[1001:],
    "extended": lambda data: data + b"\0",
}


@pytest.mark.parametrize("damage", list(DAMAGES), ids=list(DAMAGES))
def test_damaged_cache_file_is_not_served(pushed, sources, counting_proxy, tmp_path, damage):
    mountpoint = str(tmp_path / "mnt")
    directory = f"{mountpoint}.cache"
    entry = pushed.entries[RAW_PATH]
    index = 5
    chunk = entry.chunks[index]
    expected = read_source(sources.raw, chunk.offset, chunk.length)
    damaged_path = cache_file_path(directory, chunk.key)
    os.makedirs(os.path.dirname(damaged_path))
    with open(damaged_path, "wb") as file:
        file.write(DAMAGES[damage](expected))

    with mounted_ready(pushed.url, mountpoint, endpoint=counting_proxy.url) as mount:
        mount.expect_log("damaged cache file")
        reader = ChunkReader(os.path.join(mount.path, RAW_PATH), entry)
        try:
            data = reader.read_chunk(index)
        finally:
            reader.close()

        def cache_file_is_good() -> bool:
            try:
                with open(damaged_path, "rb") as file:
                    return file.read() == expected
            except FileNotFoundError:
                return False

        replaced = poll_until(cache_file_is_good, 10)
        warnings = [
            line
            for line in mount.log_text().splitlines()
            if line.startswith("WARNING") and "damaged cache file" in line
        ]

    assert data == expected
    assert counting_proxy.chunk_gets_by_key()[chunk.key] == 1
    assert len(warnings) == 1
    assert replaced, "the cache file must be rewritten with the fetched chunk"


@pytest.mark.parametrize("existing_mode", [None, 0o755], ids=["new", "existing-0755"])
def test_cache_directory_mode_is_0700(pushed, counting_proxy, tmp_path, existing_mode):
    mountpoint = str(tmp_path / "mnt")
    directory = f"{mountpoint}.cache"
    if existing_mode is not None:
        os.mkdir(directory)
        os.chmod(directory, existing_mode)

    with mounted_ready(pushed.url, mountpoint, endpoint=counting_proxy.url):
        mode = stat.S_IMODE(os.stat(directory).st_mode)

    assert mode == 0o700


# Prefetch


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_sequential_read_fetches_ahead(pushed, sources, counting_proxy, tmp_path, prefetch):
    options = [] if prefetch else ["--no-prefetch"]

    mountpoint = str(tmp_path / "mnt")
    with mounted_ready(pushed.url, mountpoint, *options, endpoint=counting_proxy.url) as mount:
        digest = read_in_order(os.path.join(mount.path, RAW_PATH))
        stats = daemon_stats(mount)

    assert digest == file_sha256(sources.raw)
    if prefetch:
        assert stats["prefetch_fetches"] > 0
    else:
        assert stats["prefetch_fetches"] == 0
    keys = pushed.chunk_keys(RAW_PATH)
    assert counting_proxy.chunk_gets_by_key() == {key: 1 for key in keys}


def test_tensor_reads_fetch_little_extra(pushed, sources, counting_proxy, tmp_path):
    expected = {
        name: hashlib.sha256(array.tobytes()).hexdigest()
        for name, array in safetensors.numpy.load_file(sources.model).items()
    }
    # Half the tensors, one at a time: a step back, then a jump over the
    # tensor already read.
    names = ["layer2.weight", "layer1.weight", "layer3.weight"]
    options = ["--read-ahead-kb", "128"]

    mountpoint = str(tmp_path / "mnt")
    with mounted_ready(pushed.url, mountpoint, *options, endpoint=counting_proxy.url) as mount:
        path = os.path.join(mount.path, MODEL_PATH)
        [(status, stdout, stderr)] = collect([start_script(TENSOR_READ_SCRIPT, path, *names)], 60)
        stats = daemon_stats(mount)

    assert status == 0, stderr
    assert json.loads(stdout) == {name: expected[name] for name in names}
    tensor_bytes = len(names) * TENSOR_ELEMENTS * 2
    keys = pushed.chunk_keys(MODEL_PATH)
    fetched = sorted(keys.index(key) for key in counting_proxy.chunk_gets_by_key())
    assert stats["bytes_decoded"] <= 1.5 * tensor_bytes, (
        f"tensors {names}: decoded {stats['bytes_decoded']} bytes for {tensor_bytes} read, "
        f"chunks {fetched} of {len(keys)}"
    )


def test_demand_read_goes_before_prefetch(pushed, sources, counting_proxy, tmp_path):
    delay_s = 0.05
    entry = pushed.entries[STREAM_PATH]
    far_chunk = entry.chunks[-3]
    start_file = tmp_path / "start"
    options = ["--max-connections", "4"]

    mountpoint = str(tmp_path / "mnt")
    with mounted_ready(pushed.url, mountpoint, *options, endpoint=counting_proxy.url) as mount:
        path = os.path.join(mount.path, STREAM_PATH)
        counting_proxy.delay_s = delay_s
        preader = start_script(
            PREAD_SCRIPT, path, str(start_file), str(far_chunk.offset), str(far_chunk.length)
        )
        whole_reader = start_script(WHOLE_READ_SCRIPT, path)
        try:
            # Start the pread once the whole-file read keeps several fetches busy.
            wait_until(lambda: counting_proxy.chunk_gets() >= 4, 30, "the whole-file read fetches")
        finally:
            start_file.touch()
            outputs = collect([preader, whole_reader], timeout_s=60)
    (pread_status, pread_out, pread_err), (whole_status, whole_out, whole_err) = outputs

    assert pread_status == 0, pread_err
    assert whole_status == 0, whole_err
    pread = json.loads(pread_out)
    whole = json.loads(whole_out)
    expected_range = read_source(sources.stream, far_chunk.offset, far_chunk.length)
    assert pread["sha256"] == hashlib.sha256(expected_range).hexdigest()
    assert whole["sha256"] == file_sha256(sources.stream)
    # A reader alone keeps one or two requests going; more means prefetch.
    assert counting_proxy.max_chunk_gets_in_flight() >= 3, "prefetch must keep fetches going"
    assert pread["elapsed"] < 10 * delay_s
    assert pread["end"] < whole["end"]

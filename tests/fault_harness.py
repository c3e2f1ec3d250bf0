"""Faults, models and readers shared by test_faults.py and scripts/reliability.py.

`FaultPlan` decides, for each chunk GET that reaches the proxy, whether to
spoil it and how. Faults come in runs: a chunk request starts a run with
probability *rate*, the run spoils that request and the next ``failures - 1``
requests for the same chunk, and the request after a run always passes. A
cold load therefore gets about *rate* of its chunks fail their first one or
two attempts, and a reader that fetches a chunk again after eviction meets
new runs, so faults keep coming for as long as reads do. The draws are a
hash of the seed, the chunk key and the request's number among that key's
requests, so a plan spoils the same requests whatever the order in which
threads send them.

`PlannedProxy` is an `S3Proxy` that consults its plan on every request that
no rule added with `add_fault` spoiled first.

`write_sources` writes the models that the fault runs load, `push_models`
pushes them in CHUNK_SIZE chunks, and the ``*_SCRIPT`` strings are the
readers that run in child processes: the proxy runs in threads of the
process that starts it, and a loader that holds the GIL while it reads
(safetensors, torch) would stall the proxy and with it its own read.
Plain reads and preads release the GIL, so `timed_pread` runs in-process.
"""

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import boto3
import numpy as np
import safetensors.torch
import torch

from s3proxy import Fault, Request, S3Proxy
from shardfs.manifest import FileEntry, parse_manifest

# The checkout that contains this file. `python -m shardfs` run there
# imports the checkout's shardfs, whatever else is installed.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fault kinds by name. "truncated" and "flipped" depend on the body length,
# so they are built per chunk from its stored length.
STATUS_500 = "500"
STATUS_503 = "503"
RESET = "reset"
TRUNCATED = "truncated"
FLIPPED = "flipped"
DELAY = "delay"
KINDS = (STATUS_500, STATUS_503, RESET, TRUNCATED, FLIPPED, DELAY)

DESCRIPTIONS = {
    STATUS_500: "HTTP 500 InternalError",
    STATUS_503: "HTTP 503 SlowDown",
    RESET: "TCP reset before the reply",
    TRUNCATED: "body cut to half its length",
    FLIPPED: "one body byte flipped",
    DELAY: "reply delayed",
}


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the proxy does to one request: spoil it, delay it, or neither."""

    kind: str | None = None
    fault: Fault | None = None
    delay_s: float = 0.0


PASS = Decision()


def make_fault(kind: str, stored_length: int) -> Fault | None:
    """Return the proxy fault of *kind* for a chunk object of *stored_length* bytes."""
    if kind == STATUS_500:
        return Fault(status=500)
    if kind == STATUS_503:
        return Fault(status=503)
    if kind == RESET:
        return Fault(reset=True)
    if kind == TRUNCATED:
        return Fault(truncate_to=stored_length // 2)
    if kind == FLIPPED:
        # Past the 16-byte object header, so the damage lands in the payload
        # that the key's hash covers.
        return Fault(flip_offset=min(stored_length - 1, 16 + stored_length // 3))
    if kind == DELAY:
        return None
    raise ValueError(f"unknown fault kind {kind!r}: expected one of {', '.join(KINDS)}")


@dataclasses.dataclass
class _KeyState:
    requests: int = 0
    # Requests still to spoil in the current run, and its fault kinds so far.
    run_left: int = 0
    run_kinds: list[str] = dataclasses.field(default_factory=list)
    # The request after a run passes, so every run ends in a good reply.
    must_pass: bool = False


class FaultPlan:
    """Spoils chunk GETs at *rate*, in runs of *failures* requests per chunk.

    Each spoiled request gets a kind drawn from *kinds* by hash.
    *stored_lengths* maps each chunk key to the length of its stored object.
    A run contains at most one flipped byte, because the chunk source gives
    up on a chunk whose copy arrives damaged twice in one read. A second flip
    drawn in a run becomes a 503 instead.
    With *persistent* set (chunk key to fault kind), every request for those
    chunks is spoiled with their kind, and other chunks are left alone.
    """

    def __init__(
        self,
        kinds: tuple[str, ...],
        rate: float,
        stored_lengths: dict[str, int],
        failures: int = 1,
        delay_s: float = 1.0,
        seed: int = 0,
        persistent: dict[str, str] | None = None,
    ):
        persistent = dict(persistent or {})
        if not kinds and not persistent:
            raise ValueError("a fault plan needs at least one fault kind")
        for kind in (*kinds, *persistent.values()):
            make_fault(kind, 2)
        self.kinds = kinds
        self.rate = rate
        self.failures = failures
        self.delay_s = delay_s
        self.seed = seed
        self.persistent = persistent
        self._stored_lengths = stored_lengths
        self._lock = threading.Lock()
        self._keys: dict[str, _KeyState] = collections.defaultdict(_KeyState)
        # Spoiled requests by fault kind, and chunk requests seen.
        self.injected: collections.Counter[str] = collections.Counter()
        self.chunk_requests = 0
        self.enabled = True

    def _draw(self, key: str, number: int, purpose: str) -> float:
        text = f"{self.seed}:{key}:{number}:{purpose}".encode()
        digest = hashlib.blake2b(text, digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def decide(self, request: Request) -> Decision:
        """Return what to do to *request*, counting what is injected."""
        if not request.is_chunk_get:
            return PASS
        with self._lock:
            self.chunk_requests += 1
            if not self.enabled:
                return PASS
            kind = self._next_kind(request.key)
            if kind is None:
                return PASS
            self.injected[kind] += 1
        fault = make_fault(kind, self._stored_lengths.get(request.key, 2))
        delay = self.delay_s if kind == DELAY else 0.0
        return Decision(kind, fault, delay)

    def _next_kind(self, key: str) -> str | None:
        if self.persistent:
            return self.persistent.get(key)
        state = self._keys[key]
        number = state.requests
        state.requests += 1
        if state.run_left == 0:
            if state.must_pass:
                state.must_pass = False
                return None
            if self._draw(key, number, "start") >= self.rate:
                return None
            state.run_left = self.failures
            state.run_kinds = []
        index = int(self._draw(key, number, "kind") * len(self.kinds))
        kind = self.kinds[index]
        if kind == FLIPPED and FLIPPED in state.run_kinds:
            kind = STATUS_503
        state.run_kinds.append(kind)
        state.run_left -= 1
        state.must_pass = state.run_left == 0
        return kind


class PlannedProxy(S3Proxy):
    """An `S3Proxy` whose chunk GETs are spoiled by a `FaultPlan` when one is set."""

    def __init__(self, upstream_url: str):
        super().__init__(upstream_url)
        self.plan: FaultPlan | None = None

    def _take_fault(self, request: Request) -> Fault | None:
        # Rules added with add_fault go first, as in S3Proxy.
        fault = super()._take_fault(request)
        plan = self.plan
        if fault is not None or plan is None:
            return fault
        decision = plan.decide(request)
        if decision.delay_s > 0:
            # Each request has its own handler thread, so this delays only it.
            time.sleep(decision.delay_s)
        return decision.fault


# The models of the fault runs


@dataclasses.dataclass(frozen=True)
class Sources:
    """Source files of the fault runs and what loading them must return."""

    checkpoint: str
    safetensors: str
    raw: str
    # {"torch": ..., "safetensors": ...}: tensor name -> [dtype, shape, sha256].
    expected_tensors: dict


def describe_tensors(tensors: dict[str, torch.Tensor]) -> dict:
    """Return each tensor's dtype, shape and the sha256 of its bytes, by name."""
    return {
        name: [
            str(tensor.dtype),
            list(tensor.shape),
            hashlib.sha256(
                tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            ).hexdigest(),
        ]
        for name, tensor in tensors.items()
    }


def checkpoint_tensors() -> dict[str, torch.Tensor]:
    """Return about 6 MiB of tensors of five dtypes, a scalar among them."""
    generator = torch.Generator().manual_seed(7)
    return {
        "embed.weight": torch.randn(512, 512, generator=generator),
        "layer0.weight": torch.randn(1024, 1024, generator=generator).to(torch.float16),
        "layer0.bias": torch.randn(1024, generator=generator).to(torch.bfloat16),
        "layer1.weight": torch.randn(1024, 1024, generator=generator).to(torch.bfloat16),
        "positions": torch.arange(128 * 1024, dtype=torch.int64),
        "mask": torch.rand(4096, generator=generator) > 0.5,
        "scale": torch.tensor(0.125),
    }


def safetensors_tensors() -> dict[str, torch.Tensor]:
    """Return about 9 MiB of float32, float16, bfloat16 and int32 tensors."""
    generator = torch.Generator().manual_seed(11)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.float16]
    tensors = {
        f"block{index}.weight": torch.randn(768, 768, generator=generator).to(dtype)
        for index, dtype in enumerate(dtypes)
    }
    tensors["block5.ids"] = torch.randint(
        0, 1 << 30, (200_000,), generator=generator, dtype=torch.int32
    )
    return tensors


def write_sources(directory: str, raw_size: int) -> Sources:
    """Write a torch.save checkpoint, a safetensors file and *raw_size* random bytes."""
    checkpoint = os.path.join(directory, "model.pt")
    torch_tensors = checkpoint_tensors()
    torch.save(torch_tensors, checkpoint)
    model = os.path.join(directory, "model.safetensors")
    st_tensors = safetensors_tensors()
    safetensors.torch.save_file(st_tensors, model)
    raw = os.path.join(directory, "random.bin")
    with open(raw, "wb") as file:
        file.write(np.random.default_rng(5).bytes(raw_size))
    expected = {
        "torch": describe_tensors(torch_tensors),
        "safetensors": describe_tensors(st_tensors),
    }
    return Sources(checkpoint, model, raw, expected)


# The pushed store

CHUNK_SIZE = 256 * 1024
TORCH_NAME = "ckpt/torch"
TORCH_PATH = "ckpt/torch/model.pt"
SAFETENSORS_NAME = "st/model"
SAFETENSORS_PATH = "st/model/model.safetensors"
RAW_NAME = "data/raw"
RAW_PATH = "data/raw/random.bin"
# Larger than the smallest memory limit (16 MiB), so random reads evict.
RAW_SIZE = 24 * 1024 * 1024
PUSH_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class PushedStore:
    url: str
    # File entries by path under the mountpoint.
    entries: dict[str, FileEntry]

    def stored_lengths(self) -> dict[str, int]:
        return {
            chunk.key: chunk.stored_length
            for entry in self.entries.values()
            for chunk in entry.chunks
        }


def push(store: str, source: str, name: str, endpoint: str | None = None) -> None:
    """Push *source* as model *name* in CHUNK_SIZE chunks; raise RuntimeError if it fails."""
    args = ["push", "--store", store, "--chunk-size", str(CHUNK_SIZE)]
    if endpoint:
        args += ["--endpoint-url", endpoint]
    result = subprocess.run(
        [sys.executable, "-m", "shardfs", *args, source, name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=PUSH_TIMEOUT_S,
    )
    if result.returncode != 0:
        raise RuntimeError(f"push of {name} failed: {result.stderr.strip()}")


def push_models(endpoint: str, sources: Sources, bucket_prefix: str) -> PushedStore:
    """Push the three source files to a new bucket on *endpoint*, one model each."""
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"{bucket_prefix}-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/models-root"
    entries = {}
    for source, name in (
        (sources.checkpoint, TORCH_NAME),
        (sources.safetensors, SAFETENSORS_NAME),
        (sources.raw, RAW_NAME),
    ):
        push(url, source, name, endpoint)
        key = f"models-root/models/{name}/manifest.json"
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for entry in parse_manifest(name, body).files:
            entries[f"{name}/{entry.path}"] = entry
    return PushedStore(url, entries)


# Reads in this process, and the cache disk


def file_sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def read_source(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


def timed_pread(path: str, offset: int, length: int) -> tuple[bytes | OSError, float]:
    """Pread one range with the kernel's read-ahead off.

    Returns the data or the error, and the seconds the pread took.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        started = time.monotonic()
        try:
            result = os.pread(fd, length, offset)
        except OSError as exc:
            result = exc
        return result, time.monotonic() - started
    finally:
        os.close(fd)


@contextlib.contextmanager
def tmpfs(path: str, *options: str):
    """Mount a tmpfs at *path* with *options* (such as ``size=4m``, ``ro``)."""
    os.makedirs(path, exist_ok=True)
    mount_options = ",".join(("mode=0700", *options))
    subprocess.run(["mount", "-t", "tmpfs", "-o", mount_options, "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


# Readers, run as ``python -c SCRIPT ARGS...``

# Loads a checkpoint with torch.load and a safetensors file with load_file,
# and prints what `describe_tensors` returns for each, as JSON.
LOAD_SCRIPT = """
import hashlib, json, sys
import safetensors.torch, torch

def describe(tensors):
    described = {}
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        described[name] = [str(t.dtype), list(t.shape), hashlib.sha256(data).hexdigest()]
    return described

print(json.dumps({
    "torch": describe(torch.load(sys.argv[1], weights_only=True)),
    "safetensors": describe(safetensors.torch.load_file(sys.argv[2])),
}))
"""

# Arguments: THREADS SECONDS CHUNK_SIZE, then pairs of MOUNTED_PATH
# SOURCE_PATH. Runs THREADS threads for SECONDS, each doing preads of random
# ranges of the mounted files (some across chunk ends, some across the end
# of the file) and comparing every byte with the source. Pages read are
# dropped from the page cache, so later reads reach the daemon again.
# Prints the counts of reads, bytes, mismatches and errors as JSON.
RANDOM_PREAD_SCRIPT = """
import collections, json, os, random, sys, threading, time

threads, seconds, chunk_size = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
pairs = [sys.argv[i:i + 2] for i in range(4, len(sys.argv), 2)]
sources = {}
for mounted, source in pairs:
    with open(source, "rb") as file:
        sources[mounted] = file.read()
lock = threading.Lock()
totals = collections.Counter()
errors = []
mismatches = []

def reader(index):
    rng = random.Random(index)
    fds = {path: os.open(path, os.O_RDONLY) for path in sources}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        path = rng.choice(list(sources))
        data = sources[path]
        length = rng.choice([1, 4096, rng.randrange(1, 3 * chunk_size), 2 * chunk_size + 1])
        if rng.random() < 0.1:
            offset = max(0, len(data) - rng.randrange(0, 2 * length))
        else:
            offset = rng.randrange(0, len(data))
        started = time.monotonic()
        try:
            got = os.pread(fds[path], length, offset)
        except OSError as exc:
            seconds_taken = time.monotonic() - started
            with lock:
                errors.append(f"{path} {offset}+{length} after {seconds_taken:.1f} s: {exc}")
            continue
        os.posix_fadvise(fds[path], offset, length, os.POSIX_FADV_DONTNEED)
        with lock:
            totals["reads"] += 1
            totals["bytes"] += len(got)
            if got != data[offset:offset + length]:
                mismatches.append(f"{path} {offset}+{length}: {len(got)} bytes, not equal")
    for fd in fds.values():
        os.close(fd)

workers = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
print(json.dumps({"totals": totals, "errors": errors[:20], "error_count": len(errors),
                  "mismatches": mismatches[:20], "mismatch_count": len(mismatches)}))
"""

# Reads the file in order, 256 KiB at a time, and prints its sha256.
WHOLE_READ_SCRIPT = """
import hashlib, sys
digest = hashlib.sha256()
with open(sys.argv[1], "rb", buffering=0) as file:
    while block := file.read(256 * 1024):
        digest.update(block)
print(digest.hexdigest())
"""


# Manifests that break the rules by their size or depth

NESTING_DEPTH = 100_000
NESTED_MANIFESTS = {
    "nested-arrays": b"[" * NESTING_DEPTH + b"]" * NESTING_DEPTH,
    "nested-objects": b'{"a":' * NESTING_DEPTH + b"1" + b"}" * NESTING_DEPTH,
    "nested-in-files": (
        b'{"format":"shardfs-manifest","version":1,"name":"MODEL","files":'
        + b"[" * NESTING_DEPTH
        + b"]" * NESTING_DEPTH
        + b"}"
    ),
}


def nested_manifest(case: str, model: str) -> bytes:
    """Return the nested manifest *case*, naming *model* where it has a name."""
    return NESTED_MANIFESTS[case].replace(b'"MODEL"', json.dumps(model).encode())


def large_manifests(good: dict, max_bytes: int, max_files: int) -> dict[str, bytes]:
    """Return manifests of many megabytes that each break one rule, by model name.

    *good* is a valid manifest document whose fields the cases reuse;
    *max_bytes* and *max_files* are the parser's limits.
    """
    cases = {}
    padding = b" " * (max_bytes + 1)
    cases["bad/over-limit"] = json.dumps(dict(good, name="bad/over-limit")).encode() + padding

    entry = {"path": "", "size": 0, "mode": 0o644, "mtime_ns": 0, "sha256": "0" * 64, "chunks": []}
    files = [dict(entry, path=f"f{index}") for index in range(max_files + 1)]
    doc = dict(good, name="bad/too-many-files", files=files)
    cases["bad/too-many-files"] = json.dumps(doc).encode()

    # One file with a table of 150,000 chunks that has a gap before its last one.
    count = 150_000
    chunk = {
        "length": 1,
        "key": "0" * 32,
        "stored_length": 1,
        "codec": "zstd",
        "transform": "none",
    }
    chunks = [dict(chunk, offset=index) for index in range(count)]
    chunks[-1]["offset"] += 1
    table = dict(entry, path="w.bin", size=count + 1, chunks=chunks)
    doc = dict(good, name="bad/gap-in-large-table", files=[table])
    cases["bad/gap-in-large-table"] = json.dumps(doc).encode()
    return cases

"""Read pushed models through a real mount with torch, safetensors and numpy.

Every test mounts a fresh daemon with an empty cache, so the first read of
each chunk goes through the chunk source to the store. The same tests run
against a local directory store and an S3 store on the moto server.
"""

import dataclasses
import filecmp
import gc
import hashlib
import json
import mmap
import os
import subprocess
import sys
import uuid

import boto3
import numpy as np
import pytest
import safetensors.torch
import torch

from conftest import mounted, needs_fuse, run_shardfs

pytestmark = needs_fuse

MIB = 1024 * 1024

# Paths under the mountpoint: a single-file source appears under its basename,
# a directory source keeps its relative paths.
MINILM_PATH = "org/minilm/model.safetensors"
CHECKPOINT_PATH = "org/checkpoint/checkpoint.pt"
RANDOM_PATH = "data/arrays/random.bin"
MATRIX_PATH = "data/arrays/matrix.npy"

# The checkpoint and the arrays use small chunks so that every file spans
# many of them. MiniLM keeps the default 8 MiB chunks.
SMALL_CHUNK_SIZE = "1MiB"

# Not a multiple of the chunk size or the page size, so the last chunk and
# the last page are both partial.
RANDOM_FILE_SIZE = 12 * MIB + 4093

READER_COUNT = 6
PREADS_PER_READER = 40
MAX_PREAD_LENGTH = 3 * MIB

# Run by each concurrent reader: it waits until the start file exists, so that
# all readers start together, then prints the sha256 of every pread and of the
# whole file.
READER_SCRIPT = """
import hashlib, json, os, random, sys, time

path, start_file = sys.argv[1], sys.argv[2]
seed, count, max_length = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
while not os.path.exists(start_file):
    time.sleep(0.001)
rng = random.Random(seed)
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
preads = []
for _ in range(count):
    offset = rng.randrange(size)
    length = rng.randint(1, max_length)
    data = os.pread(fd, length, offset)
    preads.append([offset, length, hashlib.sha256(data).hexdigest()])
os.close(fd)
with open(path, "rb") as file:
    whole = hashlib.file_digest(file, "sha256").hexdigest()
print(json.dumps({"sha256": whole, "preads": preads}))
"""


@dataclasses.dataclass(frozen=True)
class PushedStore:
    url: str
    endpoint: str | None


@dataclasses.dataclass(frozen=True)
class Sources:
    minilm: str
    checkpoint: str
    arrays_dir: str

    @property
    def random_file(self) -> str:
        return os.path.join(self.arrays_dir, "random.bin")

    @property
    def matrix_file(self) -> str:
        return os.path.join(self.arrays_dir, "matrix.npy")


def checkpoint_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return {
        "float32": torch.randn(64, 33, generator=generator),
        "float16": torch.randn(1000, generator=generator).to(torch.float16),
        "bfloat16": torch.randn(7, 9, 11, generator=generator).to(torch.bfloat16),
        "int64": torch.randint(-(2**40), 2**40, (123,), generator=generator),
        "bool": torch.rand(77, generator=generator) > 0.5,
        # A little over 3 MiB, so this tensor alone spans at least four chunks.
        "large_float32": torch.randn(3 * MIB // 4 + 5, generator=generator),
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory, minilm_dir) -> Sources:
    """The source files that the stores are pushed from."""
    root = tmp_path_factory.mktemp("sources")

    checkpoint = root / "checkpoint.pt"
    torch.save(checkpoint_tensors(), checkpoint)

    arrays_dir = root / "arrays"
    arrays_dir.mkdir()
    rng = np.random.default_rng(5678)
    (arrays_dir / "random.bin").write_bytes(rng.bytes(RANDOM_FILE_SIZE))
    matrix = rng.standard_normal((1024, 1536), dtype=np.float32)
    np.save(arrays_dir / "matrix.npy", matrix)

    return Sources(
        minilm=os.path.join(minilm_dir, "model.safetensors"),
        checkpoint=str(checkpoint),
        arrays_dir=str(arrays_dir),
    )


def push_sources(sources: Sources, store: str, *options: str) -> None:
    pushes = [
        (sources.minilm, "org/minilm", []),
        (sources.checkpoint, "org/checkpoint", ["--chunk-size", SMALL_CHUNK_SIZE]),
        (sources.arrays_dir, "data/arrays", ["--chunk-size", SMALL_CHUNK_SIZE]),
    ]
    for source, name, chunk_options in pushes:
        arguments = ["--store", store, *options, *chunk_options, source, name]
        result = run_shardfs("push", *arguments)
        assert result.returncode == 0, f"push of {name} failed: {result.stderr}"


@pytest.fixture(scope="module")
def local_models(tmp_path_factory, sources) -> PushedStore:
    store = str(tmp_path_factory.mktemp("local") / "store")
    push_sources(sources, store)
    return PushedStore(url=store, endpoint=None)


@pytest.fixture(scope="module")
def s3_models(moto_endpoint, sources) -> PushedStore:
    bucket = f"loaders-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    store = f"s3://{bucket}/models-root"
    push_sources(sources, store, "--endpoint-url", moto_endpoint)
    return PushedStore(url=store, endpoint=moto_endpoint)


@pytest.fixture(scope="module", params=["local", "s3"])
def pushed_store(request) -> PushedStore:
    """The pushed sources in a local directory store or an S3 store."""
    return request.getfixturevalue(f"{request.param}_models")


@pytest.fixture
def mount(pushed_store, tmp_path):
    """A fresh mount of the pushed store, with an empty cache."""
    mountpoint = str(tmp_path / "mnt")
    with mounted(pushed_store.url, mountpoint, endpoint=pushed_store.endpoint) as mount:
        yield mount
        # Collect reference cycles that may still hold a mapping of a mounted
        # file, because a busy mount fails to unmount.
        gc.collect()


def file_sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def mismatched_tensors(actual: dict, expected: dict) -> list[str]:
    """Return the names in *expected* that *actual* lacks or whose tensors differ."""
    names = []
    for name, tensor in expected.items():
        other = actual.get(name)
        if other is None or other.dtype != tensor.dtype:
            names.append(name)
        elif not torch.equal(other, tensor):
            names.append(name)
    return names


# The tests below that map a mounted file compare first and assert after
# the mapping is dropped, because a failed assert keeps the test's locals
# alive and a mapped file keeps the mount busy at unmount.


def test_safetensors_load_file_matches(mount, sources):
    expected = safetensors.torch.load_file(sources.minilm)

    loaded = safetensors.torch.load_file(os.path.join(mount.path, MINILM_PATH))
    keys = set(loaded)
    mismatched = mismatched_tensors(loaded, expected)
    del loaded

    assert keys == set(expected)
    assert mismatched == []


def test_safe_open_get_tensor_matches(mount, sources):
    expected = safetensors.torch.load_file(sources.minilm)

    loaded = {}
    path = os.path.join(mount.path, MINILM_PATH)
    with safetensors.safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
        # Reverse order, so the reads jump backward across chunks.
        for name in sorted(keys, reverse=True):
            loaded[name] = handle.get_tensor(name)
    mismatched = mismatched_tensors(loaded, expected)
    del loaded

    assert keys == set(expected)
    assert mismatched == []


@pytest.mark.parametrize(
    ("relative_path", "source_name"),
    [
        (MINILM_PATH, "minilm"),
        (CHECKPOINT_PATH, "checkpoint"),
        (RANDOM_PATH, "random_file"),
    ],
    ids=["minilm", "checkpoint", "random"],
)
def test_sha256sum_matches_source(mount, sources, relative_path, source_name):
    result = subprocess.run(
        ["sha256sum", os.path.join(mount.path, relative_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == file_sha256(getattr(sources, source_name))


def test_cp_copy_matches_source(mount, sources, tmp_path):
    copy = tmp_path / "copy.safetensors"

    result = subprocess.run(
        ["cp", os.path.join(mount.path, MINILM_PATH), str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert copy.stat().st_size == os.path.getsize(sources.minilm)
    assert filecmp.cmp(copy, sources.minilm, shallow=False)


@pytest.mark.parametrize("use_mmap", [False, True], ids=["read", "mmap"])
def test_torch_load_matches_checkpoint(mount, use_mmap):
    expected = checkpoint_tensors()

    path = os.path.join(mount.path, CHECKPOINT_PATH)
    loaded = torch.load(path, mmap=use_mmap, weights_only=True)
    keys = set(loaded)
    mismatched = mismatched_tensors(loaded, expected)
    del loaded

    assert keys == set(expected)
    assert mismatched == []


@pytest.mark.parametrize(
    ("dtype", "offset"),
    [(np.dtype(np.uint8), 0), (np.dtype("<u4"), MIB - 12)],
    ids=["whole-file-uint8", "offset-uint32"],
)
def test_numpy_memmap_matches_source(mount, sources, dtype, offset):
    # The second case maps from an offset that is not page aligned and lies
    # just before the end of the first chunk.
    count = (RANDOM_FILE_SIZE - offset) // dtype.itemsize
    expected = np.fromfile(sources.random_file, dtype=dtype, count=count, offset=offset)

    path = os.path.join(mount.path, RANDOM_PATH)
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
    equal = np.array_equal(mapped, expected)
    del mapped

    assert equal


def test_numpy_load_mmap_matches_source(mount, sources):
    expected = np.load(sources.matrix_file)

    mapped = np.load(os.path.join(mount.path, MATRIX_PATH), mmap_mode="r")
    dtype = mapped.dtype
    shape = mapped.shape
    equal = np.array_equal(mapped, expected)
    del mapped

    assert dtype == expected.dtype
    assert shape == expected.shape
    assert equal


def test_mmap_shared_matches_source(mount, sources):
    with open(sources.random_file, "rb") as file:
        expected = file.read()

    # Linux rejects MAP_SHARED of a FUSE file opened with direct I/O (ENODEV
    # from fuse_file_mmap, unless the daemon sets FUSE_DIRECT_IO_ALLOW_MMAP).
    fd = os.open(os.path.join(mount.path, RANDOM_PATH), os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapped:
            length = len(mapped)
            # Read the partial last page first, so it is faulted in on its own
            # and not as part of a sequential read.
            tail = mapped[length - 4096 :]
            content = mapped[:]
    finally:
        os.close(fd)

    assert length == len(expected)
    assert tail == expected[-4096:]
    assert content == expected


def test_concurrent_readers_match_source(mount, sources, tmp_path):
    path = os.path.join(mount.path, RANDOM_PATH)
    start_file = tmp_path / "start"
    readers = []
    outputs = []
    try:
        for seed in range(READER_COUNT):
            arguments = [path, str(start_file), str(seed)]
            arguments += [str(PREADS_PER_READER), str(MAX_PREAD_LENGTH)]
            reader = subprocess.Popen(
                [sys.executable, "-c", READER_SCRIPT, *arguments],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            readers.append(reader)
        start_file.touch()
        for reader in readers:
            stdout, stderr = reader.communicate(timeout=60)
            outputs.append((reader.returncode, stdout, stderr))
    finally:
        # A reader left running would keep the mount busy at unmount.
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.wait()

    failures = [stderr for returncode, _, stderr in outputs if returncode != 0]
    assert failures == []

    reports = [json.loads(stdout) for _, stdout, _ in outputs]
    expected_sha256 = file_sha256(sources.random_file)
    digests = [report["sha256"] for report in reports]
    assert digests == [expected_sha256] * READER_COUNT

    wrong_preads = []
    source_fd = os.open(sources.random_file, os.O_RDONLY)
    try:
        for index, report in enumerate(reports):
            for offset, length, digest in report["preads"]:
                data = os.pread(source_fd, length, offset)
                if hashlib.sha256(data).hexdigest() != digest:
                    wrong_preads.append((index, offset, length))
    finally:
        os.close(source_fd)
    assert wrong_preads == []
    pread_count = sum(len(report["preads"]) for report in reports)
    assert pread_count == READER_COUNT * PREADS_PER_READER

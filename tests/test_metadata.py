"""Metadata through the mount: blocks, statfs, listings, names, EROFS, locks.

One store and one mount are shared by most tests here. It contains a model of
files sized around a 64 KiB chunk, a model nested three names deep, and a
model of 5,050 small files whose listing fills many readdir replies.
"""

import errno
import fcntl
import os
import shlex
import stat
import subprocess

import pytest

from conftest import Mount, mounted, needs_fuse, run_shardfs

pytestmark = needs_fuse

KiB = 1024
MiB = 1024 * KiB
CHUNK_SIZE = 64 * KiB
SIZES = (0, 1, 4095, 4096, 4097, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 17)

SIZED_MODEL = "org/model"
NESTED_MODEL = "a/b/c"
LISTING_MODEL = "big/listing"
LISTING_SHARDS = 5000


def shard_names() -> list[str]:
    return [
        f"model-{index:05d}-of-{LISTING_SHARDS:05d}.safetensors"
        for index in range(1, LISTING_SHARDS + 1)
    ]


def long_names() -> list[str]:
    """Return 50 distinct names of 200 to 249 bytes, some with UTF-8 letters."""
    names = []
    for index in range(50):
        stem = f"long-{index:02d}-" + ("é" if index % 5 == 0 else "x")
        target = 200 + index
        padding = target - len(stem.encode()) - len(".bin")
        name = stem + "n" * padding + ".bin"
        assert len(name.encode()) == target
        names.append(name)
    return names


def push(store: str, source: str, name: str, *options: str) -> None:
    result = run_shardfs("push", "--store", store, *options, source, name)
    assert result.returncode == 0, result.stderr


class Served:
    """The shared mount of this module's store."""

    def __init__(self, mount: Mount, total_bytes: int):
        self.mount = mount
        self.root = mount.path
        self.total_bytes = total_bytes  # the sum of the sizes of all files served

    def model(self, name: str) -> str:
        return os.path.join(self.root, name)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("metadata")
    store = str(root / "store")

    sized = root / "sized"
    (sized / "sub" / "dir").mkdir(parents=True)
    for size in SIZES:
        (sized / f"size-{size}.bin").write_bytes(os.urandom(size))
    (sized / "sub" / "dir" / "nested.txt").write_bytes(b"nested file\n")
    push(store, str(sized), SIZED_MODEL, "--chunk-size", str(CHUNK_SIZE))

    nested = root / "nested"
    nested.mkdir()
    (nested / "config.json").write_text('{"hidden_size": 8}\n')
    push(store, str(nested), NESTED_MODEL)

    listing = root / "listing"
    listing.mkdir()
    # Each file contains its own name, so a listing entry and its bytes can
    # be checked against each other.
    for name in shard_names() + long_names():
        (listing / name).write_bytes(name.encode())
    push(store, str(listing), LISTING_MODEL)

    total_bytes = sum(
        path.stat().st_size
        for directory in (sized, nested, listing)
        for path in directory.rglob("*")
        if path.is_file()
    )
    with mounted(store, str(root / "mnt")) as mount:
        yield Served(mount, total_bytes)


# Blocks and disk usage


@pytest.mark.parametrize("size", SIZES)
def test_blocks_cover_size(served, size):
    info = os.stat(os.path.join(served.model(SIZED_MODEL), f"size-{size}.bin"))
    assert info.st_size == size
    assert info.st_blocks * 512 >= info.st_size


@pytest.mark.parametrize("size", SIZES)
def test_du_reports_about_the_size(served, size):
    path = os.path.join(served.model(SIZED_MODEL), f"size-{size}.bin")
    result = subprocess.run(["du", "-B1", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    usage = int(result.stdout.split()[0])
    assert usage >= size
    assert usage - size < 4096


def test_du_of_model_directory(served):
    total = sum(SIZES) + len(b"nested file\n")
    result = subprocess.run(
        ["du", "-s", "-B1", served.model(SIZED_MODEL)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    usage = int(result.stdout.split()[0])
    assert usage >= total
    assert usage - total < 4096 * (len(SIZES) + 1)


# statfs


def test_statvfs_is_filled_in(served):
    info = os.statvfs(served.root)
    assert info.f_bsize > 0
    assert info.f_frsize > 0
    assert info.f_blocks > 0
    assert info.f_files > 0
    assert info.f_namemax == 255


def test_statvfs_blocks_cover_served_bytes(served):
    info = os.statvfs(served.root)
    assert info.f_blocks * info.f_frsize >= served.total_bytes


def test_statvfs_read_only_flag(served):
    assert os.statvfs(served.root).f_flag & os.ST_RDONLY


@pytest.mark.parametrize("option", ["-h", "-i"], ids=["df-h", "df-i"])
def test_df_works(served, option):
    result = subprocess.run(["df", option, served.root], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert served.root in result.stdout


# A large directory


def test_large_directory_lists_exact_names(served):
    expected = set(shard_names() + long_names())
    assert set(os.listdir(served.model(LISTING_MODEL))) == expected


def test_large_directory_has_no_duplicates(served):
    names = os.listdir(served.model(LISTING_MODEL))
    assert len(names) == len(set(names))
    assert len(names) == LISTING_SHARDS + 50


def test_large_directory_find_counts_files(served):
    command = f"find {shlex.quote(served.model(LISTING_MODEL))} -type f | wc -l"
    result = subprocess.run(command, shell=True, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == LISTING_SHARDS + 50


def test_large_directory_repeated_listings_equal(served):
    directory = served.model(LISTING_MODEL)
    first = os.listdir(directory)
    for _ in range(3):
        assert os.listdir(directory) == first


def test_large_directory_entries_match_contents(served):
    directory = served.model(LISTING_MODEL)
    with os.scandir(directory) as entries:
        sizes = {entry.name: entry.stat().st_size for entry in entries}
    wrong = [name for name, size in sizes.items() if size != len(name.encode())]
    assert wrong == []
    for name in shard_names()[::500] + long_names()[::10]:
        with open(os.path.join(directory, name), "rb") as file:
            assert file.read() == name.encode(), name


# Nested model names


def test_root_lists_first_name_components(served):
    assert sorted(os.listdir(served.root)) == ["a", "big", "org"]


@pytest.mark.parametrize(
    "directory, expected",
    [("a", ["b"]), ("a/b", ["c"]), ("a/b/c", ["config.json"]), ("big", ["listing"])],
)
def test_nested_name_directories(served, directory, expected):
    path = os.path.join(served.root, directory)
    assert stat.S_ISDIR(os.stat(path).st_mode)
    assert sorted(os.listdir(path)) == expected


def test_nested_model_file_reads(served):
    with open(os.path.join(served.model(NESTED_MODEL), "config.json")) as file:
        assert file.read() == '{"hidden_size": 8}\n'


def test_subdirectory_inside_model(served):
    path = os.path.join(served.model(SIZED_MODEL), "sub", "dir", "nested.txt")
    with open(path, "rb") as file:
        assert file.read() == b"nested file\n"


def test_unknown_name_is_enoent(served):
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(served.model(SIZED_MODEL), "missing.bin"))


# shardfs ls


@pytest.fixture(params=["local", "s3"])
def listed_store(request, tmp_path):
    """A store of two models with known sizes, and the ls options it needs."""
    if request.param == "local":
        store, options = str(tmp_path / "store"), []
    else:
        store = request.getfixturevalue("s3_store")
        options = ["--endpoint-url", request.getfixturevalue("moto_endpoint")]
    first = tmp_path / "first"
    (first / "sub").mkdir(parents=True)
    (first / "weights.bin").write_bytes(os.urandom(MiB))
    (first / "sub" / "extra.bin").write_bytes(os.urandom(512 * KiB))
    push(store, str(first), "org/model", *options)
    second = tmp_path / "second"
    second.mkdir()
    (second / "tiny.txt").write_bytes(b"x" * 100)
    push(store, str(second), "a/b/c", *options)
    return store, options


def test_ls_lists_models_with_counts_and_sizes(listed_store):
    store, options = listed_store
    result = run_shardfs("ls", *options, store, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        name, files, size, stored = line.split("\t")
        rows[name] = (files, size)
        assert stored.endswith(" stored"), line
    assert rows == {"a/b/c": ("1 file", "100 B"), "org/model": ("2 files", "1.5 MiB")}


# Read-only operations


def _make_fifo(model: str, existing: str) -> None:
    os.mkfifo(os.path.join(model, "fifo"))


def _create(model: str, existing: str) -> None:
    os.close(os.open(os.path.join(model, "new.bin"), os.O_CREAT | os.O_WRONLY, 0o644))


WRITE_CALLS = {
    "mkdir": lambda model, existing: os.mkdir(os.path.join(model, "new")),
    "mkdir-in-root": lambda model, existing: os.mkdir(os.path.join(model, "..", "..", "new")),
    "create": _create,
    "open-write-only": lambda model, existing: os.close(os.open(existing, os.O_WRONLY)),
    "open-read-write": lambda model, existing: os.close(os.open(existing, os.O_RDWR)),
    "unlink": lambda model, existing: os.unlink(existing),
    "rmdir": lambda model, existing: os.rmdir(os.path.join(model, "sub", "dir")),
    "rename": lambda model, existing: os.rename(existing, os.path.join(model, "renamed")),
    "truncate": lambda model, existing: os.truncate(existing, 0),
    "chmod": lambda model, existing: os.chmod(existing, 0o600),
    "chown": lambda model, existing: os.chown(existing, 1, 1),
    "utime": lambda model, existing: os.utime(existing, (0, 0)),
    "utime-now": lambda model, existing: os.utime(existing),
    "setxattr": lambda model, existing: os.setxattr(existing, "user.test", b"1"),
    "removexattr": lambda model, existing: os.removexattr(existing, "user.test"),
    "symlink": lambda model, existing: os.symlink("target", os.path.join(model, "link")),
    "link": lambda model, existing: os.link(existing, os.path.join(model, "hardlink")),
    "mkfifo": _make_fifo,
}


@pytest.mark.parametrize("call", list(WRITE_CALLS.values()), ids=list(WRITE_CALLS))
def test_write_call_fails_with_erofs(served, call):
    model = served.model(SIZED_MODEL)
    existing = os.path.join(model, f"size-{CHUNK_SIZE}.bin")
    with pytest.raises(OSError) as info:
        call(model, existing)
    assert info.value.errno == errno.EROFS
    assert os.stat(existing).st_size == CHUNK_SIZE


def test_flock_shared_on_open_file(served):
    path = os.path.join(served.model(SIZED_MODEL), "size-4096.bin")
    with open(path, "rb") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_SH)
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def test_fcntl_read_lock_on_open_file(served):
    path = os.path.join(served.model(SIZED_MODEL), "size-4096.bin")
    with open(path, "rb") as file:
        fcntl.lockf(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.lockf(file.fileno(), fcntl.LOCK_UN)


# Extended attributes


def test_getxattr_is_quiet(served):
    directory = served.model(LISTING_MODEL)
    for name in shard_names()[:200]:
        with pytest.raises(OSError) as info:
            os.getxattr(os.path.join(directory, name), "user.checksum")
        assert info.value.errno in (errno.ENODATA, errno.EOPNOTSUPP), name
    with pytest.raises(OSError) as info:
        os.getxattr(served.root, "security.selinux")
    assert info.value.errno in (errno.ENODATA, errno.EOPNOTSUPP)
    assert served.mount.unexpected_log_lines() == []


def test_listxattr_is_empty(served):
    path = os.path.join(served.model(SIZED_MODEL), "size-1.bin")
    assert os.listxattr(path) == []

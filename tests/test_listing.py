"""Model listing changes: refresh, consistent snapshots, a store down at start."""

import errno
import os
import time

import pytest

from conftest import free_port, mounted, needs_fuse, run_shardfs
from shardfs import codec
from shardfs.manifest import ChunkRef, FileEntry, Manifest, to_json
from shardfs.mount.listing import ListingState, apply_listing
from shardfs.mount.tree import Tree

SIZE = 3 * 1024 * 1024 + 123
REFRESH = ("--refresh-interval", "0.2")


def _manifest(name: str, content: bytes, path: str = "w.bin") -> bytes:
    encoded = codec.encode(content)
    chunk = ChunkRef(0, len(content), encoded.key, len(encoded.data), encoded.codec)
    entry = FileEntry(path, len(content), 0o644, 0, "0" * 64, (chunk,))
    return to_json(Manifest(name, 1, 1 << 23, (entry,)))


def test_listing_adds_replaces_and_removes():
    tree, state = Tree(), ListingState()
    apply_listing(tree, state, {"org/a": _manifest("org/a", b"one"), "org/b": _manifest("org/b", b"two")})
    org = tree.lookup(1, "org")
    first_a = tree.lookup(tree.lookup(org.inode, "a").inode, "w.bin")

    stale = apply_listing(tree, state, {"org/a": _manifest("org/a", b"uno")})
    new_a = tree.lookup(tree.lookup(org.inode, "a").inode, "w.bin")
    assert sorted(name for _, name in stale) == ["a", "b"]
    assert new_a.inode != first_a.inode
    assert tree.lookup(org.inode, "b") is None
    assert tree.node(first_a.inode) is first_a


def test_listing_unchanged_keeps_inodes():
    tree, state = Tree(), ListingState()
    raw = {"m": _manifest("m", b"same")}
    apply_listing(tree, state, raw)
    before = tree.lookup(tree.lookup(1, "m").inode, "w.bin").inode
    assert apply_listing(tree, state, dict(raw)) == []
    assert tree.lookup(tree.lookup(1, "m").inode, "w.bin").inode == before


def test_listing_keeps_last_good_version(caplog):
    tree, state = Tree(), ListingState()
    apply_listing(tree, state, {"m": _manifest("m", b"good")})
    for _ in range(3):
        apply_listing(tree, state, {"m": b"{broken"})
    assert tree.lookup(tree.lookup(1, "m").inode, "w.bin").size == 4
    refused = [record for record in caplog.records if "refused" in record.getMessage()]
    assert len(refused) == 1


def test_listing_prunes_empty_parent_dirs():
    tree, state = Tree(), ListingState()
    apply_listing(tree, state, {"org/team/m": _manifest("org/team/m", b"x")})
    apply_listing(tree, state, {})
    assert tree.lookup(1, "org") is None


def test_listing_rejects_model_inside_model():
    tree, state = Tree(), ListingState()
    apply_listing(
        tree,
        state,
        {"org/m": _manifest("org/m", b"x"), "org/m/inner": _manifest("org/m/inner", b"y")},
    )
    model = tree.lookup(tree.lookup(1, "org").inode, "m")
    assert set(model.children) == {"w.bin"}


def _push(store: str, source, name: str) -> None:
    result = run_shardfs("push", "--store", store, "--chunk-size", "1MiB", str(source), name)
    assert result.returncode == 0, result.stderr


def _read_head(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read(64)


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@needs_fuse
def test_open_file_keeps_its_version(tmp_path, local_store):
    version1, version2 = os.urandom(SIZE), os.urandom(SIZE)
    source = tmp_path / "w.bin"
    source.write_bytes(version1)
    _push(local_store, source, "org/m")
    with mounted(local_store, str(tmp_path / "mnt"), *REFRESH) as mount:
        path = os.path.join(mount.path, "org/m/w.bin")
        with open(path, "rb") as old:
            first_half = old.read(SIZE // 2)
            source.write_bytes(version2)
            _push(local_store, source, "org/m")
            assert _wait_for(lambda: _read_head(path) == version2[:64])
            rest = old.read()
        assert first_half + rest == version1
        with open(path, "rb") as new:
            assert new.read() == version2


@needs_fuse
def test_removed_model_disappears_but_open_file_reads(tmp_path, local_store):
    content = os.urandom(SIZE)
    source = tmp_path / "w.bin"
    source.write_bytes(content)
    _push(local_store, source, "org/gone")
    _push(local_store, source, "org/kept")
    with mounted(local_store, str(tmp_path / "mnt"), *REFRESH) as mount:
        path = os.path.join(mount.path, "org/gone/w.bin")
        with open(path, "rb") as reader:
            os.remove(os.path.join(local_store, "models/org/gone/manifest.json"))
            assert _wait_for(lambda: "gone" not in os.listdir(os.path.join(mount.path, "org")))
            assert reader.read() == content
            assert os.fstat(reader.fileno()).st_size == SIZE
        with pytest.raises(FileNotFoundError):
            os.stat(path)
        assert os.listdir(os.path.join(mount.path, "org")) == ["kept"]


@needs_fuse
def test_new_model_appears_after_refresh(tmp_path, local_store):
    source = tmp_path / "w.bin"
    source.write_bytes(b"first")
    _push(local_store, source, "first")
    with mounted(local_store, str(tmp_path / "mnt"), *REFRESH) as mount:
        with pytest.raises(OSError) as info:
            os.stat(os.path.join(mount.path, "second"))
        assert info.value.errno == errno.ENOENT
        _push(local_store, source, "second")
        assert _wait_for(lambda: os.path.exists(os.path.join(mount.path, "second/w.bin")))


@needs_fuse
def test_store_down_at_start_serves_last_listing(tmp_path, s3_store, moto_endpoint):
    content = os.urandom(SIZE)
    source = tmp_path / "w.bin"
    source.write_bytes(content)
    result = run_shardfs(
        "push", "--store", s3_store, "--endpoint-url", moto_endpoint, str(source), "org/m"
    )
    assert result.returncode == 0, result.stderr
    mountpoint = str(tmp_path / "mnt")
    with mounted(s3_store, mountpoint, endpoint=moto_endpoint) as mount:
        with open(os.path.join(mount.path, "org/m/w.bin"), "rb") as file:
            assert file.read() == content

    closed_port = f"http://127.0.0.1:{free_port()}"
    options = ("--refresh-interval", "0", "--read-timeout", "2")
    with mounted(s3_store, mountpoint, *options, endpoint=closed_port) as mount:
        mount.expect_log("store is unreachable, serving 1 model from the last listing")
        with open(os.path.join(mount.path, "org/m/w.bin"), "rb") as file:
            assert file.read() == content


@needs_fuse
def test_last_listing_not_served_for_other_store(tmp_path, local_store):
    source = tmp_path / "w.bin"
    source.write_bytes(b"weights")
    _push(local_store, source, "org/m")
    mountpoint = str(tmp_path / "mnt")
    with mounted(local_store, mountpoint) as mount:
        assert os.path.exists(os.path.join(mount.path, "org/m/w.bin"))

    # The same cache directory, for another store that is unreachable.
    closed_port = f"http://127.0.0.1:{free_port()}"
    result = run_shardfs(
        "mount", "--foreground", "--cache-dir", f"{mountpoint}.cache", "--read-timeout", "2",
        "--endpoint-url", closed_port, "s3://other-bucket/models", mountpoint, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "unreachable" in result.stderr
    assert not os.path.ismount(mountpoint)


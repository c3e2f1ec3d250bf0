"""`shardfs mount --store A --store B`: a placed store through the command line."""

import os
import shutil

from conftest import TINY_MODEL_FILE, needs_fuse, run_shardfs

pytestmark = needs_fuse


def test_mount_placed_store_survives_lost_member(tmp_path):
    content = os.urandom(3 * 1024 * 1024 + 5)
    source = tmp_path / "w.bin"
    source.write_bytes(content)
    members = ["--store", str(tmp_path / "a"), "--store", str(tmp_path / "b")]
    pushed = run_shardfs("push", *members, "--chunk-size", "1MiB", str(source), "org/m")
    assert pushed.returncode == 0, pushed.stderr

    shutil.rmtree(tmp_path / "b" / "chunks")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = run_shardfs("mount", *members, "--cache-dir", str(tmp_path / "cache"), str(mountpoint))
    assert mounted.returncode == 0, mounted.stderr
    try:
        with open(mountpoint / "org/m/w.bin", "rb") as file:
            assert file.read() == content
    finally:
        assert run_shardfs("unmount", str(mountpoint)).returncode == 0


def test_mount_rejects_store_and_members(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = run_shardfs(
        "mount", "--store", str(tmp_path / "a"), "--store", str(tmp_path / "b"),
        str(tmp_path / "a"), str(tmp_path / "mnt"),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"shardfs: error: store given twice, as STORE {str(tmp_path / 'a')!r} and as "
        "--store; give one of them"
    )


def test_mount_single_store_flag_is_plain_store(tiny_store, tiny_source, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = run_shardfs(
        "mount", "--store", tiny_store, "--cache-dir", str(tmp_path / "cache"), str(mountpoint)
    )
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert (mountpoint / TINY_MODEL_FILE).read_bytes() == tiny_source.read_bytes()
    finally:
        assert run_shardfs("unmount", str(mountpoint)).returncode == 0

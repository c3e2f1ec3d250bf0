"""`shardfs mount --store A --store B`: a placed store through the command line."""

import json
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


def test_mount_reports_moved_member(tmp_path):
    content = os.urandom(8 * 1024 * 1024)
    source = tmp_path / "w.bin"
    source.write_bytes(content)
    members = ["--store", f"{tmp_path / 'a'},id=a", "--store", f"{tmp_path / 'b'},id=b"]
    # 32 chunks, so that the 3 failures which mark a member unhealthy come
    # from chunks whose placement starts with it: all but about 1 in 10^7 runs.
    pushed = run_shardfs("push", *members, "--chunk-size", "256KiB", str(source), "org/m")
    assert pushed.returncode == 0, pushed.stderr

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = tmp_path / "cache"
    mounted = run_shardfs("mount", *members, "--cache-dir", str(cache), str(mountpoint))
    assert mounted.returncode == 0, mounted.stderr
    try:
        os.rename(tmp_path / "a", tmp_path / "a.moved")
        with open(mountpoint / "org/m/w.bin", "rb") as file:
            assert file.read() == content
        status = run_shardfs("status", "--json", str(mountpoint))
        text = run_shardfs("status", str(mountpoint))
    finally:
        assert run_shardfs("unmount", str(mountpoint)).returncode == 0

    assert status.returncode == 0, status.stderr
    figures = json.loads(status.stdout)
    assert figures["store_members"] == 2
    assert figures["unhealthy_members"] == 1
    assert figures["store_failovers"] > 0
    assert "members        1 of 2 healthy" in text.stdout
    log = (cache / "daemon.log").read_text()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, warnings
    assert f"store member {tmp_path / 'a'} (id a) failed 3 times in a row" in warnings[0]
    assert "no such directory" in warnings[0]


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

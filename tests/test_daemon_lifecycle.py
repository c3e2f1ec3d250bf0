"""The mount command's lifecycle: ready on return, clean stops, stale mounts."""

import errno
import os
import signal
import subprocess
import time

import pytest

from conftest import TINY_MODEL_FILE, mounted, needs_fuse, run_shardfs, wait_unmounted

pytestmark = needs_fuse


def _daemon_pids(mountpoint: str) -> list[int]:
    result = subprocess.run(
        ["pgrep", "-f", f"shardfs.*mount.*{mountpoint}"], capture_output=True, text=True
    )
    return [int(pid) for pid in result.stdout.split()]


def test_mount_is_ready_when_command_returns(tiny_store, tiny_source, tmp_path):
    store = tiny_store
    content = tiny_source.read_bytes()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    for attempt in range(20):
        result = run_shardfs("mount", "--cache-dir", str(tmp_path / "cache"), store, str(mountpoint))
        assert result.returncode == 0, f"attempt {attempt}: {result.stderr}"
        assert os.stat(mountpoint / TINY_MODEL_FILE).st_size == len(content)
        result = run_shardfs("unmount", str(mountpoint))
        assert result.returncode == 0, result.stderr
        assert wait_unmounted(str(mountpoint))


def test_background_daemon_serves_and_logs(tiny_store, tiny_source, tmp_path):
    store = tiny_store
    content = tiny_source.read_bytes()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = tmp_path / "cache"
    result = run_shardfs("mount", "--cache-dir", str(cache), store, str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        assert (mountpoint / TINY_MODEL_FILE).read_bytes() == content
    finally:
        run_shardfs("unmount", str(mountpoint))
    assert wait_unmounted(str(mountpoint))
    log_text = (cache / "daemon.log").read_text()
    assert "is ready" in log_text
    assert cache.stat().st_mode & 0o777 == 0o700


def test_mount_rejects_file_as_cache_dir(tiny_store, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = tmp_path / "cache-file"
    cache.write_bytes(b"not a directory")
    result = run_shardfs("mount", "--cache-dir", str(cache), tiny_store, str(mountpoint))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"shardfs: error: cache directory {str(cache)!r} exists and is not a directory"
    )
    assert cache.read_bytes() == b"not a directory"
    assert not os.path.ismount(mountpoint)


@pytest.mark.parametrize(
    "cache, message",
    [
        ("store", "overlaps the store"),
        ("store/chunks", "overlaps the store"),
        ("mnt", "is inside the mountpoint"),
        ("mnt/cache", "is inside the mountpoint"),
    ],
)
@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_mount_rejects_cache_dir_overlap(tiny_store, tmp_path, cache, message, foreground):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mode = ["--foreground"] if foreground else []
    result = run_shardfs(
        "mount", *mode, "--cache-dir", str(tmp_path / cache), tiny_store, str(mountpoint), timeout=60
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
    assert os.listdir(mountpoint) == []
    assert not os.path.ismount(mountpoint)
    assert run_shardfs("verify", tiny_store).returncode == 0


def test_mount_rejects_bind_mount_of_store_as_cache(tiny_store, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    bound = tmp_path / "bound"
    bound.mkdir()
    subprocess.run(["mount", "--bind", tiny_store, str(bound)], check=True)
    try:
        for cache in (bound, bound / "chunks"):
            result = run_shardfs("mount", "--cache-dir", str(cache), tiny_store, str(mountpoint))
            assert result.returncode == 2, result.stderr
            assert "overlaps the store" in result.stderr
    finally:
        subprocess.run(["umount", str(bound)], check=True)
    assert run_shardfs("verify", tiny_store).returncode == 0


def test_mount_rejects_other_store_or_cache_as_cache(tiny_store, tiny_source, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    other_store = str(tmp_path / "other-store")
    assert run_shardfs("push", "--store", other_store, str(tiny_source), "org/other").returncode == 0
    other_cache = tmp_path / "other-cache"
    with mounted(tiny_store, str(tmp_path / "first")) as first:
        first_cache = f"{first.path}.cache"
        cases = [
            (other_store, "is a shardfs store"),
            (os.path.join(other_store, "tmp"), "which is a shardfs cache or store"),
            (os.path.join(first_cache, "tmp"), "which is a shardfs cache or store"),
            (os.path.join(first_cache, "chunks", "ab"), "which is a shardfs cache or store"),
            (f"file://{other_cache}", "expected a path, not a URL"),
        ]
        for cache, message in cases:
            result = run_shardfs(
                "mount", "--cache-dir", cache, tiny_store, str(mountpoint), cwd=tmp_path
            )
            assert result.returncode == 2, (cache, result.stderr)
            assert message in result.stderr, cache
    assert run_shardfs("verify", other_store).returncode == 0
    assert not (tmp_path / "file:").exists()


def test_mount_rejects_mountpoint_inside_store(tiny_store, tmp_path):
    mountpoint = os.path.join(tiny_store, "models", "mnt")
    os.mkdir(mountpoint)
    try:
        result = run_shardfs("mount", "--cache-dir", str(tmp_path / "cache"), tiny_store, mountpoint)
    finally:
        os.rmdir(mountpoint)
    assert result.returncode == 2
    assert "overlaps the store" in result.stderr
    assert not os.path.ismount(mountpoint)


def test_mount_rejects_store_inside_cache_dir(tiny_store, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_shardfs("mount", "--cache-dir", str(tmp_path), tiny_store, str(mountpoint))
    assert result.returncode == 2
    assert "overlaps the store" in result.stderr
    assert run_shardfs("verify", tiny_store).returncode == 0


def test_mount_rejects_unwritable_cache_dir(tiny_store, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = tmp_path / "read-only"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(cache)], check=True)
    try:
        result = run_shardfs("mount", "--cache-dir", str(cache), tiny_store, str(mountpoint))
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("shardfs: error: cannot write the daemon log")
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(mountpoint)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_unmounts_cleanly(tiny_store, tmp_path, signum):
    store = tiny_store
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_shardfs("mount", "--cache-dir", str(tmp_path / "cache"), store, str(mountpoint))
    assert result.returncode == 0, result.stderr
    pids = _daemon_pids(str(mountpoint))
    assert len(pids) == 1
    os.kill(pids[0], signum)
    assert wait_unmounted(str(mountpoint))
    deadline = time.monotonic() + 10
    while _daemon_pids(str(mountpoint)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _daemon_pids(str(mountpoint)) == []


def test_mount_clears_stale_mount_of_killed_daemon(tiny_store, tiny_source, tmp_path):
    store = tiny_store
    content = tiny_source.read_bytes()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = str(tmp_path / "cache")
    result = run_shardfs("mount", "--cache-dir", cache, store, str(mountpoint))
    assert result.returncode == 0, result.stderr
    os.kill(_daemon_pids(str(mountpoint))[0], signal.SIGKILL)
    time.sleep(0.2)
    try:
        with pytest.raises(OSError) as info:
            os.statvfs(mountpoint)
        assert info.value.errno == errno.ENOTCONN
        again = run_shardfs("mount", "--cache-dir", cache, store, str(mountpoint))
        assert again.returncode == 0, again.stderr
        assert (mountpoint / TINY_MODEL_FILE).read_bytes() == content
        assert run_shardfs("unmount", str(mountpoint)).returncode == 0
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def test_mount_rejects_cache_dir_in_use(tiny_store, tmp_path):
    cache = tmp_path / "shared-cache"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    result = run_shardfs("mount", "--cache-dir", str(cache), tiny_store, str(first))
    assert result.returncode == 0, result.stderr
    try:
        again = run_shardfs("mount", "--cache-dir", str(cache), tiny_store, str(second))
        log_text = (cache / "daemon.log").read_text()
    finally:
        run_shardfs("unmount", str(first))
    assert wait_unmounted(str(first))
    assert again.returncode == 2
    assert "is in use by another mount" in again.stderr
    assert "in use by another mount" not in log_text
    assert not os.path.ismount(second)


def test_mount_rejects_other_filesystem_mounted(tiny_store, tmp_path):
    store = tiny_store
    with mounted(store, str(tmp_path / "mnt")):
        again = run_shardfs("mount", "--cache-dir", str(tmp_path / "c2"), store, str(tmp_path / "mnt"))
        assert again.returncode == 2
        assert "already a mount point" in again.stderr


def test_foreground_mount_exits_zero_on_unmount(tiny_store, tiny_source, tmp_path):
    store = tiny_store
    content = tiny_source.read_bytes()
    with mounted(store, str(tmp_path / "mnt")) as mount:
        assert (tmp_path / "mnt" / TINY_MODEL_FILE).read_bytes() == content
        assert mount.process.poll() is None


# The mount's source in /proc/mounts, and shardfs unmount's errors.


def proc_mounts_line(mountpoint) -> list[str]:
    """Return the fields of the /proc/self/mounts line of *mountpoint*, as the kernel wrote them."""
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as mounts:
        lines = [line.split() for line in mounts if line.split()[1] == str(mountpoint)]
    assert len(lines) == 1, lines
    return lines[0]


def kernel_escaped(text: str) -> str:
    """Return *text* as /proc/mounts writes it: space, tab, newline and backslash in octal."""
    for character in "\\ \t\n":
        text = text.replace(character, f"\\{ord(character):03o}")
    return text


def test_proc_mounts_source_is_store_path(tiny_store, tiny_source, tmp_path):
    # Commas, spaces, backslashes and non-ASCII letters must survive the
    # FUSE option string.
    store = tmp_path / "store, with space\\and é"
    os.rename(tiny_store, store)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = str(tmp_path / "cache")
    result = run_shardfs("mount", "--cache-dir", cache, str(store), str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        source, _, fstype, *_ = proc_mounts_line(mountpoint)
        assert source == kernel_escaped(str(store))
        assert fstype == "fuse.shardfs"
        assert (mountpoint / TINY_MODEL_FILE).read_bytes() == tiny_source.read_bytes()
    finally:
        assert run_shardfs("unmount", str(mountpoint)).returncode == 0


def test_proc_mounts_source_is_s3_url(tmp_path, s3_store, moto_endpoint, tiny_source):
    options = ("--endpoint-url", moto_endpoint)
    pushed = run_shardfs("push", *options, "--store", s3_store, str(tiny_source), "org/tiny")
    assert pushed.returncode == 0, pushed.stderr
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_shardfs(
        "mount", *options, "--cache-dir", str(tmp_path / "cache"), s3_store, str(mountpoint)
    )
    assert result.returncode == 0, result.stderr
    try:
        assert proc_mounts_line(mountpoint)[:3] == [s3_store, str(mountpoint), "fuse.shardfs"]
    finally:
        assert run_shardfs("unmount", str(mountpoint)).returncode == 0


def test_proc_mounts_source_of_placed_store(tmp_path, tiny_source):
    members = [str(tmp_path / "a"), str(tmp_path / "b")]
    store_flags = ["--store", members[0], "--store", f"{members[1]},weight=2"]
    pushed = run_shardfs("push", *store_flags, str(tiny_source), "org/tiny")
    assert pushed.returncode == 0, pushed.stderr
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_shardfs(
        "mount", *store_flags, "--cache-dir", str(tmp_path / "cache"), str(mountpoint)
    )
    assert result.returncode == 0, result.stderr
    try:
        assert proc_mounts_line(mountpoint)[0] == "+".join(members)
    finally:
        assert run_shardfs("unmount", str(mountpoint)).returncode == 0


def test_unmount_not_mounted(tmp_path):
    result = run_shardfs("unmount", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"shardfs: error: {str(tmp_path)!r} is not mounted"


def test_unmount_busy_mount(tiny_store, tmp_path):
    mountpoint = tmp_path / "mnt"
    with mounted(tiny_store, str(mountpoint)):
        with open(mountpoint / TINY_MODEL_FILE, "rb"):
            result = run_shardfs("unmount", str(mountpoint))
            assert result.returncode == 2
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert lines[0].startswith(f"shardfs: error: unmounting {str(mountpoint)!r} failed: ")
            assert "busy, because files on it are open or mapped" in lines[0]
            lazy = "umount -l" if os.geteuid() == 0 else "fusermount3 -u -z"
            assert f"'{lazy} {mountpoint}'" in lines[0]
            assert os.path.ismount(mountpoint)

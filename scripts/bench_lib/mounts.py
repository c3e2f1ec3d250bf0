"""FUSE mounts under test: a shardfs daemon and s3fs-fuse on the same server."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from bench_lib.servers import ACCESS_KEY, SECRET_KEY, Server, client_env
from bench_lib.system import run, wait_until

MOUNT_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 60.0
STATS_TIMEOUT_S = 10.0
STATS_FILE = "stats.json"
PID_FILE = "daemon.pid"
SIGUSR1_BIT = 1 << (signal.SIGUSR1 - 1)


def shardfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "shardfs", *args]


def shardfs_mount_flags() -> set[str]:
    """Return the long options that this shardfs's ``mount`` accepts."""
    output = run(shardfs_command("mount", "--help")).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", output))


def _unmount(mountpoint: str) -> None:
    """Unmount a FUSE mount, retrying while it is busy, lazily as a last resort."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
    for _ in range(10):
        if not os.path.ismount(mountpoint):
            return
        if subprocess.run([fusermount, "-u", mountpoint], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    subprocess.run([fusermount, "-uz", mountpoint], capture_output=True)
    subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def _read_status_field(pid: int, field: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _pid_alive(pid: int) -> bool:
    # A zombie has exited but is still listed until its parent reaps it.
    state = _read_status_field(pid, "State")
    return state is not None and not state.startswith("Z")


class ShardfsMount:
    """One shardfs daemon, started with ``shardfs mount`` and stopped with unmount."""

    def __init__(self, server: Server, store_url: str, mountpoint: str, cache_dir: str, options: list[str]):
        self.server = server
        self.store_url = store_url
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.options = options
        self.pid: int | None = None
        self.exit_stats: dict | None = None
        self._started_at = 0.0

    def __enter__(self) -> "ShardfsMount":
        os.makedirs(self.mountpoint, exist_ok=True)
        os.makedirs(self.cache_dir, exist_ok=True)
        self._started_at = time.time()
        command = shardfs_command(
            "mount", "--cache-dir", self.cache_dir, "--endpoint-url", self.server.endpoint,
            *self.options, self.store_url, self.mountpoint,
        )
        result = subprocess.run(
            command, capture_output=True, text=True, env=client_env(self.server.endpoint), timeout=MOUNT_TIMEOUT_S + 30
        )
        if result.returncode != 0:
            raise RuntimeError(f"shardfs mount failed ({result.returncode}): {result.stderr.strip()}")
        self.pid = self._find_daemon()
        return self

    def __exit__(self, *exc_info) -> None:
        self.unmount()

    def _find_daemon(self) -> int | None:
        try:
            with open(os.path.join(self.cache_dir, PID_FILE)) as file:
                return int(file.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        import psutil

        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = process.info["cmdline"] or []
            if "--foreground" in cmdline and self.mountpoint in cmdline and "shardfs" in " ".join(cmdline):
                return process.info["pid"]
        return None

    def handles_sigusr1(self) -> bool:
        # Sending SIGUSR1 to a daemon without a handler would kill it, so check
        # its caught-signal mask first.
        if self.pid is None:
            return False
        mask = _read_status_field(self.pid, "SigCgt")
        return mask is not None and bool(int(mask, 16) & SIGUSR1_BIT)

    def snapshot(self) -> dict | None:
        """Ask the daemon for its counters (SIGUSR1) and return them, or None."""
        if not self.handles_sigusr1():
            return None
        path = os.path.join(self.cache_dir, STATS_FILE)
        before = _stat_key(path)
        os.kill(self.pid, signal.SIGUSR1)
        if not wait_until(lambda: _stat_key(path) != before, STATS_TIMEOUT_S, interval_s=0.05):
            return None
        return _read_json(path)

    def peak_rss(self) -> int | None:
        """Return the daemon's peak resident memory in bytes (VmHWM)."""
        value = _read_status_field(self.pid, "VmHWM") if self.pid else None
        if value is None:
            return None
        number, _, unit = value.partition(" ")
        return int(number) * 1024 if unit.strip() == "kB" else int(number)

    def cpu_seconds(self) -> float | None:
        """Return the daemon's user plus system CPU time so far."""
        import psutil

        try:
            times = psutil.Process(self.pid).cpu_times()
        except (psutil.Error, TypeError):
            return None
        return times.user + times.system

    def unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(shardfs_command("unmount", self.mountpoint), capture_output=True)
            _unmount(self.mountpoint)
        if self.pid is not None:
            if not wait_until(lambda: not _pid_alive(self.pid), EXIT_TIMEOUT_S):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            path = os.path.join(self.cache_dir, STATS_FILE)
            key = _stat_key(path)
            if key is not None and key[0] >= self._started_at:
                self.exit_stats = _read_json(path)
            self.pid = None


def _stat_key(path: str) -> tuple[float, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


def _read_json(path: str) -> dict | None:
    # The daemon may be rewriting the file; a torn read is retried briefly.
    for _ in range(20):
        try:
            with open(path) as file:
                return json.load(file)
        except ValueError:
            time.sleep(0.05)
        except OSError:
            return None
    return None


class S3fsMount:
    """An s3fs-fuse mount of the plain objects, optionally with its disk cache."""

    def __init__(self, server: Server, prefix: str, mountpoint: str, run_dir: str, cache_dir: str | None):
        self.server = server
        self.prefix = prefix
        self.mountpoint = mountpoint
        self.run_dir = run_dir
        self.cache_dir = cache_dir

    def options(self) -> list[str]:
        passwd = os.path.join(self.run_dir, "s3fs.passwd")
        with open(os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
            file.write(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        options = [
            "ro",
            f"url={self.server.endpoint}",
            "use_path_request_style",
            f"passwd_file={passwd}",
            "endpoint=us-east-1",
            f"logfile={os.path.join(self.run_dir, 's3fs.log')}",
            "dbglevel=warn",
        ]
        if self.cache_dir:
            os.makedirs(self.cache_dir, exist_ok=True)
            options.append(f"use_cache={self.cache_dir}")
        return options

    def __enter__(self) -> "S3fsMount":
        os.makedirs(self.mountpoint, exist_ok=True)
        source = f"{self.server.bucket}:/{self.prefix.strip('/')}"
        command = ["s3fs", source, self.mountpoint, "-o", ",".join(self.options())]
        env = client_env(self.server.endpoint)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=MOUNT_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"s3fs failed ({result.returncode}): {result.stderr.strip()}")
        if not wait_until(lambda: os.path.ismount(self.mountpoint), 30.0):
            raise RuntimeError(f"s3fs did not mount {self.mountpoint} within 30 s")
        return self

    def __exit__(self, *exc_info) -> None:
        _unmount(self.mountpoint)

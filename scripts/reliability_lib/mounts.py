"""The moto server and shardfs daemons of the reliability runs."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

from fault_harness import REPO

READY_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server(log_path: str):
    """Start moto's S3 server on 127.0.0.1 and yield its URL."""
    port = free_port()
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"moto server exited with {server.returncode}; see {log_path}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start in 30 s; see {log_path}")
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def shardfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "shardfs", *args]


class Daemon:
    """A ``shardfs mount --foreground`` started for one run, with its log file."""

    def __init__(self, store: str, mountpoint: str, *options: str, endpoint: str | None = None):
        self.mountpoint = mountpoint
        self.cache_dir = f"{mountpoint}.cache"
        self.log_path = f"{mountpoint}.log"
        os.makedirs(mountpoint, exist_ok=True)
        # A second daemon on the same mountpoint appends to the same log, and
        # reads only its own part of it.
        self._log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        args = ["--log-level", "INFO", "mount", "--foreground", "--cache-dir", self.cache_dir]
        args += options
        if endpoint:
            args += ["--endpoint-url", endpoint]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                shardfs_command(*args, store, mountpoint),
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        # Set when the daemon exited before it reported the mount ready.
        self.start_error: str | None = None

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "is ready" not in self.log_text():
            if self.process.poll() is not None:
                status = self.process.returncode
                self.start_error = self.last_error_line() or f"exit status {status}"
                return False
            if time.monotonic() > deadline:
                self.kill()
                self.start_error = f"not ready after {READY_TIMEOUT_S:.0f} s"
                return False
            time.sleep(0.05)
        return True

    def alive(self) -> bool:
        return self.process.poll() is None

    def path(self, relative: str) -> str:
        return os.path.join(self.mountpoint, relative)

    def log_text(self) -> str:
        with open(self.log_path, "rb") as file:
            file.seek(self._log_offset)
            return file.read().decode(errors="replace")

    def lines(self, level: str, pattern: str = "") -> list[str]:
        return [
            line
            for line in self.log_text().splitlines()
            if line.startswith(level) and pattern in line
        ]

    def last_error_line(self) -> str | None:
        lines = [
            line
            for line in self.log_text().splitlines()
            if line.startswith(("shardfs: error", "ERROR")) or "Error:" in line
        ]
        return lines[-1].strip() if lines else None

    def stop(self) -> int | None:
        """Unmount and return the daemon's exit status, or None if it had to be killed."""
        if self.process.poll() is not None:
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
            return self.process.returncode
        subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def running(store: str, mountpoint: str, *options: str, endpoint: str | None = None):
    """Yield a `Daemon`, whose `start_error` is None if it started, and unmount it on exit."""
    daemon = Daemon(store, mountpoint, *options, endpoint=endpoint)
    daemon.wait_ready()
    try:
        yield daemon
    finally:
        if daemon.start_error is None:
            daemon.stop()
        else:
            daemon.kill()

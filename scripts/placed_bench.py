#!/usr/bin/env python3
"""Time a cold load through a placed store, healthy and with one member failing.

Starts three moto S3 servers on 127.0.0.1 as the members, pushes a
synthetic bf16 safetensors file of ``--size`` bytes with two replicas of
every chunk, then for each case mounts the placed store with an empty cache,
reads the whole file in 1 MiB reads, checks its sha256 and prints one line:

- ``healthy``: every member serves.
- ``down``: one member's endpoint is a loopback port with no server, so its
  requests are refused (the cost of noticing a dead member). Its id stays
  the same, and with it the placement.
- ``hung``: one member's server is paused with SIGSTOP before the mount, so
  its requests are accepted but get no response (the cost of the hedge
  delay).

The stopped or paused member is the first member, which is first in the
rank of about a third of the chunks. Each case runs ``--repeat`` times and
the line shows the median and the range. Needs FUSE (``/dev/fuse`` and
``fusermount3``) and the test extras (moto, torch, safetensors).

    python scripts/placed_bench.py --size 256MiB --repeat 3
"""

import argparse
import hashlib
import os
import pickle
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CASES = ("healthy", "down", "hung")
MIB = 1024 * 1024

MOUNT_LAUNCHER = """
import logging, pickle, sys
from shardfs.mount.daemon import serve
logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
for name in ("botocore", "boto3", "urllib3"):
    logging.getLogger(name).setLevel(logging.WARNING)
store_config, mount_config = pickle.loads(bytes.fromhex(sys.argv[1]))
serve(store_config, mount_config)
"""


def parse_size(text: str) -> int:
    from shardfs.config import parse_size as shardfs_parse_size
    from shardfs.errors import UsageError

    try:
        return shardfs_parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    def __init__(self, log_path: str):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"moto server on port {self.port} did not start; see {self.log_path}"
                    )
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def write_model(path: str, size: int) -> None:
    import safetensors.torch
    import torch

    generator = torch.Generator().manual_seed(0)
    elements = size // 2 // 8
    tensors = {}
    for index in range(8):
        weights = torch.randn(elements, generator=generator) * 0.02
        tensors[f"layer{index}.weight"] = weights.to(torch.bfloat16)
    safetensors.torch.save_file(tensors, path)


def mount_and_read(config, work_dir: str, run: int, case: str, file_path: str) -> float:
    """Mount *config* with an empty cache, read *file_path* under it, return seconds."""
    from shardfs.config import MountConfig

    mountpoint = os.path.join(work_dir, f"mnt-{case}-{run}")
    os.makedirs(mountpoint)
    mount_config = MountConfig(mountpoint=mountpoint, cache_dir=f"{mountpoint}.cache")
    log_path = f"{mountpoint}.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-c", MOUNT_LAUNCHER, pickle.dumps((config, mount_config)).hex()],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not os.path.ismount(mountpoint) or "is ready" not in open(log_path).read():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mount did not start; see {log_path}")
            time.sleep(0.05)
        digest = hashlib.sha256()
        started = time.monotonic()
        with open(os.path.join(mountpoint, "bench", "model.safetensors"), "rb") as file:
            while block := file.read(MIB):
                digest.update(block)
        elapsed = time.monotonic() - started
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
            daemon.kill()
    with open(file_path, "rb") as file:
        expected = hashlib.file_digest(file, "sha256").hexdigest()
    if digest.hexdigest() != expected:
        raise SystemExit(f"case {case}: the mounted file differs from the source; see {log_path}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("256MiB"), help="model bytes (default: 256MiB)"
    )
    parser.add_argument(
        "--chunk-size", default="8MiB", help="shardfs push --chunk-size (default: 8MiB)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (default: 3)")
    parser.add_argument(
        "--hedge-after",
        type=float,
        default=2.0,
        help="seconds before a read is also started on the next member (default: 2.0)",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="directory for logs, mounts and caches (default: a new temporary one)",
    )
    options = parser.parse_args()

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        os.environ[name] = value
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_PROFILE", None)

    import boto3

    from shardfs.stores.placed import PlacedStoreConfig, parse_member, placed_config

    work_dir = options.work_dir or tempfile.mkdtemp(prefix="shardfs-placed-bench-")
    os.makedirs(work_dir, exist_ok=True)
    servers = [MotoServer(os.path.join(work_dir, f"moto-{index}.log")) for index in range(3)]
    try:
        values = []
        for index, server in enumerate(servers):
            server.start()
            client = boto3.client("s3", endpoint_url=server.endpoint)
            client.create_bucket(Bucket=f"member-{index}")
            values.append(f"s3://member-{index}/root,endpoint={server.endpoint}")
        source = os.path.join(work_dir, "model.safetensors")
        write_model(source, options.size)
        store_arguments = [argument for value in values for argument in ("--store", value)]
        command = [sys.executable, "-m", "shardfs", "push", *store_arguments]
        command += ["--chunk-size", options.chunk_size, source, "bench"]
        push = subprocess.run(command, capture_output=True, text=True)
        if push.returncode != 0:
            raise SystemExit(f"push failed: {push.stderr.strip()}")

        configs = {}
        refused = f"http://127.0.0.1:{free_port()}"
        for case in CASES:
            case_values = list(values)
            if case == "down":
                case_values[0] = f"s3://member-0/root,endpoint={refused}"
            base = placed_config([parse_member(value, None, 16) for value in case_values], 2, 16)
            configs[case] = PlacedStoreConfig(
                base.members,
                base.replicas,
                base.max_connections,
                hedge_after_s=options.hedge_after,
            )
        size = os.path.getsize(source)
        print(
            f"model {size / MIB:.0f} MiB, chunk size {options.chunk_size}, 3 members, "
            f"2 replicas, hedge after {options.hedge_after:g} s"
        )
        healthy_median = None
        for case in CASES:
            samples = []
            for run in range(options.repeat):
                if case == "hung":
                    os.kill(servers[0].process.pid, signal.SIGSTOP)
                try:
                    samples.append(mount_and_read(configs[case], work_dir, run, case, source))
                finally:
                    if case == "hung":
                        os.kill(servers[0].process.pid, signal.SIGCONT)
            median = statistics.median(samples)
            if case == "healthy":
                healthy_median = median
            ratio = median / healthy_median if healthy_median else 1.0
            print(
                f"{case:8} {median:6.2f} s (min {min(samples):.2f}, max {max(samples):.2f})"
                f"  {size / MIB / median:7.1f} MiB/s  {ratio:5.2f}x healthy"
            )
    finally:
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

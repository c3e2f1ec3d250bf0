"""Run store faults and bad inputs against real mounts and write docs/RELIABILITY.md.

The script starts its own moto S3 server on 127.0.0.1 and puts the test
proxy of tests/s3proxy.py in front of it, with tests/fault_harness.py
choosing the faults. It pushes three models in 256 KiB chunks (a torch.save
checkpoint, a safetensors file and 24 MiB of random bytes) and mounts them
with the shardfs of this checkout. Each row of the report is one run: a
fault or a bad input, how often it was applied, what the reader saw (exact
bytes, or an error after how long) and whether the daemon stayed up.

Run it from the repository root, as root (it mounts tmpfs cache disks),
after ./scripts/setup.sh:

    .venv/bin/python scripts/reliability.py

It takes about five minutes on two cores. Nothing is sent anywhere but
127.0.0.1.
"""

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Credentials valid only on the moto server this script starts. boto3 must
# find no profile, role or endpoint of this host.
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
    AWS_CONFIG_FILE=os.devnull,
    AWS_SHARED_CREDENTIALS_FILE=os.devnull,
)
# The checkout's shardfs, the test proxy and fault harness, and this
# script's own package.
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "scripts")]

import fault_harness  # noqa: E402
from fault_harness import NESTED_MANIFESTS, RAW_SIZE, push_models, write_sources  # noqa: E402
from reliability_lib.mounts import moto_server  # noqa: E402
from reliability_lib.report import render  # noqa: E402
from reliability_lib.runs import Runner  # noqa: E402

# (rate, failed attempts per faulted chunk) for each transient fault kind.
TRANSIENT_RATES = {
    fault_harness.STATUS_500: [(0.1, 1), (0.3, 2)],
    fault_harness.STATUS_503: [(0.1, 1), (0.3, 2)],
    fault_harness.RESET: [(0.1, 1), (0.3, 2)],
    fault_harness.TRUNCATED: [(0.1, 1), (0.3, 2)],
    # The chunk source gives up on a chunk that arrives damaged twice in one
    # read, so a flipped byte fails one attempt at a time.
    fault_harness.FLIPPED: [(0.1, 1), (0.3, 1)],
    fault_harness.DELAY: [(0.1, 1), (0.3, 1)],
}


def run_all(runner: Runner, seconds: float) -> None:
    for kind, settings in TRANSIENT_RATES.items():
        for rate, failures in settings:
            runner.guarded("transient", kind, lambda: runner.transient(kind, rate, failures))
    runner.guarded("transient", "mixed", lambda: runner.mixed_random_reads(seconds))
    runner.guarded("persistent", "persistent", runner.persistent)
    runner.guarded("persistent", "abandoned", runner.abandoned_requests)
    runner.guarded("manifests", "manifest 503 x3", runner.manifest_throttled_at_start)
    runner.guarded("manifests", "manifest truncated", runner.manifest_truncated_at_start)
    runner.guarded("manifests", "manifest 503 always", runner.manifest_throttled_for_good)
    runner.guarded("manifests", "listing 503", runner.listing_throttled_at_refresh)
    runner.guarded("manifests", "bad manifests", runner.bad_manifests)
    for case in NESTED_MANIFESTS:
        runner.guarded("manifests", case, lambda: runner.nested_manifest_at_start(case))
    runner.guarded("manifests", "nested at refresh", runner.nested_manifest_at_refresh)
    runner.guarded("cache", "kill -9", runner.kill_during_load)
    runner.guarded("cache", "full disk", runner.full_cache_disk)
    runner.guarded("cache", "read-only cache", runner.read_only_cache)


def commit_id() -> str:
    result = subprocess.run(
        ["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def host_description() -> str:
    return f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}"


def check_host() -> str | None:
    """Return why this host cannot run the script, or None if it can."""
    if os.geteuid() != 0:
        return "run as root, because the cache disk runs mount tmpfs filesystems"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        default=os.path.join(REPO, "docs", "RELIABILITY.md"),
        help="report to write (default: docs/RELIABILITY.md)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=15.0,
        help="duration of the run of 16 concurrent readers, in seconds (default: 15)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument(
        "--only",
        default="",
        metavar="WORDS",
        help="run only the runs whose section or label contains one of these "
        "comma-separated words, such as 'persistent,kill' (default: all)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    problem = check_host()
    if problem is not None:
        print(f"reliability.py: error: {problem}", file=sys.stderr)
        return 2

    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="shardfs-reliability-")
    try:
        with moto_server(os.path.join(work, "moto.log")) as endpoint:
            sources_dir = os.path.join(work, "sources")
            os.makedirs(sources_dir)
            sources = write_sources(sources_dir, RAW_SIZE)
            runner = Runner(work, endpoint, sources, push_models(endpoint, sources, "reliability"))
            runner.only = [word for word in args.only.split(",") if word]
            try:
                run_all(runner, args.seconds)
            finally:
                runner.close()
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    meta = {
        "commit": commit_id(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": host_description(),
        "seconds": time.monotonic() - started,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        file.write(render(runner.rows, meta))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

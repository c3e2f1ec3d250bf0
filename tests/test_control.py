"""The control channel: status, warm-up, metrics, and who may use it."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from conftest import free_port, mounted, needs_fuse, run_shardfs
from s3proxy import Fault, counting_proxy  # noqa: F401 (a fixture)
from shardfs.config import format_size
from shardfs.manifest import parse_manifest
from shardfs.stores.base import chunk_object_key

pytestmark = needs_fuse

SIZE = 5 * 1024 * 1024 + 17


@pytest.fixture
def store_with_two_models(tmp_path, local_store):
    contents = {}
    for name in ("org/alpha", "org/beta"):
        source = tmp_path / f"{name.replace('/', '-')}.bin"
        contents[name] = os.urandom(SIZE)
        source.write_bytes(contents[name])
        result = run_shardfs("push", "--store", local_store, "--chunk-size", "1MiB", str(source), name)
        assert result.returncode == 0, result.stderr
    return local_store, contents


def _status(mountpoint: str) -> dict:
    result = run_shardfs("status", "--json", mountpoint)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as file:
        file.write("3\n")


def test_status_counts_known_reads(store_with_two_models, tmp_path):
    store, contents = store_with_two_models
    with mounted(store, str(tmp_path / "mnt"), "--no-prefetch") as mount:
        path = os.path.join(mount.path, "org/alpha/org-alpha.bin")
        with open(path, "rb") as file:
            assert file.read() == contents["org/alpha"]
        status = _status(mount.path)
        assert status["models"] == 2
        assert status["bytes_read"] == SIZE
        assert status["chunks_fetched"] == 6
        assert status["read_errors"] == 0
        shares = {model["name"]: model["cached"] / model["size"] for model in status["model_list"]}
        assert shares == {"org/alpha": 1.0, "org/beta": 0.0}
        text = run_shardfs("status", mount.path)
        assert text.returncode == 0, text.stderr
        assert "org/alpha\t1 file\t" in text.stdout


def test_warm_makes_model_resident(store_with_two_models, tmp_path):
    store, contents = store_with_two_models
    with mounted(store, str(tmp_path / "mnt")) as mount:
        result = run_shardfs("warm", mount.path, "org/beta")
        assert result.returncode == 0, result.stderr
        assert "0 B was already cached" in result.stdout
        before = _status(mount.path)["chunks_fetched"]
        _drop_page_cache()
        with open(os.path.join(mount.path, "org/beta/org-beta.bin"), "rb") as file:
            assert file.read() == contents["org/beta"]
        assert _status(mount.path)["chunks_fetched"] == before
        again = run_shardfs("warm", mount.path, os.path.join(mount.path, "org/beta"))
        assert again.returncode == 0, again.stderr
        assert "5.0 MiB was already cached" in again.stdout


def test_warm_reports_failed_chunks(store_with_two_models, tmp_path):
    store, _ = store_with_two_models
    with open(os.path.join(store, "models/org/alpha/manifest.json"), "rb") as file:
        (entry,) = parse_manifest("org/alpha", file.read()).files
    missing, corrupt = entry.chunks[0], entry.chunks[2]
    os.unlink(os.path.join(store, chunk_object_key(missing.key)))
    with open(os.path.join(store, chunk_object_key(corrupt.key)), "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 0xFF]))
    good_bytes = SIZE - missing.length - corrupt.length

    # One warm worker, so the chunks are fetched one after another.
    with mounted(store, str(tmp_path / "mnt"), "--max-connections", "1") as mount:
        mount.expect_log(corrupt.key)
        result = run_shardfs("warm", mount.path, "org/alpha")
        status = _status(mount.path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "warmed 3.0 MiB of 5.0 MiB: 0 B was already cached" in result.stdout
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2, result.stderr
    assert any(missing.key in line for line in failed), failed
    assert any(corrupt.key in line for line in failed), failed
    assert "2 chunks could not be fetched; 2.0 MiB is not cached" in result.stderr
    assert status["disk_cache_bytes"] == good_bytes


def test_warm_with_store_down_caches_nothing(s3_store, moto_endpoint, counting_proxy, tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(SIZE))
    push = run_shardfs(
        "push", "--store", s3_store, "--endpoint-url", moto_endpoint,
        "--chunk-size", "1MiB", str(source), "org/model",
    )
    assert push.returncode == 0, push.stderr
    # Every chunk GET is reset, as by a store that went down after the mount.
    counting_proxy.add_fault(Fault(reset=True), count=None)
    options = ["--read-timeout", "3"]

    with mounted(s3_store, str(tmp_path / "mnt"), *options, endpoint=counting_proxy.url) as mount:
        mount.expect_log(r"retrying chunk")
        # The S3 client's own retries of a reset can outlast the deadline.
        mount.expect_log(r"past its read's deadline")
        result = run_shardfs("warm", mount.path, "org/model")
        status = _status(mount.path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "warmed 0 B of 5.0 MiB: 0 B was already cached" in result.stdout
    assert "6 chunks could not be fetched; 5.0 MiB is not cached" in result.stderr
    assert status["disk_cache_bytes"] == 0


def test_warm_larger_than_cache_fails(store_with_two_models, tmp_path):
    store, _ = store_with_two_models
    with mounted(store, str(tmp_path / "mnt"), "--cache-size", "2MiB") as mount:
        result = run_shardfs("warm", mount.path, "org/alpha")
        status = _status(mount.path)

    # Which chunks stay depends on the order their writes finished in.
    cached = status["disk_cache_bytes"]
    assert 0 < cached <= 2 * 1024 * 1024
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"warmed {format_size(cached)} of 5.0 MiB" in result.stdout
    assert "failed: " not in result.stderr
    evicted = format_size(SIZE - cached)
    assert f"{evicted} was fetched but evicted from the disk cache again" in result.stderr


def test_warm_with_cache_off_keeps_nothing(store_with_two_models, tmp_path):
    store, _ = store_with_two_models
    with mounted(store, str(tmp_path / "mnt"), "--cache-size", "0") as mount:
        result = run_shardfs("warm", mount.path, "org/alpha")
        status = _status(mount.path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "warmed 0 B of 5.0 MiB: 0 B was already cached" in result.stdout
    assert "failed: " not in result.stderr
    assert "could not be fetched" not in result.stderr
    assert "6 chunks (5.0 MiB) were fetched but not kept" in result.stderr
    assert "because the disk cache is off (--cache-size 0)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert status["chunks_fetched"] == 6
    assert status["disk_cache_bytes"] == 0


def test_warm_unknown_model_fails(store_with_two_models, tmp_path):
    store, _ = store_with_two_models
    with mounted(store, str(tmp_path / "mnt")) as mount:
        result = run_shardfs("warm", mount.path, "org/missing")
        assert result.returncode == 2
        assert "not found under the mount: org/missing" in result.stderr


def test_metrics_endpoint_reports_reads(store_with_two_models, tmp_path):
    store, contents = store_with_two_models
    port = free_port()
    with mounted(store, str(tmp_path / "mnt"), "--metrics-address", f"127.0.0.1:{port}") as mount:
        with open(os.path.join(mount.path, "org/alpha/org-alpha.bin"), "rb") as file:
            file.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    assert f"shardfs_read_bytes_total {SIZE}" in text
    assert "shardfs_read_seconds_bucket" in text
    assert "shardfs_fetch_seconds_count" in text
    assert "shardfs_models 2" in text


def test_control_channel_rejects_other_user(store_with_two_models, tmp_path):
    store, _ = store_with_two_models
    with mounted(store, str(tmp_path / "mnt")) as mount:
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-m", "shardfs", "status", mount.path],
            capture_output=True,
            text=True,
            env={**os.environ, "XDG_RUNTIME_DIR": "/run"},
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_status_without_daemon_fails_clearly(tmp_path):
    result = run_shardfs("status", str(tmp_path))
    assert result.returncode == 2
    assert "no shardfs daemon serves" in result.stderr

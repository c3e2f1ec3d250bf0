"""``shardfs verify``, ``gc`` and ``rm`` on local and S3 stores, and the store calls they use."""

import io
import json
import os
import signal
import subprocess
import tempfile
import threading
import time

import pytest
import torch
import safetensors.torch

from conftest import free_port, mounted, needs_fuse, run_shardfs, shardfs_command
from shardfs import codec
from shardfs.config import PushConfig, StoreConfig
from shardfs.errors import ObjectInvalid, ObjectNotFound
from shardfs.manifest import parse_manifest
from shardfs.publish.gc import collect_garbage
from shardfs.publish.push import push as push_model
from shardfs.publish.retire import RETIRED_PREFIX
from shardfs.stores import open_store
from shardfs.stores.base import chunk_object_key, list_models, manifest_object_key
from shardfs.stores.local import LocalStore

DAY = 86400.0
CHUNK = 64 * 1024


def write_model(path, seed: int, size: int = 60_000) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "shared": torch.arange(50_000, dtype=torch.float32),
        "own": torch.randn(size, generator=generator),
    }
    safetensors.torch.save_file(tensors, str(path))
    return path.read_bytes()


def push(store: str, source, name: str, *extra: str) -> None:
    result = run_shardfs("push", "--store", store, "--chunk-size", "64KiB", *extra, str(source), name)
    assert result.returncode == 0, result.stderr


def chunk_keys(store: LocalStore, name: str) -> set[str]:
    manifest = parse_manifest(name, store.get(manifest_object_key(name)))
    return {chunk.key for entry in manifest.files for chunk in entry.chunks}


def stored_chunks(store) -> set[str]:
    return {key.rsplit("/", 1)[1] for key in store.list("chunks/")}


def flip_byte(path: str, position: int, mask: int) -> None:
    with open(path, "r+b") as file:
        data = bytearray(file.read())
        data[position] ^= mask
        file.seek(0)
        file.write(data)


def age_everything(root: str, seconds: float) -> None:
    """Set every object of a local store back by *seconds*."""
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            info = os.stat(path)
            os.utime(path, (info.st_atime - seconds, info.st_mtime - seconds))


@pytest.fixture
def two_models(tmp_path, local_store):
    """A local store with org/a and org/b, which share one tensor's chunks."""
    push(local_store, _model_file(tmp_path, "a", 1), "org/a")
    push(local_store, _model_file(tmp_path, "b", 2), "org/b")
    return LocalStore(local_store)


def _model_file(tmp_path, name: str, seed: int):
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    path = directory / "model.safetensors"
    write_model(path, seed)
    return path


def test_verify_all_good(two_models):
    result = run_shardfs("verify", two_models.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified 2 models" in result.stdout
    assert "all good" in result.stdout


def test_verify_finds_missing_and_corrupt(two_models):
    keys_a = sorted(chunk_keys(two_models, "org/a") - chunk_keys(two_models, "org/b"))
    missing, corrupt = keys_a[0], keys_a[1]
    os.unlink(os.path.join(two_models.root, chunk_object_key(missing)))
    flip_byte(os.path.join(two_models.root, chunk_object_key(corrupt)), -1, 0xFF)

    result = run_shardfs("verify", two_models.root)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    missing_lines = [line for line in lines if missing in line]
    corrupt_lines = [line for line in lines if corrupt in line]
    assert len(missing_lines) == 1
    assert missing_lines[0].startswith("org/a/model.safetensors bytes ")
    assert "is missing" in missing_lines[0]
    assert len(corrupt_lines) == 1
    assert "is corrupt" in corrupt_lines[0]
    assert "1 missing, 1 corrupt" in lines[-1]
    assert result.stderr == ""

    only_b = run_shardfs("verify", two_models.root, "org/b")
    assert only_b.returncode == 0, only_b.stdout
    assert "verified 1 model," in only_b.stdout


@pytest.mark.parametrize("codec_name", ["raw", "split"])
def test_verify_names_truncated_size(tmp_path, local_store, codec_name):
    _, _, _, size = _push_and_truncate_chunk(tmp_path, local_store, codec_name)

    result = run_shardfs("verify", local_store)
    assert result.returncode == 1
    assert f"object is {size // 2} bytes, its header gives {size}" in result.stdout


def test_verify_counts_shared_chunk_once(tmp_path, local_store):
    directory = tmp_path / "twins"
    directory.mkdir()
    data = write_model(directory / "first.safetensors", 3)
    (directory / "second.safetensors").write_bytes(data)
    push(local_store, directory, "org/twins")
    store = LocalStore(local_store)
    key = sorted(chunk_keys(store, "org/twins"))[0]
    os.unlink(os.path.join(local_store, chunk_object_key(key)))

    result = run_shardfs("verify", local_store)
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert len([line for line in lines if key in line]) == 2
    assert lines[-1].endswith(": 1 missing")


def test_push_check_existing_replaces_corrupt(two_models, tmp_path):
    key = sorted(chunk_keys(two_models, "org/a") - chunk_keys(two_models, "org/b"))[0]
    flip_byte(os.path.join(two_models.root, chunk_object_key(key)), -1, 0xFF)
    source = tmp_path / "a" / "model.safetensors"

    push(two_models.root, source, "org/a")
    still_corrupt = run_shardfs("verify", two_models.root)
    assert still_corrupt.returncode == 1
    assert "push each model named above again" in still_corrupt.stdout
    assert "--check-existing" in still_corrupt.stdout

    push(two_models.root, source, "org/a", "--check-existing")
    repaired = run_shardfs("verify", two_models.root)
    assert repaired.returncode == 0, repaired.stdout
    assert "all good" in repaired.stdout


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_push_replaces_chunk_that_is_not_a_file(two_models, tmp_path, kind):
    key = sorted(chunk_keys(two_models, "org/a") - chunk_keys(two_models, "org/b"))[0]
    path = os.path.join(two_models.root, chunk_object_key(key))
    os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)

    push(two_models.root, tmp_path / "a" / "model.safetensors", "org/a")
    result = run_shardfs("verify", two_models.root, timeout=60)
    assert result.returncode == 0, result.stdout
    assert os.path.isfile(path)


def _source_for_codec(codec_name: str) -> bytes:
    """Return 300,000 bytes whose chunks push stores with *codec_name*."""
    if codec_name == "raw":
        return os.urandom(300_000)
    if codec_name == "zstd":
        return b"".join(b"line %06d of a text file\n" % number for number in range(12_000))[:300_000]
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(75_000, generator=generator) * 0.02).numpy().tobytes()


def _chunk_with_codec(store: LocalStore, name: str, codec_name: str) -> str:
    for key in sorted(chunk_keys(store, name)):
        header = codec.parse_header(key, store.get(chunk_object_key(key)))
        if header.codec == codec_name:
            return key
    raise AssertionError(f"no {codec_name} chunk in {name}")


def _push_and_truncate_chunk(tmp_path, local_store: str, codec_name: str):
    """Push org/data, cut one of its *codec_name* chunk objects to half its
    size, and return the source, the chunk key, the object's path and size."""
    source = tmp_path / "data.bin"
    source.write_bytes(_source_for_codec(codec_name))
    push(local_store, source, "org/data")
    key = _chunk_with_codec(LocalStore(local_store), "org/data", codec_name)
    path = os.path.join(local_store, chunk_object_key(key))
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    return source, key, path, size


@pytest.mark.parametrize("codec_name", ["raw", "zstd", "split"])
def test_push_replaces_truncated_chunk(tmp_path, local_store, codec_name):
    source, key, path, size = _push_and_truncate_chunk(tmp_path, local_store, codec_name)
    store = LocalStore(local_store)

    # A plain push finds the damage from the object's size.
    push(local_store, source, "org/data")
    result = run_shardfs("verify", local_store)
    assert result.returncode == 0, result.stdout
    assert os.path.getsize(path) == size
    manifest = parse_manifest("org/data", store.get(manifest_object_key("org/data")))
    [entry] = manifest.files
    assert {chunk.stored_length for chunk in entry.chunks if chunk.key == key} == {size}


def test_push_keeps_zstd_chunk_of_other_size(tmp_path, local_store):
    source = tmp_path / "data.bin"
    data = _source_for_codec("zstd")
    source.write_bytes(data)
    push(local_store, source, "org/data")
    store = LocalStore(local_store)
    key = _chunk_with_codec(store, "org/data", "zstd")
    [chunk] = [
        chunk
        for entry in parse_manifest("org/data", store.get(manifest_object_key("org/data"))).files
        for chunk in entry.chunks
        if chunk.key == key
    ]
    # Another zstd version or level writes a good copy of another size.
    other = codec.encode_as(data[chunk.offset : chunk.offset + chunk.length], "zstd", "none", 19)
    path = os.path.join(local_store, chunk_object_key(key))
    assert len(other.data) != os.path.getsize(path)
    with open(path, "wb") as file:
        file.write(other.data)

    result = run_shardfs("push", "--store", local_store, "--chunk-size", "64KiB", str(source), "org/data")
    assert result.returncode == 0, result.stderr
    assert " 0 B uploaded" in result.stderr
    with open(path, "rb") as file:
        assert file.read() == other.data


def test_verify_reports_fifo_chunk(two_models):
    key = sorted(chunk_keys(two_models, "org/a") - chunk_keys(two_models, "org/b"))[0]
    path = os.path.join(two_models.root, chunk_object_key(key))
    os.unlink(path)
    os.mkfifo(path)
    result = run_shardfs("verify", two_models.root, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if key in line]
    assert len(lines) == 1, result.stdout
    assert "is corrupt" in lines[0]
    assert "it is a FIFO, not a regular file" in lines[0]
    assert "1 corrupt" in result.stdout.splitlines()[-1]


def test_verify_reports_unknown_encoding(two_models, tmp_path):
    key = sorted(chunk_keys(two_models, "org/a") - chunk_keys(two_models, "org/b"))[0]
    # Byte 4 is the codec id, and every id from 200 up is undefined.
    flip_byte(os.path.join(two_models.root, chunk_object_key(key)), 4, 200)
    result = run_shardfs("verify", two_models.root, "org/a")
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if key in line]
    assert len(lines) == 1, result.stdout
    assert f"chunk {key} is unsupported" in lines[0]
    assert "upgrade shardfs" in lines[0]
    assert (
        "push the model again from its original files with --check-existing "
        "to rewrite it in an encoding this version reads"
    ) in lines[0]

    push(two_models.root, tmp_path / "a" / "model.safetensors", "org/a", "--check-existing")
    repaired = run_shardfs("verify", two_models.root)
    assert repaired.returncode == 0, repaired.stdout


def _edit_manifest(store: LocalStore, name: str, change) -> None:
    path = os.path.join(store.root, manifest_object_key(name))
    with open(path) as file:
        doc = json.load(file)
    change(doc["files"][0])
    with open(path, "w") as file:
        json.dump(doc, file)


def _swap_two_chunks(entry: dict) -> None:
    chunks = entry["chunks"]
    first, second = [index for index, chunk in enumerate(chunks) if chunk["length"] == CHUNK][:2]
    chunks[first]["key"], chunks[second]["key"] = chunks[second]["key"], chunks[first]["key"]


@pytest.mark.parametrize(
    "change",
    [_swap_two_chunks, lambda entry: entry.__setitem__("sha256", "0" * 64)],
    ids=["chunks-swapped", "wrong-sha256"],
)
def test_verify_check_files_finds_edited_manifest(two_models, change):
    _edit_manifest(two_models, "org/a", change)

    # Every chunk is still good, so the chunk check alone finds nothing.
    plain = run_shardfs("verify", two_models.root)
    assert plain.returncode == 0, plain.stdout
    checked = run_shardfs("verify", "--check-files", two_models.root)
    assert checked.returncode == 1, checked.stdout
    lines = checked.stdout.splitlines()
    assert lines[0].startswith("org/a: model.safetensors: the sha256 of its chunks is ")
    assert "push its model again" in lines[1]
    assert lines[-1].endswith("2 files read whole: 1 file not matching its sha256")


def test_verify_names_wrong_chunk_length(two_models):
    def lengthen_last_chunk(entry: dict) -> None:
        entry["chunks"][-1]["length"] += 10
        entry["size"] += 10

    _edit_manifest(two_models, "org/a", lengthen_last_chunk)
    result = run_shardfs("verify", two_models.root, "org/a")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "the manifest gives chunk " in lines[0]
    assert "a wrong length: the chunk object is " in lines[0]
    assert "push its model again" in lines[1]
    assert lines[-1].endswith(": 1 mislabeled")


def test_verify_check_files_all_good(two_models):
    result = run_shardfs("verify", "--check-files", two_models.root, "org/b")
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().endswith("1 file read whole: all good")


def test_verify_options_between_positionals(two_models):
    result = run_shardfs("verify", two_models.root, "--check-files", "org/b")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("1 file read whole: all good")


def test_verify_check_files_skips_damaged_file(two_models):
    key = sorted(chunk_keys(two_models, "org/a") - chunk_keys(two_models, "org/b"))[0]
    os.unlink(os.path.join(two_models.root, chunk_object_key(key)))
    result = run_shardfs("verify", "--check-files", two_models.root)
    assert result.returncode == 1
    assert "sha256" not in result.stdout.splitlines()[0]
    assert result.stdout.strip().endswith("1 file read whole: 1 missing")


def test_verify_unknown_model(two_models):
    result = run_shardfs("verify", two_models.root, "org/nope")
    assert result.returncode == 1
    assert "org/nope: model not found" in result.stdout


def test_gc_keeps_named_and_young_chunks(two_models, tmp_path):
    before = stored_chunks(two_models)
    push(two_models.root, _model_file(tmp_path, "a", 3), "org/a")
    replaced = before - chunk_keys(two_models, "org/a") - chunk_keys(two_models, "org/b")
    assert replaced

    # Within the grace period the replaced version's chunks stay.
    result = run_shardfs("gc", two_models.root)
    assert result.returncode == 0, result.stderr
    assert "deleted 0 " in result.stdout
    assert ", kept 0 younger than 24h (0 B); " in result.stdout
    assert result.stdout.startswith("2 models and 1 retired manifest name ")
    assert replaced <= stored_chunks(two_models)

    report = collect_garbage(two_models, grace_s=DAY, now=lambda: time.time() + 0.5 * DAY)
    assert report.deleted == 0
    assert report.retired_kept == 1
    assert replaced <= stored_chunks(two_models)


def test_gc_deletes_orphans_past_grace(two_models, tmp_path):
    before = stored_chunks(two_models)
    push(two_models.root, _model_file(tmp_path, "a", 3), "org/a")
    named = chunk_keys(two_models, "org/a") | chunk_keys(two_models, "org/b")
    orphans = before - named

    report = collect_garbage(two_models, grace_s=DAY, now=lambda: time.time() + 1.5 * DAY)
    assert report.deleted == len(orphans)
    assert report.retired_deleted == 1
    assert stored_chunks(two_models) == named
    assert list(two_models.list(RETIRED_PREFIX)) == []
    assert run_shardfs("verify", two_models.root).returncode == 0


def test_gc_dry_run_and_zero_grace(two_models):
    assert run_shardfs("rm", two_models.root, "org/a").returncode == 0
    orphans = stored_chunks(two_models) - chunk_keys(two_models, "org/b")

    dry = run_shardfs("gc", "--grace", "0", "--dry-run", two_models.root)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete {len(orphans)} " in dry.stdout
    assert dry.stdout.startswith("1 model and 0 retired manifests name ")
    # No chunk is younger than a grace period of 0, so the count is left out.
    assert "younger than" not in dry.stdout
    assert dry.stdout.rstrip().endswith("would delete 1 expired retired manifest")
    assert orphans <= stored_chunks(two_models)

    real = run_shardfs("gc", "--grace", "0", two_models.root)
    assert real.returncode == 0, real.stderr
    assert f"deleted {len(orphans)} " in real.stdout
    assert stored_chunks(two_models) == chunk_keys(two_models, "org/b")
    assert run_shardfs("verify", two_models.root).returncode == 0


def test_gc_deletes_old_partial_writes(two_models):
    directory = os.path.join(two_models.root, "chunks", "ab")
    os.makedirs(directory, exist_ok=True)
    old, young = os.path.join(directory, ".tmp-old"), os.path.join(directory, ".tmp-young")
    for path in (old, young):
        with open(path, "wb") as file:
            file.write(b"x" * 1000)
    age = time.time() - 2 * DAY
    os.utime(old, (age, age))

    dry = run_shardfs("gc", "--dry-run", two_models.root)
    assert dry.returncode == 0, dry.stderr
    assert "would delete 0 expired retired manifests and 1 partial write" in dry.stdout
    assert os.path.exists(old)

    real = run_shardfs("gc", two_models.root)
    assert real.returncode == 0, real.stderr
    assert "and 1 partial write of interrupted pushes (1000 B)" in real.stdout
    assert not os.path.exists(old)
    assert os.path.exists(young)
    assert run_shardfs("verify", two_models.root).returncode == 0


def test_push_sigterm_leaves_no_partial_writes(tmp_path, local_store):
    source = tmp_path / "noise.bin"
    source.write_bytes(os.urandom(64 * 1024 * 1024))
    process = subprocess.Popen(
        shardfs_command("push", "--store", local_store, "--chunk-size", "64KiB", str(source), "org/noise"),
        stderr=subprocess.PIPE,
        text=True,
    )
    chunks = os.path.join(local_store, "chunks")
    deadline = time.monotonic() + 60
    while not (os.path.isdir(chunks) and len(os.listdir(chunks)) > 20):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=60)[1]

    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["shardfs: terminated"]
    leftovers = [name for _, _, names in os.walk(local_store) for name in names if name.startswith(".tmp-")]
    assert leftovers == []
    assert list_models(LocalStore(local_store)) == []


def test_push_commit_hook_runs_before_manifest(tmp_path):
    store = LocalStore(str(tmp_path / "store"))
    store.create()
    seen = {}

    def on_commit() -> None:
        seen["models"] = list_models(store)
        seen["chunks"] = stored_chunks(store)

    source = tmp_path / "a" / "model.safetensors"
    source.parent.mkdir()
    write_model(source, 1)
    config = PushConfig(chunk_size=64 * 1024)
    push_model(store, str(source), "org/a", config, io.StringIO(), on_commit=on_commit)

    assert seen["models"] == []
    assert seen["chunks"] == chunk_keys(store, "org/a")
    assert list_models(store) == ["org/a"]


def test_gc_keeps_chunk_renewed_during_run(two_models):
    """A chunk a push reuses after gc listed it is kept."""
    assert run_shardfs("rm", two_models.root, "org/a").returncode == 0
    age_everything(two_models.root, 2 * DAY)
    orphans = stored_chunks(two_models) - chunk_keys(two_models, "org/b")

    class RenewingStore(LocalStore):
        # A concurrent push touches each chunk just before gc reads its age again.
        def stat(self, key):
            if key.startswith("chunks/"):
                self.touch(key)
            return super().stat(key)

    report = collect_garbage(RenewingStore(two_models.root), grace_s=DAY)
    assert report.deleted == 0
    assert report.kept_young == len(orphans)
    assert orphans <= stored_chunks(two_models)


def test_push_renews_reused_chunks(two_models, tmp_path):
    age_everything(two_models.root, 2 * DAY)
    push(two_models.root, tmp_path / "a" / "model.safetensors", "org/c")
    now = time.time()
    for key in chunk_keys(two_models, "org/c"):
        assert now - two_models.stat(chunk_object_key(key)).modified < 600


def test_gc_stops_on_invalid_manifest(two_models):
    assert run_shardfs("rm", two_models.root, "org/a").returncode == 0
    count = len(stored_chunks(two_models))
    two_models.put(manifest_object_key("org/b"), b"{not json")
    result = run_shardfs("gc", "--grace", "0", two_models.root)
    assert result.returncode == 1
    assert "gc stopped before deleting anything" in result.stderr
    assert "org/b" in result.stderr
    assert "push the model again or remove it with shardfs rm" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(stored_chunks(two_models)) == count


@pytest.mark.parametrize("replace", ["rm", "push"])
def test_invalid_manifest_not_retired(two_models, tmp_path, replace):
    two_models.put(manifest_object_key("org/a"), b"{not json")
    if replace == "rm":
        assert run_shardfs("rm", two_models.root, "org/a").returncode == 0
    else:
        push(two_models.root, _model_file(tmp_path, "a", 5), "org/a")
    assert list(two_models.list(RETIRED_PREFIX)) == []
    collected = run_shardfs("gc", "--grace", "0", two_models.root)
    assert collected.returncode == 0, collected.stderr
    assert run_shardfs("verify", two_models.root).returncode == 0


def test_newer_manifest_still_retired(two_models):
    newer = b'{"format": "shardfs-manifest", "version": 99, "files": []}'
    two_models.put(manifest_object_key("org/a"), newer)
    assert run_shardfs("rm", two_models.root, "org/a").returncode == 0
    retired = list(two_models.list(RETIRED_PREFIX))
    assert len(retired) == 1
    assert two_models.get(retired[0]) == newer


def test_gc_stops_on_invalid_retired_copy(two_models):
    two_models.put(f"{RETIRED_PREFIX}org/a/1-0000abcd.json", b"{not json")
    count = len(stored_chunks(two_models))
    result = run_shardfs("gc", two_models.root)
    assert result.returncode == 1
    assert "delete that retired copy from the store if no reader can use it" in result.stderr
    assert len(stored_chunks(two_models)) == count


def test_manifest_replaced_by_directory(two_models):
    path = os.path.join(two_models.root, manifest_object_key("org/a"))
    os.unlink(path)
    os.mkdir(path)
    count = len(stored_chunks(two_models))

    listed = run_shardfs("ls", two_models.root)
    assert listed.returncode == 1
    assert "org/a\tinvalid: it is a directory, not a regular file" in listed.stdout
    verified = run_shardfs("verify", two_models.root)
    assert verified.returncode == 1
    assert "org/a: manifest is invalid: it is a directory" in verified.stdout
    collected = run_shardfs("gc", "--grace", "0", two_models.root)
    assert collected.returncode == 1
    assert "gc stopped before deleting anything" in collected.stderr
    assert len(stored_chunks(two_models)) == count

    assert run_shardfs("rm", two_models.root, "org/a").returncode == 0
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    "link, reason",
    [("dangling", "a symbolic link to a missing file"), ("loop", "a symbolic link loop")],
)
def test_manifest_replaced_by_bad_link(two_models, tmp_path, link, reason):
    path = os.path.join(two_models.root, manifest_object_key("org/a"))
    os.unlink(path)
    os.symlink(path if link == "loop" else os.path.join(two_models.root, "gone"), path)
    count = len(stored_chunks(two_models))

    listed = run_shardfs("ls", two_models.root)
    assert listed.returncode == 1
    assert f"org/a\tinvalid: it is {reason}" in listed.stdout
    collected = run_shardfs("gc", "--grace", "0", two_models.root)
    assert collected.returncode == 1
    assert "gc stopped before deleting anything" in collected.stderr
    assert len(stored_chunks(two_models)) == count

    push(two_models.root, tmp_path / "a" / "model.safetensors", "org/a")
    assert not os.path.islink(path)
    assert run_shardfs("verify", two_models.root).returncode == 0


def test_linked_model_directory_changes_nothing(two_models, tmp_path):
    os.symlink("a", os.path.join(two_models.root, "models", "org", "c"))
    target = os.path.join(two_models.root, manifest_object_key("org/a"))
    with open(target, "rb") as file:
        before = file.read()

    listed = run_shardfs("ls", two_models.root)
    assert "skipping models/org/c in store" in listed.stderr
    assert "it is a symbolic link to a directory" in listed.stderr
    removed = run_shardfs("rm", two_models.root, "org/c")
    assert removed.returncode == 1
    assert "models/org/c is a symbolic link; remove it from the store" in removed.stderr
    source = tmp_path / "a" / "model.safetensors"
    pushed = run_shardfs("push", "--store", two_models.root, str(source), "org/c")
    assert pushed.returncode == 1
    assert "models/org/c is a symbolic link" in pushed.stderr

    with open(target, "rb") as file:
        assert file.read() == before
    assert run_shardfs("verify", two_models.root, "org/a").returncode == 0


def test_cache_directory_is_not_a_store(two_models, tmp_path):
    cache = tmp_path / "cache"
    for name in ("chunks", "tmp", "manifests"):
        (cache / name).mkdir(parents=True)
    (cache / "lock").write_bytes(b"")
    for command in (("ls",), ("gc",), ("verify",), ("rm", "org/a")):
        result = run_shardfs(command[0], str(cache), *command[1:])
        assert result.returncode == 1, command
        assert "is a mount's cache directory, not a shardfs store" in result.stderr
    source = tmp_path / "a" / "model.safetensors"
    pushed = run_shardfs("push", "--store", str(cache), str(source), "org/a")
    assert pushed.returncode == 1
    assert sorted(os.listdir(cache)) == ["chunks", "lock", "manifests", "tmp"]


def test_full_output_is_one_line(two_models):
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            shardfs_command("ls", two_models.root), stdout=full, stderr=subprocess.PIPE, timeout=60
        )
    assert result.returncode == 1
    assert result.stderr.decode().strip() == "shardfs: error: No space left on device"


def test_gc_leaves_unknown_objects(two_models):
    two_models.put("chunks/zz/notes.txt", b"operator notes")
    collect_garbage(two_models, grace_s=0)
    assert two_models.stat("chunks/zz/notes.txt") is not None


# Objects under retired/ that retire_manifest did not write: no model name,
# an invalid one, or a file name other than <time_ns>-<8 hex digits>.json.
UNKNOWN_RETIRED_KEYS = [
    "retired/notes.txt",
    "retired/1-0000abcd.json",
    "retired/org/a/notes.txt",
    "retired/org/a/1-0000abcd.json.bak",
    "retired/org/a/1-0000ABCD.json",
    "retired/org/a/1-0000abc.json",
    "retired/org/a/x1-0000abcd.json",
    "retired/-org/a/1-0000abcd.json",
    "retired/a/b/c/d/e/1-0000abcd.json",
]


@pytest.mark.parametrize("grace", ["24h", "0"])
def test_gc_leaves_unknown_retired_objects(two_models, grace):
    for key in UNKNOWN_RETIRED_KEYS:
        two_models.put(key, b"operator notes")
    assert run_shardfs("rm", two_models.root, "org/a").returncode == 0
    retired = set(two_models.list(RETIRED_PREFIX)) - set(UNKNOWN_RETIRED_KEYS)
    assert len(retired) == 1
    (retired_key,) = retired

    result = run_shardfs("gc", "--grace", grace, two_models.root)
    assert result.returncode == 0, result.stderr
    for key in UNKNOWN_RETIRED_KEYS:
        assert two_models.get(key) == b"operator notes", key
    if grace == "0":
        assert "deleted 1 expired retired manifest" in result.stdout
        assert two_models.stat(retired_key) is None
    else:
        assert "1 model and 1 retired manifest name " in result.stdout
        assert two_models.stat(retired_key) is not None


def test_rm_removes_manifest(two_models):
    result = run_shardfs("rm", two_models.root, "org/a")
    assert result.returncode == 0, result.stderr
    assert "removed org/a" in result.stdout
    assert list_models(two_models) == ["org/b"]
    retired = list(two_models.list(RETIRED_PREFIX))
    assert len(retired) == 1
    assert retired[0].startswith("retired/org/a/")

    again = run_shardfs("rm", two_models.root, "org/a")
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"shardfs: error: model 'org/a' not found in store {two_models.root}"
    )


@pytest.mark.parametrize(
    "args, status, message",
    [
        (("gc", "--grace", "soon"), 2, "invalid duration 'soon'"),
        (("gc", "--grace=-1h"), 2, "invalid duration '-1h'"),
        (("rm", "org//a"), 2, "invalid model name 'org//a'"),
        (("rm", "../a"), 2, "invalid model name '../a'"),
        (("verify", "../a"), 2, "invalid model name '../a'"),
        (("verify", "org/a", "/org/a"), 2, "invalid model name '/org/a'"),
    ],
)
def test_maintenance_bad_arguments(two_models, args, status, message):
    command, *rest = args
    if command in ("rm", "verify"):
        result = run_shardfs(command, two_models.root, *rest)
    else:
        result = run_shardfs(command, *rest, two_models.root)
    assert result.returncode == status
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [("verify",), ("gc",), ("rm", "org/a")])
def test_maintenance_missing_store(tmp_path, command):
    missing = str(tmp_path / "nowhere")
    result = run_shardfs(command[0], missing, *command[1:])
    assert result.returncode == 1
    assert result.stderr.strip() == f"shardfs: error: store not found: {missing}: no such directory"


@pytest.mark.parametrize("command", [("verify",), ("gc",), ("rm", "org/a"), ("ls",)])
def test_maintenance_store_is_a_file(tmp_path, command):
    path = tmp_path / "store"
    path.write_bytes(b"not a store")
    result = run_shardfs(command[0], str(path), *command[1:])
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"shardfs: error: store not found: {path}: it exists and is not a directory"
    )
    assert path.read_bytes() == b"not a store"


@pytest.mark.parametrize("command", [("ls",), ("gc", "--dry-run"), ("verify",)])
def test_closed_output_is_quiet(two_models, command):
    # The reader end is closed before the command starts, so every write fails.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            shardfs_command(command[0], two_models.root, *command[1:]),
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.stderr == b""
    assert result.returncode == 141


def test_maintenance_unreachable_s3():
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_shardfs("verify", "--endpoint-url", endpoint, "s3://bucket/root", timeout=120)
    assert result.returncode == 1
    assert "unreachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_s3_verify_gc_rm(tmp_path, s3_store, moto_endpoint, s3_client):
    options = ("--endpoint-url", moto_endpoint)
    push(s3_store, _model_file(tmp_path, "a", 1), "org/a", *options)
    push(s3_store, _model_file(tmp_path, "b", 2), "org/b", *options)
    store = open_store(StoreConfig(s3_store, endpoint_url=moto_endpoint))
    keys_a = chunk_keys(store, "org/a") - chunk_keys(store, "org/b")

    assert run_shardfs("verify", *options, s3_store).returncode == 0
    bucket, prefix = s3_store[len("s3://") :].split("/", 1)
    missing = sorted(keys_a)[0]
    s3_client.delete_object(Bucket=bucket, Key=f"{prefix}/{chunk_object_key(missing)}")
    result = run_shardfs("verify", *options, s3_store)
    assert result.returncode == 1
    assert f"chunk {missing} is missing" in result.stdout

    assert run_shardfs("rm", *options, s3_store, "org/a").returncode == 0
    kept = run_shardfs("gc", *options, s3_store)
    assert kept.returncode == 0, kept.stderr
    assert "deleted 0 " in kept.stdout
    deleted = run_shardfs("gc", "--grace", "0", *options, s3_store)
    assert deleted.returncode == 0, deleted.stderr
    assert f"deleted {len(keys_a) - 1} " in deleted.stdout
    assert stored_chunks(store) == chunk_keys(store, "org/b")
    assert run_shardfs("verify", *options, s3_store).returncode == 0


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        store = LocalStore(str(tmp_path / "store"))
        store.create()
        return store
    endpoint = request.getfixturevalue("moto_endpoint")
    url = request.getfixturevalue("s3_store")
    return open_store(StoreConfig(url, endpoint_url=endpoint))


def test_store_stat_touch_delete(any_store):
    key = "chunks/ab/ab" + "0" * 30
    assert any_store.stat(key) is None
    any_store.put(key, b"12345")
    info = any_store.stat(key)
    assert info.size == 5
    assert abs(info.modified - time.time()) < 300
    listed = list(any_store.list_info("chunks/"))
    assert [(item.key, item.size) for item in listed] == [(key, 5)]

    time.sleep(1.1)
    any_store.touch(key)
    assert any_store.stat(key).modified > info.modified
    assert any_store.get(key) == b"12345"

    any_store.delete(key)
    assert any_store.stat(key) is None
    any_store.delete(key)
    with pytest.raises(ObjectNotFound):
        any_store.touch(key)


def empty_directories(root: str) -> list[str]:
    """Return the empty directories below *root*, relative to it."""
    return sorted(
        os.path.relpath(directory, root)
        for directory, subdirs, files in os.walk(root)
        if not subdirs and not files and directory != root
    )


def test_rm_and_gc_remove_empty_directories(tmp_path, local_store):
    push(local_store, _model_file(tmp_path, "a", 1), "org/a")
    push(local_store, _model_file(tmp_path, "b", 2), "org/b")
    push(local_store, _model_file(tmp_path, "c", 3), "other/c")
    store = LocalStore(local_store)
    chunk_directories = {key.rsplit("/", 1)[0] for key in store.list("chunks/")}

    assert run_shardfs("rm", local_store, "org/a").returncode == 0
    assert run_shardfs("rm", local_store, "other/c").returncode == 0
    assert sorted(os.listdir(os.path.join(local_store, "models"))) == ["org"]
    assert os.listdir(os.path.join(local_store, "models", "org")) == ["b"]
    assert empty_directories(local_store) == []

    collected = run_shardfs("gc", "--grace", "0", local_store)
    assert collected.returncode == 0, collected.stderr
    assert os.listdir(os.path.join(local_store, "retired")) == []
    # Each chunks/<xx>/ directory stays, even once empty.
    chunks_left = {key.rsplit("/", 1)[0] for key in store.list("chunks/")}
    emptied = chunk_directories - chunks_left
    assert emptied
    assert empty_directories(local_store) == sorted(emptied | {"retired"})

    assert run_shardfs("rm", local_store, "org/b").returncode == 0
    assert os.listdir(os.path.join(local_store, "models")) == []
    assert list_models(store) == []


def test_local_put_recreates_removed_directory(tmp_path, monkeypatch):
    store = LocalStore(str(tmp_path / "store"))
    store.create()
    directory = os.path.join(store.root, "models", "org", "b")
    real_mkstemp = tempfile.mkstemp
    removed = []

    def mkstemp_after_delete(**kwargs):
        # A delete of another object removes the directories, empty then,
        # between put's makedirs and its temporary file, once.
        if not removed:
            os.rmdir(kwargs["dir"])
            os.rmdir(os.path.dirname(kwargs["dir"]))
            removed.append(kwargs["dir"])
        return real_mkstemp(**kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_after_delete)
    store.put("models/org/b/manifest.json", b"b")

    assert removed == [directory]
    assert store.get("models/org/b/manifest.json") == b"b"


NON_REGULAR_OBJECTS = {
    "fifo": lambda path: os.mkfifo(path),
    "directory": lambda path: os.mkdir(path),
    "device": lambda path: os.symlink("/dev/null", path),
}


@pytest.mark.parametrize("kind", list(NON_REGULAR_OBJECTS))
@pytest.mark.parametrize("method", ["get", "get_range"])
def test_local_store_rejects_non_regular_object(tmp_path, kind, method):
    store = LocalStore(str(tmp_path / "store"))
    store.create()
    key = chunk_object_key("ab" + "0" * 30)
    path = os.path.join(store.root, key)
    os.makedirs(os.path.dirname(path))
    NON_REGULAR_OBJECTS[kind](path)
    outcome = {}

    def read() -> None:
        try:
            if method == "get":
                outcome["data"] = store.get(key)
            else:
                outcome["data"] = store.get_range(key, 0, 10)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=10)
    blocked = thread.is_alive()
    if blocked:
        # Give the blocked open of the FIFO a writer, so the thread ends.
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
    assert not blocked, f"{method} of a {kind} blocked"
    error = outcome.get("error")
    assert isinstance(error, ObjectInvalid), outcome
    assert "not a regular file" in str(error)
    assert key in str(error)


@needs_fuse
def test_open_reader_survives_replace_and_gc(tmp_path, local_store):
    source = tmp_path / "v1" / "model.safetensors"
    source.parent.mkdir()
    original = write_model(source, 1, size=200_000)
    push(local_store, source, "org/m")

    mountpoint = str(tmp_path / "mnt")
    with mounted(local_store, mountpoint, "--no-prefetch"):
        with open(os.path.join(mountpoint, "org/m/model.safetensors"), "rb") as reader:
            replacement = tmp_path / "v2" / "model.safetensors"
            replacement.parent.mkdir()
            write_model(replacement, 2, size=200_000)
            push(local_store, replacement, "org/m")
            result = run_shardfs("gc", local_store)
            assert result.returncode == 0, result.stderr
            assert "deleted 0 " in result.stdout
            assert reader.read() == original

"""Dedup across versions of a model, counted by the chunk uploads of each push.

A store wrapper records every chunk object the pusher puts, and the push
summary line reports the same counts to the user.
"""

import io
import json
import os
import re
import struct
import time

import pytest
import safetensors.torch
import torch

from conftest import run_shardfs
from shardfs.config import PushConfig
from shardfs.errors import UsageError
from shardfs.publish import push as push_module
from shardfs.publish.gc import collect_garbage
from shardfs.publish.push import push
from shardfs.publish.verify import verify_models
from shardfs.stores.base import CHUNKS_PREFIX, manifest_object_key
from shardfs.stores.local import LocalStore

CHUNK = 64 * 1024


class CountingStore(LocalStore):
    """A local store that records the chunk objects put into it."""

    def __init__(self, root: str):
        super().__init__(root)
        self.create()
        self.chunk_puts: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        if key.startswith(CHUNKS_PREFIX):
            self.chunk_puts.append(key.rsplit("/", 1)[1])
        super().put(key, data)

    def count_puts(self) -> list[str]:
        """Return the chunk keys put since the last call."""
        puts, self.chunk_puts = self.chunk_puts, []
        return puts


def model_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {"embed": (torch.randn(256, 300, generator=generator) * 0.02).to(torch.bfloat16)}
    for layer in range(4):
        tensors[f"layers.{layer}.attn"] = torch.randn(100, 100, generator=generator) * 0.02
        tensors[f"layers.{layer}.norm"] = torch.ones(100)
    return tensors


def save(path, tensors, metadata=None) -> None:
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def tensor_span(path, name: str) -> tuple[int, int]:
    data = path.read_bytes()
    (size,) = struct.unpack_from("<Q", data)
    start, end = json.loads(data[8 : 8 + size])[name]["data_offsets"]
    return 8 + size + start, 8 + size + end


def push_version(store, path, name: str = "org/model"):
    config = PushConfig(chunk_size=CHUNK, workers=4)
    return push(store, str(path), name, config, progress_stream=io.StringIO())


def test_unchanged_push_uploads_nothing(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    path = tmp_path / "model.safetensors"
    save(path, model_tensors())
    first = push_version(store, path)
    chunks = first.files[0].chunks
    assert len(store.count_puts()) == len(chunks)

    again = push_version(store, path)
    assert store.count_puts() == []
    assert [chunk.key for chunk in again.files[0].chunks] == [chunk.key for chunk in chunks]


def test_one_tensor_changed_uploads_its_chunks(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    path = tmp_path / "model.safetensors"
    tensors = model_tensors()
    save(path, tensors)
    push_version(store, path)
    store.count_puts()

    for name in ("layers.2.attn", "embed"):
        tensors[name] = tensors[name] + 1
        save(path, tensors)
        manifest = push_version(store, path)
        start, end = tensor_span(path, name)
        covering = {
            chunk.key for chunk in manifest.files[0].chunks if chunk.offset < end and chunk.end > start
        }
        uploaded = store.count_puts()
        assert set(uploaded) == covering, name
        assert len(uploaded) == len(covering), name


def test_header_growth_uploads_header_chunk(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    path = tmp_path / "model.safetensors"
    tensors = model_tensors()
    save(path, tensors)
    before = push_version(store, path)
    store.count_puts()

    save(path, tensors, metadata={"format": "pt", "note": "fine-tuned " * 200})
    after = push_version(store, path)
    uploaded = store.count_puts()
    assert uploaded == [after.files[0].chunks[0].key]
    assert after.files[0].chunks[0].offset == 0
    before_keys = [chunk.key for chunk in before.files[0].chunks[1:]]
    assert [chunk.key for chunk in after.files[0].chunks[1:]] == before_keys


def test_torch_pickle_growth_uploads_metadata_chunks(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    path = tmp_path / "model.pt"
    tensors = model_tensors()
    torch.save(tensors, path)
    before = push_version(store, path)
    store.count_puts()

    # A training script adds a non-tensor entry: data.pkl grows and every
    # tensor record moves, but only the pickle's and the directory's chunks change.
    torch.save({**tensors, "training_note": "resumed at step 12000 " * 20}, path)
    after = push_version(store, path)
    uploaded = store.count_puts()
    after_chunks = after.files[0].chunks
    assert sorted(uploaded) == sorted([after_chunks[0].key, after_chunks[-1].key])
    assert after_chunks[1].offset > before.files[0].chunks[1].offset
    before_keys = [chunk.key for chunk in before.files[0].chunks[1:-1]]
    assert [chunk.key for chunk in after_chunks[1:-1]] == before_keys


def test_repeated_chunk_uploaded_once(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    path = tmp_path / "model.safetensors"
    save(path, {"a": torch.zeros(100_000), "b": torch.zeros(100_000)})
    manifest = push_version(store, path)
    keys = [chunk.key for chunk in manifest.files[0].chunks]
    assert len(set(keys)) < len(keys)
    assert sorted(store.count_puts()) == sorted(set(keys))


def test_repeated_file_counted_once(tmp_path, local_store):
    source = tmp_path / "model"
    source.mkdir()
    data = os.urandom(3 * CHUNK)
    for name in ("a.bin", "b.bin", "c.bin"):
        (source / name).write_bytes(data)

    result = run_shardfs(
        "push", "--store", local_store, "--chunk-size", "64KiB", str(source), "org/copies"
    )
    assert result.returncode == 0, result.stderr
    # Three files of three equal-content chunks each: three distinct chunks,
    # stored once, none of them in the store before.
    assert summary_counts(result.stderr) == (3, 0)
    assert "576.0 KiB read" in result.stderr
    stored = sum(
        os.path.getsize(os.path.join(directory, name))
        for directory, _, names in os.walk(os.path.join(local_store, "chunks"))
        for name in names
    )
    assert f"{stored / 1024:.1f} KiB stored" in result.stderr
    listed = run_shardfs("ls", local_store)
    assert listed.returncode == 0, listed.stderr
    assert f"{stored / 1024:.1f} KiB stored" in listed.stdout


@pytest.mark.parametrize("change", ["in place", "appended"])
def test_source_changed_during_push_fails(tmp_path, monkeypatch, change):
    store = CountingStore(str(tmp_path / "store"))
    path = tmp_path / "model.safetensors"
    tensors = model_tensors()
    save(path, tensors)
    before = push_version(store, path)
    tensors["embed"] = tensors["embed"] + 1
    save(path, tensors)
    submit = push_module._ChunkUploader.submit
    written = []

    def submit_then_write(self, source, plan, data):
        # A writer changes the file after its first chunk was read.
        if not written:
            with open(path, "r+b" if change == "in place" else "ab") as file:
                file.seek(0, os.SEEK_END)
                file.seek(file.tell() - (100 if change == "in place" else 0))
                file.write(os.urandom(100))
            written.append(plan)
        return submit(self, source, plan, data)

    monkeypatch.setattr(push_module._ChunkUploader, "submit", submit_then_write)
    with pytest.raises(UsageError, match="changed while pushing"):
        push_version(store, path)
    # The model keeps the version pushed before.
    manifest = store.get(manifest_object_key("org/model"))
    assert manifest == push_module.to_json(before)


def summary_counts(stderr: str) -> tuple[int, int]:
    match = re.search(r"(\d+) chunks? \((\d+) already present\)", stderr)
    assert match, stderr
    return int(match.group(1)), int(match.group(2))


def test_push_summary_reports_dedup(tmp_path, local_store):
    path = tmp_path / "model.safetensors"
    tensors = model_tensors()
    save(path, tensors)
    common = ("push", "--store", local_store, "--chunk-size", "64KiB", str(path), "org/model")

    first = run_shardfs(*common)
    assert first.returncode == 0, first.stderr
    total, present = summary_counts(first.stderr)
    assert present == 0

    unchanged = run_shardfs(*common)
    assert summary_counts(unchanged.stderr) == (total, total)
    assert " 0 B uploaded" in unchanged.stderr

    save(path, tensors, metadata={"note": "longer header"})
    grown = run_shardfs(*common)
    assert summary_counts(grown.stderr) == (total, total - 1)


def test_chunk_deleted_during_push_uploaded_again(tmp_path):
    class VanishingStore(CountingStore):
        # gc deletes each chunk between the push finding it and renewing it.
        def touch(self, key: str) -> None:
            self.delete(key)
            super().touch(key)

    store = VanishingStore(str(tmp_path / "store"))
    path = tmp_path / "model.safetensors"
    save(path, model_tensors())
    first = push_version(store, path)
    store.count_puts()

    push_version(store, path)
    assert sorted(store.count_puts()) == sorted(chunk.key for chunk in first.files[0].chunks)
    for chunk in first.files[0].chunks:
        assert store.stat(f"chunks/{chunk.key[:2]}/{chunk.key}") is not None


class TouchCountingStore(CountingStore):
    def __init__(self, root: str):
        super().__init__(root)
        self.touches = 0

    def touch(self, key: str) -> None:
        self.touches += 1
        super().touch(key)


def test_short_push_renews_each_chunk_once(tmp_path):
    store = TouchCountingStore(str(tmp_path / "store"))
    path = tmp_path / "model.safetensors"
    save(path, model_tensors())
    first = push_version(store, path)
    assert store.touches == 0

    push_version(store, path)
    assert store.touches == len(first.files[0].chunks)


def push_long(store, tmp_path, monkeypatch) -> set[str]:
    """Push a model as if it ran for hours; return the keys of its chunks."""
    # Every chunk then counts as confirmed too long ago.
    monkeypatch.setattr(push_module, "RENEW_AGAIN_AFTER_S", -1.0)
    path = tmp_path / "model.safetensors"
    save(path, model_tensors())
    manifest = push_version(store, path)
    return {chunk.key for chunk in manifest.files[0].chunks}


def test_long_push_renews_chunks_before_gc(tmp_path, monkeypatch):
    class AgingStore(TouchCountingStore):
        # Each chunk is two hours old when the push is ready to write its
        # manifest, and gc with a one-hour grace runs at that moment.
        def __init__(self, root: str):
            super().__init__(root)
            self.collected = None

        def put(self, key: str, data: bytes) -> None:
            super().put(key, data)
            if key.startswith(CHUNKS_PREFIX):
                two_hours_ago = time.time() - 2 * 3600
                os.utime(self._path(key), (two_hours_ago, two_hours_ago))

        def get(self, key: str) -> bytes:
            if key == manifest_object_key("org/model") and self.collected is None:
                self.collected = collect_garbage(self, grace_s=3600)
            return super().get(key)

    store = AgingStore(str(tmp_path / "store"))
    keys = push_long(store, tmp_path, monkeypatch)

    assert store.collected.deleted == 0
    assert store.collected.kept_young == len(keys)
    assert store.touches == len(keys)
    report = verify_models(store)
    assert report.models == 1
    assert report.problems == []


def test_long_push_uploads_chunks_gc_deleted(tmp_path, monkeypatch):
    class CollectedStore(CountingStore):
        # gc deletes each chunk right after its first upload.
        def put(self, key: str, data: bytes) -> None:
            again = key.rsplit("/", 1)[1] in self.chunk_puts
            super().put(key, data)
            if key.startswith(CHUNKS_PREFIX) and not again:
                self.delete(key)

    store = CollectedStore(str(tmp_path / "store"))
    keys = push_long(store, tmp_path, monkeypatch)

    # Each chunk is uploaded, deleted, and uploaded again.
    assert sorted(store.count_puts()) == sorted(list(keys) * 2)
    report = verify_models(store)
    assert report.models == 1
    assert report.problems == []

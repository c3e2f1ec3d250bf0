"""One timed action of the benchmark, run in a fresh process.

Usage::

    worker.py load LOADER PATH
    worker.py download ENDPOINT BUCKET KEY DEST THREADS CHUNK_BYTES
    worker.py random-access PATH COUNT SEED

Each action prints one JSON object on stdout. The timer starts after the
imports, so interpreter start-up and ``import torch`` are not counted.
"""

import hashlib
import json
import random
import sys
import time

LOADERS = ("safetensors", "torch", "torch-mmap")


def _sample_digest(tensors: dict) -> str:
    """Hash names, shapes and three 4 KiB samples of each tensor's bytes.

    Cheap enough to run after every load, and enough to tell a wrong offset
    or a wrong file from the right one, but it does not check every byte.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        middle = len(data) // 2
        for start in (0, middle, max(0, len(data) - 4096)):
            digest.update(data[start : start + 4096].tobytes())
    return digest.hexdigest()


def _materialize(tensors: dict) -> tuple[dict, int]:
    # Loaders may return tensors backed by a lazy mapping of the file. A clone
    # copies every byte into this process, so the load is complete.
    copies = {}
    total = 0
    for name in list(tensors):
        copy = tensors.pop(name).clone()
        total += copy.numel() * copy.element_size()
        copies[name] = copy
    return copies, total


def load(loader: str, path: str) -> dict:
    import safetensors.torch
    import torch

    started = time.perf_counter()
    if loader == "safetensors":
        tensors = safetensors.torch.load_file(path)
    elif loader == "torch":
        tensors = torch.load(path, weights_only=True)
    elif loader == "torch-mmap":
        tensors = torch.load(path, mmap=True, weights_only=True)
    else:
        raise SystemExit(f"invalid loader {loader!r}: expected one of {', '.join(LOADERS)}")
    copies, total = _materialize(tensors)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": total, "tensors": len(copies), "digest": _sample_digest(copies)}


def download(endpoint: str, bucket: str, key: str, dest: str, threads: str, chunk: str) -> dict:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=endpoint)
    config = TransferConfig(
        max_concurrency=int(threads),
        multipart_threshold=int(chunk),
        multipart_chunksize=int(chunk),
        use_threads=True,
    )
    started = time.perf_counter()
    client.download_file(bucket, key, dest, Config=config)
    return {"seconds": time.perf_counter() - started}


def random_access(path: str, count: str, seed: str) -> dict:
    # safe_open imports torch on first use, so importing it here keeps the
    # import out of the timed reads.
    import torch  # noqa: F401
    from safetensors import safe_open

    started = time.perf_counter()
    total = 0
    with safe_open(path, framework="pt") as handle:
        names = sorted(handle.keys())
        chosen = random.Random(int(seed)).sample(names, min(int(count), len(names)))
        for name in chosen:
            tensor = handle.get_tensor(name).clone()
            total += tensor.numel() * tensor.element_size()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": total, "tensors": len(chosen), "names": chosen}


ACTIONS = {"load": load, "download": download, "random-access": random_access}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ACTIONS:
        print(f"usage: worker.py {{{','.join(ACTIONS)}}} ARGS...", file=sys.stderr)
        return 2
    result = ACTIONS[argv[0]](*argv[1:])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

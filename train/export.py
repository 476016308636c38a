"""``python -m train.export CHECKPOINT --out adapter.safetensors``: a training checkpoint → release files.

``CHECKPOINT`` is a checkpoint folder (``…/checkpoints/step-00001000``), a training output folder
(its latest checkpoint is used) or an accelerate ``model.safetensors``/``ema.safetensors``; a
checkpoint with an EMA exports the EMA unless ``--weights raw``. Every ``--out`` is written in
the layout ``ConsistentIDAdapter.load`` and the original code read: ``.bin`` = the release's nested
``torch.save`` dict (``image_proj`` for SD1.5, ``image_proj_model`` for SDXL), ``.safetensors`` = the
flat prefixed form. Each file is loaded back and compared with the checkpoint before the command
reports success.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from consistentid_core import CheckpointFormatError, ConsistentIDAdapter
from consistentid_core.checkpoint.io import ReleaseStateDicts

from .checkpointing import STATE_FILE, find_checkpoint
from .ema import EMA_FILE

logger = logging.getLogger("train.export")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PREFIX = "adapter."
MODEL_FILE = "model.safetensors"


def checkpoint_weights(path: str | Path, weights: str = "auto") -> Path:
    """The weights file a checkpoint argument refers to.

    ``weights``: ``raw`` = ``model.safetensors``; ``ema`` = ``ema.safetensors`` (an error if the run
    kept no EMA); ``auto`` = the EMA when the checkpoint has one, else the raw weights.
    """
    path = Path(path)
    if path.is_file():
        return path
    folder = path if (path / MODEL_FILE).is_file() else find_checkpoint(path, "auto")
    if folder is None or not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{path}: no training checkpoint ({MODEL_FILE}) found")
    if weights == "raw":
        return folder / MODEL_FILE
    if (folder / EMA_FILE).is_file():
        return folder / EMA_FILE
    if weights == "ema":
        raise FileNotFoundError(f"{folder} has no {EMA_FILE}: the run was trained without train.ema_decay")
    return folder / MODEL_FILE


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


def adapter_from_training_state(state: dict[str, torch.Tensor], source: str = "checkpoint", pairing: str = "original") -> ConsistentIDAdapter:
    adapter = ConsistentIDAdapter.from_state_dicts(release_state_dicts(state, source), source=source)
    adapter.pairing = pairing
    return adapter


def trained_pairing(weights: Path) -> str:
    """``model.pairing`` of the run that wrote a checkpoint (its ``trainer_state.json``), else ``original``."""
    state = weights.parent / STATE_FILE
    if not state.is_file():
        return "original"
    return json.loads(state.read_text(encoding="utf-8")).get("config", {}).get("model", {}).get("pairing", "original")


def load_trained_adapter(path: str | Path, weights: str = "auto") -> ConsistentIDAdapter:
    from safetensors.torch import load_file

    found = checkpoint_weights(path, weights)
    pairing = trained_pairing(found)
    logger.info("exporting %s (%s pairing)", found, pairing)
    return adapter_from_training_state(load_file(str(found)), str(found), pairing)


def export(checkpoint: str | Path, outputs: list[str | Path], dtype: str = "fp32", weights: str = "auto") -> ConsistentIDAdapter:
    adapter = load_trained_adapter(checkpoint, weights).to(DTYPES[dtype])
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
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="EMA or raw weights (default: the EMA when the run kept one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export(args.checkpoint, args.out, args.dtype, args.weights)


if __name__ == "__main__":
    main()

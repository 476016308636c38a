"""Atomic, resumable training checkpoints on top of ``accelerate.save_state``.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000500`` holding what accelerate saves
(adapter weights ``model.safetensors``, optimizer, LR scheduler, gradient scaler, the RNG states of
every process), ``ema.safetensors`` when ``train.ema_decay`` is on, and ``trainer_state.json``
(optimizer step, counters, the run shape that fixes the data position, config). It is
written under a temporary name and renamed when complete, and ``checkpoints/latest`` (a one-line
file) is replaced atomically afterwards, so an interruption at any moment leaves the previous
checkpoint intact and ``resume: auto`` never picks a half-written one. On several nodes the output
folder must be on a shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: p.name)


def save_checkpoint(
    accelerator: Any, output_dir: str | Path, step: int, trainer_state: dict[str, Any], keep: int,
    extra_tensors: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Collective: every process must call it. Returns the checkpoint folder.

    ``extra_tensors`` maps file names (``ema.safetensors``) to tensors the main process writes beside
    accelerate's files, inside the same atomic rename."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        for name, tensors in (extra_tensors or {}).items():
            save_file(tensors, str(tmp / name))
        _write_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the latest complete one (or none), else a path."""
    if resume in (None, "", "none", "null"):
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"resume: {path} is not a complete training checkpoint (no {STATE_FILE})")
        return path
    root = Path(output_dir) / CHECKPOINTS
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text(encoding="utf-8").strip()
        if (named / STATE_FILE).is_file():
            return named
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint: ``state`` (step, counters), ``shape`` (the run shape), ``config``."""
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, Any]:
    """Collective: restore accelerate's state and return ``trainer_state.json``."""
    accelerator.load_state(str(path))
    return read_trainer_state(path)

"""The example workflows (``workflows/*_api.json``) at a size tiny models run in seconds on a CPU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SMALL_STEPS = 3
SMALL_SCALE = 4  # latents 4x smaller per side than the workflow asks for

__all__ = ["WORKFLOWS", "at_small_size", "load_api", "names"]


def names() -> list[str]:
    """Every example that has an API-format twin."""
    return sorted(path.name[: -len("_api.json")] for path in WORKFLOWS.glob("*_api.json"))


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}_api.json").read_text(encoding="utf-8"))


def at_small_size(prompt: dict, scale: int = SMALL_SCALE, steps: int = SMALL_STEPS) -> dict:
    """The same graph with a latent ``scale`` times smaller per side (64 px at least) and ``steps``
    sampling steps (tiny models, CPU)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = max(64, inputs["width"] // scale)
            inputs["height"] = max(64, inputs["height"] // scale)
        if node["class_type"] == "KSampler":
            inputs["steps"] = steps
    return prompt

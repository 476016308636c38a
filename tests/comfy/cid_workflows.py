"""Example workflows for the tests: API twins at test size, and UI → API conversion."""

from __future__ import annotations

import copy
import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TEST_STEPS = 3
TEST_SCALE = 4  # latents 4x smaller per side than the workflow asks for


def names() -> list[str]:
    return sorted(path.name[: -len("_api.json")] for path in WORKFLOWS.glob("*_api.json"))


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}_api.json").read_text())


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def at_test_size(prompt: dict) -> dict:
    """The same graph with a small latent and a few sampling steps (tiny models, CPU)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = max(64, inputs["width"] // TEST_SCALE)
            inputs["height"] = max(64, inputs["height"] // TEST_SCALE)
        if node["class_type"] == "KSampler":
            inputs["steps"] = TEST_STEPS
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def ui_to_api(ui: dict, node_classes: dict) -> dict:
    """Convert a UI-format workflow to API format with the nodes' own input definitions."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        definition = node_classes[node["type"]].INPUT_TYPES()
        specs = {**definition.get("required", {}), **definition.get("optional", {})}
        inputs = {}
        values = list(node.get("widgets_values", []))
        for name, spec in specs.items():
            if not _is_widget(spec) or not values:
                continue
            inputs[name] = values.pop(0)
            options = spec[1] if len(spec) > 1 else {}
            if options.get("control_after_generate"):
                values.pop(0)
            if options.get("image_upload"):
                values.pop(0)
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt

"""API-format workflows for the headless runner: loading, ``--set`` overrides, error messages.

Pure Python (no ComfyUI import), so argument handling and messages are tested in CI.
An API-format workflow is ``{node_id: {"class_type": str, "inputs": {...}, "_meta": {"title": str}}}``;
links are ``[source_node_id, output_index]`` (ComfyUI: Workflow > Export (API)).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Override", "WorkflowError", "apply_overrides", "describe_node", "format_execution_error",
    "format_validation_errors", "load_workflow", "parse_override", "parse_value", "resolve_node",
]


class WorkflowError(Exception):
    """A user-facing problem with the workflow file or a ``--set``; the message says what to do."""


@dataclass(frozen=True)
class Override:
    """``NODE.INPUT=VALUE``: NODE is a node id, a ``_meta.title`` or a class name used once."""

    node: str
    input: str
    value: Any
    text: str  # the argument as given, for messages


def load_workflow(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowError(f"workflow file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorkflowError(f"{path} is not a JSON file ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        raise WorkflowError(
            f"{path} is a UI workflow (the format the editor saves); the runner needs the API format: "
            "in ComfyUI use Workflow > Export (API)"
        )
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a /prompt request body
    if not isinstance(data, dict) or not data or not all(
        isinstance(node, dict) and "class_type" in node for node in data.values()
    ):
        raise WorkflowError(f"{path} is not an API-format workflow (every entry needs a class_type)")
    return {str(node_id): node for node_id, node in data.items()}


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, null, lists, quoted strings), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(text: str) -> Override:
    target, sep, raw = text.partition("=")
    node, dot, name = target.rpartition(".")
    if not sep or not dot or not node or not name:
        raise WorkflowError(f"--set {text!r}: expected NODE.INPUT=VALUE, e.g. --set 3.seed=42 or --set KSampler.steps=20")
    return Override(node.strip(), name.strip(), parse_value(raw), text)


def describe_node(workflow: Mapping[str, dict], node_id: str) -> str:
    """``#3 KSampler`` or ``#3 KSampler "Sampler"`` (with its title when it has one of its own)."""
    node = workflow.get(node_id, {})
    class_type = node.get("class_type", "?")
    title = (node.get("_meta") or {}).get("title")
    return f"#{node_id} {class_type}" + (f' "{title}"' if title and title != class_type else "")


def resolve_node(workflow: Mapping[str, dict], ref: str) -> str:
    """The node id ``ref`` names: an id, else a unique title, else a unique class_type."""
    if ref in workflow:
        return ref
    for key in (lambda n: (n.get("_meta") or {}).get("title"), lambda n: n.get("class_type")):
        matches = [node_id for node_id, node in workflow.items() if key(node) == ref]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise WorkflowError(f"{ref!r} names {len(matches)} nodes ({', '.join(describe_node(workflow, m) for m in matches)}); use the node id")
    known = ", ".join(describe_node(workflow, node_id) for node_id in workflow)
    raise WorkflowError(f"no node {ref!r} in the workflow; nodes: {known}")


def apply_overrides(
    workflow: Mapping[str, dict],
    overrides: Iterable[Override],
    known_inputs: Callable[[str], set[str] | None] | None = None,
) -> dict[str, dict]:
    """A copy of ``workflow`` with every override applied.

    An input must already be in the workflow or, when ``known_inputs(class_type)`` is given, be one
    the node class declares (typos fail instead of being ignored). A string input keeps a string
    value even when it looks like a number (``--set 6.text=42``).
    """
    result = copy.deepcopy(dict(workflow))
    for override in overrides:
        node_id = resolve_node(result, override.node)
        node = result[node_id]
        inputs = node.setdefault("inputs", {})
        declared = known_inputs(node["class_type"]) if known_inputs else None
        if override.input not in inputs and (declared is None or override.input not in declared):
            names = sorted(set(inputs) | (declared or set()))
            raise WorkflowError(f"--set {override.text}: {describe_node(result, node_id)} has no input {override.input!r}; "
                                f"its inputs: {', '.join(names) or 'none'}")
        value = override.value
        current = inputs.get(override.input)
        if isinstance(current, str) and not isinstance(value, str) and not isinstance(value, (list, dict)):
            value = override.text.partition("=")[2]
        inputs[override.input] = value
    return result


def format_validation_errors(workflow: Mapping[str, dict], error: Mapping | None, node_errors: Mapping) -> list[str]:
    """Lines for ComfyUI's ``validate_prompt`` result: one per problem, naming node and input."""
    lines = []
    for node_id, entry in node_errors.items():
        for reason in entry.get("errors", []):
            details = reason.get("details") or ""
            lines.append(f"{describe_node(workflow, str(node_id))}: {reason.get('message', 'invalid')}" + (f": {details}" if details else ""))
    if not lines and error:
        details = error.get("details") or ""
        lines.append(f"{error.get('message', 'invalid workflow')}" + (f" ({details})" if details else ""))
    return lines


def format_execution_error(workflow: Mapping[str, dict], message: Mapping) -> str:
    """One message for ComfyUI's ``execution_error`` event: node, exception type and text, no traceback."""
    node_id = str(message.get("node_id"))
    exception_type = str(message.get("exception_type", "Exception")).rsplit(".", 1)[-1]
    text = str(message.get("exception_message", "")).strip()
    return f"{describe_node(workflow, node_id)} failed: {exception_type}: {text}"
